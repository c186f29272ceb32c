"""Running a Flax model (linen or nnx) as a pure function that reports every layer's output.

A layer is a module call. Both adapters record, in the order the calls *finish* (which is forward
order for leaf layers), the module path, its class name, whether it called other modules (then it
is not a leaf) and its output, optionally plus a perturbation so that ``jax.grad`` with respect to
the perturbations gives the gradient reaching that output.

- linen: ``flax.linen.intercept_methods`` sees every ``__call__`` of every module; the model runs
  through ``model.apply(..., mutable=True)`` so batch-norm layers in training mode work without
  the caller naming collections.
- nnx: the model is split into its ``nnx.Param`` state and everything else, merged afresh in each
  run (the caller's model is never mutated), and the ``__call__`` of each module class in the graph
  is wrapped for the duration of the call (the same device ``nnx.capture`` uses), recording only
  calls on the merged instances.

Parameters are exchanged as a flat ``dict`` from ``"path/to/kernel"`` to array, the same for both
frameworks, so statistics, gradients, optimizers and LSUV work on one representation.

flax is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


@dataclasses.dataclass
class Record:
    """One recorded module call."""

    name: str
    path: tuple
    kind: str
    leaf: bool
    value: jax.Array
    kernel: str | None  # flat name of the module's kernel parameter, if it has one
    bias: str | None  # flat name of its bias parameter, if it has one


def path_name(path: tuple) -> str:
    """``("block", 0, "kernel") -> "block/0/kernel"``."""
    return "/".join(str(p) for p in path)


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

    def enter(self) -> list[int]:
        if self.stack:
            self.stack[-1][0] += 1
        frame = [0]
        self.stack.append(frame)
        return frame

    def leave(self, frame: list[int], path: tuple, kind: str, out: Any) -> Any:
        self.stack.pop()
        if not _is_float_array(out):
            return out
        index = len(self.records)
        if self.eps is not None:
            out = out + self.eps[index].astype(out.dtype)
        base = path_name(path) or "<root>"
        count = self.seen.get(base, 0) + 1
        self.seen[base] = count
        name = base if count == 1 else f"{base}#{count}"
        prefix = path_name(path)
        prefix = prefix + "/" if prefix else ""
        kernel = prefix + "kernel"
        bias = prefix + "bias"
        self.records.append(
            Record(
                name=name,
                path=path,
                kind=kind,
                leaf=frame[0] == 0,
                value=out,
                kernel=kernel if kernel in self.param_names else None,
                bias=bias if bias in self.param_names else None,
            )
        )
        return out


class Adapter:
    """A Flax model as ``run(params, x, eps=None) -> (output, records, new_other_state)``."""

    framework: str
    params: Params

    def run(
        self, params: Params, x: Any, eps: list[jax.Array] | None = None, other: Any = None
    ) -> tuple[Any, list[Record], Any]:
        raise NotImplementedError

    other: Any


class LinenAdapter(Adapter):
    """``flax.linen`` module plus its variables."""

    framework = "linen"

    def __init__(self, model: Any, variables: Mapping[str, Any], model_kwargs: Mapping[str, Any]):
        from flax import traverse_util

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
        from flax import traverse_util

        nested = traverse_util.unflatten_dict({self.paths[n]: v for n, v in params.items()})
        return {**(self.other if other is None else other), "params": nested}

    def run(self, params, x, eps=None, other=None):
        from flax import linen as nn

        rec = _Recorder(eps, params)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            frame = rec.enter()
            try:
                out = next_fun(*args, **kwargs)
            except BaseException:
                rec.stack.pop()
                raise
            return rec.leave(frame, tuple(context.module.path), type(context.module).__name__, out)

        with nn.intercept_methods(interceptor):
            out, state = self.model.apply(
                self.variables(params, other), x, mutable=True, **self.model_kwargs
            )
        state = {k: v for k, v in dict(state).items() if k not in ("params", "intermediates")}
        return out, rec.records, state


@contextlib.contextmanager
def _wrap_calls(modules: Mapping[int, tuple], on_call: Callable[..., Any]):
    """Wraps ``__call__`` of the classes of ``modules`` (id -> path), restoring it afterwards."""
    classes = {type(m) for _, m in modules.values()}
    originals = {}
    for cls in classes:
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


_MISSING = object()


class NnxAdapter(Adapter):
    """``flax.nnx`` module; runs on fresh merged copies, never mutating the original."""

    framework = "nnx"

    def __init__(self, model: Any, model_kwargs: Mapping[str, Any]):
        from flax import nnx

        self.model = model
        self.model_kwargs = dict(model_kwargs)
        self.graphdef, params, self.other = nnx.split(model, nnx.Param, ...)
        flat = list(nnx.to_flat_state(params))
        self.paths = {path_name(k): k for k, _ in flat}
        self.template = {path_name(k): v for k, v in flat}
        self.params = {path_name(k): v.get_value() for k, v in flat}

    def state(self, params: Params) -> Any:
        from flax import nnx

        return nnx.from_flat_state(
            {self.paths[n]: self.template[n].replace(v) for n, v in params.items()}
        )

    def run(self, params, x, eps=None, other=None):
        from flax import nnx

        # Fresh Variables at the current trace level: the caller's model is never touched.
        other = jax.tree.map(lambda a: a, self.other if other is None else other)
        model = nnx.merge(self.graphdef, self.state(params), other)
        modules = {id(m): (tuple(p), m) for p, m in nnx.iter_modules(model)}
        rec = _Recorder(eps, params)

        def on_call(fn, module, path, args, kwargs):
            frame = rec.enter()
            try:
                out = fn(module, *args, **kwargs)
            except BaseException:
                rec.stack.pop()
                raise
            return rec.leave(frame, path, type(module).__name__, out)

        with _wrap_calls(modules, on_call):
            out = model(x, **self.model_kwargs)
        _, _, other = nnx.split(model, nnx.Param, ...)
        return out, rec.records, other

    def update(self, params: Params) -> None:
        """Writes ``params`` into the original model."""
        from flax import nnx

        nnx.update(self.model, self.state(params))


def adapter(model: Any, variables: Any, model_kwargs: Mapping[str, Any] | None) -> Adapter:
    """Picks the adapter for a linen module (with ``variables``) or an nnx module (without)."""
    kwargs = dict(model_kwargs or {})
    module_name = type(model).__module__
    try:
        from flax import linen as nn
        from flax import nnx
    except ImportError as err:  # pragma: no cover - flax is a dependency
        raise ImportError("jaxinit's model diagnostics need flax.") from err
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
        f"{type(model).__name__} from {module_name}."
    )
