"""``python -m jaxinit``: the depth experiment; ``python -m jaxinit coord-check``: the muP check.

The depth experiment runs :func:`jaxinit.depth_report` and prints, for every activation, init and
batch-norm setting, the activation std at a few depths, the saturated fraction (bounded
activations) and a verdict. ``coord-check`` runs :func:`jaxinit.coord_check` and prints every
layer's log-log slope of output size against width, under SP and under muP, with verdicts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

from jaxinit.diagnostics.coord_check import (
    COORD_MODELS,
    FLAT_SLOPE,
    coord_check,
    plot_coord_check,
)
from jaxinit.diagnostics.depth import (
    DEPTH_ACTIVATIONS,
    DEPTH_INITS,
    EXPLODE_RATIO,
    SATURATE_FRACTION,
    VANISH_RATIO,
    depth_report,
    plot_depth,
)
from jaxinit.diagnostics.mlp_scan import ACTIVATION_NAMES

_EPILOG = f"""\
inits:
  normal         ji.normal(1.0): every weight N(0, 1), no fan scaling
  lecun_normal   ji.lecun_normal(): flax's default, truncated normal, variance 1/fan_in
  kaiming        ji.kaiming_normal(nonlinearity=...): torch's calculate_gain (relu's for gelu)
  variance_gain  variance 1/fan_in times ji.variance_gain(f)**2, so that E[z^2] stays 1
  lsuv           ji.orthogonal(), then LSUV rescales each layer to unit variance on the batch

verdicts (r = activation std at the last layer / std at layer 1):
  explodes   r > {EXPLODE_RATIO:g}, or any inf/nan
  saturates  (tanh) more than {SATURATE_FRACTION:.0%} of units have |h| > the saturation threshold
  vanishes   r < {VANISH_RATIO:g}
  holds      otherwise

example: python -m jaxinit --depth 20 --activations relu,tanh --plot depth.png

the muP coordinate check: python -m jaxinit coord-check --help
"""

_COORD_EPILOG = f"""\
each row is one layer under SP (the standard parametrization: variance 1/fan_in, one learning
rate) or muP (ji.mup_init and ji.mup_lr_scale, base width = the first width). slope@t is the
log-log slope of the layer's mean |output| against width after t Adam steps; w=... columns are
the sizes after the last step.

