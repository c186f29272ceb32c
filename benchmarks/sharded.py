"""Sharded vs unsharded initialization, and cross-device vs single-device batch norm.

Run: ``python benchmarks/sharded.py`` (``--quick`` for a smoke run with a 1024^2 kernel,
``--no-write`` to leave RESULTS.md alone). Sets ``XLA_FLAGS`` for 8 host CPU devices before jax
is imported. For each case it reports the compiled per-device memory (``memory_analysis()``:
temp + output bytes, in shards of the full array) and the median wall time of interleaved runs
after warm-up. Variants:

* he_normal: unsharded jit vs jit with ``out_sharding=NamedSharding(mesh, P("d"))``.
* orthogonal: unsharded vs sharded outside jit (QR once on one device, then ``device_put``) vs
  sharded inside jit (``compute_once``: the QR under ``lax.cond`` on the first device, a psum,
  then each device keeps its shard).
* batch norm train forward on one global batch: one device vs ``jax.shard_map`` over 8 devices
  with ``axis_name`` (count-weighted cross-device statistics).

Host "devices" share this machine's cores, so sharded times measure overhead, not speed-up.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

N_DEV = 8


def _memory(compiled):
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def _time(fns, rounds):
    """Median seconds of each fn over interleaved rounds (rotating order), after one warm-up."""
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_init(name, init, n, rounds, mesh):
    shape = (n, n)
    full = 4 * n * n
    shard = full / N_DEV
    s = NamedSharding(mesh, P("d"))
    key = jax.random.key(0)
    unsharded = jax.jit(lambda k: init(k, shape)).lower(key).compile()
    sharded = jax.jit(lambda k: init(k, shape, out_sharding=s)).lower(key).compile()
    fns = {"unsharded jit": lambda: unsharded(key), "sharded jit": lambda: sharded(key)}
    mem = {"unsharded jit": _memory(unsharded), "sharded jit": _memory(sharded)}
    if name == "orthogonal":
        fns["sharded eager"] = lambda: init(key, shape, out_sharding=s)
        mem["sharded eager"] = None
    t = _time(fns, rounds)
    # Values: sharded equals unsharded.
    ref = np.asarray(unsharded(key))
    for k in fns:
        if k != "unsharded jit":
            same = np.array_equal(np.asarray(fns[k]()), ref)
            mem[k + " same"] = same
    rows = []
    base = t["unsharded jit"]
    for k in fns:
        m = mem[k]
        rows.append(
            (
                f"{name} ({n}, {n}) f32",
                k,
                "-" if m is None else f"{m / 2**20:.0f}",
                "-" if m is None else f"{m / shard:.2f}",
                f"{t[k] * 1e3:.1f}",
                f"{t[k] / base:.2f}",
                "ref" if k == "unsharded jit" else str(mem[k + " same"]),
            )
        )
    return rows


def bench_batch_norm(shape, rounds, mesh):
    f = shape[-1]
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), shape, jnp.float32)
    mask = jnp.asarray(np.random.default_rng(0).random((shape[0], 1)) < 0.8)
    state = ji.batch_norm_state(f)

    def step(x, mask, axis_name):
        y, new = ji.batch_norm(x, state, training=True, axis_name=axis_name, mask=mask)
        return y, new.mean, new.var

    single = jax.jit(lambda x, m: step(x, m, None))
    row = NamedSharding(mesh, P("d"))
    sm = jax.jit(
        jax.shard_map(
            lambda x, m: step(x, m, "d"),
            mesh=mesh,
            in_specs=(P("d"), P("d")),
            out_specs=(P("d"), P(), P()),
        )
    )
    xs, ms = jax.device_put(x, row), jax.device_put(mask, row)
    x1, m1 = jax.device_put(x, jax.devices()[0]), jax.device_put(mask, jax.devices()[0])
    t = _time({"1 device": lambda: single(x1, m1), "8 devices": lambda: sm(xs, ms)}, rounds)
    a, b = single(x1, m1), sm(xs, ms)
    err = max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(a[1:], b[1:], strict=True)
    )
    full = 4 * x.size
    rows = []
    for k, c in (
        ("1 device", single.lower(x1, m1).compile()),
        ("8 devices", sm.lower(xs, ms).compile()),
    ):
        m = _memory(c)
        rows.append(
            (
                f"batch norm train fwd {shape} f32, masked",
                k,
                f"{m / 2**20:.0f}",
                f"{m / (full / N_DEV):.2f}",
                f"{t[k] * 1e3:.1f}",
                f"{t[k] / t['1 device']:.2f}",
                "ref" if k == "1 device" else f"max stat diff {err:.1e}",
            )
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024^2 kernel, few rounds")
    ap.add_argument("--rounds", type=int, default=7, help="rounds for he_normal and batch norm")
    ap.add_argument("--ortho-rounds", type=int, default=1, help="rounds for orthogonal")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    assert jax.device_count() == N_DEV, jax.devices()
    n = 1024 if args.quick else 8192
    rounds = 3 if args.quick else args.rounds
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = bench_init("he_normal", ji.he_normal(), n, rounds, mesh)
    rows += bench_init("orthogonal", ji.orthogonal(), n, args.ortho_rounds, mesh)
    bn_shape = (512, 256) if args.quick else (4096, 1024)
    rows += bench_batch_norm(bn_shape, rounds, mesh)

    header = (
        "| case | variant | per-device MiB | per-device shards | median ms | / baseline | "
        "values equal |\n|---|---|---:|---:|---:|---:|---|\n"
    )
    table = header + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    cmd = "python benchmarks/sharded.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.rounds != 7 or args.ortho_rounds != 1):
        cmd += f" --rounds {args.rounds} --ortho-rounds {args.ortho_rounds}"
    text = (
        "## Sharded initialization and cross-device batch norm\n\n"
        f"Command: `{cmd}` (jax {jax.__version__}, {platform.machine()}, {N_DEV} host CPU "
        f"devices on {os.cpu_count()} cores; medians of interleaved rounds after warm-up: "
        f"{rounds} for he_normal and batch norm, {args.ortho_rounds} for orthogonal).\n\n"
        + table
        + "\n\nPer-device memory is the compiled `memory_analysis()` temp + output of one device, "
        "in shards (full array / 8). Targets: sharded per-device peak <= 6 shards, time <= 1.2x "
        "unsharded. orthogonal cannot be partitioned: its QR needs the whole matrix on one device "
        "(sharded eager: QR once, then `device_put`; sharded jit: the QR under `lax.cond` on the "
        "first device, then a psum), so its per-device figure is the full QR workspace. The host "
        "devices share the machine's cores, so 8-device times show overhead, not speed-up.\n"
    )
    print(text)
    if not args.no_write:
        path = Path(__file__).with_name("RESULTS.md")
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        block = f"<!-- sharded:start -->\n{text}<!-- sharded:end -->"
        pat = re.compile(r"<!-- sharded:start -->.*?<!-- sharded:end -->", re.S)
        new = (
            pat.sub(lambda _: block, old)
            if pat.search(old)
            else old.rstrip() + "\n\n" + block + "\n"
        )
        path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
