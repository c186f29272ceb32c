"""Normalization speed and memory: jaxinit vs flax's modules vs an elementwise memory floor.

Run: ``python benchmarks/normalization.py`` (``--quick`` for a short smoke run, ``--only ln``
to run one norm, ``--no-write`` to leave RESULTS.md alone). For layer norm and RMS norm on
(4096, 1024) and (8192, 1024) in float32 and bfloat16, group norm on (64, 32, 32, 128) float32 and
batch norm on (4096, 1024) float32 and (64, 32, 32, 128) float32 and bfloat16, it times, side by
side in one process and interleaved (each round runs every variant once, in rotating order), the
median of ``--rounds`` rounds after warm-up, under ``jax.jit``:

* fwd: the training-mode forward (batch norm: ``y`` and the new running statistics);
* fwd+bwd: the forward and the gradients with respect to x, scale and bias for a given output
  cotangent (one VJP);
* eval fwd (batch norm only): ``y`` from the running statistics.

Variants: jaxinit; flax's module with its default ``use_fast_variance=True``; flax with
``use_fast_variance=False`` (the same formula as jaxinit's); and the floor, one elementwise pass
``x * 2 + 1`` (read x, write y) timed inside a ``lax.fori_loop`` so its buffers are reused.
Memory floors in passes over x: fwd = 2 for row norms (read, write; the statistics of a row stay
in cache) and 1.5 for batch and group norm (the statistics pass reads x once more), fwd+bwd = 4.

Residuals are the bytes the forward saves for the backward, counted from
``jax.ad_checkpoint.print_saved_residuals`` of the function of (x, scale, bias), x included.

The script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised (``--system-malloc`` keeps the defaults): by default every
output of 32 MiB or more is a fresh ``mmap`` whose page faults cost about 17 ms on this machine,
for every variant alike, which would hide the differences between them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxinit as ji

F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [
    ("layer_norm", (4096, 1024), F32),
    ("layer_norm", (4096, 1024), BF16),
    ("layer_norm", (8192, 1024), F32),
    ("layer_norm", (8192, 1024), BF16),
    ("rms_norm", (4096, 1024), F32),
    ("rms_norm", (4096, 1024), BF16),
    ("rms_norm", (8192, 1024), F32),
    ("rms_norm", (8192, 1024), BF16),
    ("group_norm", (64, 32, 32, 128), F32),
    ("batch_norm", (4096, 1024), F32),
    ("batch_norm", (64, 32, 32, 128), F32),
    ("batch_norm", (64, 32, 32, 128), BF16),
]
QUICK = [
    ("layer_norm", (256, 128), F32),
    ("rms_norm", (256, 128), BF16),
    ("group_norm", (4, 8, 8, 64), F32),
    ("batch_norm", (8, 8, 8, 32), BF16),
]
SHORT = {"layer_norm": "ln", "rms_norm": "rms", "group_norm": "gn", "batch_norm": "bn"}
FLOOR_ITERS = 20
FWD_PASSES = {"layer_norm": 2.0, "rms_norm": 2.0, "group_norm": 1.5, "batch_norm": 1.5}
GROUPS = 32
# Freed buffers stay in the heap: no page faults for a fresh 32 MiB output on every call.
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def _inputs(shape, dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = (3.0 + 2.0 * jax.random.normal(k1, shape, F32)).astype(dtype)
    ct = jax.random.normal(k2, shape, F32).astype(dtype)
    f = shape[-1]
    scale = 1.0 + 0.1 * jax.random.normal(k3, (f,), F32)
    bias = 0.1 * jax.random.normal(k4, (f,), F32)
    return x, ct, scale, bias


def _jaxinit_apply(norm, f):
    """``apply(x, scale, bias) -> y`` (train mode) and, for batch norm, the eval forward."""
    if norm == "layer_norm":
        return (lambda x, s, b: ji.layer_norm(x, s, b)), None
    if norm == "rms_norm":
        return (lambda x, s, b: ji.rms_norm(x, s)), None
    if norm == "group_norm":
        return (lambda x, s, b: ji.group_norm(x, s, b, num_groups=GROUPS)), None
    state = ji.batch_norm_state(f)

    def train(x, s, b):
        return ji.batch_norm(x, state, s, b, training=True)

    def ev(x, s, b):
        return ji.batch_norm(x, state, s, b, training=False)[0]

    return train, ev


def _flax_apply(norm, f, fast):
    if norm == "batch_norm":
        bn = nn.BatchNorm(use_fast_variance=fast)
        stats = {"mean": jnp.zeros((f,), F32), "var": jnp.ones((f,), F32)}

        def train(x, s, b):
            v = {"params": {"scale": s, "bias": b}, "batch_stats": stats}
            y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        def ev(x, s, b):
            v = {"params": {"scale": s, "bias": b}, "batch_stats": stats}
            return bn.apply(v, x, use_running_average=True)

        return train, ev
    module = {
        "layer_norm": lambda: nn.LayerNorm(use_fast_variance=fast),
        "rms_norm": lambda: nn.RMSNorm(use_fast_variance=fast),
        "group_norm": lambda: nn.GroupNorm(num_groups=GROUPS, use_fast_variance=fast),
    }[norm]()

    def train(x, s, b):
        params = {"scale": s} if norm == "rms_norm" else {"scale": s, "bias": b}
        return module.apply({"params": params}, x)

    return train, None


def _jobs(apply, ev):
    def fwd(x, ct, s, b):
        return apply(x, s, b)

    def fwd_bwd(x, ct, s, b):
        out, vjp = jax.vjp(apply, x, s, b)
        y = out[0] if isinstance(out, tuple) else out
        # flax returns float32 for bf16 input with float32 params; feed a matching cotangent.
        cts = jax.tree.map(jnp.zeros_like, out)
        cts = (ct.astype(y.dtype), *cts[1:]) if isinstance(out, tuple) else ct.astype(y.dtype)
        return out, vjp(cts)

    jobs = {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(fwd_bwd)}
    if ev is not None:
        jobs["eval fwd"] = jax.jit(lambda x, ct, s, b: ev(x, s, b))
    return jobs


_AVAL = re.compile(r"^(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "bool": 1, "u32": 4, "i8": 1}


def residual_bytes(apply, *args):
    """Bytes saved for the backward of ``apply`` (from ``print_saved_residuals``)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(apply, *args)
    total = 0
    for line in buf.getvalue().splitlines():
        m = _AVAL.match(line.strip())
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            total += _BYTES.get(m.group(1), 4) * int(np.prod(dims, dtype=np.int64))
    return total


