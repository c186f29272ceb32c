"""Tests for ji.weight_norm, ji.spectral_norm and ji.fold_batch_norm(s), against float64 numpy.

The Flax modules built on them are tested in test_reparam_modules.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_norm import F32_EPS, draws, f64, random_variables, sum_tol

import jaxinit as ji
import jaxinit.nnx as jnnx

# --------------------------------------------------------------------------- weight norm


def _np_weight_norm(v, scale, feat):
    v = f64(v)
    other = tuple(i for i in range(v.ndim) if i not in feat)
    w = v / np.sqrt((v**2).sum(axis=other, keepdims=True))
    return w * np.expand_dims(f64(scale), other)


WN_CASES = [((16, 8), -1), ((3, 3, 4, 8), -1), ((8, 4, 3, 3), 0), ((3, 3, 4, 8), (2, 3))]


@jax.jit
def _weight_norm_run(vs, scales, ws):
    out = []
    for (_, feat), v, s, w in zip(WN_CASES, vs, scales, ws, strict=True):
        y, vjp = jax.vjp(lambda v, s, feat=feat: ji.weight_norm(v, s, feature_axes=feat), v, s)
        out.append((y, vjp(w), ji.weight_norm_scale(v, feature_axes=feat)))
    return out


def test_weight_norm():
    vs, scales, ws = [], [], []
    for i, (shape, feat) in enumerate(WN_CASES):
        fa = tuple(a % len(shape) for a in np.atleast_1d(feat))
        vs.append(draws(i, shape))
        scales.append(draws(10 + i, tuple(shape[a] for a in fa), loc=1.0, scale=0.3))
        ws.append(draws(20 + i, shape))
    out = jax.device_get(_weight_norm_run(vs, scales, ws))
    for (shape, feat), v, s, (y, (gv, gs), norm) in zip(WN_CASES, vs, scales, out, strict=True):
        fa = tuple(a % len(shape) for a in np.atleast_1d(feat))
        other = tuple(i for i in range(len(shape)) if i not in fa)
        n = int(np.prod([shape[a] for a in other]))
        np.testing.assert_allclose(y, _np_weight_norm(v, s, fa), rtol=sum_tol(n), atol=sum_tol(n))
        # weight_norm_scale reproduces the kernel: ||v|| per feature.
        np.testing.assert_allclose(norm, np.sqrt((f64(v) ** 2).sum(axis=other)), rtol=sum_tol(n))
        # The paper's property: the gradient with respect to v is orthogonal to v per feature.
        dot = (f64(gv) * f64(v)).sum(axis=other)
        scale_of_terms = (np.abs(f64(gv) * f64(v))).sum(axis=other)
        assert np.all(np.abs(dot) <= 4 * n * F32_EPS * scale_of_terms), (shape, feat)
        assert gs.shape == s.shape


def test_weight_norm_of_its_scale_is_the_kernel():
    k = jax.device_put(draws(0, (3, 3, 4, 8)))
    w = ji.weight_norm(k, ji.weight_norm_scale(k))
    np.testing.assert_allclose(w, k, rtol=4 * sum_tol(36), atol=1e-7)


# --------------------------------------------------------------------------- spectral norm


def _top_singular(w):
    return float(np.linalg.svd(f64(w), compute_uv=False)[0])


@jax.jit
def _spectral_run(kernels, keys):
    out = []
    for k, key in zip(kernels, keys, strict=True):
        state = ji.spectral_norm_state(key, k)  # 15 warm-up iterations
        w, state = ji.spectral_norm(k, state, training=True, n_steps=300)
        w_eval, same = ji.spectral_norm(k, state, training=False)

        def loss(k, u, state=state):
            s = ji.SpectralNormState(u, state.sigma)
            return jnp.sum(ji.spectral_norm(k, s, training=True)[0] ** 2)

        grads = jax.grad(loss, argnums=(0, 1))(k, state.u)
        out.append((w, state, w_eval, same, grads))
    return out


def test_spectral_norm_converges_to_the_largest_singular_value():
    kernels = [draws(0, (256, 128)), draws(1, (3, 3, 16, 32))]
    keys = list(jax.random.split(jax.random.key(0), 2))
    out = jax.device_get(_spectral_run([jax.device_put(k) for k in kernels], keys))
    for k, (w, state, w_eval, same, (gk, gu)) in zip(kernels, out, strict=True):
        mat = k.reshape(-1, k.shape[-1])
        top = _top_singular(mat)
        assert abs(float(state.sigma) / top - 1) < 1e-3
        assert abs(_top_singular(w.reshape(mat.shape)) - 1) < 1e-3
        assert state.u.shape == (1, k.shape[-1])
        # Eval: no iteration, sigma = ||W u|| from the stored u; the state comes back unchanged.
        sigma_eval = np.linalg.norm(f64(mat) @ f64(state.u).T)
        np.testing.assert_allclose(w_eval, f64(k) / sigma_eval, rtol=4 * sum_tol(mat.shape[0]))
        np.testing.assert_array_equal(same.u, state.u)
        # u receives no gradient; the kernel's flows through sigma = v^T W u.
        np.testing.assert_array_equal(gu, np.zeros_like(gu))
        assert np.all(np.isfinite(gk)) and np.abs(gk).max() > 0


def test_spectral_norm_gradient_is_the_papers():
    # d/dW sum(G * W / sigma) = G / sigma - <G, W> / sigma^2 * v u^T, with u, v held constant.
    k = jax.device_put(draws(2, (6, 4)))
    g = draws(3, (6, 4))
    state = ji.spectral_norm_state(jax.random.key(1), k, n_warmup=50)
    f = jax.jit(jax.grad(lambda k: jnp.sum(ji.spectral_norm(k, state, training=False)[0] * g)))
    gk = f(k)
    u = f64(state.u)
    v = f64(k) @ u.T
    sigma = np.linalg.norm(v)
    v = v / sigma
    want = f64(g) / sigma - (f64(g) * f64(k)).sum() / sigma**2 * (v @ u)
    np.testing.assert_allclose(gk, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- folding


class _Block(nn.Module):
    """layer -> BN -> ReLU -> Dense -> BN, or the same without the norms (``use_bn=False``)."""

    kind: str
    use_bias: bool
    use_bn: bool = True

    @nn.compact
    def __call__(self, x):
        bias = self.use_bias or not self.use_bn
        if self.kind == "dense":
            h = nn.Dense(8, use_bias=bias, name="layer")(x.reshape(x.shape[0], -1))
        elif self.kind == "conv_transpose":
            h = nn.ConvTranspose(8, (3, 3), use_bias=bias, name="layer")(x)
        else:
            groups = {"conv": 1, "grouped": 2, "depthwise": 4}[self.kind]
            h = nn.Conv(8, (3, 3), feature_group_count=groups, use_bias=bias, name="layer")(x)
        if self.use_bn:
            h = nn.BatchNorm(use_running_average=True, name="bn1")(h)
        h = nn.relu(h)
        h = nn.Dense(5, use_bias=bias, name="head")(h.reshape(h.shape[0], -1))
        if self.use_bn:
            h = nn.BatchNorm(use_running_average=True, name="bn2")(h)
        return h


FOLD_CASES = [
    (kind, bias)
    for kind in ("conv", "grouped", "depthwise", "conv_transpose", "dense")
    for bias in (True, False)
]


def test_folded_model_equals_the_original():
    x = jax.device_put(draws(0, (2, 6, 6, 4)))
    models = [(_Block(k, b), _Block(k, b, use_bn=False)) for k, b in FOLD_CASES]
    # Statistics and affine parameters away from their initial values.
    variables = [random_variables(jax.eval_shape(m.init, jax.random.key(0), x)) for m, _ in models]
    pairs = {"layer": "bn1", "head": "bn2"}

    @jax.jit
    def run(variables, x):
        out = []
        for (model, plain), v in zip(models, variables, strict=True):
            folded = ji.fold_batch_norms(v, pairs)
            out.append((model.apply(v, x), plain.apply(folded, x), folded))
        return out

    for (kind, bias), (want, got, folded) in zip(FOLD_CASES, run(variables, x), strict=True):
        assert "batch_stats" not in folded and set(folded["params"]) == {"layer", "head"}
        scale = float(np.abs(f64(want)).max())
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{kind} {bias}"
        )


def test_nnx_fold_batch_norm():
    from flax import nnx

    conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, use_bias=False, rngs=nnx.Rngs(0))
    bn = jnnx.BatchNorm(6, rngs=nnx.Rngs(1))
    bn.mean[...] = jnp.linspace(-1.0, 1.0, 6)
    bn.var[...] = jnp.linspace(0.5, 2.0, 6)
    bn.eval()
    x = jax.device_put(draws(1, (2, 5, 5, 4)))
    folded = jnnx.fold_batch_norm(conv, bn)
    assert type(folded) is nnx.Conv and folded.use_bias and conv.bias is None
    np.testing.assert_allclose(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input


K = np.ones((4, 3), np.float32)


@pytest.mark.parametrize(
    "call, err, msg",
    [
        pytest.param(
            lambda: ji.weight_norm(K, feature_axes=2),
            ValueError,
            r"feature_axes=2 is out of range for an input of rank 2",
            id="wn_axes",
        ),
        pytest.param(
            lambda: ji.weight_norm(K, np.ones(4, np.float32)),
            ValueError,
            r"scale has shape \(4,\); expected \(3,\)",
            id="wn_scale",
        ),
        pytest.param(
            lambda: ji.weight_norm(K, epsilon=-1.0),
            ValueError,
            r"epsilon must be non-negative, got -1.0",
            id="wn_epsilon",
        ),
        pytest.param(
            lambda: ji.fold_batch_norm(
                K.astype(np.int32), None, None, None, np.zeros(3), np.ones(3)
            ),
            TypeError,
            r"kernel must have a real floating dtype.*got int32",
            id="fold_int_kernel",
        ),
        pytest.param(
            lambda: ji.spectral_norm_state(jax.random.key(0), np.ones(3, np.float32)),
            ValueError,
            r"kernel must have at least 2 dimensions.*shape \(3,\)",
            id="sn_vector",
        ),
        pytest.param(
            lambda: ji.spectral_norm(
                K, ji.SpectralNormState(jnp.ones((1, 4)), jnp.ones(())), training=True
            ),
            ValueError,
            r"state.u has shape \(1, 4\); expected \(1, 3\)",
            id="sn_u",
        ),
        pytest.param(
            lambda: ji.spectral_norm(
                K, ji.SpectralNormState(jnp.ones((1, 3)), jnp.ones(())), training=1
            ),
            TypeError,
            r"training must be a Python bool, got 1",
            id="sn_training",
        ),
        pytest.param(
            lambda: ji.spectral_norm_state(jax.random.key(0), K, feature_axes=(0, 1)),
            ValueError,
            r"must leave both features and other axes",
            id="sn_all_features",
        ),
        pytest.param(
            lambda: ji.fold_batch_norm(K, None, None, None, np.zeros(4), np.ones(3)),
            ValueError,
            r"mean has shape \(4,\); expected \(3,\)",
            id="fold_shape",
        ),
        pytest.param(
            lambda: ji.fold_batch_norms(
                {"params": {"fc": {"kernel": K}}, "batch_stats": {}}, {"fc": "bn"}
            ),
            KeyError,
            r"'bn' is not in variables\['batch_stats'\]",
            id="fold_path",
        ),
        pytest.param(
            lambda: ji.fold_batch_norms({"params": {}}, {"a/b": "bn"}),
            KeyError,
            r"'a/b' is not in variables\['params'\] \(no 'a'\)",
            id="fold_layer_path",
        ),
        pytest.param(
            lambda: ji.fold_batch_norms({"params": {}}, {3: "bn"}),
            TypeError,
            r"a layer path must be a '/'-joined string or a tuple of strings, got 3",
            id="fold_path_type",
        ),
    ],
)
def test_bad_input(call, err, msg):
    with pytest.raises(err, match=msg):
        call()
