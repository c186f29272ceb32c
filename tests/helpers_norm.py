"""Shared data, float64 references and tolerances of the batch-norm tests.

Used by test_batch_norm, test_batch_norm_sharded, test_moments, test_linen, test_nnx,
test_training and test_multiprocess. Inputs come from numpy's generator, not ``jax.random``: each
new shape of a jax sampler, and each eager op on a new shape, is an XLA compile, which costs more
than the checks themselves on a small CPU; they reach the device by ``jax.device_put`` (in this
jax, ``jnp.asarray`` of a numpy array is an eager op that compiles once per shape). References
are float64 numpy.

Tolerances are derived from the float32 and bfloat16 rounding units:

* ``F32_EPS`` = 2**-23, float32's spacing at 1; one rounding errs by at most ``F32_EPS / 2``.
* A float32 sum of n terms errs by at most about ``n * F32_EPS / 2`` times the sum of their
  magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 2002, 4.2);
  :func:`sum_tol` is that bound, doubled for the two passes of a mean-then-variance.
* ``BF16_EPS`` = 2**-8: bfloat16 keeps 8 significant bits, so one rounding to bfloat16 errs by at
  most 2**-8 relative; two results rounded from nearly equal float32 values may land one
  bfloat16 spacing (2**-7 relative) apart.
"""

import jax
import jax.numpy as jnp
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
BF16_EPS = 2.0**-8
BF16_ULP = 2.0**-7


# The input shape of the tests that run eagerly, in every file: eager ops compile once per shape.
EAGER_SHAPE = (64, 8)


def sum_tol(n):
    """Relative error bound of float32 statistics over n elements (two passes of n-term sums)."""
    return n * F32_EPS


def draws(seed, shape, loc=0.0, scale=1.0):
    """``loc + scale * N(0, 1)`` from numpy's generator ``seed``, as a writable float32 array."""
    return np.asarray(loc + scale * np.random.default_rng(seed).standard_normal(shape), np.float32)


def normal(seed, shape, loc=0.0, scale=1.0, dtype=jnp.float32):
    """:func:`draws` as a jax array of ``dtype``."""
    return jax.device_put(draws(seed, shape, loc, scale).astype(dtype))


def affine(feat, seed=1):
    """A scale near 1 and a bias near 0 of feature shape ``feat``, so that both matter."""
    feat = (feat,) if isinstance(feat, int) else tuple(feat)
    rng = np.random.default_rng(seed)
    scale = 1.0 + 0.3 * rng.standard_normal(feat)
    bias = 0.5 * rng.standard_normal(feat)
    return jax.device_put(scale.astype(np.float32)), jax.device_put(bias.astype(np.float32))


def random_variables(abstract, seed=5):
    """Concrete batch-norm variables of the shapes and dtypes of ``abstract`` (from eval_shape).

    A scale near 1 and a bias near 0 so that both matter, and running statistics away from
    their initial mean 0 and var 1 so that the update's old term matters. Leaves are matched by
    name (``scale``, ``bias``, ``mean``, ``var``, and ``kernel`` of other layers); numpy draws,
    cast to each leaf's dtype.
    """
    rng = np.random.default_rng(seed)
    base = {"scale": (1.0, 0.3), "bias": (0.0, 0.5), "mean": (0.0, 0.5), "var": (1.0, 0.2)}
    base["kernel"] = (0.0, 0.3)  # of the layers around the normalization

    def leaf(path, s):
        loc, scale = base[path[-1].key]
        return jax.device_put((loc + scale * rng.standard_normal(s.shape)).astype(s.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def row_mask(n, drop_every=3):
    """A (n, 1) boolean mask that drops every ``drop_every``-th row, starting with row 0."""
    return np.arange(n)[:, None] % drop_every != 0


def f64(a):
    return np.asarray(a, np.float64)


def feature_axes(ndim, axis):
    """Sorted non-negative feature axes and the reduction axes (all the others)."""
    feat = tuple(sorted(int(a) % ndim for a in np.atleast_1d(axis)))
    return feat, tuple(i for i in range(ndim) if i not in feat)


def _fshape(shape, red):
    return tuple(1 if i in red else s for i, s in enumerate(shape))


def np_stats(x, red, mask=None):
    """Float64 count, mean and biased variance of ``x`` over axes ``red`` (kept elements only)."""
    x = f64(x)
    mask = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), x.shape)
    n = mask.sum(axis=red)
    mean = np.where(mask, x, 0.0).sum(axis=red) / n
    dev = x - np.expand_dims(mean, red)
    var = np.where(mask, dev**2, 0.0).sum(axis=red) / n
    return n, mean, var


