"""Initializer speed: jaxinit vs its jax.nn.initializers namesake vs the raw jax.random sampler.

Run: ``python benchmarks/initializers.py`` (``--quick`` for a smoke run, ``--no-write`` to leave
RESULTS.md alone). Every variant is jitted with the key as its only argument, warmed up, then timed
in interleaved rounds (each round runs every variant of a row once, in rotating order); the table
reports medians. The raw sampler is the ``jax.random`` call the initializer is built on, times its
constant: the floor for any initializer with that distribution.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxinit as ji

jinit = jax.nn.initializers
RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- initializers:start -->", "<!-- initializers:end -->"


def _raw(distribution, shape, dtype):
    if distribution == "truncated_normal":
        return lambda k: jax.random.truncated_normal(k, -2, 2, shape, dtype) * jnp.array(0.5, dtype)
    if distribution == "uniform":
        return lambda k: jax.random.uniform(k, shape, dtype, -1) * jnp.array(0.5, dtype)
    return lambda k: jax.random.normal(k, shape, dtype) * jnp.array(0.5, dtype)


def rows(n: int, ortho_sizes: list[int]):
    """(label, shape, dtype, {variant: fn(key)}) for every row of the table."""
    shape, f32 = (n, n), jnp.float32
    vs = jinit.variance_scaling
    # (label, jaxinit initializer, the jax initializer with the same distribution, distribution)
    pairs = [
        *(
            (name, getattr(ji, name)(), getattr(jinit, name)(), dist)
            for name, dist in [
                ("he_normal", "truncated_normal"),
                ("he_uniform", "uniform"),
                ("glorot_normal", "truncated_normal"),
                ("glorot_uniform", "uniform"),
                ("lecun_normal", "truncated_normal"),
                ("lecun_uniform", "uniform"),
            ]
        ),
        ("kaiming_normal", ji.kaiming_normal(), vs(2.0, "fan_in", "normal"), "normal"),
        ("kaiming_uniform", ji.kaiming_uniform(), vs(2.0, "fan_in", "uniform"), "uniform"),
        ("xavier_normal", ji.xavier_normal(), vs(1.0, "fan_avg", "normal"), "normal"),
        ("xavier_uniform", ji.xavier_uniform(), vs(1.0, "fan_avg", "uniform"), "uniform"),
        ("normal", ji.normal(0.02), jinit.normal(0.02), "normal"),
        ("uniform", ji.uniform(0.02), jinit.uniform(0.02), "uniform"),
        (
            "truncated_normal",
            ji.truncated_normal(0.02),
            jinit.truncated_normal(0.02 / 0.87962566103423978),
            "truncated_normal",
        ),
    ]
    for name, ours, theirs, dist in pairs:
        yield (
            name,
            shape,
            f32,
            {
                "jaxinit": lambda k, i=ours: i(k, shape, f32),
                "jax": lambda k, i=theirs: i(k, shape, f32),
                "raw": _raw(dist, shape, f32),
            },
        )
    bf16 = jnp.bfloat16
    yield (
        "he_normal bf16",
        shape,
        bf16,
        {
            "jaxinit": lambda k: ji.he_normal()(k, shape, bf16),
            "jax": lambda k: jinit.he_normal()(k, shape, bf16),
            "raw": _raw("truncated_normal", shape, bf16),
        },
    )
    for m in ortho_sizes:
        yield (
            "orthogonal",
            (m, m),
            f32,
            {
                "jaxinit": lambda k, m=m: ji.orthogonal()(k, (m, m), f32),
                "jax": lambda k, m=m: jinit.orthogonal()(k, (m, m), f32),
                "raw": lambda k, m=m: jax.random.normal(k, (m, m), f32),
            },
        )
        yield (
            "orthogonal bf16",
            (m, m),
            bf16,
            {
                "jaxinit": lambda k, m=m: ji.orthogonal()(k, (m, m), bf16),
                "raw": lambda k, m=m: jax.random.normal(k, (m, m), bf16),
            },
        )


def _time(fn, key) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(key))
    return time.perf_counter() - t0


def bench(label, fns, rounds: int) -> dict[str, float]:
    jitted = {v: jax.jit(f) for v, f in fns.items()}
    keys = jax.random.split(jax.random.key(0), rounds + 1)
    for f in jitted.values():
        jax.block_until_ready(f(keys[0]))
    times: dict[str, list[float]] = {v: [] for v in jitted}
    names = list(jitted)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            times[v].append(_time(jitted[v], keys[r + 1]))
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def _fmt(ms: float | None) -> str:
    return "-" if ms is None or math.isnan(ms) else f"{ms:.2f}"


def run(n: int, ortho_sizes: list[int], rounds: int, ortho_rounds: int) -> list[str]:
    lines = [
        "| initializer | shape | dtype | jaxinit ms | jax ms | raw sampler ms | vs jax | vs raw |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, shape, dtype, fns in rows(n, ortho_sizes):
        r = ortho_rounds if label.startswith("orthogonal") and shape[0] > 1024 else rounds
        med = bench(label, fns, r)
        ours, theirs, raw = med["jaxinit"], med.get("jax"), med["raw"]
        vs_jax = "jax fails" if theirs is None else f"{ours / theirs:.2f}x"
        line = (
            f"| {label} | {shape[0]}x{shape[1]} | {jnp.dtype(dtype).name} | {_fmt(ours)} | "
            f"{_fmt(theirs)} | {_fmt(raw)} | {vs_jax} | {ours / raw:.2f}x |"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def write_results(text: str) -> None:
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{START}\n{text}\n{END}"
    if START in body:
        body = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds (smoke run)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per row")
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        n, ortho, rounds, ortho_rounds = 256, [128], 3, 3
    else:
        n, ortho, rounds, ortho_rounds = 2048, [1024, 4096], args.rounds, 5
    cmd = "python benchmarks/initializers.py" + (
        "" if args.rounds == 15 else f" --rounds {args.rounds}"
    )
    print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].platform}", flush=True)
    lines = run(n, ortho, rounds, ortho_rounds)
    if args.quick or args.no_write:
        return
    text = "\n".join(
        [
            "## Initializers",
            "",
            f"Command: `{cmd}` (jax {jax.__version__}, {jax.devices()[0].platform}, "
            f"{platform.machine()}). Medians of {rounds} interleaved rounds under jit "
            f"({ortho_rounds} for orthogonal 4096x4096). `raw sampler` is the bare `jax.random` "
            "draw the initializer is built on (times a constant); for orthogonal it is the normal "
            "draw the QR starts from. kaiming/xavier/normal/uniform/truncated_normal are compared "
            "with the `jax.nn.initializers` call that has the same distribution. jax's orthogonal "
            "has no 16-bit QR, so bf16 has no jax column.",
            "",
            *lines,
        ]
    )
    write_results(text)
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
