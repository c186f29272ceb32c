"""Sharded initialization on 8 host devices (see conftest.py): layouts, values, memory, Flax."""

import contextlib
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_init import MESHES, N_DEV, auto_mesh
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji
import jaxinit.linen as jil
import jaxinit.nnx as jnnx
from jaxinit._src import sharding as sh

KEY = jax.random.key(42)

# (name, initializer, shape, spec): every public initializer.
INITS = [
    ("he_normal", ji.he_normal(), (16, 32), P("a", "b")),
    ("he_uniform", ji.he_uniform(), (16, 32), P("a", "b")),
    ("glorot_normal", ji.glorot_normal(), (16, 32), P("b", "a")),
    ("glorot_uniform", ji.glorot_uniform(), (16, 32), P(None, "a")),
    ("lecun_normal", ji.lecun_normal(), (8, 16, 32), P(None, "b", "a")),
    ("lecun_uniform", ji.lecun_uniform(), (16, 32), P("a", "b")),
    ("variance_scaling", ji.variance_scaling(0.5, "fan_avg", "normal"), (16, 32), P("a")),
    ("kaiming_normal", ji.kaiming_normal(nonlinearity="relu"), (16, 32), P("a", "b")),
    ("kaiming_uniform", ji.kaiming_uniform(a=math.sqrt(5)), (16, 32), P(("a", "b"))),
    ("xavier_normal", ji.xavier_normal(), (16, 32), P("a", "b")),
    ("xavier_uniform", ji.xavier_uniform(), (16, 32), P("a", "b")),
    ("normal", ji.normal(0.5), (16, 32), P("a", "b")),
    ("uniform", ji.uniform(low=-1.0, high=1.0), (16, 32), P("a", "b")),
    ("truncated_normal", ji.truncated_normal(0.02), (16, 32), P("a", "b")),
    ("sparse", ji.sparse(0.5), (16, 32), P("a", "b")),
    ("orthogonal", ji.orthogonal(), (16, 32), P("a", "b")),
    ("orthogonal_conv", ji.orthogonal(column_axis=-2), (3, 3, 8, 16), P(None, None, "b", "a")),
    ("delta_orthogonal", ji.delta_orthogonal(), (3, 3, 8, 16), P(None, None, "b", "a")),
    ("identity", ji.identity(), (3, 3, 8, 16), P(None, None, "b")),
    ("zeros", ji.zeros, (16, 32), P("a")),
    ("ones", ji.ones, (16, 32), P("a", "b")),
    ("constant", ji.constant(0.25), (16, 32), P("a")),
]
# One initializer per code path (partitioned draw, argsort, QR once, scatter, fill): every
# other initializer runs the same path as one of these. All of them run under jit on the Auto
# mesh; these run eagerly and jitted in every configuration.
EAGER = ("he_normal", "sparse", "orthogonal_conv", "delta_orthogonal", "identity", "zeros")

# (mesh kind, whether out_sharding is a bare PartitionSpec, whether the mesh is set, whether
# every initializer runs under jit or only those of EAGER, one per code path).
CONFIGS = {
    "auto named": ("auto", False, False, True),
    "explicit named under set_mesh": ("explicit", False, True, False),
    "explicit named outside set_mesh": ("explicit", False, False, False),
    "auto spec under set_mesh": ("auto", True, True, False),
    "explicit spec under set_mesh": ("explicit", True, True, False),
}


@functools.cache
def _reference():
    """The unsharded results of every initializer, in one jit outside any mesh."""
    out = jax.jit(lambda k: [init(k, shape) for _, init, shape, _ in INITS])(KEY)
    return [np.asarray(x) for x in out]


@pytest.mark.same_rounding
@pytest.mark.parametrize("config", CONFIGS)
def test_every_initializer_on_every_kind_of_sharding(config):
    kind, bare_spec, set_mesh, every = CONFIGS[config]
    mesh = MESHES[kind]()
    shardings = [spec if bare_spec else NamedSharding(mesh, spec) for _, _, _, spec in INITS]
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        jitted = jax.jit(
            lambda k: [
                init(k, shape, out_sharding=s) if every or name in EAGER else None
                for (name, init, shape, _), s in zip(INITS, shardings, strict=True)
            ]
        )(KEY)
        eager = {
            name: init(KEY, shape, out_sharding=s)
            for (name, init, shape, _), s in zip(INITS, shardings, strict=True)
            if name in EAGER
        }
    for (name, _, shape, spec), x_jit, want in zip(INITS, jitted, _reference(), strict=True):
        full_spec = P(*spec, *(None,) * (len(shape) - len(spec)))
        for how, x in (("jit", x_jit), ("eager", eager.get(name))):
            if x is None:  # not run in this configuration
                continue
            where = f"{name} {how} {config}"
            assert x.shape == shape and x.dtype == jnp.float32, where
            want_sharding = NamedSharding(mesh, full_spec)
            if how == "eager" or kind == "explicit":
                # The full-rank spec, as jax's samplers give, so that a jitted consumer sees one
                # sharding where P('a') and P('a', None) would compile it twice.
                assert x.sharding == want_sharding, (where, x.sharding)
            else:  # an Auto-mesh jit's output sharding is the outer jit's to canonicalise
                assert x.sharding.is_equivalent_to(want_sharding, len(shape)), where
            if kind == "explicit":  # the type carries the sharding
                assert jax.typeof(x).sharding.spec == full_spec, where
            # Each device holds exactly its block of the unsharded result.
            for shard in x.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], where)


