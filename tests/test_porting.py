"""Tests for jaxinit.porting: torch default init, BN conventions, state-dict conversion.

torch is not a dependency: its documented formulas are written out here in numpy.
"""

import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from absl.testing import parameterized
from flax import nnx

import jaxinit as ji
import jaxinit.linen as jil
from jaxinit import porting

# ----------------------------------------------------------------- torch's formulas, in numpy


def torch_fan_in_of_weight(weight_shape):
    """torch.nn.init._calculate_fan_in_and_fan_out on a torch weight: size(1) * receptive."""
    return weight_shape[1] * math.prod(weight_shape[2:])


SQRT5 = math.sqrt(5.0)


def torch_kaiming_uniform_bound(fan_in, a=SQRT5):
    """torch.nn.init.kaiming_uniform_: gain = calculate_gain("leaky_relu", a), sqrt(3) * std."""
    gain = math.sqrt(2.0 / (1 + a**2))
    std = gain / math.sqrt(fan_in)
    return math.sqrt(3.0) * std


def torch_bias_bound(fan_in):
    """torch.nn.Linear/ConvNd.reset_parameters: bound = 1/sqrt(fan_in) if fan_in > 0 else 0."""
    return 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def torch_conv_nd(x, w, b, groups=1):
    """torch's ConvNd forward (cross-correlation, stride 1, no padding), NC* layout, float64."""
    n = x.shape[0]
    c_out, c_per_group = w.shape[:2]
    k = w.shape[2:]
    spatial = tuple(s - kk + 1 for s, kk in zip(x.shape[2:], k, strict=True))
    out = np.zeros((n, c_out, *spatial))
    out_per_group = c_out // groups
    for o in range(c_out):
        g = o // out_per_group
        for i in range(c_per_group):
            for off in itertools.product(*(range(kk) for kk in k)):
                window = tuple(slice(d, d + s) for d, s in zip(off, spatial, strict=True))
                out[:, o] += x[(slice(None), g * c_per_group + i, *window)] * w[(o, i, *off)]
        if b is not None:
            out[:, o] += b[o]
    return out


def uniform_checks(test, sample, bound):
    """Draws of U(-bound, bound): in range, reach the bound, KS-consistent, right variance."""
    s = np.asarray(sample, np.float64).ravel()
    n = s.size
    test.assertLessEqual(np.abs(s).max(), bound * (1 + 1e-6))
    # P(max |u| < bound (1 - 20/n)) = (1 - 20/n)^n < e^-20.
    test.assertGreater(np.abs(s).max(), bound * (1 - 20 / n))
    # E[u^2] = bound^2/3; relative std error of the mean of u^2 is sqrt(0.8/n). 6 SE.
    test.assertAlmostEqual(np.mean(s**2) / (bound**2 / 3), 1.0, delta=6 * math.sqrt(0.8 / n))
    # Mean: std error bound/sqrt(3n). 6 SE.
    test.assertLess(abs(s.mean()), 6 * bound / math.sqrt(3 * n))
    test.assertGreater(
        scipy.stats.kstest(s, scipy.stats.uniform(-bound, 2 * bound).cdf).pvalue, 1e-6
    )


# Torch layers as (name, torch weight shape, groups, transposed).
TORCH_LAYERS = (
    ("linear", (10, 128), 1, False),
    ("conv1d", (32, 16, 5), 1, False),
    ("conv2d", (32, 16, 3, 5), 1, False),
    ("conv2d_groups4", (32, 4, 3, 3), 4, False),
    ("depthwise", (8, 1, 3, 3), 8, False),
    ("conv3d", (6, 4, 2, 3, 2), 1, False),
    # ConvTranspose2d(in=16, out=32, k=3): torch weight (in, out/groups, *k).
    ("conv_transpose2d", (16, 32, 3, 3), 1, True),
)


def flax_kernel_shape(torch_shape, transposed):
    """Flax layout of a torch weight: (*k, in/groups, out), or (*k, in, out) for ConvTranspose."""
    if len(torch_shape) == 2:
        return (torch_shape[1], torch_shape[0])
    if transposed:  # torch (in, out, *k) -> flax ConvTranspose (*k, in, out)
        return (*torch_shape[2:], torch_shape[0], torch_shape[1])
    return (*torch_shape[2:], torch_shape[1], torch_shape[0])


