"""End to end: small Flax models with jaxinit initializers and batch norm, trained with optax.

Data is generated here: a two-class problem with an offset far from zero (where batch norm
matters) for the MLPs, and horizontal-versus-vertical bars in noise for the CNN.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxinit as ji
import jaxinit.linen as jil
import jaxinit.nnx as jnnx

STEPS = 60


def blobs(n=256, seed=0):
    """Two Gaussian classes in 8-D, centred far from the origin (offset 50, scale 10)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centres = np.where(y[:, None] == 1, 1.0, -1.0) * np.linspace(0.5, 1.5, 8)
    x = 50.0 + 10.0 * (centres + 0.7 * rng.normal(size=(n, 8)))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def bars(n=128, size=8, seed=0):
    """Images with one horizontal (class 0) or vertical (class 1) bar, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = 0.3 * rng.normal(size=(n, size, size, 1))
    pos = rng.integers(0, size, n)
    for i in range(n):
        if y[i] == 0:
            x[i, pos[i], :, 0] += 1.0
        else:
            x[i, :, pos[i], 0] += 1.0
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(32, kernel_init=ji.kaiming_normal(nonlinearity="relu"))(x)
        x = jil.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dense(2, kernel_init=ji.lecun_normal())(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), kernel_init=ji.kaiming_normal(nonlinearity="relu"), use_bias=False)(
            x
        )
        x = jil.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (1, 8), kernel_init=ji.kaiming_normal(nonlinearity="relu"))(x)
        x = nn.relu(x).max((1, 2))
        return nn.Dense(2, kernel_init=ji.xavier_uniform())(x)


def train_linen(model, x, y, lr):
    variables = model.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return xent(logits, y), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with floats
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    init_stats = stats
    for i in range(STEPS):
        idx = jnp.asarray(np.random.default_rng(i).choice(x.shape[0], 64, replace=False))
        params, stats, opt_state, loss = step(params, stats, opt_state, x[idx], y[idx])
        losses.append(float(loss))
    return {"params": params, "batch_stats": stats}, init_stats, np.array(losses)


def check_eval_uses_running_stats(test, model, variables, init_stats, x, y):
    # The running statistics moved away from their initial values (mean 0, var 1) ...
    new, old = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(init_stats)
    for a, b in zip(new, old, strict=True):
        test.assertFalse(bool(jnp.allclose(a, b)))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    # ... and eval mode uses them: each example's output does not depend on the rest of the batch,
    one = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(one, logits[:1], rtol=1e-4, atol=1e-4)
    # differs from the batch-statistics output on a one-example batch,
    train_one, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
    test.assertGreater(float(jnp.abs(train_one - one).max()), 1e-3)
    # and classifies well.
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
    test.assertGreater(accuracy, 0.9)


class LinenTrainingTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        chex.clear_trace_counter()

    def test_mlp(self):
        x, y = blobs()
        variables, init_stats, losses = train_linen(MLP(), x, y, 1e-2)
        self.assertLess(losses[-10:].mean(), 0.5 * losses[:5].mean())
        check_eval_uses_running_stats(self, MLP(), variables, init_stats, x, y)

    def test_cnn(self):
        x, y = bars()
        variables, init_stats, losses = train_linen(CNN(), x, y, 2e-2)
        self.assertLess(losses[-10:].mean(), 0.5 * losses[:5].mean())
        check_eval_uses_running_stats(self, CNN(), variables, init_stats, x, y)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 32, kernel_init=ji.kaiming_normal(nonlinearity="relu"), rngs=rngs)
        self.bn = jnnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(32, 2, kernel_init=ji.lecun_normal(), rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


class NnxTrainingTest(chex.TestCase):
    def test_mlp(self):
        x, y = blobs(seed=1)
        model = NnxMLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        traces = []

        @nnx.jit
        def step(model, optimizer, x, y):
            traces.append(1)  # runs only while tracing

            def loss_fn(model):
                return xent(model(x), y)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            with jax.numpy_dtype_promotion("standard"):  # optax's int32 count meets floats
                optimizer.update(model, grads)
            return loss

        model.train()
        losses = []
        for i in range(STEPS):
            idx = jnp.asarray(np.random.default_rng(i).choice(x.shape[0], 64, replace=False))
            losses.append(float(step(model, optimizer, x[idx], y[idx])))
        losses = np.array(losses)
        self.assertEqual(len(traces), 1)
        self.assertLess(losses[-10:].mean(), 0.5 * losses[:5].mean())
        self.assertFalse(bool(jnp.allclose(model.bn.mean[...], 0.0)))

        model.eval()
        stats = nnx.clone(nnx.state(model, nnx.BatchStat))
        logits = nnx.jit(lambda m, x: m(x))(model, x)
        chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), stats)
        np.testing.assert_allclose(model(x[:1]), logits[:1], rtol=1e-4, atol=1e-4)
        self.assertGreater(float(jnp.mean(jnp.argmax(logits, -1) == y)), 0.9)
        model.train()
        self.assertGreater(float(jnp.abs(model(x[:1]) - logits[:1]).max()), 1e-3)
