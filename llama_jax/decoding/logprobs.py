"""Each token's log-probability and the most likely alternatives, computed on the device.

    chosen_b, top_ids_bk, top_logprobs_bk = token_logprobs(logits_bv, tokens_b)

Letters in names: b batch rows, v vocab, k alternatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's chat API allows up to 20)


def token_logprobs(logits_bv, tokens_b, top: int = TOP_LOGPROBS):
    """(log-probability of each row's token float32 [b], the top ids int32 [b, top], their
    log-probabilities float32 [b, top]) under log_softmax of the logits [b, v] in float32.
    A negative token (a row that made none) reads token 0's log-probability."""
    logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen_b = jnp.take_along_axis(logprobs_bv, jnp.maximum(tokens_b, 0)[:, None], axis=-1)[:, 0]
    top_lp_bk, top_ids_bk = jax.lax.top_k(logprobs_bv, min(top, logprobs_bv.shape[-1]))
    return chosen_b, top_ids_bk.astype(jnp.int32), top_lp_bk
