"""Test-session setup, before JAX loads: 8 host devices, fast compiles, strict dtype promotion."""

import os

# jax's CPU QR calls into OpenBLAS, whose spinning threads make orthogonal init crawl on a busy
# 2-core machine; one thread is faster there.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite compiles some 2000 small programs and runs each once, so compiling is most of its
# work: LLVM -O0 instead of -O2, and XLA's classic loop emitters instead of the MLIR fusion
# emitters, compile the table of 63 initializers in a fraction of the default time. HLO passes
# (fusion, buffer assignment, sharding) still run, so memory and sharding checks see the same
# programs; benchmarks do not import this file. At -O0 two differently fused programs may round
# a product differently, so the tests marked `same_rounding` (bit-identical results from
# different programs: eager against jit, sharded against unsharded, one process against two)
# run apart, in one subprocess at -O1 (tests/test_same_rounding.py).
OPT_LEVEL = os.environ.get("JAXINIT_TEST_OPT_LEVEL", "0")
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    f"--xla_backend_optimization_level={OPT_LEVEL}",
    "--xla_cpu_use_fusion_emitters=false",
)
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_current, *(f for f in _FLAGS if f not in _current)]).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "same_rounding: asserts bit-identical results from differently compiled programs; "
        "runs in a subprocess at LLVM -O1 (tests/test_same_rounding.py)",
    )


def pytest_collection_modifyitems(config, items):
    """At -O0, leave the `same_rounding` tests to tests/test_same_rounding.py's subprocess."""
    if OPT_LEVEL != "0":
        return
    apart = [item for item in items if item.get_closest_marker("same_rounding")]
    if apart:
        config.hook.pytest_deselected(items=apart)
        items[:] = [item for item in items if not item.get_closest_marker("same_rounding")]