verdicts (mean slope over steps 1..steps):
  flat     within +-{FLAT_SLOPE:g}: the layer's size does not depend on width (muP's promise)
  grows    above {FLAT_SLOPE:g} (SP's hidden and output layers under Adam)
  shrinks  below -{FLAT_SLOPE:g}

example: python -m jaxinit coord-check --widths 64,256,1024 --steps 3 --plot coord.png
"""


def _names(known: Sequence[str], what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; "
                f"choose from {','.join(known)}"
            )
        return names

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_run_options(parser: argparse.ArgumentParser, seeded: str, curves: str) -> None:
    """The options both reports share: the seed, the plot file and quiet."""
    parser.add_argument("--seed", type=int, default=0, help=f"PRNG seed for {seeded} (0)")
    parser.add_argument("--plot", metavar="FILE.png", help=f"write the {curves} curves here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _progress_printer() -> Callable[[str], None]:
    """``progress(line)``: prints the line on stderr after the seconds since this call."""
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"{time.perf_counter() - start:6.1f}s  {line}", file=sys.stderr, flush=True)

    return progress


def build_parser() -> argparse.ArgumentParser:
    """The command line parser of ``python -m jaxinit``."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxinit",
        description=(
            "The depth experiment: push unit-normal inputs through a deep bias-free MLP and watch "
            "the activations hold, vanish, explode or saturate under each init, with and without "
            "batch norm between layers."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--depth", type=_positive, default=50, help="layers (default 50)")
    parser.add_argument("--width", type=_positive, default=512, help="units per layer (512)")
    parser.add_argument("--batch", type=_positive, default=1024, help="input rows (1024)")
    parser.add_argument(
        "--activations",
        type=_names(ACTIVATION_NAMES, "activation"),
        default=DEPTH_ACTIVATIONS,
        help=f"comma-separated, from {','.join(ACTIVATION_NAMES)} "
        f"(default {','.join(DEPTH_ACTIVATIONS)})",
    )
    parser.add_argument(
        "--inits",
        type=_names(DEPTH_INITS, "init"),
        default=DEPTH_INITS,
        help=f"comma-separated, from {','.join(DEPTH_INITS)} (default: all)",
    )
    parser.add_argument(
        "--batch-norm",
        choices=("both", "off", "on"),
        default="both",
        help="run without and/or with batch norm before each activation (default both)",
    )
    parser.add_argument(
        "--saturation",
        type=float,
        default=0.97,
        help="|tanh| above which a unit counts as saturated (0.97)",
    )
    _add_run_options(parser, "inputs and weights", "std-by-depth")
    return parser


def _widths(text: str) -> tuple[int, ...]:
    """Comma-separated integers; :func:`jaxinit.coord_check` checks that they increase."""
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def build_coord_parser() -> argparse.ArgumentParser:
    """The command line parser of ``python -m jaxinit coord-check``."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxinit coord-check",
        description=(
            "The muP coordinate check: train a model for a few Adam steps at several widths, "
            "under SP and under muP, and see whether each layer's output size depends on width."
        ),
        epilog=_COORD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--widths",
        type=_widths,
        default=(64, 128, 256, 512, 1024),
        help="comma-separated, increasing; the first is the base (default 64,128,256,512,1024)",
    )
    parser.add_argument("--steps", type=_positive, default=5, help="Adam steps (default 5)")
    parser.add_argument("--model", choices=COORD_MODELS, default="mlp", help="(default mlp)")
    parser.add_argument(
        "--learning-rate", type=float, default=1e-2, help="Adam's learning rate (1e-2)"
    )
    _add_run_options(parser, "data and weights", "size-by-width")
    return parser


def coord_main(argv: Sequence[str]) -> int:
    """Runs ``python -m jaxinit coord-check``; returns the exit status.

    Args:
        argv: the arguments after ``coord-check``.

    Returns:
        0 on success (argparse exits with 2 on bad arguments).

    Example:
        >>> from jaxinit.__main__ import main
        >>> main(["coord-check", "--widths", "32,64", "--steps", "1", "--quiet"])  # doctest: +ELLIPSIS
        param  layer ...
        SP     input ...
        0
    """
    parser = build_coord_parser()
    args = parser.parse_args(argv)
    progress = _progress_printer()

    if not args.quiet:
        progress(f"model {args.model}, widths {args.widths}, {args.steps} Adam steps, SP and muP")
    try:
        report = coord_check(
            widths=args.widths,
            steps=args.steps,
            model=args.model,
            learning_rate=args.learning_rate,
            seed=args.seed,
            progress=None if args.quiet else progress,
        )
    except ValueError as err:
        parser.error(str(err))
    print(report.table(), flush=True)
    if args.plot:
        plot_coord_check(report, args.plot)
        if not args.quiet:
            progress(f"wrote {args.plot}")
    if not args.quiet:
        progress(f"done in {report.seconds:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the depth experiment (or, after ``coord-check``, the muP check); returns the status.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        0 on success (argparse exits with 2 on bad arguments).

    Example:
        >>> from jaxinit.__main__ import main
        >>> main(["--depth", "6", "--width", "32", "--batch", "64", "--activations", "relu",
        ...       "--inits", "kaiming", "--batch-norm", "off", "--quiet"])  # doctest: +ELLIPSIS
        activation  init ...
        relu        kaiming(gain=1.41) ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["coord-check"]:
        return coord_main(argv[1:])
    args = build_parser().parse_args(argv)
    if not 0.0 < args.saturation < 1.0:
        build_parser().error(f"--saturation must be in (0, 1); got {args.saturation}")
    bn = {"both": (False, True), "off": (False,), "on": (True,)}[args.batch_norm]
    progress = _progress_printer()

    if not args.quiet:
        progress(
            f"depth {args.depth}, width {args.width}, batch {args.batch}, seed {args.seed}: "
            f"{len(args.activations) * len(args.inits) * len(bn)} configurations"
        )
    report = depth_report(
        depth=args.depth,
        width=args.width,
        batch=args.batch,
        activations=args.activations,
        inits=args.inits,
        batch_norm=bn,
        seed=args.seed,
        saturation=args.saturation,
        progress=None if args.quiet else progress,
    )
    print(report.table(), flush=True)
    if args.plot:
        plot_depth(report, args.plot)
        if not args.quiet:
            progress(f"wrote {args.plot}")
    if not args.quiet:
        progress(
            f"done: compile {report.compile_s:.2f} s, weights {report.init_s:.2f} s, "
            f"runs {report.run_s:.2f} s"
        )
    return 0


def _limit_openblas_threads() -> None:
    """One OpenBLAS thread for jax's CPU QR (scipy's OpenBLAS, loaded at the first QR).

    The orthogonal draws of the LSUV arm run 50 small QRs; on a shared CPU, OpenBLAS's spinning
    worker threads slowed them from about 1 s to minutes. An explicit setting is kept.
    """
    if "scipy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


if __name__ == "__main__":
    _limit_openblas_threads()
    sys.exit(main())
