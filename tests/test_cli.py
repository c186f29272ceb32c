"""The main job: ``python -m jaxinit`` and ``ji.depth_report`` underneath it."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_diagnostics import is_png, requires_matplotlib

import jaxinit as ji
from jaxinit.__main__ import main
from jaxinit.diagnostics.depth import DEPTH_ACTIVATIONS, DEPTH_INITS, verdict

DEPTH, WIDTH, BATCH = 6, 32, 64  # the doctests' shapes: the depth scan compiles once
TINY = ["--depth", str(DEPTH), "--width", str(WIDTH), "--batch", str(BATCH)]
VERDICTS = {"holds", "vanishes", "explodes", "saturates"}


def _rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["activation", "init", "bn"]
    return [line.split() for line in lines[1:]]


def test_main_prints_every_activation_and_init(capsys):
    assert main([*TINY, "--seed", "1"]) == 0
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert len(rows) == len(DEPTH_ACTIVATIONS) * len(DEPTH_INITS) * 2
    assert [r[0] for r in rows[::10]] == list(DEPTH_ACTIVATIONS)
    assert all(r[-1] in VERDICTS for r in rows)
    header = captured.out.splitlines()[0].split()
    assert header == ["activation", "init", "bn", "std@1", "std@3", "std@6", "sat@6", "verdict"]
    # Progress goes to stderr, one line per configuration.
    assert captured.err.count("/50]") == 50
    # Saturation is reported for tanh only.
    for r in rows:
        assert (r[-2] == "-") == (r[0] != "tanh")
    # The naive std-1 init explodes without batch norm for every unbounded activation.
    for r in rows:
        if r[1] == "normal(1.0)" and r[2] == "no" and r[0] != "tanh":
            assert r[-1] == "explodes"


@requires_matplotlib
def test_main_subset_quiet_and_plot(tmp_path, capsys):
    png = tmp_path / "depth.png"
    argv = [*TINY, "--activations", "relu,tanh", "--inits", "kaiming,lsuv", "--batch-norm", "on"]
    assert main([*argv, "--plot", str(png), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = _rows(captured.out)
    assert [(r[0], r[2]) for r in rows] == [("relu", "yes")] * 2 + [("tanh", "yes")] * 2
    assert is_png(png)


def test_python_dash_m_help_documents_the_options():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxinit", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m jaxinit")
    for flag in ("--depth", "--width", "--batch", "--activations", "--inits", "--seed", "--plot"):
        assert flag in out
    for word in ("holds", "vanishes", "explodes", "saturates", "variance_gain", "lsuv"):
        assert word in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--activations", "relu,swish"], "unknown activation 'swish'"),
        (["--inits", "xavier"], "unknown init 'xavier'"),
        (["--depth", "0"], "expected a positive integer"),
        (["--saturation", "1.5"], "--saturation must be in"),
    ],
)
def test_bad_arguments_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def _numpy_forward(weights, x, f, bn):
    stds, sats = [], []
    h = x
    for w in weights:
        z = h @ w
        if bn:
            z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
        h = f(z)
        stds.append(h.std())
        sats.append(np.mean(np.abs(h) > 0.97))
    return np.array(stds), np.array(sats)


# float32 rounding: a dot product of n terms is off by at most about n * eps relative to the
# magnitude of its terms (Higham 2002, section 3.1), and the layers chain that: depth * width *
# eps = 2.3e-5 (4e-7 measured).
STD_RTOL = DEPTH * WIDTH * float(np.finfo(np.float32).eps)


def test_depth_report_matches_float64_reference():
    seed = 4
    r = ji.depth_report(
        depth=DEPTH,
        width=WIDTH,
        batch=BATCH,
        activations=["tanh", "relu"],
        inits=["kaiming", "lsuv"],
        seed=seed,
    )
    kx, kw = jax.random.split(jax.random.key(seed))
    x = np.asarray(jax.random.normal(kx, (BATCH, WIDTH), jnp.float32), np.float64)
    keys = jax.random.split(kw, DEPTH)  # orthogonal (LSUV) kernels: one key per layer
    fns = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0)}
    assert len(r.rows) == 8
    for row in r.rows:
        if row.init == "kaiming":
            # The whole stack in one draw, fans per layer (batch_axis=0).
            init = ji.kaiming_normal(nonlinearity=row.activation, batch_axis=0)
            ws = list(np.asarray(init(kw, (DEPTH, WIDTH, WIDTH)), np.float64))
        else:
            # LSUV: orthogonal, then each layer scaled to unit pre-activation variance in turn.
            ws, h = [], x
            for k in keys:
                w = np.asarray(ji.orthogonal()(k, (WIDTH, WIDTH)), np.float64)
                while abs(np.var(h @ w) - 1.0) > 0.1:  # the default tolerance
                    w = w / math.sqrt(np.var(h @ w))
                ws.append(w)
                z = h @ w
                if row.batch_norm:
                    z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
                h = fns[row.activation](z)
        std, sat = _numpy_forward(ws, x, fns[row.activation], row.batch_norm)
        np.testing.assert_allclose(row.std, std, rtol=STD_RTOL, err_msg=f"{row}")
        if row.activation == "tanh":
            # Counting |h| > 0.97 can flip for elements within float32 rounding of the threshold.
            np.testing.assert_allclose(row.saturated, sat, atol=3.0 / (BATCH * WIDTH))
        else:
            assert np.all(np.isnan(row.saturated))


def test_depth_report_verdicts_at_moderate_size():
    # Without batch norm a std-1 init explodes, lecun's variance 1/fan_in halves relu's signal
    # at every layer and vanishes, kaiming's 2/fan_in holds it (He et al., 2015), and std-1 tanh
    # saturates (Glorot and Bengio, 2010); batch norm rescues all of them (Ioffe and Szegedy,
    # 2015). Over L = 5 layers of width n = 512 lecun's relu std ratio is 2**-2, and the
    # finite-width wander of log std (variance about 5 L / (4 n), Hanin 2018) has std 0.11:
    # both 6 std from the verdicts' thresholds 0.5 and 2.
    r = ji.depth_report(
        depth=5,
        width=512,
        batch=64,
        activations=["relu", "tanh"],
        inits=["normal", "lecun_normal", "kaiming"],
    )
    got = {(row.activation, row.init, row.batch_norm): row.verdict for row in r.rows}
    assert got[("relu", "normal", False)] == "explodes"
    assert got[("relu", "lecun_normal", False)] == "vanishes"
    assert got[("relu", "kaiming", False)] == "holds"
    assert got[("tanh", "normal", False)] == "saturates"
    assert all(v == "holds" for (_, _, bn), v in got.items() if bn)
    assert r.layers == (1, 2, 5)
    assert r.compile_s > 0 and r.run_s > 0


def test_verdict_thresholds():
    assert verdict([1.0, 2.0]) == "holds"
    assert verdict([1.0, 2.01]) == "explodes"
    assert verdict([1.0, 0.5]) == "holds"
    assert verdict([1.0, 0.49]) == "vanishes"
    assert verdict([1.0, np.nan]) == "explodes"
    assert verdict([np.inf, 1.0]) == "explodes"
    assert verdict([0.0, 0.0]) == "vanishes"
    assert verdict([0.9, 0.9], saturated=0.21) == "saturates"
    assert verdict([0.9, 0.9], saturated=0.2) == "holds"
    assert verdict([0.9, 100.0], saturated=0.9) == "explodes"


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"activations": "relu"}, TypeError, "sequence of names"),
        ({"activations": ["swish"]}, ValueError, "activations must be chosen from"),
        ({"inits": []}, ValueError, "inits must name at least one"),
        ({"depth": 0}, ValueError, "depth must be an int >= 1"),
        ({"batch_norm": []}, ValueError, "batch_norm must list"),
        ({"saturation": 1.0}, ValueError, "saturation must be in"),
    ],
)
def test_depth_report_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ji.depth_report(**kwargs)
