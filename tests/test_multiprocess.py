"""Two JAX processes on 127.0.0.1 (4 host devices each) against this single process (8 devices).

The children run tests/_multiprocess_worker.py: sharded initialization and cross-process batch
norm over the 8 global devices, with gloo CPU collectives. Each saves its addressable shards; the
parent assembles them and compares with the same computation on its own 8 devices.
"""

import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import jax
import numpy as np
from absl.testing import absltest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxinit as ji

sys.path.insert(0, os.path.dirname(__file__))
import _multiprocess_worker as worker

WORKER = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
TIMEOUT_S = 45


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


def _assemble(out_dir, name, shape, dtype=np.float32):
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


@unittest.skipIf(_gloo_missing_reason(), _gloo_missing_reason() or "")
class MultiProcessTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        port = _free_port()
        env = dict(os.environ)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # not the parent's 8
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("JAX_NUM_CPU_DEVICES", None)
        procs = []
        try:
            for pid in range(2):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, WORKER, str(port), str(pid), cls.tmp.name],
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
            deadline = time.monotonic() + TIMEOUT_S
            cls.outputs = []
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                cls.outputs.append((p.returncode, out))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_children_succeeded(self):
        for code, out in self.outputs:
            self.assertEqual(code, 0, out[-3000:])

    def test_sharded_init_matches_single_process(self):
        self.test_children_succeeded()
        mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        row = NamedSharding(mesh, P("d"))
        key = jax.random.key(7)
        for name, init in [("he_normal", ji.he_normal()), ("orthogonal", ji.orthogonal())]:
            ref = np.asarray(
                jax.jit(lambda k, init=init: init(k, worker.SHAPE, out_sharding=row))(key)
            )
            got = _assemble(self.tmp.name, name, worker.SHAPE)
            np.testing.assert_array_equal(got, ref, err_msg=name)
        ref = np.asarray(ji.orthogonal()(key, worker.SHAPE))
        np.testing.assert_array_equal(_assemble(self.tmp.name, "orthogonal", worker.SHAPE), ref)
        # Inside jit the QR runs on one device of the 8 and reaches the other process by psum.
        got = _assemble(self.tmp.name, "orthogonal_jit", worker.SHAPE)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.T @ got, np.eye(worker.SHAPE[1]), atol=2e-5)

    def test_batch_norm_matches_global_batch(self):
        self.test_children_succeeded()
        x, mask = worker.batch_norm_inputs()
        y_ref, mean_ref, var_ref = jax.jit(worker.batch_norm_step, static_argnums=2)(x, mask, None)
        y = _assemble(self.tmp.name, "bn_y", x.shape)
        mean = _assemble(self.tmp.name, "bn_mean", (6,))
        var = _assemble(self.tmp.name, "bn_var", (6,))
        m = mask[:, 0]
        np.testing.assert_allclose(y[m], np.asarray(y_ref)[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)
        np.testing.assert_allclose(var, var_ref, rtol=1e-6)
        # Count-weighted: equal to float64 statistics of the kept rows, not a mean of means.
        kept = x.astype(np.float64)[m]
        np.testing.assert_allclose(mean, 0.5 * kept.mean(0), rtol=1e-5)
        np.testing.assert_allclose(var, 0.5 + 0.5 * kept.var(0), rtol=1e-5)
