"""Each token's log-probability and the most likely alternatives, computed on the device.

    chosen_b, top_ids_bk, top_logprobs_bk = token_logprobs(logits_bv, tokens_b)
    chosen_bt, top_ids_btk, top_logprobs_btk = prompt_logprobs(model, params, tokens_bt)

`token_logprobs` reads one step's logits (a generated token); `prompt_logprobs`
runs a forward pass over whole rows and scores every token given those before
it (the server's `echo` with logprobs). Both return only the chosen token's
log-probability and the top `k` per position, so nothing of vocabulary size
leaves the device.

Letters in names: b batch rows, t positions, c positions of one chunk, d model
width, v vocab, k alternatives.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.arith import ceil_div

TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's chat API allows up to 20)
LOGITS_CHUNK = 256  # positions projected to the vocabulary at a time by prompt_logprobs


def token_logprobs(logits_bv, tokens_b, top: int = TOP_LOGPROBS):
    """(log-probability of each row's token float32 [b], the top ids int32 [b, top], their
    log-probabilities float32 [b, top]) under log_softmax of the logits [b, v] in float32.
    A negative token (a row that made none) reads token 0's log-probability."""
    logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen_b = jnp.take_along_axis(logprobs_bv, jnp.maximum(tokens_b, 0)[:, None], axis=-1)[:, 0]
    top_lp_bk, top_ids_bk = jax.lax.top_k(logprobs_bv, min(top, logprobs_bv.shape[-1]))
    return chosen_b, top_ids_bk.astype(jnp.int32), top_lp_bk


def prompt_logprobs(model, params, tokens_bt, *, top: int = TOP_LOGPROBS, chunk: int = LOGITS_CHUNK):
    """What the model predicts at every position of `tokens_bt` (int32 [b, t], right-padded:
    causal attention keeps padding from reaching earlier positions), from one forward pass.

    Returns (chosen float32 [b, t], top ids int32 [b, t, top], top log-probabilities float32
    [b, t, top]): entry i is position i's prediction of the token after it, so chosen[:, i] =
    log p(tokens[:, i + 1] | tokens[:, :i + 1]) (the last entry, with no token after it,
    reads token 0's). The vocabulary projection runs `chunk` positions at a time, so at most
    [b, chunk, v] float32 logits exist at once.
    """
    hidden_btd, _ = model.apply({"params": params}, tokens_bt, return_hidden=True)
    b, t = tokens_bt.shape
    targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
    chunk = min(chunk, t)
    n = ceil_div(t, chunk)
    pad = n * chunk - t

    # Strided chunks (step j holds positions j, j + n, ...), as train's chunked losses cut them:
    # under a layout that splits the length, every device owns its share of every chunk.
    def split(x):  # [b, t, ...] -> [n, b, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    def merge(x):  # [n, b, chunk, ...] -> [b, t, ...]
        return jnp.moveaxis(x, 0, 2).reshape(b, n * chunk, *x.shape[3:])[:, :t]

    def one_chunk(_, xs):
        hidden_bcd, targets_bc = xs
        hidden_bcd = nn.with_logical_constraint(hidden_bcd, ("batch", "length", "embed"))
        logits_bcv = model.apply({"params": params}, hidden_bcd, method="logits")
        logprobs_bcv = jax.nn.log_softmax(logits_bcv.astype(jnp.float32), axis=-1)
        chosen_bc = jnp.take_along_axis(logprobs_bcv, targets_bc[..., None], axis=-1)[..., 0]
        top_lp_bck, top_ids_bck = jax.lax.top_k(logprobs_bcv, min(top, logprobs_bcv.shape[-1]))
        return None, (chosen_bc, top_ids_bck.astype(jnp.int32), top_lp_bck)

    _, outputs = jax.lax.scan(one_chunk, None, (split(hidden_btd), split(targets_bt)))
    return tuple(merge(x) for x in outputs)