class TorchDefaultInitTest(chex.TestCase):
    @parameterized.named_parameters(*TORCH_LAYERS)
    def test_fan_in_matches_torch(self, torch_shape, groups, transposed):
        del groups  # carried by the shape, as in torch
        shape = flax_kernel_shape(torch_shape, transposed)
        self.assertEqual(
            porting.torch_fan_in(shape, transposed=transposed), torch_fan_in_of_weight(torch_shape)
        )

    @parameterized.named_parameters(*TORCH_LAYERS)
    def test_kernel_and_bias_distribution(self, torch_shape, groups, transposed):
        del groups
        shape = flax_kernel_shape(torch_shape, transposed)
        fan_in = torch_fan_in_of_weight(torch_shape)
        kinit = porting.torch_kernel_init(transposed=transposed)
        binit = porting.torch_bias_init(fan_in)
        # torch's fan-in does not see the out axis (the in axis for a transposed conv), so widen
        # that axis to get >= 20000 draws of the same distribution.
        wide = -2 if transposed else -1
        big = list(shape)
        big[wide] *= -(-20000 // math.prod(shape))
        w, b, w_small = jax.jit(
            lambda k: (kinit(k, tuple(big)), binit(k, (20000,)), kinit(k, shape))
        )(jax.random.key(3))
        self.assertEqual(w_small.shape, shape)
        self.assertLessEqual(float(jnp.abs(w_small).max()), 1 / math.sqrt(fan_in) * (1 + 1e-6))
        self.assertEqual(w.dtype, jnp.float32)
        uniform_checks(self, w, torch_kaiming_uniform_bound(fan_in))
        uniform_checks(self, b, torch_bias_bound(fan_in))
        # kaiming_uniform(a=sqrt(5)) is U(+-1/sqrt(fan_in)), torch's documented Linear init.
        self.assertAlmostEqual(torch_kaiming_uniform_bound(fan_in), 1 / math.sqrt(fan_in))

    @chex.variants(with_jit=True, without_jit=True)
    def test_bias_eager_and_jit(self):
        b = self.variant(lambda k: porting.torch_bias_init(36)(k, (8,)))(jax.random.key(0))
        ref = jax.random.uniform(jax.random.key(0), (8,), jnp.float32, -1 / 6, 1 / 6)
        np.testing.assert_array_equal(b, ref)

    @parameterized.named_parameters(
        ("f32", jnp.float32), ("bf16", jnp.bfloat16), ("f16", jnp.float16)
    )
    def test_dtypes(self, dtype):
        w = porting.torch_kernel_init()(jax.random.key(0), (64, 32), dtype)
        b = porting.torch_bias_init(64)(jax.random.key(0), (32,), dtype)
        self.assertEqual(w.dtype, dtype)
        self.assertEqual(b.dtype, dtype)
        self.assertLessEqual(float(jnp.abs(b).max()), 1 / 8)

    def test_zero_fan_in_bias_is_zero(self):
        b = porting.torch_bias_init(0)(jax.random.key(0), (5,))
        np.testing.assert_array_equal(b, np.zeros(5, np.float32))

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "fan_in.*-1"):
            porting.torch_bias_init(-1)
        with self.assertRaisesRegex(ValueError, "fan_in"):
            porting.torch_bias_init(2.5)
        with self.assertRaisesRegex(TypeError, "floating"):
            porting.torch_bias_init(4)(jax.random.key(0), (3,), jnp.int32)
        with self.assertRaisesRegex(ValueError, "rank >= 2"):
            porting.torch_fan_in((5,))


class CNN(nn.Module):
    """Dense, Conv, grouped Conv, ConvTranspose and BatchNorm; zero kernels (cheap to build)."""

    @nn.compact
    def __call__(self, x):
        z = nn.initializers.zeros
        x = nn.Conv(16, (3, 3), padding="VALID", kernel_init=z, name="conv")(x)
        x = nn.Conv(16, (3, 3), feature_group_count=4, kernel_init=z, name="grouped")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = nn.ConvTranspose(8, (2, 2), kernel_init=z, name="up")(x)
        x = x.mean((1, 2))
        return nn.Dense(300, kernel_init=z, name="head")(x)


