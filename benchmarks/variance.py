"""The depth experiment as a benchmark: compile vs run time of ``ji.depth_report``.

Compares, in one process and on the same weights and inputs:

- ``jaxinit``: ``ji.depth_report`` as ``python -m jaxinit`` runs it: one jitted ``lax.scan`` whose
  weights, activation and flags are arguments, compiled once for all 50 configurations;
- ``per-config jit``: a fresh ``jax.jit`` per configuration with the activation and flags baked
  in as constants, so every configuration pays its own compile (0.19 s of compile per
  configuration measured here at the default size, in ``benchmarks/RESULTS.md``).

Rounds alternate between the two; the first ``jaxinit`` round pays the compile, later ones reuse
it. Times are wall-clock medians with ``block_until_ready``. Writes the table and this command
between ``<!-- variance:start -->`` and ``<!-- variance:end -->`` in ``benchmarks/RESULTS.md``.

Usage: python benchmarks/variance.py [--rounds 3] [--no-write]
"""

from __future__ import annotations

import os

# Before scipy's OpenBLAS loads (jax's CPU QR): its spinning threads make the 50 orthogonal draws
# take minutes on a shared CPU. `python -m jaxinit` does the same.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxinit as ji
from jaxinit.diagnostics import mlp_scan
from jaxinit.diagnostics.depth import DEPTH_ACTIVATIONS, DEPTH_INITS, draw_weights, init_for

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
START, END = "<!-- variance:start -->", "<!-- variance:end -->"


def per_config_jit(weights, x, activation, bn, lsuv):
    """One configuration with its own jit: the activation and flags are compile-time constants."""

    @jax.jit
    def run(weights, x):
        return mlp_scan.depth_forward.__wrapped__(
            weights,
            x,
            mlp_scan.activation_index(activation),
            jnp.asarray(bn),
            jnp.asarray(lsuv),
            jnp.asarray(0.1, jnp.float32),
            jnp.asarray(10, jnp.int32),
        )

    t0 = time.perf_counter()
    compiled = run.lower(weights, x).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = compiled(weights, x)
    jax.block_until_ready(out)
    return compile_s, time.perf_counter() - t0


def baseline_round(depth, width, batch, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    cache = {}
    compile_s = run_s = 0.0
    for activation in DEPTH_ACTIVATIONS:
        for init in DEPTH_INITS:
            init_fn, _, key = init_for(init, activation)
            if key not in cache:
                cache[key] = draw_weights(init, init_fn, kw, depth, width)
            for bn in (False, True):
                c, r = per_config_jit(cache[key], x, activation, bn, init == "lsuv")
                compile_s += c
                run_s += r
    return compile_s, run_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    shape = {"depth": args.depth, "width": args.width, "batch": args.batch}

    ours = {"wall": [], "compile": [], "init": [], "run": []}
    base = {"compile": [], "run": []}
    report = None
    for i in range(args.rounds):
        t0 = time.perf_counter()
        report = ji.depth_report(**shape, seed=0)
        ours["wall"].append(time.perf_counter() - t0)
        ours["compile"].append(report.compile_s)
        ours["init"].append(report.init_s)
        ours["run"].append(report.run_s)
        c, r = baseline_round(**shape, seed=0)
        base["compile"].append(c)
        base["run"].append(r)
        print(
            f"round {i + 1}: jaxinit wall {ours['wall'][-1]:.2f} s (compile "
            f"{report.compile_s:.2f}, weights {report.init_s:.2f}, runs {report.run_s:.2f}); "
            f"per-config jit compile {c:.2f} s, runs {r:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    n = len(report.rows)
    med = statistics.median
    first_wall = ours["wall"][0]
    rows = [
        ("configurations", f"{n}", f"{n}"),
        ("compiles", "1", f"{n}"),
        ("compile, s", f"{ours['compile'][0]:.2f} (first round)", f"{med(base['compile']):.2f}"),
        (
            "compile per configuration, s",
            f"{ours['compile'][0] / n:.3f}",
            f"{med(base['compile']) / n:.3f}",
        ),
        ("runs, s (median)", f"{med(ours['run']):.2f}", f"{med(base['run']):.2f}"),
        ("run per configuration, s", f"{med(ours['run']) / n:.3f}", f"{med(base['run']) / n:.3f}"),
        ("weights drawn, s (median)", f"{med(ours['init']):.2f}", "(same weights)"),
        ("full report wall, first round, s", f"{first_wall:.2f}", ""),
        (
            "full report wall, warm median, s",
            f"{med(ours['wall'][1:]) if len(ours['wall']) > 1 else first_wall:.2f}",
            "",
        ),
    ]
    cmd = "python benchmarks/variance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Depth experiment (`python -m jaxinit`)",
        "",
        f"Command: `{cmd.strip()}` (jax {jax.__version__}, {platform.machine()}, "
        f"{jax.device_count()} device(s); depth {args.depth}, width {args.width}, batch "
        f"{args.batch}; {args.rounds} interleaved rounds).",
        "",
        "| | jaxinit (one scan, compiled once) | per-config jit |",
        "|---|---:|---:|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "Per-config jit bakes activation and flags into each compile, so every configuration "
        f"pays its own compile ({med(base['compile']) / n:.2f} s each here). Both columns run "
        "the same scan; "
        "per-config jit may fold its constant activation and flags, jaxinit selects them at run "
        "time (lax.switch/cond). The machine has 2 cores; absolute times move by 10-30% between runs, ratios less.",
        "",
        "The table `python -m jaxinit` printed (seed 0):",
        "",
        "```",
        report.table(),
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        block = f"{START}\n{text}\n{END}"
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if START in old and END in old:
            new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip("\n") + "\n\n" + block + "\n"
        RESULTS.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
