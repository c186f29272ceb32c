"""torch state dicts of weight-normalized and spectral-normalized layers, both directions.

torch is not a dependency: the state dicts are built by hand with torch's names and layouts, and
torch's eval outputs are its formulas in float64 numpy (``W = g * v / ||v||`` per output row;
``W / sigma`` with ``sigma = u . (W_mat v)``).
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers_norm import f64

import jaxinit as ji
import jaxinit.linen as jil

RNG = np.random.default_rng(0)
P = "parametrizations.weight."


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jil.SpectralNorm(nn.Conv(4, (3, 3), padding="VALID", name="conv"))(
            x, update_stats=False
        )
        h = h.reshape(h.shape[0], -1)
        return jil.WeightNorm(nn.Dense(3, name="fc"))(h)


def _svd_vectors(w):
    mat = f64(w).reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(mat)
    return u[:, 0].astype(np.float32), vt[0].astype(np.float32), s[0]


def _state_dict(old_style):
    conv_w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)  # OIHW
    conv_b = RNG.standard_normal(4).astype(np.float32)
    u, v, _ = _svd_vectors(conv_w)
    fc_v = RNG.standard_normal((3, 64)).astype(np.float32)  # (out, in): 4x4x4 features
    fc_g = (1.0 + RNG.random((3, 1))).astype(np.float32)
    fc_b = RNG.standard_normal(3).astype(np.float32)
    if old_style:
        sd = {
            "conv.weight_orig": conv_w,
            "conv.weight_u": u,
            "conv.weight_v": v,
            "fc.weight_g": fc_g,
            "fc.weight_v": fc_v,
        }
    else:
        sd = {
            f"conv.{P}original": conv_w,
            f"conv.{P}0._u": u,
            f"conv.{P}0._v": v,
            f"fc.{P}original0": fc_g,
            f"fc.{P}original1": fc_v,
        }
    return {**sd, "conv.bias": conv_b, "fc.bias": fc_b}, (conv_w, conv_b, fc_v, fc_g, fc_b)


def _torch_eval(x, conv_w, conv_b, fc_v, fc_g, fc_b):
    """torch's eval output: conv with W / sigma, flatten in (H, W, C) order, then weight norm."""
    _, _, sigma = _svd_vectors(conv_w)
    w = f64(conv_w) / sigma
    n, hgt, wid, _ = x.shape
    out = np.zeros((n, hgt - 2, wid - 2, 4))
    for i in range(hgt - 2):
        for j in range(wid - 2):
            patch = f64(x)[:, i : i + 3, j : j + 3, :]  # (n, kh, kw, c)
            out[:, i, j, :] = np.einsum("nhwc,ochw->no", patch, w) + f64(conv_b)
    h = out.reshape(n, -1)
    wn = f64(fc_g) * f64(fc_v) / np.linalg.norm(f64(fc_v), axis=1, keepdims=True)
    return h @ wn.T + f64(fc_b)


@pytest.mark.parametrize("old_style", [False, True], ids=["parametrizations", "legacy"])
def test_converted_model_gives_torch_eval_output(old_style):
    sd, arrays = _state_dict(old_style)
    variables = ji.torch_state_dict_to_flax(sd)
    assert set(variables["params"]) == {"conv", "fc", "WeightNorm_0"}
    assert set(variables["batch_stats"]["SpectralNorm_0"]) == {"conv/kernel/u", "conv/kernel/sigma"}
    assert variables["params"]["WeightNorm_0"]["fc/kernel/scale"].shape == (3,)
    x = RNG.standard_normal((2, 6, 6, 2)).astype(np.float32)
    # The Flax model's own variable tree has the same names and shapes.
    abstract = jax.eval_shape(Net().init, jax.random.key(0), x)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)
    y = jax.jit(Net().apply)(variables, x)
    np.testing.assert_allclose(y, _torch_eval(x, *arrays), rtol=1e-5, atol=1e-5)


def test_round_trip_to_torch():
    sd, _ = _state_dict(old_style=False)
    back = ji.flax_to_torch_state_dict(ji.torch_state_dict_to_flax(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        # _v is recomputed from u and W (normalize(W^T u)): torch's, for converged vectors.
        np.testing.assert_allclose(back[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # The legacy names come back in the current style.
    legacy, _ = _state_dict(old_style=True)
    assert set(ji.flax_to_torch_state_dict(ji.torch_state_dict_to_flax(legacy))) == set(sd)


def test_wrapper_names_and_errors():
    sd, _ = _state_dict(old_style=False)
    v = ji.torch_state_dict_to_flax(sd, wrappers={"fc": "wn", "conv": "sn"})
    assert "wn" in v["params"] and "sn" in v["batch_stats"]
    bad = {k: a for k, a in sd.items() if not k.endswith("original0")}
    with pytest.raises(ValueError, match=r"'fc' has weight-norm tensors \['v'\] but needs both"):
        ji.torch_state_dict_to_flax(bad)
    bad = {**sd, f"conv.{P}0._u": np.ones(5, np.float32)}
    with pytest.raises(ValueError, match=r"spectral-norm u \(5,\) and v \(18,\) do not fit"):
        ji.torch_state_dict_to_flax(bad)
