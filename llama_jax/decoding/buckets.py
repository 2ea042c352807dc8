"""Padded shapes of prompts and caches: few distinct shapes, so few compiles.

    t, chunk = prompt_shape(longest, max_seq_len, length_shards, prefill_chunk)
    cache_len = cache_bucket(prompt_len + max_new_tokens)

infer's Engine and Batcher pad with these, and train.compile sizes the server's
programs with them, so an ahead-of-time compile sees the shapes a server runs.
"""

from __future__ import annotations

import numpy as np

from llama_jax.arith import round_up


def prompt_bucket(length: int) -> int:
    """Padded prompt length: powers of two up to 256 (at least 16), then multiples of 256."""
    if length <= 256:
        return max(16, 1 << (length - 1).bit_length())
    return round_up(length, 256)


def cache_bucket(length: int) -> int:
    """Cache length for `length` positions, rounded up to a multiple of 128."""
    return round_up(length, 128)


def length_multiple(length_shards: int) -> int:
    """What a row's length must divide by on a layout that splits tokens into `length_shards`:
    context parallelism gives every shard an early and a late half
    (llama_jax/model/context_parallel.py)."""
    return 2 * length_shards if length_shards > 1 else 1


def row_length(longest: int, max_len: int, length_shards: int) -> int:
    """Padded length of rows of up to `longest` tokens: `prompt_bucket(longest)`, at most
    `max_len`, rounded up to `length_multiple(length_shards)`."""
    return round_up(min(prompt_bucket(longest), max_len), length_multiple(length_shards))


def prompt_shape(longest: int, max_seq_len: int, length_shards: int, prefill_chunk: int) -> tuple[int, int]:
    """(padded prompt length t, prefill chunk) for prompts of up to `longest` tokens.

    t is `row_length(longest, max_seq_len, length_shards)`, and a multiple of the chunk
    (itself rounded to the length multiple) when longer than one chunk.
    """
    t = row_length(longest, max_seq_len, length_shards)
    chunk = round_up(prefill_chunk, length_multiple(length_shards))
    return (round_up(t, chunk) if t > chunk else t), chunk


def pad_rows(rows_of_ids, rows: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows right-padded into (ids int32 [rows, t], lengths int32 [rows]); padding
    rows hold one token 0 (length 1), so every row has a last token to read."""
    ids_bt = np.zeros((rows, t), np.int32)
    lengths_b = np.ones((rows,), np.int32)
    for i, ids in enumerate(rows_of_ids):
        ids_bt[i, :len(ids)] = ids
        lengths_b[i] = len(ids)
    return ids_bt, lengths_b
