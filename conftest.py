"""Test-session setup, before JAX loads: 8 host devices, fast compiles, strict dtype promotion."""

import os

# jax's CPU QR calls into OpenBLAS, whose spinning threads make orthogonal init crawl on a busy
# 2-core machine; one thread is faster there.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite compiles some 1500 small programs and runs each once, so compiling is most of its
# work: LLVM -O1 instead of -O2, and XLA's classic loop emitters instead of the MLIR fusion
# emitters, compile the table of 63 initializers in 3.9 s instead of 9.4 s. HLO passes (fusion,
# buffer assignment, sharding) still run, so memory and sharding checks see the same programs;
# benchmarks do not import this file. (-O0 compiles faster still but rounds some fused products
# differently from one program to another.)
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=1",
    "--xla_cpu_use_fusion_emitters=false",
)
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_current, *(f for f in _FLAGS if f not in _current)]).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