def test_other_dtypes():
    mesh = auto_mesh()
    for init, shape, dtype in [
        (ji.he_normal(), (12, 6), jnp.bfloat16),
        (ji.orthogonal(), (12, 6), jnp.bfloat16),
        (ji.variance_scaling(1.0, "fan_in", "truncated_normal"), (12, 8), jnp.complex64),
    ]:
        s = NamedSharding(mesh, P("a"))
        ref = np.asarray(jax.jit(init, static_argnums=(1, 2))(KEY, shape, dtype))
        for f in (init, jax.jit(init, static_argnums=(1, 2, 3))):
            x = f(KEY, shape, dtype, s)
            assert x.dtype == dtype
            assert x.sharding.is_equivalent_to(s, len(shape))
            np.testing.assert_array_equal(np.asarray(x), ref)


def test_bad_out_sharding():
    init = ji.he_normal()
    with pytest.raises(ValueError, match="bare PartitionSpec but no mesh"):
        init(KEY, (8, 8), out_sharding=P("a"))
    with pytest.raises(TypeError, match="out_sharding must be"):
        init(KEY, (8, 8), out_sharding="a")
    with pytest.raises(ValueError, match="bare PartitionSpec but no mesh"):
        ji.orthogonal()(KEY, (8, 8), out_sharding=P("a"))


def _memory(f, *args):
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def test_he_normal_never_materialises_the_full_array():
    shape = (2048, 1024)
    full = 4 * math.prod(shape)
    shard = full / N_DEV
    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("d",))
    init = ji.he_normal()
    for s in (NamedSharding(mesh, P("d")), NamedSharding(mesh, P(None, "d"))):
        sharded = _memory(lambda k, s=s: init(k, shape, out_sharding=s), KEY)
        assert sharded <= 6 * shard
    # The measure sees the full array when there is one: the unsharded init holds it.
    assert _memory(lambda k: init(k, shape), KEY) >= full
    # Explicit axes under set_mesh, too.
    emesh = jax.make_mesh((N_DEV,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(emesh):
        sharded = _memory(lambda k: init(k, shape, out_sharding=P("d")), KEY)
    assert sharded <= 6 * shard


def test_orthogonal_in_jit_runs_one_qr_on_one_device():
    # A QR cannot be partitioned: inside jit, compute_once runs it under lax.cond on the first
    # device of the mesh only, where a sharding constraint would make every device run it.
    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("d",))
    s = NamedSharding(mesh, P("d"))
    shape = (256, 128)
    lowered = jax.jit(lambda k: ji.orthogonal()(k, shape, out_sharding=s)).lower(KEY)
    hlo = lowered.compile().as_text()
    assert "conditional" in hlo
    m = lowered.compile().memory_analysis()
    assert m.output_size_in_bytes == 4 * math.prod(shape) // N_DEV
    # What it guards against: without compute_once the QR is outside any conditional.
    naive = jax.jit(lambda k: sh.place(jnp.linalg.qr(jax.random.normal(k, shape))[0], s)).lower(KEY)
    assert "conditional" not in naive.compile().as_text()


def test_compute_once_outside_trace_is_the_plain_call():
    mesh = auto_mesh()
    calls = []

    def fn(k):
        calls.append(1)
        return jax.random.normal(k, (4, 4))

    x = sh.compute_once(fn, KEY, NamedSharding(mesh, P("a")))
    assert len(calls) == 1
    np.testing.assert_array_equal(np.asarray(x), np.asarray(fn(KEY)))


# ----------------------------------------------------------------------------- Flax


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            64,
            kernel_init=nn.with_partitioning(ji.he_normal(), (None, "model")),
            bias_init=nn.with_partitioning(ji.zeros, ("model",)),
        )(x)
        x = nn.relu(x)
        x = nn.Dense(
            32,
            kernel_init=nn.with_logical_partitioning(ji.orthogonal(), ("mlp", "embed")),
            use_bias=False,
        )(x)
        x = nn.LayerNorm()(x)  # unannotated: replicated
        return nn.Dense(8, kernel_init=ji.lecun_normal())(x)


