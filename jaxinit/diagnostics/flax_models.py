"""Flax models (linen or nnx) as pure functions that report every layer's output.

The only diagnostics module that imports flax; the others import it when a model diagnostic is
called, so ``import jaxinit`` does not load flax.

A layer is a module call. Both adapters record, in the order the calls *finish* (forward order
for leaf layers), the module path, its class name, whether it called other modules (then it is
not a leaf) and its output, optionally plus a perturbation, so that ``jax.grad`` with respect to
the perturbations is the gradient reaching that output.

- linen: ``flax.linen.intercept_methods`` sees every ``__call__``; the model runs through
  ``model.apply(..., mutable=True)`` so batch norm in training mode works.
- nnx: the model is split into its ``nnx.Param`` state and the rest, merged afresh in each run
  (the caller's model is never mutated), and the ``__call__`` of each module class in the graph
  is wrapped for the duration of the run, recording only calls on the merged instances.

Parameters are a flat ``dict`` from ``"path/to/kernel"`` to array for both frameworks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util

Params = dict[str, jax.Array]


@dataclasses.dataclass
class Record:
    """One recorded module call.

    Attributes:
        name: the module path joined by ``/`` (``<root>`` for the top module); a module called
            again gets ``#2``, ``#3``, ... appended.
        path: the module path.
        kind: the module's class name.
        leaf: whether the call made no other module call.
        value: the call's output.
        kernel: flat name of the module's kernel parameter, or None.
        bias: flat name of its bias parameter, or None.
    """

    name: str
    path: tuple
    kind: str
    leaf: bool
    value: Any
    kernel: str | None
    bias: str | None


def path_name(path: tuple) -> str:
    """Joins a path: ``("block", 0, "kernel") -> "block/0/kernel"``."""
    return "/".join(str(p) for p in path)


def loss_value(loss_fn: Callable[..., Any], out: Any, y: Any) -> jax.Array:
    """Returns ``loss_fn(out, y)`` (``loss_fn(out)`` when ``y`` is None), checked to be a scalar."""
    loss = loss_fn(out) if y is None else loss_fn(out, y)
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(f"loss_fn must return a scalar; got shape {loss.shape}.")
    return loss


def _is_float_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact) and x.ndim >= 1


class _Recorder:
    """Bookkeeping shared by both adapters: nesting, leaf detection, naming, perturbations."""

    def __init__(self, eps: list[jax.Array] | None, param_names: Mapping[str, Any]):
        self.records: list[Record] = []
        self.stack: list[list[int]] = []
        self.eps = eps
        self.param_names = param_names
        self.seen: dict[str, int] = {}

    def call(self, fn: Callable[[], Any], path: tuple, kind: str) -> Any:
        """Runs one module call ``fn()`` and records its output."""
        if self.stack:
            self.stack[-1][0] += 1
        frame = [0]
        self.stack.append(frame)
        try:
            out = fn()
        finally:
            self.stack.pop()
        if not _is_float_array(out):
            return out
        if self.eps is not None:
            out = out + self.eps[len(self.records)].astype(out.dtype)
        prefix = path_name(path)
        base = prefix or "<root>"
        count = self.seen.get(base, 0) + 1
        self.seen[base] = count
        prefix = f"{prefix}/" if prefix else ""
        self.records.append(
            Record(
                name=base if count == 1 else f"{base}#{count}",
                path=path,
                kind=kind,
                leaf=frame[0] == 0,
                value=out,
                kernel=self._param(prefix + "kernel"),
                bias=self._param(prefix + "bias"),
            )
        )
        return out

    def _param(self, name: str) -> str | None:
        return name if name in self.param_names else None


class Adapter:
    """A Flax model as ``run(params, x, eps=None, other=None) -> (output, records, new_other)``.

    Attributes:
        framework: ``"linen"`` or ``"nnx"``.
        params: the model's parameters, flat.
        other: its other state (batch statistics, ...), passed back to :meth:`run`.
    """

    framework: str
    params: Params
    other: Any

    def run(
        self, params: Params, x: Any, eps: list[jax.Array] | None = None, other: Any = None
    ) -> tuple[Any, list[Record], Any]:
        """Runs the model on ``x``; ``eps`` (one array per record) is added to the outputs."""
        raise NotImplementedError

    def trace(self, params: Params, x: Any) -> list[Record]:
        """The records of one run, traced abstractly: values are ``jax.ShapeDtypeStruct``."""
        meta: list[list[Record]] = []

        def values(p):
            _, records, _ = self.run(p, x)
            meta.append(records)
            return [r.value for r in records]

        shapes = jax.eval_shape(values, params)
        return [dataclasses.replace(r, value=s) for r, s in zip(meta[-1], shapes, strict=True)]

    def gradients(
        self, params: Params, x: Any, y: Any, loss_fn: Callable[..., Any]
    ) -> tuple[jax.Array, Params, list[Record], list[jax.Array]]:
        """Returns the loss, its parameter gradients, the records, and its gradient per record."""
        eps = [jnp.zeros(r.value.shape, r.value.dtype) for r in self.trace(params, x)]
        meta: list[list[Record]] = []

        def objective(p, eps):
            out, records, _ = self.run(p, x, eps)
            meta.append(records)
            return loss_value(loss_fn, out, y), [r.value for r in records]

        (loss, values), (grads, record_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True
        )(params, eps)
        records = [dataclasses.replace(r, value=v) for r, v in zip(meta[-1], values, strict=True)]
        return loss, grads, records, record_grads


class LinenAdapter(Adapter):
    """A ``flax.linen`` module plus its variables."""

    framework = "linen"

    def __init__(self, model: Any, variables: Mapping[str, Any], model_kwargs: Mapping[str, Any]):
        """Checks ``variables`` and flattens its ``params`` collection."""
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "variables must be the linen variables dict with a 'params' collection "
                f"(as returned by model.init); got {type(variables).__name__}"
                + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
                + "."
            )
        if "mutable" in model_kwargs:
            raise ValueError(
                "model_kwargs must not set 'mutable': the model runs with mutable=True so that "
                "batch norm in training mode works, and the caller's variables stay unchanged."
            )
        self.model = model
        self.model_kwargs = dict(model_kwargs)
        flat = traverse_util.flatten_dict(dict(variables["params"]))
        self.paths = {path_name(k): k for k in flat}
        self.params = {path_name(k): v for k, v in flat.items()}
        self.other = {k: v for k, v in variables.items() if k != "params"}

    def variables(self, params: Params, other: Any = None) -> dict[str, Any]:
        """The linen variables dict holding ``params`` (and ``other``, default the original)."""
        nested = traverse_util.unflatten_dict({self.paths[n]: v for n, v in params.items()})
        return {**(self.other if other is None else other), "params": nested}

    def run(self, params, x, eps=None, other=None):
        """Runs the model on ``x``; ``eps`` (one array per record) is added to the outputs."""
        rec = _Recorder(eps, params)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            module = context.module
            return rec.call(
                lambda: next_fun(*args, **kwargs), tuple(module.path), type(module).__name__
            )

        with nn.intercept_methods(interceptor):
            out, state = self.model.apply(
                self.variables(params, other), x, mutable=True, **self.model_kwargs
            )
        state = {k: v for k, v in dict(state).items() if k not in ("params", "intermediates")}
        return out, rec.records, state


_MISSING = object()


@contextlib.contextmanager
def _wrap_calls(modules: Mapping[int, tuple], on_call: Callable[..., Any]):
    """Wraps ``__call__`` of the classes of ``modules`` (id -> (path, module)), then restores it."""
    originals = {}
    for cls in {type(m) for _, m in modules.values()}:
        # The instance-level __call__ through the MRO (not the metaclass's, which builds objects).
        resolved = next(
            (b.__dict__["__call__"] for b in cls.__mro__ if "__call__" in b.__dict__), None
        )
        if resolved is not None:
            originals[cls] = (cls.__dict__.get("__call__", _MISSING), resolved)
    active: set[int] = set()

    def make(fn):
        def wrapper(self, *args, **kwargs):
            key = id(self)
            if key not in modules or key in active:
                return fn(self, *args, **kwargs)
            active.add(key)
            try:
                return on_call(fn, self, modules[key][0], args, kwargs)
            finally:
                active.discard(key)

        wrapper._jaxinit_capture = True
        return wrapper

    try:
        for cls, (_, resolved) in originals.items():
            cls.__call__ = make(resolved)
        yield
    finally:
        for cls, (own, _) in originals.items():
            if own is _MISSING:
                del cls.__call__
            else:
                cls.__call__ = own


class NnxAdapter(Adapter):
    """A ``flax.nnx`` module; runs on fresh merged copies, never mutating the original."""

    framework = "nnx"

    def __init__(self, model: Any, model_kwargs: Mapping[str, Any]):
        """Splits ``model`` into its flat ``nnx.Param`` state and everything else."""
        self.model = model
        self.model_kwargs = dict(model_kwargs)
        self.graphdef, params, self.other = nnx.split(model, nnx.Param, ...)
        flat = list(nnx.to_flat_state(params))
        self.paths = {path_name(k): k for k, _ in flat}
        self.template = {path_name(k): v for k, v in flat}
        self.params = {path_name(k): v.get_value() for k, v in flat}

    def state(self, params: Params) -> Any:
        """The ``nnx.State`` holding ``params``."""
        return nnx.from_flat_state(
            {self.paths[n]: self.template[n].replace(v) for n, v in params.items()}
        )

    def run(self, params, x, eps=None, other=None):
        """Runs the model on ``x``; ``eps`` (one array per record) is added to the outputs."""
        # Fresh Variables at the current trace level: the caller's model is never touched.
        other = jax.tree.map(lambda a: a, self.other if other is None else other)
        model = nnx.merge(self.graphdef, self.state(params), other)
        modules = {id(m): (tuple(p), m) for p, m in nnx.iter_modules(model)}
        rec = _Recorder(eps, params)

        def on_call(fn, module, path, args, kwargs):
            return rec.call(lambda: fn(module, *args, **kwargs), path, type(module).__name__)

        with _wrap_calls(modules, on_call):
            out = model(x, **self.model_kwargs)
        _, _, other = nnx.split(model, nnx.Param, ...)
        return out, rec.records, other

    def update(self, params: Params) -> None:
        """Writes ``params`` into the original model."""
        nnx.update(self.model, self.state(params))


def adapter(model: Any, variables: Any, model_kwargs: Mapping[str, Any] | None) -> Adapter:
    """Returns the adapter for a linen module (with ``variables``) or an nnx module (without)."""
    kwargs = dict(model_kwargs or {})
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                "a flax.linen model needs its variables: pass variables=model.init(...)."
            )
        return LinenAdapter(model, variables, kwargs)
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                "an nnx model holds its own state: variables must be None for nnx models."
            )
        return NnxAdapter(model, kwargs)
    raise TypeError(
        "model must be a flax.linen.Module (with variables) or a flax.nnx.Module; got "
        f"{type(model).__name__} from {type(model).__module__}."
    )
