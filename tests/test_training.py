"""End to end: small Flax models with jaxinit initializers and batch norm, trained with optax.

Data is generated here: a two-class problem with an offset far from zero (where batch norm
matters) for the MLPs, and horizontal-versus-vertical bars in noise for the CNN.
"""

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers_norm import assert_close_to_scale, sum_tol

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
    return x.astype(np.float32), y.astype(np.int32)


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
    return x.astype(np.float32), y.astype(np.int32)


def batches(n):
    """The example indices of each step: 64 of the n, without replacement, fixed seeds."""
    return [np.random.default_rng(i).choice(n, 64, replace=False) for i in range(STEPS)]


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
    tx = optax.adam(lr)

    @jax.jit
    def init(key, x):
        variables = model.init(key, x, train=False)
        return variables["params"], variables["batch_stats"], tx.init(variables["params"])

    params, stats, opt_state = init(jax.random.key(0), x)

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
    for idx in batches(x.shape[0]):
        params, stats, opt_state, loss = step(params, stats, opt_state, x[idx], y[idx])
        losses.append(loss)
    return {"params": params, "batch_stats": stats}, init_stats, np.array(jax.device_get(losses))


def check_eval_uses_running_stats(model, variables, init_stats, x, y):
    # The running statistics moved away from their initial values (mean 0, var 1) ...
    new, old = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(init_stats)
    for a, b in zip(new, old, strict=True):
        assert not np.allclose(a, b)

    @jax.jit
    def run(v, x):
        return (
            model.apply(v, x, train=False),
            model.apply(v, x[:1], train=False),
            model.apply(v, x[:1], train=True, mutable=["batch_stats"])[0],
        )

    logits, one, train_one = jax.device_get(run(variables, x))
    # ... and eval mode uses them: each example's output does not depend on the rest of the
    # batch (up to the summation order of the batch-size-dependent matmul and conv kernels,
    # whose longest sums have 64 terms: the CNN's 1x8 conv over 8 channels),
    assert_close_to_scale(one, logits[:1], sum_tol(64))
    # differs from the batch-statistics output on a one-example batch,
    assert np.abs(train_one - one).max() > 1e-3
    # and classifies well.
    assert np.mean(np.argmax(logits, -1) == y) > 0.9


@pytest.mark.parametrize(
    "model, data, lr",
    [pytest.param(MLP(), blobs, 1e-2, id="mlp"), pytest.param(CNN(), bars, 2e-2, id="cnn")],
)
def test_linen(model, data, lr):
    chex.clear_trace_counter()
    x, y = data()
    variables, init_stats, losses = train_linen(model, x, y, lr)
    assert losses[-10:].mean() < 0.5 * losses[:5].mean()
    check_eval_uses_running_stats(model, variables, init_stats, x, y)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 32, kernel_init=ji.kaiming_normal(nonlinearity="relu"), rngs=rngs)
        self.bn = jnnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(32, 2, kernel_init=ji.lecun_normal(), rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def build_nnx():
    model = NnxMLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def test_nnx_mlp():
    x, y = blobs(seed=1)
    # Built under jit: one compile instead of one per initializer op.
    model, optimizer = nnx.jit(build_nnx)()
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
    losses = np.array(jax.device_get([step(model, optimizer, x[i], y[i]) for i in batches(256)]))
    assert len(traces) == 1
    assert losses[-10:].mean() < 0.5 * losses[:5].mean()
    assert not np.allclose(model.bn.mean[...], 0.0)

    model.eval()
    stats = nnx.clone(nnx.state(model, nnx.BatchStat))
    logits, one = jax.device_get(nnx.jit(lambda m, x: (m(x), m(x[:1])))(model, x))
    chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), stats)
    # Eval is per example (see check_eval_uses_running_stats).
    assert_close_to_scale(one, logits[:1], sum_tol(64))
    assert np.mean(np.argmax(logits, -1) == y) > 0.9
    model.train()
    train_one = jax.device_get(nnx.jit(lambda m, x: m(x[:1]))(model, x))
    assert np.abs(train_one - logits[:1]).max() > 1e-3