LINEN_RULES = (("embed", "data"), ("mlp", "model"))


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(
            16,
            64,
            kernel_init=nnx.with_partitioning(ji.kaiming_normal(), (None, "model")),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            64,
            32,
            kernel_init=nnx.with_partitioning(ji.orthogonal(), ("mlp", "embed")),
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(32, rngs=rngs)


def _flax_meshes():
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    return auto, explicit


def test_linen_values_and_shardings_match_one_device():
    module = _LinenMLP()
    x = jnp.ones((4, 16))
    with nn.logical_axis_rules(LINEN_RULES):
        single = nn.meta.unbox(module.init(KEY, x))
    for mesh in _flax_meshes():
        variables = jil.init_sharded(module, KEY, x, mesh=mesh, rules=LINEN_RULES)
        params = variables["params"]
        got = nn.meta.unbox(variables)
        chex.assert_trees_all_equal(got, single)
        specs = {
            "Dense_0/kernel": P(None, "model"),
            "Dense_0/bias": P("model"),
            "Dense_1/kernel": P("model", "data"),
            "LayerNorm_0/scale": P(),
            "Dense_2/kernel": P(),
        }
        for path, spec in specs.items():
            layer, name = path.split("/")
            leaf = params[layer][name]
            arr = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
            want = NamedSharding(mesh, spec)
            assert arr.sharding.is_equivalent_to(want, arr.ndim), (path, arr.sharding)
            assert arr.sharding.mesh == mesh
        if mesh.axis_types[0] == AxisType.Explicit:
            continue  # explicit-axis matmuls need out_sharding annotations in the model
        # The model applies with the sharded variables and gives the single-device output.
        with jax.set_mesh(mesh), nn.logical_axis_rules(LINEN_RULES):
            y = jax.jit(module.apply)(variables, x)
        np.testing.assert_allclose(y, module.apply(single, x), rtol=1e-5, atol=1e-5)


def test_linen_bad_axis():
    module = nn.Dense(8, kernel_init=nn.with_partitioning(ji.he_normal(), (None, "tensor")))
    mesh = _flax_meshes()[0]
    with pytest.raises(ValueError, match="tensor"):
        jil.init_sharded(module, KEY, jnp.ones((1, 4)), mesh=mesh)
    with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh"):
        jil.init_sharded(module, KEY, jnp.ones((1, 4)), mesh=None)


def test_nnx_values_and_shardings_match_one_device():
    factory = lambda: _NnxMLP(nnx.Rngs(7))
    with nnx.use_eager_sharding(False):  # one device, annotations ignored
        ref = factory()
        single = jax.jit(lambda: nnx.state(factory()))()
    rules = (("mlp", "model"), ("embed", "data"))
    for mesh in _flax_meshes():
        model = jnnx.create_sharded(factory, mesh, rules=rules)
        assert isinstance(model, _NnxMLP)
        chex.assert_trees_all_equal(
            jax.tree.map(np.asarray, nnx.state(model)), jax.tree.map(np.asarray, single)
        )
        for arr, spec in [
            (model.up.kernel[...], P(None, "model")),
            (model.down.kernel[...], P("model", "data")),
            (model.up.bias[...], P()),
            (model.norm.scale[...], P()),
        ]:
            want = NamedSharding(mesh, spec)
            assert arr.sharding.is_equivalent_to(want, arr.ndim), arr.sharding
        if mesh.axis_types[0] == AxisType.Explicit:
            continue  # explicit-axis matmuls need out_sharding annotations in the model
        with jax.set_mesh(mesh):
            y = nnx.jit(lambda m, x: m.norm(m.down(m.up(x))))(model, jnp.ones((2, 16)))
        np.testing.assert_allclose(
            y, ref.norm(ref.down(ref.up(jnp.ones((2, 16))))), rtol=1e-5, atol=1e-5
        )


def test_nnx_bad_input():
    mesh = _flax_meshes()[0]
    with pytest.raises(ValueError, match="mlp"):
        jnnx.create_sharded(lambda: _NnxMLP(nnx.Rngs(0)), mesh)
    with pytest.raises(TypeError, match=r"expected an nnx\.Module"):
        jnnx.create_sharded(lambda: jnp.ones(3), mesh)
