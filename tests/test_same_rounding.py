"""Runs the tests marked ``same_rounding`` in a subprocess compiled at LLVM -O1 (see conftest.py).

They assert that differently compiled programs give bit-identical results (eager and jit,
sharded and unsharded, one process and two), which holds at the default optimization level and
at -O1 but not at the -O0 the rest of the suite compiles with.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_same_rounding_tests_pass_at_o1():
    env = {**os.environ, "JAXINIT_TEST_OPT_LEVEL": "1"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
    cmd += ["-m", "same_rounding", "tests/test_sharding.py", "tests/test_initializers.py"]
    cmd += ["tests/test_multiprocess.py"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-4000:]
    # Exit code 5 (nothing collected) would mean the marks are gone: a failure too.
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " deselected" in run.stdout, tail