def _floor():
    return jax.jit(lambda x: lax.fori_loop(0, FLOOR_ITERS, lambda i, v: v * 2 + 1, x))


def _time_once(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_case(norm, shape, dtype, rounds, warmup):
    x, ct, scale, bias = _inputs(shape, dtype)
    f = shape[-1]
    applies = {"jaxinit": _jaxinit_apply(norm, f)}
    applies["flax"] = _flax_apply(norm, f, True)
    applies["flax two-pass"] = _flax_apply(norm, f, False)
    args = (x, ct, scale, bias)
    jobs = {}
    for name, (apply, ev) in applies.items():
        for mode, fn in _jobs(apply, ev).items():
            jobs[(name, mode)] = (fn, args, 1)
    jobs[("floor", "pass")] = (_floor(), (x,), FLOOR_ITERS)
    for fn, a, _ in jobs.values():
        for _ in range(warmup):
            _time_once(fn, a)
    keys = list(jobs)
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            fn, a, div = jobs[k]
            times[k].append(_time_once(fn, a) / div)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    res = {name: residual_bytes(apply, x, scale, bias) for name, (apply, _) in applies.items()}
    return med, res


def run(rounds, warmup, cases):
    rows = []
    for norm, shape, dtype in cases:
        t, res = bench_case(norm, shape, dtype, rounds, warmup)
        floor = t[("floor", "pass")]
        case = f"{norm} {tuple(shape)} {jnp.dtype(dtype).name}"
        modes = ["fwd", "fwd+bwd"] + (["eval fwd"] if norm == "batch_norm" else [])
        for mode in modes:
            passes = {"fwd": FWD_PASSES[norm], "fwd+bwd": 4.0, "eval fwd": 1.0}[mode]
            j, fl, fl2 = (t[(n, mode)] for n in ("jaxinit", "flax", "flax two-pass"))
            resid = ""
            if mode == "fwd+bwd":
                resid = f"{res['jaxinit'] / 2**20:.1f} / {res['flax'] / 2**20:.1f}"
                resid += f" ({res['jaxinit'] / res['flax']:.2f})"
            rows.append(
                (case, mode, j, fl, fl2, j / fl, j / min(fl, fl2), j / (passes * floor), resid)
            )
    return rows


def table(rows):
    out = [
        "| case | mode | jaxinit ms | flax ms | flax two-pass ms | / flax | / best flax "
        "| / memory floor | residuals MiB jaxinit / flax (ratio) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} "
            f"| {r[7]:.2f} | {r[8]} |"
        )
    return "\n".join(out)


NOTES = """\
`/ flax` is jaxinit's time over flax's default module (`use_fast_variance=True`), `/ best flax`
over the faster of flax's two variants. The memory floor counts passes over x (fwd: 2 for row
norms, 1.5 for batch and group norm; fwd+bwd: 4) of an `x*2+1` loop with reused buffers.

What bounds jaxinit here: its statistics are two shifted sums (`sum(x - s)`, `sum((x - s)**2)`
with `s` a sample of the data), the price of a variance that stays exact far from zero mean, and
XLA:CPU does not fuse two reductions that share `x - s` into one read without writing `x - s`
out, so batch norm's forward reads x three times where flax's `E[x^2] - E[x]^2` reads it twice.
Its backward is two reductions over x and dy and one elementwise pass, and XLA:CPU's reductions
over the leading (batch) axis run at about a third of the speed of row reductions: batch norm's
fwd+bwd makes some 10 passes over arrays of x's size against the floor's 4. Row norms reduce
over contiguous rows, and their gain is the backward: jaxinit saves x and per-row statistics
(a third of flax's bytes in float32, a sixth in bfloat16, which saves the input promoted to
float32 and more) and never writes a full-size float32 temporary. Below a few MiB (the
`--quick` shapes) jaxinit's extra small kernels cost more than they save.
"""


def write_results(text, path):
    start, end = "<!-- normalization:start -->", "<!-- normalization:end -->"
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
    p.add_argument("--only", choices=sorted(SHORT.values()), action="append", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's mmap threshold")
    a = p.parse_args(argv)
    if not a.system_malloc and any(os.environ.get(k) != v for k, v in HEAP_ENV.items()):
        args = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, __file__, *args], {**os.environ, **HEAP_ENV})
    cases = QUICK if a.quick else CASES
    if a.only:
        cases = [c for c in cases if SHORT[c[0]] in a.only]
    rounds = a.rounds or (5 if a.quick else 21)
    rows = run(rounds, a.warmup, cases)
    tab = table(rows)
    print(tab)
    if not a.quick and not a.only and not a.no_write:
        cmd = "python benchmarks/normalization.py" + (f" --rounds {a.rounds}" if a.rounds else "")
        cmd += " --system-malloc" if a.system_malloc else ""
        env = (
            f"jax {jax.__version__}, flax {flax.__version__}, "
            f"{platform.processor() or platform.machine()}, {jax.device_count()} device(s); "
            f"medians of {rounds} interleaved rounds"
        )
        text = f"## Normalization\n\nCommand: `{cmd}` ({env}).\n\n{tab}\n\n{NOTES}"
        write_results(text, Path(__file__).with_name("RESULTS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
