"""The training loss against independent references, plain and chunked, on one device and fsdp_sp."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import LLAMA3_LIKE
from train_runs import random_batch

from llama_jax import init_params
from sharding.layout import load_layout
from sharding.place import Placement
from train.objectives.cross_entropy import chunked_cross_entropy_sums, cross_entropy_sums
from train.step import make_gradients

ROWS, LENGTH, DIM, VOCAB = 3, 20, 16, 50


def _inputs(seed=0, rows=ROWS, length=LENGTH):
    """Hidden states [B, T, D], a projection [D, V], targets and uneven weights [B, T]."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(rows, length, DIM)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(DIM, VOCAB)) * 2.0, jnp.float32)  # logits of a few units
    # Half the targets are the model's top choice, so accuracy counts something.
    top = np.asarray(jnp.argmax(hidden @ kernel, axis=-1))
    targets = jnp.asarray(np.where(rng.random((rows, length)) < 0.5, top,
                                   rng.integers(0, VOCAB, (rows, length))), jnp.int32)
    weights = jnp.asarray(rng.random((rows, length)) * (rng.random((rows, length)) > 0.3), jnp.float32)
    return hidden, kernel, targets, weights


def _reference(logits, targets, weights):
    """(weighted NLL sum, weighted log Z^2 sum, weighted correct count) from optax and jax.nn."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(weights * nll), jnp.sum(weights * log_z ** 2), jnp.sum(weights * correct)


@pytest.mark.parametrize("chunk", [0, 5, 7, LENGTH])
def test_cross_entropy_equals_optax_with_weights_and_z_loss(chunk):
    hidden, kernel, targets, weights = _inputs()
    project = lambda h: h @ kernel  # noqa: E731
    if chunk:
        sums = chunked_cross_entropy_sums(project, hidden, targets, weights, chunk)
    else:
        sums = cross_entropy_sums(project(hidden), targets, weights)
    want = _reference(project(hidden), targets, weights)
    names = ("NLL", "z-loss", "correct")
    for name, got, expected in zip(names, sums, want):
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-5, err_msg=name)
    assert float(want[2]) > 0  # some targets are predicted, so accuracy is really compared


def test_cross_entropy_gradients_equal_optax_with_z_loss():
    hidden, kernel, targets, weights = _inputs(1)
    z_loss = 1e-2

    def ours(h, k, chunk):
        project = lambda x: x @ k  # noqa: E731
        if chunk:
            nll, z, _ = chunked_cross_entropy_sums(project, h, targets, weights, chunk)
        else:
            nll, z, _ = cross_entropy_sums(project(h), targets, weights)
        return nll + z_loss * z

    def reference(h, k):
        nll, z, _ = _reference(h @ k, targets, weights)
        return nll + z_loss * z

    want = jax.grad(reference, argnums=(0, 1))(hidden, kernel)
    for chunk in (0, 6):
        got = jax.grad(ours, argnums=(0, 1))(hidden, kernel, chunk)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                       atol=1e-6 * float(jnp.abs(w).max()))


# ---------------------------------------------------------------- under fsdp_sp: the length is split

RTOL = 1e-5  # as the layout tests (tests/test_sharding.py)


def _fsdp_sp():
    placement = Placement.create(LLAMA3_LIKE, load_layout("fsdp_sp"))
    assert placement.mesh.shape["sequence"] == 2
    return placement


@pytest.mark.parametrize("chunk", [8, 12])  # 12 does not divide the length 32: padded
def test_chunked_loss_under_fsdp_sp_equals_the_unchunked_loss_on_one_device(chunk):
    placement = _fsdp_sp()
    config = placement.config
    params = init_params(config, jax.random.key(0))
    batch = random_batch(8, 32, config.vocab_size, seed=2)
    one_device = Placement.create(config, load_layout("dp"), devices=jax.devices()[:1])
    grads_fn = jax.jit(make_gradients(config, one_device.param_shardings(), z_loss=1e-2))
    want_grads, want_sums = jax.device_get(grads_fn(params, batch))

    sharded = placement.put(params, placement.param_shardings())
    with placement.activate():
        gradients = jax.jit(make_gradients(config, placement.param_shardings(), z_loss=1e-2,
                                           loss_chunk=chunk))
        grads, sums = gradients(sharded, placement.global_batch(batch))
    for name in ("loss", "z_loss", "accuracy", "weight"):
        np.testing.assert_allclose(float(sums[name]), float(want_sums[name]), rtol=RTOL, err_msg=name)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= RTOL, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"


def test_chunked_loss_under_fsdp_sp_reads_only_local_positions():
    """The length is split over `sequence`; each chunk is spread over every shard, so
    neither the loss nor its gradient moves hidden states between devices: the only
    collectives are the all-reduces of the sums and of the projection's gradient."""
    placement = _fsdp_sp()
    hidden, kernel, targets, weights = _inputs(rows=8, length=32)  # 2 rows x 16 positions a device
    hidden = jax.device_put(hidden, placement.sharding("batch", "length", "embed"))
    targets, weights = (jax.device_put(x, placement.sharding("batch", "length")) for x in (targets, weights))

    def loss(h, k):
        return chunked_cross_entropy_sums(lambda x: x @ k, h, targets, weights, 8)[0]

    with placement.activate():
        hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel).compile().as_text()
    collectives = set(re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                                 r"(?:-start)?\(", hlo))
    assert collectives == {"all-reduce"}, collectives
