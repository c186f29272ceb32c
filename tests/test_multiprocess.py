"""Two JAX processes on 127.0.0.1 (4 host devices each) against this single process (8 devices).

The children run tests/_multiprocess_worker.py: sharded initialization and cross-process batch
norm over the 8 global devices, with gloo CPU collectives. Each saves its addressable shards; the
parent assembles them and compares with the same computation on its own 8 devices.

The children start when the first test here needs them (not at collection: under pytest-xdist
every worker collects every file).
"""

import atexit
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from helpers_norm import f64, np_stats, sum_tol
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

sys.path.insert(0, os.path.dirname(__file__))
import _multiprocess_worker as worker

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
TIMEOUT_S = 60  # from the start of the children to the end of both (at least 15 s of waiting)


def _gloo_missing_reason():
    try:
        from jax._src.lib import _jax
    except ImportError:
        return "jaxlib has no _jax extension"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "the installed jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The two worker processes; their output goes to files in ``out_dir``."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.out_dir = self._tmp.name
        env = dict(os.environ)
        # 4 devices each (not the parent's 8), compiled as the parent is (see conftest.py).
        env["XLA_FLAGS"] = (
            "--xla_force_host_platform_device_count=4 --xla_cpu_use_fusion_emitters=false "
            f"--xla_backend_optimization_level={os.environ.get('JAXINIT_TEST_OPT_LEVEL', '0')}"
        )
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("JAX_NUM_CPU_DEVICES", None)
        port = _free_port()
        self.start = time.monotonic()
        self.procs, self.logs = [], []
        for pid in range(2):
            log = open(os.path.join(self.out_dir, f"log{pid}.txt"), "w+")
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, str(port), str(pid), self.out_dir],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        atexit.register(self.close)

    def wait(self):
        """[(return code, output)] of both children, killed past TIMEOUT_S."""
        results = []
        for p, log in zip(self.procs, self.logs, strict=True):
            try:
                p.wait(timeout=max(15.0, self.start + TIMEOUT_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.seek(0)
            results.append((p.returncode, log.read()))
        return results

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()
        self._tmp.cleanup()


REASON = _gloo_missing_reason()
# Compares values computed in two processes with one process's: bit-identical at -O1.
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.same_rounding,
]


@pytest.fixture(scope="module")
def out_dir():
    cluster = Cluster()
    results = cluster.wait()
    for code, out in results:
        assert code == 0, out[-3000:]
    yield cluster.out_dir
    cluster.close()


def assemble(out_dir, name, shape, dtype=np.float32):
    full = np.full(shape, np.nan, dtype)
    files = glob.glob(os.path.join(out_dir, f"{name}__*.npy"))
    assert files, f"no shards of {name} in {out_dir}"
    for path in files:
        data = np.load(path)
        starts = [int(s) for s in os.path.basename(path)[: -len(".npy")].split("__")[1].split("_")]
        idx = tuple(slice(s, s + n) for s, n in zip(starts, data.shape, strict=True))
        full[idx] = data
    assert not np.isnan(full).any(), f"{name}: shards do not cover the array"
    return full


def test_children_succeeded(out_dir):
    names = {os.path.basename(p).split("__")[0] for p in glob.glob(os.path.join(out_dir, "*.npy"))}
    assert names == {"he_normal", "orthogonal", "orthogonal_jit", "bn_y", "bn_mean", "bn_var"}


def test_sharded_init_matches_single_process(out_dir):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    row = NamedSharding(mesh, P("d"))
    key = jax.random.key(7)
    for name, init in [("he_normal", ji.he_normal()), ("orthogonal", ji.orthogonal())]:
        ref = jax.device_get(
            jax.jit(lambda k, init=init: init(k, worker.SHAPE, out_sharding=row))(key)
        )
        got = assemble(out_dir, name, worker.SHAPE)
        np.testing.assert_array_equal(got, ref, err_msg=name)
    ref = jax.device_get(ji.orthogonal()(key, worker.SHAPE))
    np.testing.assert_array_equal(assemble(out_dir, "orthogonal", worker.SHAPE), ref)
    # Inside jit the QR runs on one device of the 8 (the same LAPACK call as eagerly) and
    # reaches the other process by a psum with zeros from the other devices: exact.
    got = assemble(out_dir, "orthogonal_jit", worker.SHAPE)
    np.testing.assert_array_equal(got, ref)
    # Orthonormal columns: dot products of 64 terms.
    np.testing.assert_allclose(f64(got).T @ f64(got), np.eye(worker.SHAPE[1]), atol=sum_tol(64))


def test_batch_norm_matches_global_batch(out_dir):
    x, mask = worker.batch_norm_inputs()
    y_ref, mean_ref, var_ref = jax.device_get(
        jax.jit(worker.batch_norm_step, static_argnums=2)(x, mask, None)
    )
    y = assemble(out_dir, "bn_y", x.shape)
    mean = assemble(out_dir, "bn_mean", (6,))
    var = assemble(out_dir, "bn_var", (6,))
    m = mask[:, 0]
    n, kept_mean, kept_var = np_stats(x, (0,), mask)
    # The same sums over the kept rows, in another order: sum_tol(n) on each side.
    tol = 2 * sum_tol(int(n[0]))
    np.testing.assert_allclose(y[m], y_ref[m], rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, mean_ref, rtol=tol)
    np.testing.assert_allclose(var, var_ref, rtol=tol)
    # Count-weighted: equal to float64 statistics of the kept rows, not a mean of means.
    np.testing.assert_allclose(mean, 0.5 * kept_mean, rtol=sum_tol(int(n[0])))
    np.testing.assert_allclose(var, 0.5 + 0.5 * kept_var, rtol=sum_tol(int(n[0])))
