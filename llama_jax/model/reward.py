"""Reading a score model's scalars: a reward per conversation, values per position.

A Llama with `head: score` (ModelConfig) gives one float32 scalar at every
position, `scores [b, t]`. Llama 2's reward model reads it at a conversation's
last token (its whole text seen, as Hugging Face's
LlamaForSequenceClassification does at the last non-padding token); PPO's value
model reads it at every position of a response. Both are the same model and
parameters, so a reward model initialises a value model as it is.

Letters in names: b batch, t time.
"""

from __future__ import annotations

import jax.numpy as jnp


def last_scores(scores_bt, mask_bt):
    """float32 [b]: each row's score at the last position where `mask_bt` (bool [b, t]) is true:
    a right-padded row's last token (mask: not padding), or the last token of one segment of a
    packed row (mask: segment_ids == k). A row whose mask is all false gives its position 0."""
    t = scores_bt.shape[1]
    last_b = jnp.max(jnp.where(mask_bt, jnp.arange(t), 0), axis=1)
    return jnp.take_along_axis(scores_bt, last_b[:, None], axis=1)[:, 0]


def conversation_rewards(model, params, tokens_bt, lengths_b):
    """float32 [b]: the reward of each right-padded conversation `tokens_bt` (int32 [b, t]) of
    `lengths_b` ids (int32 [b]), read at its last token; `model` is a Llama with the score head."""
    scores_bt, _ = model.apply({"params": params}, tokens_bt)
    return last_scores(scores_bt, jnp.arange(tokens_bt.shape[1]) < lengths_b[:, None])
