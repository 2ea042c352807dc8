"""Blocked (flash-style) attention in plain JAX, with a backward pass that recomputes.

Letters: b batch, t query time, s key time, n kv heads, g query heads per kv
head, k head_dim; q and c suffixes are one block of queries / keys.

Queries and keys are cut into blocks; each (query block, key block) pair is
one step of an online softmax, and a pair in which no query can see any key
(every key coordinate above every query coordinate of the block) is skipped
by `lax.cond`, so causal attention does about half the work of the full
square. The forward pass keeps only the output and each row's log-sum-exp;
the backward pass (a `custom_vjp`) recomputes each block's probabilities
from them, so memory is O(t x block) per head in both passes, never
O(t x s). Any coordinates work (traced per row: KV caches, prefill chunks),
which is what the splash kernel cannot take.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(masked - max) is 0, never NaN
_NEVER = jnp.iinfo(jnp.int32).max  # coordinate of padding keys: no query reaches it
_NOBODY = jnp.iinfo(jnp.int32).min  # coordinate of padding queries: they see no key


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, size: int):
    """[b, t, ...] -> [t / size, b, size, ...]: the scan axis first."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _unblock(x):
    """[n_blocks, b, size, ...] -> [b, n_blocks * size, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def blocked_attend(q_btngk, k_bsnk, v_bsnk, q_coord_bt, k_coord_bs, q_segment_bt, k_segment_bs,
                   block: int):
    """Causal GQA attention, [b, t, n, g, k] float32, q already scaled by 1/sqrt(head_dim).

    Coordinates int32 [b, t] / [b, s]; segment ids int32 [b, t] / [b, s] or None.
    """
    b, t = q_btngk.shape[:2]
    s = k_bsnk.shape[1]
    if q_segment_bt is None:
        q_segment_bt, k_segment_bs = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    block_q, block_k = min(block, t), min(block, s)
    # Tie coordinates and segment ids to the queries. Under a scan over layers
    # they are loop invariants, and JAX would hoist every block pair's mask out
    # of the layer loop as a [blocks, blocks, block, block] table (8 GiB at 8K
    # tokens on v5p, measured): the barrier makes the masks per-layer values.
    q_btngk, q_coord_bt, k_coord_bs, q_segment_bt, k_segment_bs = jax.lax.optimization_barrier(
        (q_btngk, q_coord_bt, k_coord_bs, q_segment_bt, k_segment_bs))
    out = _attention(_pad_to(q_btngk, 1, block_q), _pad_to(k_bsnk, 1, block_k),
                     _pad_to(v_bsnk, 1, block_k), _pad_to(q_coord_bt, 1, block_q, _NOBODY),
                     _pad_to(k_coord_bs, 1, block_k, _NEVER), _pad_to(q_segment_bt, 1, block_q),
                     _pad_to(k_segment_bs, 1, block_k), block_q, block_k)
    return out[:, :t]


def _pair(q_c, k_c, qc_c, kc_c, qs_c, ks_c):
    """Scores [b, n, g, tq, sc] float32 of one block pair and its visibility mask."""
    scores = jnp.einsum("btngk,bsnk->bngts", q_c, k_c, preferred_element_type=jnp.float32)
    mask = (kc_c[:, None, :] <= qc_c[:, :, None]) & (ks_c[:, None, :] == qs_c[:, :, None])
    return scores, mask[:, None, None]


def _any_visible(qc_c, kc_c):
    """False when no key of the block can be seen by any query of the block (skip it)."""
    return jnp.min(kc_c) <= jnp.max(qc_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, qc, kc, qs, ks, block_q, block_k):
    return _forward(q, k, v, qc, kc, qs, ks, block_q, block_k)[0]


def _forward(q, k, v, qc, kc, qs, ks, block_q, block_k):
    b, t, n, g, d = q.shape
    key_blocks = (_blocks(k, block_k), _blocks(v, block_k), _blocks(kc, block_k), _blocks(ks, block_k))

    def query_block(_, query):
        q_c, qc_c, qs_c = query

        def key_block(carry, key):
            k_c, v_c, kc_c, ks_c = key

            def update(carry):
                running_max, denom, acc = carry
                scores, mask = _pair(q_c, k_c, qc_c, kc_c, qs_c, ks_c)
                new_max = jnp.maximum(running_max, jnp.where(mask, scores, MASKED_SCORE).max(-1))
                probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(running_max - new_max)
                acc = acc * rescale[..., None] + jnp.einsum(
                    "bngts,bsnk->bngtk", probs.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
                return new_max, denom * rescale + probs.sum(-1), acc

            return jax.lax.cond(_any_visible(qc_c, kc_c), update, lambda c: c, carry), None

        init = (jnp.full((b, n, g, block_q), MASKED_SCORE, jnp.float32),
                jnp.zeros((b, n, g, block_q), jnp.float32),
                jnp.zeros((b, n, g, block_q, d), jnp.float32))
        (running_max, denom, acc), _ = jax.lax.scan(key_block, init, key_blocks)
        seen = denom > 0  # padding queries see no key
        out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, running_max + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        return None, (jnp.einsum("bngtk->btngk", out), lse)

    _, (out, lse) = jax.lax.scan(query_block, None, (_blocks(q, block_q), _blocks(qc, block_q),
                                                      _blocks(qs, block_q)))
    out = _unblock(out)  # [b, t, n, g, k]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, n, g, t)
    return out, (q, k, v, qc, kc, qs, ks, out, lse)


def _backward(block_q, block_k, residuals, d_out):
    q, k, v, qc, kc, qs, ks, out, lse = residuals
    d_out = d_out.astype(jnp.float32)
    # Each row's sum of d_out * out: the softmax backward's subtracted term.
    delta = jnp.einsum("btngk,btngk->bngt", d_out, out)
    b, t, n, g, d = q.shape

    def split_rows(x):  # [b, n, g, t] -> [t / block_q, b, n, g, block_q]
        return jnp.moveaxis(x.reshape(b, n, g, t // block_q, block_q), 3, 0)

    query_blocks = (_blocks(q, block_q), _blocks(d_out, block_q), split_rows(lse), split_rows(delta),
                    _blocks(qc, block_q), _blocks(qs, block_q))

    def key_block(d_q, key):
        k_c, v_c, kc_c, ks_c = key

        def query_block(carry, query):
            q_c, do_c, lse_c, delta_c, qc_c, qs_c = query

            def grads(carry):
                d_k, d_v = carry
                scores, mask = _pair(q_c, k_c, qc_c, kc_c, qs_c, ks_c)
                probs = jnp.where(mask, jnp.exp(scores - lse_c[..., None]), 0.0)
                d_v = d_v + jnp.einsum("bngts,btngk->bsnk", probs, do_c)
                d_probs = jnp.einsum("btngk,bsnk->bngts", do_c, v_c, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - delta_c[..., None])
                d_k = d_k + jnp.einsum("bngts,btngk->bsnk", d_scores, q_c, preferred_element_type=jnp.float32)
                d_q_c = jnp.einsum("bngts,bsnk->btngk", d_scores, k_c, preferred_element_type=jnp.float32)
                return (d_k, d_v), d_q_c

            def skip(carry):
                return carry, jnp.zeros((b, block_q, n, g, d), jnp.float32)

            return jax.lax.cond(_any_visible(qc_c, kc_c), grads, skip, carry)

        zeros = jnp.zeros((b, block_k, n, d), jnp.float32)
        (d_k, d_v), d_q_blocks = jax.lax.scan(query_block, (zeros, zeros), query_blocks)
        return d_q + _unblock(d_q_blocks), (d_k, d_v)

    key_blocks = (_blocks(k, block_k), _blocks(v, block_k), _blocks(kc, block_k), _blocks(ks, block_k))
    d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), key_blocks)
    return (d_q.astype(q.dtype), _unblock(d_k).astype(k.dtype), _unblock(d_v).astype(v.dtype),
            None, None, None, None)


_attention.defvjp(_forward, _backward)
