"""Batch norm speed: jaxinit vs flax.linen.BatchNorm vs an elementwise memory floor.

Run: ``python benchmarks/batchnorm.py`` (``--quick`` for a short smoke run, ``--no-write`` to
leave RESULTS.md alone). Times, side by side in one process and interleaved (each round runs
every variant once, in rotating order), the median of ``--rounds`` rounds after warm-up, for:

* train fwd: ``y, new_state`` from batch statistics;
* train fwd+bwd: ``y, new_state`` and the gradients with respect to x, scale and bias for a
  given output cotangent (one VJP);
* eval fwd: ``y`` from the running statistics.

The floor is one elementwise pass ``x * 2 + 1`` (read x, write y) timed inside a
``lax.fori_loop`` so its buffers are reused: on this machine a fresh output buffer of 32 MiB or
more pays page faults on every call. Memory floors: eval fwd = 1 pass, train fwd = 1.5 passes
(read x for the statistics, then read x and write y), train fwd+bwd = 4 passes (train fwd, then
read x and dy for two reductions, then read x and dy and write dx).
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxinit as ji

CASES = [
    ((4096, 1024), jnp.float32),
    ((64, 32, 32, 128), jnp.float32),
    ((64, 32, 32, 128), jnp.bfloat16),
]
FLOOR_ITERS = 20


def _make(shape, dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = (3.0 + 2.0 * jax.random.normal(k1, shape, jnp.float32)).astype(dtype)
    ct = jax.random.normal(k2, shape, jnp.float32).astype(dtype)
    f = shape[-1]
    scale = 1.0 + 0.1 * jax.random.normal(k3, (f,), jnp.float32)
    bias = 0.1 * jax.random.normal(k4, (f,), jnp.float32)
    return x, ct, scale, bias


def _jaxinit_fns(f):
    state = ji.batch_norm_state(f)

    def fwd(x, scale, bias, state):
        return ji.batch_norm(x, state, scale, bias, training=True)

    def fwd_bwd(x, ct, scale, bias, state):
        (y, new_state), vjp = jax.vjp(
            lambda x, s, b: ji.batch_norm(x, state, s, b, training=True), x, scale, bias
        )
        zero_state = jax.tree.map(jnp.zeros_like, new_state)
        return y, new_state, vjp((ct, zero_state))

    def ev(x, scale, bias, state):
        return ji.batch_norm(x, state, scale, bias, training=False)[0]

    return state, jax.jit(fwd), jax.jit(fwd_bwd), jax.jit(ev)


def _flax_fns(f, fast):
    bn = nn.BatchNorm(use_fast_variance=fast)
    stats = {"mean": jnp.zeros((f,), jnp.float32), "var": jnp.ones((f,), jnp.float32)}

    def apply(x, scale, bias, stats, train=True):
        v = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
        if not train:
            return bn.apply(v, x, use_running_average=True)
        y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def fwd(x, scale, bias, stats):
        return apply(x, scale, bias, stats)

    def fwd_bwd(x, ct, scale, bias, stats):
        (y, new_stats), vjp = jax.vjp(lambda x, s, b: apply(x, s, b, stats), x, scale, bias)
        zero = jax.tree.map(jnp.zeros_like, new_stats)
        # flax returns float32 for bf16 input with float32 params; feed a matching cotangent.
        return y, new_stats, vjp((ct.astype(y.dtype), zero))

    def ev(x, scale, bias, stats):
        return apply(x, scale, bias, stats, train=False)

    return stats, jax.jit(fwd), jax.jit(fwd_bwd), jax.jit(ev)


def _floor_fns():
    def loop(x):
        return lax.fori_loop(0, FLOOR_ITERS, lambda i, v: v * 2 + 1, x)

    return jax.jit(loop), jax.jit(lambda x: x * 2 + 1)


def _time_once(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_case(shape, dtype, rounds, warmup):
    x, ct, scale, bias = _make(shape, dtype)
    f = shape[-1]
    variants = {}
    st, fwd, fb, ev = _jaxinit_fns(f)
    variants["jaxinit"] = (st, fwd, fb, ev)
    for name, fast in (("flax", True), ("flax_twopass", False)):
        variants[name] = _flax_fns(f, fast)
    loop, fresh = _floor_fns()

    jobs = {}
    for name, (st, fwd, fb, ev) in variants.items():
        jobs[(name, "train fwd")] = (fwd, (x, scale, bias, st), 1)
        jobs[(name, "train fwd+bwd")] = (fb, (x, ct, scale, bias, st), 1)
        jobs[(name, "eval fwd")] = (ev, (x, scale, bias, st), 1)
    jobs[("floor", "loop")] = (loop, (x,), FLOOR_ITERS)
    jobs[("floor", "fresh")] = (fresh, (x,), 1)

    for fn, args, _ in jobs.values():  # compile + warm up
        for _ in range(warmup):
            _time_once(fn, args)
    keys = list(jobs)
    times = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in order:
            fn, args, div = jobs[k]
            times[k].append(_time_once(fn, args) / div)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _fmt_case(shape, dtype):
    return f"{tuple(shape)} {jnp.dtype(dtype).name}"


def run(rounds, warmup, cases):
    rows = []
    for shape, dtype in cases:
        t = bench_case(shape, dtype, rounds, warmup)
        e = t[("floor", "loop")]
        mib = np.prod(shape) * jnp.dtype(dtype).itemsize / 2**20
        for mode, passes in (("train fwd", 1.5), ("train fwd+bwd", 4.0), ("eval fwd", 1.0)):
            ji_t = t[("jaxinit", mode)]
            fl, fl2 = t[("flax", mode)], t[("flax_twopass", mode)]
            rows.append(
                (
                    _fmt_case(shape, dtype),
                    mode,
                    ji_t,
                    fl,
                    fl2,
                    ji_t / min(fl, fl2),
                    ji_t / (passes * e),
                )
            )
        rows.append(
            (_fmt_case(shape, dtype), f"floor x*2+1 ({mib:.0f} MiB)", e, t[("floor", "fresh")])
        )
    return rows


def table(rows):
    out = [
        "| case | mode | jaxinit ms | flax ms | flax two-pass ms | jaxinit / best flax "
        "| jaxinit / memory floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if len(r) == 4:
            out.append(
                f"| {r[0]} | {r[1]} | reused buffers {r[2]:.3f} | fresh output {r[3]:.3f} | | | |"
            )
        else:
            out.append(
                f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} "
                f"| {r[6]:.2f} |"
            )
    return "\n".join(out)


def write_results(text, path):
    start, end = "<!-- batchnorm:start -->", "<!-- batchnorm:end -->"
    block = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke run)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    a = p.parse_args(argv)
    if a.quick:
        cases = [((256, 128), jnp.float32), ((8, 8, 8, 32), jnp.bfloat16)]
        rounds = a.rounds or 5
    else:
        cases = CASES
        rounds = a.rounds or 41
    rows = run(rounds, a.warmup, cases)
    tab = table(rows)
    print(tab)
    if not a.quick and not a.no_write:
        cmd = "python benchmarks/batchnorm.py" + (f" --rounds {a.rounds}" if a.rounds else "")
        env = (
            f"jax {jax.__version__}, flax {flax.__version__}, "
            f"{platform.processor() or platform.machine()}, "
            f"{jax.device_count()} device(s); medians of {rounds} interleaved rounds"
        )
        text = (
            "## Batch norm\n\n"
            f"Command: `{cmd}` ({env}).\n\n"
            f"{tab}\n\n"
            "Memory floor: eval fwd = 1 elementwise pass, train fwd = 1.5, train fwd+bwd = 4 "
            "(8 passes over x), each pass timed as `x*2+1` inside a `fori_loop` (buffers "
            "reused). Outputs of 32 MiB or more, here (64, 32, 32, 128) float32, pay page "
            "faults on every fresh buffer on this machine (compare the floor's fresh-output "
            "time), which the real layers pay and the floor does not."
        )
        write_results(text, Path(__file__).with_name("RESULTS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
