"""Attention implementations agree with plain XLA attention, forward and backward.

The splash kernel runs in Pallas interpret mode on CPU, which is slow: shapes
stay at a few hundred tokens and a handful of heads. Tolerances: 1e-5
relative to each tensor's largest entry, in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model.attention import attend, implementation
from llama_jax.model.context_parallel import balance, balanced_order

RTOL = 1e-5


def _inputs(b, t, h, n, k, seed=0, s=None):
    rng = np.random.default_rng(seed)
    s = s or t
    q = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, s, n, k)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, s, n, k)), jnp.float32)
    # A random linear function of the output: its gradient reaches every entry.
    weights = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
    return q, keys, values, weights


def _value_and_grads(impl, inputs, q_coord, k_coord, segments=(None, None), block=128):
    q, keys, values, weights = inputs

    def objective(q, keys, values):
        out = attend(q, keys, values, q_coord, k_coord, *segments, impl=impl, block=block)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        q, keys, values)
    return out, grads


def _assert_close(got, want, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(np.abs(np.asarray(w)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=RTOL * scale,
                                   err_msg=f"{what}: {name}")


def _packed_segments(b, t, seed=1):
    """Sorted document ids per row, as packing writes them (3 documents a row)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1), jnp.int32)


CASES = {  # b, t, h, n, k, packed
    "causal_gqa_4to1_head_dim_64": (2, 256, 8, 2, 64, False),
    "gqa_8to1_head_dim_128": (1, 256, 8, 1, 128, False),
    "packed_segments": (2, 256, 4, 1, 64, True),
    "length_not_a_block_multiple": (1, 200, 4, 1, 128, True),
}


@pytest.mark.parametrize("impl", ["splash", "blocked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_implementation_equals_xla_forward_and_gradients(impl, case):
    b, t, h, n, k, packed = CASES[case]
    inputs = _inputs(b, t, h, n, k)
    rows = np.arange(t, dtype=np.int32)
    segments = (_packed_segments(b, t),) * 2 if packed else (None, None)
    out, grads = _value_and_grads(impl, inputs, rows, rows, segments)
    want_out, want_grads = _value_and_grads("xla", inputs, rows, rows, segments)
    _assert_close((out, *grads), (want_out, *want_grads), f"{impl} {case}")


def test_splash_in_a_load_balanced_order_equals_xla():
    """Static coordinates in any order: the kernel sees row i at coordinate order[i]."""
    inputs = _inputs(1, 256, 4, 2, 64, seed=3)
    order = balanced_order(256, 2)
    segments = (balance(_packed_segments(1, 256), 2),) * 2
    out, grads = _value_and_grads("splash", inputs, order, order, segments)
    want_out, want_grads = _value_and_grads("xla", inputs, order, order, segments)
    _assert_close((out, *grads), (want_out, *want_grads), "splash balanced order")


def test_blocked_with_cache_coordinates_equals_xla():
    """Traced coordinates, as in a prefill chunk against a KV cache: queries at
    positions 40..71 of each row, keys at cache slots 0..95, block 16."""
    b, t, s = 2, 32, 96
    inputs = _inputs(b, t, 4, 2, 32, seed=4, s=s)
    q_coord = jnp.broadcast_to(40 + jnp.arange(t), (b, t))
    k_coord = jnp.broadcast_to(jnp.arange(s), (b, s))
    out, grads = _value_and_grads("blocked", inputs, q_coord, k_coord, block=16)
    want_out, want_grads = _value_and_grads("xla", inputs, q_coord, k_coord)
    _assert_close((out, *grads), (want_out, *want_grads), "blocked cache coordinates")


def test_blocked_never_reads_key_blocks_no_query_can_see():
    """NaN keys and values in cache slots past every query's position stay out of
    the result and its gradients: those blocks are skipped, not masked after use
    (a masked block would still give 0 * NaN = NaN)."""
    b, t, s = 1, 16, 64
    q, keys, values, weights = _inputs(b, t, 2, 1, 16, seed=5, s=s)
    keys = keys.at[:, 32:].set(jnp.nan)
    values = values.at[:, 32:].set(jnp.nan)
    q_coord = jnp.broadcast_to(jnp.arange(t), (b, t))
    k_coord = jnp.broadcast_to(jnp.arange(s), (b, s))
    out, grads = _value_and_grads("blocked", (q, keys, values, weights), q_coord, k_coord, block=16)
    for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert np.isfinite(np.asarray(x)).all(), f"{name} has NaN: a skipped block was read"
    want_out, _ = _value_and_grads("xla", (q, keys[:, :32], values[:, :32], weights),
                                   q_coord, k_coord[:, :32])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=RTOL, atol=RTOL)


def test_balanced_order_gives_every_shard_the_same_causal_work():
    t, shards = 64, 4
    order = balanced_order(t, shards)
    assert sorted(order.tolist()) == list(range(t))
    # Shard i's share of causal attention: each query row sees row + 1 keys.
    work = [int((order.reshape(shards, -1)[i] + 1).sum()) for i in range(shards)]
    assert len(set(work)) == 1, work
    np.testing.assert_array_equal(balance(order, shards, axis=0), np.arange(t))


def test_off_tpu_auto_is_xla_for_short_sequences_and_decode_steps_and_blocked_beyond():
    def shapes(t, s):
        return (2, t, 8, 64), (2, s, 2, 64)

    assert implementation("auto", True, *shapes(512, 512)) == "xla"
    assert implementation("auto", True, *shapes(1024, 1024)) == "blocked"
    assert implementation("auto", False, *shapes(1, 8192)) == "xla"
    # splash takes sequences attending to themselves; over a KV cache it hands over
    assert implementation("splash", False, *shapes(1, 4096)) == "xla"
    assert implementation("splash", False, *shapes(256, 4096)) == "blocked"
    assert implementation("splash", True, *shapes(256, 256)) == "splash"


def test_splash_over_other_keys_is_a_one_line_error():
    q, keys, values, _ = _inputs(1, 64, 2, 1, 16)
    rows = np.arange(64, dtype=np.int32)
    with pytest.raises(ValueError, match=r"^attention=splash attends a sequence to itself: key "
                                         r"coordinates must be a permutation of 0\.\.t-1$"):
        attend(q, keys[:, :32], values[:, :32], rows, rows[:32], impl="splash")


def _largest_intermediate(jaxpr) -> int:
    from jax.extend.core import jaxprs_in_params

    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


def test_blocked_gradients_under_a_layer_scan_hold_no_square_of_scores():
    """Two layers under `lax.scan`, as the model stacks them: with coordinates that are
    loop invariants, JAX could hoist every block pair's mask and weights out of the
    layer loop as [blocks, blocks, block, block] tables, t x t per head again."""
    b, t, h, n, k = 1, 64, 4, 1, 8
    rows = np.arange(t, dtype=np.int32)

    def loss(x, weights, impl):
        def layer(x, w):
            q = x * w
            return x + attend(q, q[:, :, :n], q[:, :, n:2 * n], rows, rows, impl=impl, block=16), None
        return jax.lax.scan(layer, x, weights)[0].sum()

    def largest(impl):
        jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, impl=impl), argnums=(0, 1)))(
            jnp.ones((b, t, h, k)), jnp.ones((2, k))).jaxpr
        return _largest_intermediate(jaxpr)

    square = b * h * t * t
    assert largest("xla") >= square  # the plain scores, for contrast
    assert largest("blocked") < square
