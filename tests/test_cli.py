"""The main job: ``python -m jaxinit`` and ``ji.depth_report`` underneath it."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinit as ji
from jaxinit.__main__ import main
from jaxinit.diagnostics.depth import DEPTH_ACTIVATIONS, DEPTH_INITS, verdict

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--depth", "6", "--width", "24", "--batch", "48"]
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


def test_main_subset_and_plot_in_subprocess(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "depth.png"
    cmd = [sys.executable, "-m", "jaxinit", *TINY, "--activations", "relu,tanh"]
    cmd += ["--inits", "kaiming,lsuv", "--batch-norm", "on", "--plot", str(png), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = _rows(proc.stdout)
    assert [(r[0], r[2]) for r in rows] == [("relu", "yes")] * 2 + [("tanh", "yes")] * 2
    assert png.read_bytes()[:8] == PNG


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
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


def test_depth_report_matches_float64_reference():
    depth, width, batch, seed = 6, 24, 48, 4  # TINY's shapes: the compiled scan is reused
    r = ji.depth_report(
        depth=depth,
        width=width,
        batch=batch,
        activations=["tanh", "relu"],
        inits=["kaiming", "lsuv"],
        seed=seed,
    )
    kx, kw = jax.random.split(jax.random.key(seed))
    x = np.asarray(jax.random.normal(kx, (batch, width), jnp.float32), np.float64)
    keys = jax.random.split(kw, depth)  # orthogonal (LSUV) kernels: one key per layer
    fns = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0)}
    assert len(r.rows) == 8
    for row in r.rows:
        if row.init == "kaiming":
            # The whole stack in one draw, fans per layer (batch_axis=0).
            init = ji.kaiming_normal(nonlinearity=row.activation, batch_axis=0)
            ws = list(np.asarray(init(kw, (depth, width, width)), np.float64))
        else:
            # LSUV: orthogonal, then each layer scaled to unit pre-activation variance in turn.
            ws, h = [], x
            for k in keys:
                w = np.asarray(ji.orthogonal()(k, (width, width)), np.float64)
                while abs(np.var(h @ w) - 1.0) > 0.1:  # the default tolerance
                    w = w / math.sqrt(np.var(h @ w))
                ws.append(w)
                z = h @ w
                if row.batch_norm:
                    z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
                h = fns[row.activation](z)
        std, sat = _numpy_forward(ws, x, fns[row.activation], row.batch_norm)
        np.testing.assert_allclose(row.std, std, rtol=2e-4, err_msg=f"{row}")
        if row.activation == "tanh":
            # Counting |h| > 0.97 can flip for elements within float32 rounding of the threshold.
            np.testing.assert_allclose(row.saturated, sat, atol=3.0 / (batch * width))
        else:
            assert np.all(np.isnan(row.saturated))


def test_depth_report_finds_the_seeds_failures():
    # The seeds' claims at moderate size (ANCHORS.md section 5): std-1 explodes, lecun vanishes
    # for relu, kaiming holds relu, tanh with std 1 saturates, batch norm rescues everything.
    # Width 512 over 10 layers keeps the finite-width wander of log E[z^2] (variance about
    # 5 L / n, Hanin 2018) at std 0.3, well inside the holds band [0.5, 2].
    r = ji.depth_report(
        depth=10,
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
    assert r.layers == (1, 2, 5, 10)
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


def test_plot_depth_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    r = ji.depth_report(
        depth=6, width=24, batch=48, activations=["linear"], inits=["normal"], batch_norm=[True]
    )
    path = ji.plot_depth(r, str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG
    assert path.endswith("d.png")
