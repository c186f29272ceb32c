"""Test-session setup: 8 host devices and strict dtype promotion, before JAX loads."""

import os

# jax's CPU QR calls into OpenBLAS, whose spinning threads make orthogonal init crawl on a busy
# 2-core machine; one thread is faster there.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
