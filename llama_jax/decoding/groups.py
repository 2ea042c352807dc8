"""Groups of samples per prompt from one prefill: what RL rollouts (train/rl/rollout.py) compile.

    tokens_bn, log_probs_bn, entropy_bn, lengths_b = sample_groups(
        model, params, prompts_pt, lengths_p, key, stops, group=G, temperature=T, steps=N, cache_len=C)

Each of P prompts is prefilled once; its cache and state are then repeated G times
(rows p*G .. p*G + G - 1 are prompt p's samples), and the P*G rows decode together, each with
its own key (`fold_in(key, row)`, as `sampling.row_keys`), so a row's answer depends only on the
key, its prompt and its row. Sampling is plain temperature sampling (no top-k or top-p), so
the log-probability reported for each token is that of the distribution it was drawn from:
log softmax(logits / T). An RL objective's ratio pi / pi_old needs exactly that.

Letters in names: p prompts, t prompt time, b = p * G sample rows, n answer steps, v vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.decoding import programs
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.decoding.sampling import Sampling, row_keys, sample, step_keys
from llama_jax.model.llama import Llama


def _repeat_rows(state, axes, group: int):
    """Every state entry with each row repeated `group` times along its "batch" axis."""
    def repeat(names, x):
        return jnp.repeat(x, group, axis=names.index("batch"))
    return jax.tree.map(repeat, axes, state, is_leaf=lambda x: isinstance(x, tuple))


def _chosen_and_entropy(logits_bv, tokens_b, temperature: float):
    """(log-probability of each row's token [b], entropy of the distribution it was drawn from [b]),
    float32, under log softmax(logits / temperature)."""
    log_probs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32) / temperature, axis=-1)
    chosen_b = jnp.take_along_axis(log_probs_bv, jnp.maximum(tokens_b, 0)[:, None], axis=-1)[:, 0]
    entropy_b = -jnp.sum(jnp.exp(log_probs_bv) * log_probs_bv, axis=-1)
    return chosen_b, entropy_b


def sample_groups(model: Llama, params, prompts_pt, lengths_p, key, stops, *, group: int, temperature: float,
                  steps: int, cache_len: int):
    """`group` answers of up to `steps` tokens to each prompt, sampled at `temperature` (> 0).

    prompts_pt: int32 [p, t], right-padded; lengths_p: int32 [p]; key: a PRNG key; stops:
    int32 [k] ids that end an answer (included in it). cache_len >= t + steps.
    Returns (tokens int32 [b, steps] with NO_TOKEN past each answer's end, their
    log-probabilities float32 [b, steps] (0 past the end), the entropy of each token's
    distribution float32 [b, steps] (0 past the end), answer lengths int32 [b]), b = p * group.
    """
    if not temperature > 0:
        raise ValueError(f"sample_groups: temperature must be > 0 (the log-probabilities are of the "
                         f"sampling distribution), got {temperature}")
    p = prompts_pt.shape[0]
    b = p * group
    sampling = Sampling(temperature=temperature)
    limits_p = jnp.full((p,), steps, jnp.int32)
    state, _, logits_pv = programs.prefill(model, params, prompts_pt, lengths_p, limits_p, 0, stops,
                                           sampling=sampling, cache_len=cache_len, keep_logits=True)
    state = _repeat_rows(state, programs.state_axes(model.config), group)
    logits_bv = jnp.repeat(logits_pv, group, axis=0)
    keys_b = row_keys(key, b)
    first_b = sample(logits_bv, step_keys(keys_b, jnp.zeros((b,), jnp.int32)), sampling)
    count_b = jnp.ones((b,), jnp.int32)
    state = {**state, "token": first_b, "keys": keys_b, "count": count_b,
             "done": programs.is_stop(first_b, stops) | (count_b >= steps)}
    chosen_b, entropy_b = _chosen_and_entropy(logits_bv, first_b, temperature)
    tokens_bn = jnp.full((b, steps), NO_TOKEN, jnp.int32).at[:, 0].set(first_b)
    log_probs_bn = jnp.zeros((b, steps), jnp.float32).at[:, 0].set(chosen_b)
    entropy_bn = jnp.zeros((b, steps), jnp.float32).at[:, 0].set(entropy_b)

    def running(carry):
        i, st, *_ = carry
        return (i < steps) & ~jnp.all(st["done"])

    def step(carry):
        i, st, tokens_bn, log_probs_bn, entropy_bn = carry
        live_b = ~st["done"]
        st, next_b, logits_bv = programs.decode_step(model, params, st, stops, sampling=sampling)
        chosen_b, entropy_b = _chosen_and_entropy(logits_bv, next_b, temperature)
        tokens_bn = tokens_bn.at[:, i].set(jnp.where(live_b, next_b, NO_TOKEN))
        log_probs_bn = log_probs_bn.at[:, i].set(jnp.where(live_b, chosen_b, 0.0))
        entropy_bn = entropy_bn.at[:, i].set(jnp.where(live_b, entropy_b, 0.0))
        return i + 1, st, tokens_bn, log_probs_bn, entropy_bn

    _, state, tokens_bn, log_probs_bn, entropy_bn = jax.lax.while_loop(
        running, step, (jnp.int32(1), state, tokens_bn, log_probs_bn, entropy_bn))
    return tokens_bn, log_probs_bn, entropy_bn, state["count"]
