"""The muP coordinate check: flat under muP, growing under SP; its CLI and plot."""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np
import pytest

import jaxinit as ji
from jaxinit.__main__ import main
from jaxinit.diagnostics.coord_check import FLAT_SLOPE

# The module, not the function the package exports under the same name.
coord_check_module = importlib.import_module("jaxinit.diagnostics.coord_check")

WIDTHS = (64, 128, 256)


@pytest.fixture(scope="module")
def report():
    # lr 0.02: at these small widths Adam's coherent updates (about lr * width per unit) already
    # dominate SP's init after one step, which the default 1e-2 needs widths up to 1024 for.
    return ji.coord_check(widths=WIDTHS, steps=2, learning_rate=0.02, seed=0)


def test_mup_is_flat_and_sp_grows(report):
    assert report.layers == ("input", "hidden_1", "hidden_2", "output")
    for layer in report.layers:
        assert len(report.slopes["mup"][layer]) == report.steps + 1
        assert report.sizes["mup"][layer].shape == (report.steps + 1, len(WIDTHS))
        for t in range(1, report.steps + 1):
            assert abs(report.slopes["mup"][layer][t]) < FLAT_SLOPE, (layer, t)
        assert report.verdicts["mup"][layer] == "flat"
    # SP: the input layer's fan_in is fixed, so it stays flat; every layer after it grows.
    assert report.verdicts["sp"]["input"] == "flat"
    for layer in ("hidden_1", "hidden_2", "output"):
        # Every step after the first update, not just on average (the slopes are 0.52 to 1.84).
        assert min(report.slopes["sp"][layer][1:]) > FLAT_SLOPE, layer
        assert report.verdicts["sp"][layer] == "grows"


def test_the_base_width_is_one_model_and_slopes_are_least_squares(report):
    # At the base width muP is SP: the same draws and the same learning rates.
    for layer in report.layers:
        np.testing.assert_array_equal(
            report.sizes["sp"][layer][:, 0], report.sizes["mup"][layer][:, 0]
        )
    # The muP readout starts at variance 1/(fan_in * mult): its size at init falls as
    # mult^(-1/2) (the hidden activations feeding it are width-independent).
    assert abs(report.slopes["mup"]["output"][0] + 0.5) < 0.35
    sizes = report.sizes["sp"]["hidden_1"][1]
    x, y = np.log(WIDTHS), np.log(sizes)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    assert math.isclose(report.slopes["sp"]["hidden_1"][1], slope, rel_tol=1e-9)
    table = report.table()
    assert table.splitlines()[0].split()[:3] == ["param", "layer", "slope@0"]
    assert "muP    hidden_1" in table and table.count("grows") == 3


def test_transformer_kinds_come_from_einsum_axes():
    # The stacked-block kernels: the block axis is a batch axis, heads and head_dim outputs.
    spec = coord_check_module._MODELS["transformer"]
    base = jax.eval_shape(lambda: spec.template(16))
    infos = ji.mup_infos(spec.template(64), base, overrides=spec.overrides)
    got = {k: (i.kind, i.fan_in_mult, i.fan_out_mult) for k, i in infos["blocks"].items()}
    assert got == {
        "qkv": ("hidden", 4.0, 4.0),  # (L, D, 3, H, K): in D, out (3, H, K)
        "proj": ("hidden", 4.0, 4.0),  # (L, H, K, D): in (H, K), out D
        "mlp_in": ("hidden", 4.0, 4.0),
        "mlp_out": ("hidden", 4.0, 4.0),
        "ln_1": ("vector", 1.0, 4.0),
        "ln_2": ("vector", 1.0, 4.0),
    }
    assert infos["blocks"]["qkv"].batch_axis == (0,) and infos["blocks"]["qkv"].in_axis == (1,)
    assert (infos["embed"].kind, infos["unembed"].kind, infos["ln_f"].kind) == (
        "input",
        "output",
        "vector",
    )


def test_cli_prints_the_table_and_plots(report, tmp_path, capsys):
    png = tmp_path / "coord.png"
    # The fixture's run: its compiled programs serve this one.
    argv = ["coord-check", "--widths", "64,128,256", "--steps", "2", "--learning-rate", "0.02"]
    assert main([*argv, "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        (p, layer) for p in ("SP", "muP") for layer in ("input", "hidden_1", "hidden_2", "output")
    ]
    assert [r[-1] for r in rows] == [
        report.verdicts[p][layer] for p in ("sp", "mup") for layer in report.layers
    ]
    assert "width 64: done" in captured.err and f"wrote {png}" in captured.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "64,32"], "increasing"),
        (["--widths", "64"], "at least two"),
        (["--model", "resnet"], "invalid choice"),
        (["--model", "transformer", "--widths", "24,48"], "divisible by its head size 16"),
        (["--steps", "0"], "positive integer"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["coord-check", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_coord_check_errors():
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        ji.coord_check(model="cnn")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ji.coord_check(steps=0)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        ji.coord_check(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="strictly increasing"):
        ji.coord_check(widths=(128, 64))
