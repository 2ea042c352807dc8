"""The training loss against independent references, plain and chunked, on one device and fsdp_sp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.loss import chunked_cross_entropy_sums, cross_entropy_sums

ROWS, LENGTH, DIM, VOCAB = 3, 20, 16, 50


def _inputs(seed=0):
    """Hidden states [B, T, D], a projection [D, V], targets and uneven weights [B, T]."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(ROWS, LENGTH, DIM)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(DIM, VOCAB)) * 2.0, jnp.float32)  # logits of a few units
    # Half the targets are the model's top choice, so accuracy counts something.
    top = np.asarray(jnp.argmax(hidden @ kernel, axis=-1))
    targets = jnp.asarray(np.where(rng.random((ROWS, LENGTH)) < 0.5, top,
                                   rng.integers(0, VOCAB, (ROWS, LENGTH))), jnp.int32)
    weights = jnp.asarray(rng.random((ROWS, LENGTH)) * (rng.random((ROWS, LENGTH)) > 0.3), jnp.float32)
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
