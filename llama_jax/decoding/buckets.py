"""Padded shapes of prompts and caches: few distinct shapes, so few compiles.

    t, chunk = prompt_shape(longest, max_seq_len, length_shards, prefill_chunk)
    cache_len = cache_bucket(prompt_len + max_new_tokens)

infer's Engine and Batcher pad with these, and train.compile sizes the server's
programs with them, so an ahead-of-time compile sees the shapes a server runs.
"""

from __future__ import annotations

from llama_jax.arith import round_up


def prompt_bucket(length: int) -> int:
    """Padded prompt length: powers of two up to 256 (at least 16), then multiples of 256."""
    if length <= 256:
        return max(16, 1 << (length - 1).bit_length())
    return round_up(length, 256)


def cache_bucket(length: int) -> int:
    """Cache length for `length` positions, rounded up to a multiple of 128."""
    return round_up(length, 128)


def prompt_shape(longest: int, max_seq_len: int, length_shards: int, prefill_chunk: int) -> tuple[int, int]:
    """(padded prompt length t, prefill chunk) for prompts of up to `longest` tokens.

    t is `prompt_bucket(longest)` (at most `max_seq_len`) rounded so that the layout's
    `length_shards` divide it, and a multiple of the chunk when longer than one chunk.
    """
    # Context parallelism splits each length shard into two halves (llama_jax/model/context_parallel.py).
    multiple = 2 * length_shards if length_shards > 1 else 1
    t = round_up(min(prompt_bucket(longest), max_seq_len), multiple)
    chunk = round_up(prefill_chunk, multiple)
    return (round_up(t, chunk) if t > chunk else t), chunk