def np_batch_norm(x, red, scale=None, bias=None, mask=None, eps=1e-5):
    """Float64 train-mode batch norm: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
    x = f64(x)
    _, mean, var = np_stats(x, red, mask)
    fs = _fshape(x.shape, red)
    y = (x - mean.reshape(fs)) / np.sqrt(var.reshape(fs) + eps)
    if scale is not None:
        y = y * f64(scale).reshape(fs)
    if bias is not None:
        y = y + f64(bias).reshape(fs)
    return y


def np_batch_norm_grads(x, scale, bias, w, red, mask=None, eps=1e-5, dloss=np.cos):
    """Float64 gradients of ``sum(loss(batch_norm(x)) * w)`` with respect to x, scale and bias.

    ``dloss`` is the derivative of the elementwise ``loss``: ``np.cos`` for ``sin``.

    The chain rule through the batch statistics (Ioffe and Szegedy, 2015, section 3), with the
    mean and variance taken over the kept elements only: with ``r = 1/sqrt(var + eps)``,
    ``xhat = (x - mean) * r`` and ``g = dL/dy``,
    ``dx = scale * r * (g - m/n * sum(g) - m * xhat/n * sum(g * xhat))``, where ``m`` is the mask
    and the sums run over every element (every output depends on the statistics).
    """
    x = f64(x)
    n, mean, var = np_stats(x, red, mask)
    fs = _fshape(x.shape, red)
    m = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), x.shape)
    r = 1.0 / np.sqrt(var.reshape(fs) + eps)
    xhat = (x - mean.reshape(fs)) * r
    s = f64(scale).reshape(fs)
    g = dloss(xhat * s + f64(bias).reshape(fs)) * f64(w)
    sum_g = g.sum(axis=red, keepdims=True)
    sum_gx = (g * xhat).sum(axis=red, keepdims=True)
    nn = n.reshape(fs)
    dx = s * r * (g - m * sum_g / nn - m * xhat * sum_gx / nn)
    return dx, sum_gx.reshape(np.shape(scale)), sum_g.reshape(np.shape(bias))


def np_sin_loss(x, scale, bias, w, red, mask=None, eps=1e-5):
    """Float64 ``sum(sin(batch_norm(x) * scale + bias) * w)``, written directly.

    ``x``, ``scale`` and ``bias`` may carry one leading axis of stacked inputs (one loss each):
    ``red`` are the reduction axes of ``w``'s shape, taken from the end.
    """
    nd = np.ndim(w)
    r = tuple(a - nd for a in red)
    fs = _fshape(np.shape(w), red)
    m = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), np.shape(w))
    x = f64(x)
    n = m.sum(axis=r, keepdims=True)
    mean = np.where(m, x, 0.0).sum(axis=r, keepdims=True) / n
    var = np.where(m, (x - mean) ** 2, 0.0).sum(axis=r, keepdims=True) / n

    def per_feature(p):
        p = f64(p)
        lead = p.shape[: p.ndim - (nd - len(red))]
        return p.reshape(lead + fs)

    y = (x - mean) / np.sqrt(var + eps) * per_feature(scale) + per_feature(bias)
    return (np.sin(y) * f64(w)).sum(axis=tuple(range(-nd, 0)))


def central_differences(f, a, h):
    """Float64 central differences of the scalar function ``f`` at ``a``, element by element.

    ``f`` takes a stack of inputs along a new leading axis. The step is ``h``; the difference
    quotient divides by the perturbation as represented, so rounding of ``a +- h`` cancels.
    """
    a = f64(a)
    e = h * np.eye(a.size).reshape((a.size, *a.shape))
    plus, minus = a + e, a - e
    step = (plus - minus).reshape(a.size, -1).max(axis=1)
    return ((f(plus) - f(minus)) / step).reshape(a.shape)


def assert_close_to_scale(actual, desired, tol):
    """``max|actual - desired| <= tol * max|desired|``: the error relative to the reference's scale.

    For gradients, whose entries near zero carry the rounding of the large ones.
    """
    desired = f64(desired)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * float(np.max(np.abs(desired))))


# --------------------------------------------------------------------------- the norm family


def np_norm(x, red, scale=None, bias=None, mask=None, eps=1e-6, centered=True):
    """Float64 ``(x - mean) / sqrt(var + eps) * scale + bias`` over axes ``red``.

    ``scale`` and ``bias`` broadcast against ``x`` (x's rank, size 1 off their axes);
    ``centered=False`` is RMS norm (``x / sqrt(mean(x**2) + eps) * scale``). Statistics use the
    kept elements of ``mask``; a group with none gets mean 0 and variance 0.
    """
    x = f64(x)
    m = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), x.shape)
    n = np.maximum(m.sum(axis=red, keepdims=True), 1)
    mean = np.where(m, x, 0.0).sum(axis=red, keepdims=True) / n if centered else 0.0
    var = np.where(m, (x - mean) ** 2, 0.0).sum(axis=red, keepdims=True) / n
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return y


def np_norm_grads(x, red, scale, bias, w, mask=None, eps=1e-6, centered=True):
    """Float64 gradients of ``sum(np_norm(x, ...) * w)`` with respect to x, scale and bias.

    With ``r = 1/sqrt(var + eps)``, ``xhat = (x - mean) * r``, ``g = w * scale`` and ``m`` the
    mask: ``dx = r * (g - m/n * sum(g) - m * xhat/n * sum(g * xhat))``, the sums over ``red``
    (every output depends on the statistics; the statistics only on the kept elements), without
    the ``sum(g)`` term when uncentred. ``dscale = sum(w * xhat)`` and ``dbias = sum(w)`` over
    the axes along which the parameter is broadcast. Checked against central differences in
    test_normalization.
    """
    x, w = f64(x), f64(w)
    m = np.broadcast_to(np.ones((), bool) if mask is None else np.asarray(mask), x.shape)
    n = np.maximum(m.sum(axis=red, keepdims=True), 1)
    mean = np.where(m, x, 0.0).sum(axis=red, keepdims=True) / n if centered else 0.0
    var = np.where(m, (x - mean) ** 2, 0.0).sum(axis=red, keepdims=True) / n
    r = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * r
    s = 1.0 if scale is None else f64(scale)
    g = w * s
    sum_gx = (g * xhat).sum(axis=red, keepdims=True)
    dx = g - m * xhat * sum_gx / n
    if centered:
        dx = dx - m * g.sum(axis=red, keepdims=True) / n
    dx = r * dx

    def param_sum(v, p):
        axes = tuple(i for i in range(x.ndim) if np.shape(p)[i] == 1)
        return v.sum(axis=axes, keepdims=True)

    ds = None if scale is None else param_sum(w * xhat, scale)
    db = None if bias is None else param_sum(w, bias)
    return dx, ds, db
