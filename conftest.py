"""Test-session setup, before JAX loads: 8 host devices, fast compiles, strict dtype promotion."""

import os

# jax's CPU QR calls into OpenBLAS, whose spinning threads make orthogonal init crawl on a busy
# 2-core machine; one thread is faster there.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite compiles hundreds of small programs and runs each once: LLVM's -O2 passes cost more
# time than they save at test sizes (a table of 33 initializers compiles in 1.2 s instead of
# 4.3 s at -O1). HLO passes (fusion, buffer assignment, sharding) still run, so memory and
# sharding checks see the same programs; benchmarks do not import this file. (-O0 is no faster
# and rounds some fused products differently from -O2.)
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=1",
)
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_current, *(f for f in _FLAGS if f not in _current)]).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