class TorchInitParamsTest(chex.TestCase):
    def test_linen_tree(self):
        self.model = CNN()
        self.x = jnp.ones((2, 12, 12, 8))
        self.variables = jax.jit(self.model.init)(jax.random.key(0), self.x)
        self.transposed = lambda path: path[-1] == "up"
        params = self.variables["params"]
        new = porting.torch_init_params(params, jax.random.key(1), transposed=self.transposed)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
        # Batch-norm parameters are left alone (torch's defaults, ones and zeros, match Flax's).
        chex.assert_trees_all_equal(new["bn"], params["bn"])
        torch_shapes = {  # the torch weight each layer stands for
            "conv": (16, 8, 3, 3),
            "grouped": (16, 4, 3, 3),
            "up": (16, 8, 2, 2),
            "head": (300, 8),
        }
        for name, torch_shape in torch_shapes.items():
            fan_in = torch_fan_in_of_weight(torch_shape)
            kernel, bias = new[name]["kernel"], new[name]["bias"]
            bound = torch_kaiming_uniform_bound(fan_in)
            self.assertLessEqual(float(jnp.abs(kernel).max()), bound * (1 + 1e-6), name)
            self.assertLessEqual(float(jnp.abs(bias).max()), torch_bias_bound(fan_in) * (1 + 1e-6))
            self.assertTrue(bool(jnp.any(bias != 0)), name)
            # The bound is reached: the kernel is not drawn with a smaller fan-in's range either.
            n = kernel.size
            self.assertGreater(float(jnp.abs(kernel).max()), bound * (1 - 20 / n), name)
        # The largest layer's variance, against torch's bound^2/3 (6 standard errors).
        kernel = np.asarray(new["head"]["kernel"], np.float64)
        bound = torch_kaiming_uniform_bound(8)
        self.assertAlmostEqual(
            np.mean(kernel**2) / (bound**2 / 3), 1.0, delta=6 * math.sqrt(0.8 / kernel.size)
        )
        # The model still runs.
        self.model.apply({**self.variables, "params": new}, self.x)

    def test_deterministic_and_independent_per_layer(self):
        dense = {"kernel": jnp.zeros((4, 3))}
        params = {"x": dense, "y": dense}
        a = porting.torch_init_params(params, jax.random.key(1))
        b = porting.torch_init_params(params, jax.random.key(1))
        chex.assert_trees_all_equal(a, b)
        # A layer's draws depend on its path and the key, not on the rest of the tree.
        c = porting.torch_init_params({"x": dense}, jax.random.key(1))
        chex.assert_trees_all_equal(c["x"], a["x"])
        # Layers of the same shape get different draws, and another key gives other values.
        self.assertFalse(bool(jnp.array_equal(a["x"]["kernel"], a["y"]["kernel"])))
        d = porting.torch_init_params(params, jax.random.key(2))
        self.assertFalse(bool(jnp.array_equal(a["x"]["kernel"], d["x"]["kernel"])))

    def test_nnx_state(self):
        class Net(nnx.Module):
            def __init__(self, rngs):
                z = nnx.initializers.zeros
                self.conv = nnx.Conv(8, 16, (3, 3), feature_group_count=2, kernel_init=z, rngs=rngs)
                self.fc = nnx.Linear(16, 400, kernel_init=z, rngs=rngs)

        model = Net(nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        nnx.update(model, porting.torch_init_params(state, jax.random.key(5)))
        for layer, torch_shape in ((model.conv, (16, 4, 3, 3)), (model.fc, (400, 16))):
            fan_in = torch_fan_in_of_weight(torch_shape)
            kernel = layer.kernel[...]
            self.assertLessEqual(
                float(jnp.abs(kernel).max()), torch_kaiming_uniform_bound(fan_in) * (1 + 1e-6)
            )
            self.assertGreater(
                float(jnp.abs(kernel).max()), torch_kaiming_uniform_bound(fan_in) * 0.9
            )
            self.assertTrue(bool(jnp.any(layer.bias[...] != 0)))
            self.assertLessEqual(float(jnp.abs(layer.bias[...]).max()), torch_bias_bound(fan_in))

    def test_presets_in_a_flax_layer(self):
        layer = nn.Dense(
            400, kernel_init=porting.torch_kernel_init(), bias_init=porting.torch_bias_init(64)
        )
        p = layer.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
        uniform_checks(self, p["kernel"], 1 / 8)
        self.assertLessEqual(float(jnp.abs(p["bias"]).max()), 1 / 8)


def torch_bn_train_reference(batches, m, eps):
    """torch BatchNorm training, float64: normalise with the biased batch variance and update
    running_mean = (1 - m) * rm + m * mean, running_var = (1 - m) * rv + m * unbiased_var."""
    c = batches[0].shape[-1]
    rm, rv = np.zeros(c), np.ones(c)
    ys = []
    for x in batches:
        x = np.asarray(x, np.float64)
        n = x.size // c
        mean = x.reshape(-1, c).mean(0)
        var = x.reshape(-1, c).var(0)
        ys.append((x - mean) / np.sqrt(var + eps))
        rm = (1 - m) * rm + m * mean
        rv = (1 - m) * rv + m * var * n / (n - 1)
    return ys, rm, rv


class TorchBatchNormConventionsTest(chex.TestCase):
    def test_kwargs(self):
        kw = porting.torch_batch_norm_kwargs(momentum=0.1, eps=1e-3)
        self.assertEqual(
            kw, {"momentum": 0.9, "epsilon": 1e-3, "unbiased_running_var": True, "axis": -1}
        )
        self.assertEqual(porting.torch_batch_norm_kwargs(channels_last=False)["axis"], 1)
        self.assertEqual(porting.torch_batch_norm_kwargs(momentum=1.0)["momentum"], 0.0)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "cumulative"):
            porting.torch_batch_norm_kwargs(momentum=None)
        for m in (0.0, -0.1, 1.5):
            with self.assertRaisesRegex(ValueError, "momentum"):
                porting.torch_batch_norm_kwargs(momentum=m)
        with self.assertRaisesRegex(ValueError, "eps"):
            porting.torch_batch_norm_kwargs(eps=-1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pure_function_matches_torch(self):
        m, eps = 0.3, 1e-3
        rng = np.random.default_rng(0)
        batches = [rng.normal(2.0, 3.0, (6, 4, 5)).astype(np.float32) for _ in range(4)]
        ys_ref, rm, rv = torch_bn_train_reference(batches, m, eps)
        kw = porting.torch_batch_norm_kwargs(momentum=m, eps=eps)
        step = self.variant(lambda x, s: ji.batch_norm(x, s, training=True, **kw))
        state = ji.batch_norm_state(5)
        for x, y_ref in zip(batches, ys_ref, strict=True):
            y, state = step(jnp.asarray(x), state)
            np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.mean, rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var, rv, rtol=1e-5)

    def test_linen_module_matches_torch_channels_first(self):
        m, eps = 0.1, 1e-5
        rng = np.random.default_rng(1)
        batches = [rng.normal(-1.0, 0.5, (4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
        # torch's NCHW batches; the reference works channels-last.
        ys_ref, rm, rv = torch_bn_train_reference(
            [b.transpose(0, 2, 3, 1) for b in batches], m, eps
        )
        bn = jil.BatchNorm(
            use_running_average=False,
            **porting.torch_batch_norm_kwargs(m, eps, channels_last=False),
        )
        variables = bn.init(jax.random.key(0), jnp.asarray(batches[0]))
        for x, y_ref in zip(batches, ys_ref, strict=True):
            y, upd = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
            variables = {**variables, **upd}
            np.testing.assert_allclose(y, y_ref.transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(variables["batch_stats"]["mean"], rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], rv, rtol=1e-5)


# ----------------------------------------------------------------- state dicts


def make_torch_state_dict(rng):
    """A hand-built torch state dict: conv -> bn -> grouped conv -> linear, plus 1-D, 3-D, LN."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "features.0.weight": f(8, 3, 3, 3),
        "features.0.bias": f(8),
        "features.1.weight": f(8) + 1,
        "features.1.bias": f(8),
        "features.1.running_mean": f(8),
        "features.1.running_var": np.abs(f(8)) + 0.5,
        "features.1.num_batches_tracked": np.array(123, np.int64),
        "features.3.weight": f(16, 4, 3, 3),  # groups=2
        "classifier.weight": f(10, 16),
        "classifier.bias": f(10),
        "seq.conv.weight": f(6, 4, 5),  # Conv1d
        "vol.weight": f(3, 2, 2, 3, 2),  # Conv3d, no bias
        "vol.bias": f(3),
        "ln.weight": f(10),
        "ln.bias": f(10),
    }


class TorchNet(nn.Module):
    """The Flax twin of make_torch_state_dict's conv/bn/conv/linear part (NHWC)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding="VALID", name="Conv_0")(x)
        x = nn.BatchNorm(use_running_average=True, name="BatchNorm_0")(x)
        x = nn.Conv(
            16, (3, 3), padding="VALID", feature_group_count=2, use_bias=False, name="Conv_1"
        )(x)
        x = x.mean((1, 2))
        return nn.Dense(10, name="Dense_0")(x)


RENAME = {
    "features.0": "Conv_0",
    "features.1": "BatchNorm_0",
    "features.3": "Conv_1",
    "classifier": "Dense_0",
}


class StateDictTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.sd = make_torch_state_dict(np.random.default_rng(0))

    def test_layouts_elementwise(self):
        v = porting.torch_state_dict_to_flax(self.sd)
        p = v["params"]
        w = self.sd["features.0.weight"]
        k = p["features"]["0"]["kernel"]
        self.assertEqual(k.shape, (3, 3, 3, 8))
        for o, i, h, ww in itertools.product(range(8), range(3), range(3), range(3)):
            self.assertEqual(k[h, ww, i, o], w[o, i, h, ww])
        k = p["classifier"]["kernel"]
        for o, i in itertools.product(range(10), range(16)):
            self.assertEqual(k[i, o], self.sd["classifier.weight"][o, i])
        self.assertEqual(p["seq"]["conv"]["kernel"].shape, (5, 4, 6))
        k3, w3 = p["vol"]["kernel"], self.sd["vol.weight"]
        self.assertEqual(k3.shape, (2, 3, 2, 2, 3))
        self.assertEqual(k3[1, 2, 0, 1, 2], w3[2, 1, 1, 2, 0])
        np.testing.assert_array_equal(p["ln"]["scale"], self.sd["ln.weight"])
        bn_p, bn_s = p["features"]["1"], v["batch_stats"]["features"]["1"]
        np.testing.assert_array_equal(bn_p["scale"], self.sd["features.1.weight"])
        np.testing.assert_array_equal(bn_p["bias"], self.sd["features.1.bias"])
        np.testing.assert_array_equal(bn_s["mean"], self.sd["features.1.running_mean"])
        np.testing.assert_array_equal(bn_s["var"], self.sd["features.1.running_var"])
        self.assertEqual(sorted(bn_s), ["mean", "var"])

    @parameterized.named_parameters(("drop_count", False), ("keep_count", True))
    def test_round_trip(self, keep_count):
        v = porting.torch_state_dict_to_flax(self.sd, keep_count=keep_count)
        back = porting.flax_to_torch_state_dict(v)
        expected = dict(self.sd)
        if not keep_count:
            expected["features.1.num_batches_tracked"] = np.array(0, np.int64)
        self.assertEqual(sorted(back), sorted(expected))
        for name, arr in expected.items():
            self.assertEqual(back[name].dtype, arr.dtype, name)
            np.testing.assert_array_equal(back[name], arr, err_msg=name)

    def test_round_trip_with_rename_and_embedding(self):
        sd = {"emb.weight": np.arange(12.0).reshape(4, 3), **self.sd}
        rename = {**RENAME, "emb": "encoder/Embed_0"}
        v = porting.torch_state_dict_to_flax(sd, rename=rename, kinds={"emb": "embed"})
        np.testing.assert_array_equal(
            v["params"]["encoder"]["Embed_0"]["embedding"], sd["emb.weight"]
        )
        back = porting.flax_to_torch_state_dict(v, rename=rename)
        self.assertEqual(sorted(back), sorted(sd))
        for name in sd:
            if name != "features.1.num_batches_tracked":
                np.testing.assert_array_equal(back[name], sd[name], err_msg=name)

    def test_converted_model_matches_torch_forward(self):
        sd = {k: v for k, v in self.sd.items() if k.split(".")[0] in ("features", "classifier")}
        v = porting.torch_state_dict_to_flax(sd, rename=RENAME)
        model = TorchNet()
        x_nchw = np.random.default_rng(1).normal(size=(2, 3, 9, 9)).astype(np.float32)
        x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
        ref_tree = jax.eval_shape(model.init, jax.random.key(0), x)
        chex.assert_trees_all_equal_shapes_and_dtypes(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), v),
            {k: ref_tree[k] for k in ("params", "batch_stats")},
        )
        y = model.apply(v, x)
        # torch's forward in float64 on NCHW: conv -> eval BN -> grouped conv -> mean -> linear.
        h = torch_conv_nd(x_nchw.astype(np.float64), sd["features.0.weight"], sd["features.0.bias"])
        rm, rv = sd["features.1.running_mean"], sd["features.1.running_var"]
        g, b = sd["features.1.weight"], sd["features.1.bias"]
        s = (slice(None), None, None)
        h = (h - rm[s]) / np.sqrt(rv[s] + 1e-5) * g[s] + b[s]
        h = torch_conv_nd(h, sd["features.3.weight"], None, groups=2).mean((2, 3))
        ref = h @ sd["classifier.weight"].T.astype(np.float64) + sd["classifier.bias"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)

    @parameterized.named_parameters(("conv1d", 1), ("conv3d", 3))
    def test_conv_nd_forward(self, nd):
        rng = np.random.default_rng(nd)
        w = rng.normal(size=(6, 2, *(2,) * nd)).astype(np.float32)  # groups=2, in=4
        b = rng.normal(size=6).astype(np.float32)
        x = rng.normal(size=(2, 4, *(5,) * nd)).astype(np.float32)
        p = porting.conv_from_torch(w, b)
        conv = nn.Conv(6, (2,) * nd, padding="VALID", feature_group_count=2)
        perm = (0, *range(2, nd + 2), 1)
        y = conv.apply({"params": p}, jnp.asarray(x.transpose(perm)))
        ref = torch_conv_nd(x.astype(np.float64), w, b, groups=2)
        np.testing.assert_allclose(y, ref.transpose(perm), rtol=1e-4, atol=1e-4)
        back = porting.conv_to_torch(p)
        np.testing.assert_array_equal(back["weight"], w)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "attn.in_proj_weight"):
            porting.torch_state_dict_to_flax({"attn.in_proj_weight": np.zeros((6, 2))})
        with self.assertRaisesRegex(ValueError, "bias must have shape \\(10,\\)"):
            porting.linear_from_torch(np.zeros((10, 4)), np.zeros(3))
        with self.assertRaisesRegex(ValueError, "2-D"):
            porting.linear_from_torch(np.zeros((10, 4, 1)))
        with self.assertRaisesRegex(ValueError, "rank 3 to 5"):
            porting.conv_from_torch(np.zeros((10, 4)))
        with self.assertRaisesRegex(ValueError, "kinds\\['fc'\\].*'dense'"):
            porting.torch_state_dict_to_flax({"fc.weight": np.zeros((2, 2))}, kinds={"fc": "dense"})
        with self.assertRaisesRegex(ValueError, "same Flax path"):
            porting.torch_state_dict_to_flax(
                {"a.weight": np.zeros((2, 2)), "b.weight": np.zeros((2, 2))},
                rename={"a": "x", "b": "x"},
            )
        with self.assertRaisesRegex(ValueError, "running_mean and running_var"):
            porting.batch_norm_from_torch(np.ones(3), np.zeros(3))
        with self.assertRaisesRegex(ValueError, "cannot convert Flax parameters \\['w'\\]"):
            porting.flax_to_torch_state_dict({"params": {"m": {"w": np.zeros(3)}}})


def test_import_needs_no_flax():
    import subprocess
    import sys

    code = (
        "import sys, jaxinit, jaxinit.porting; "
        "assert not [m for m in sys.modules if m == 'flax' or m.startswith('flax.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
