"""Rollouts: answers sampled from the policy being trained, as a training batch.

`make_rollout(...)` is one pure function the RL step jits once:

    batch, tokens_bn, stats = rollout(params, frozen, reference, prompts, step)

It samples `group` answers to each prompt with the policy's live parameters, where they
are (llama_jax/decoding/groups.py: one prefill per prompt, the group decoding from copies
of its cache; no host copy, the run's mesh and layout), then lays prompt and answer out
as one training row (`update_rows`) and runs the training forward pass on it twice:
- the policy's own: the log-probability of every answer token, which must equal what the
  sampler reported (the classic silent bug of RL stacks: a sampler and a trainer that
  disagree). `stats["log_prob_error"]` is the largest difference;
- the frozen reference's (a LoRA run: its base without adapters), once per batch of
  rollouts, for the KL penalty of every update on it (none with `kl: none`).

Rows: prompt p's answers are rows p*G .. p*G + G - 1. Letters: p prompts, t prompt time,
b = p * G rows, n answer steps, T = t + n the update row's length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.decoding.buckets import cache_bucket
from llama_jax.decoding.groups import sample_groups
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.model.llama import Llama
from llama_jax.model.trees import join
from train.objectives.policy_gradient import OLD_LOG_PROBS, REFERENCE_LOG_PROBS, sampled_log_probs


def update_rows(prompts_pt, lengths_p, tokens_bn, log_probs_bn, group: int) -> dict:
    """Each answer after its prompt as one training row of T = t + n tokens (train/step.py's batch).

    The prompt is left-padded to t, so every answer starts at index t: row i holds padding
    (segment 0, invisible to the rest), the prompt (positions 0..), then the answer
    (positions continuing the prompt's), then padding. Targets are the next token;
    loss weights 1 where the target is an answer token (its stop token included);
    OLD_LOG_PROBS [b, T] the sampler's log-probability of that target (0 elsewhere).
    """
    t, n = prompts_pt.shape[1], tokens_bn.shape[1]
    lengths_b = jnp.repeat(lengths_p, group)
    prompts_bt = jnp.repeat(prompts_pt, group, axis=0)
    answer_b = jnp.sum(tokens_bn != NO_TOKEN, axis=1)
    i = jnp.arange(t + n)[None, :]
    shift_b1 = (t - lengths_b)[:, None]  # left padding
    in_prompt = (i >= shift_b1) & (i < t)
    in_answer = (i >= t) & (i - t < answer_b[:, None])
    prompt_tok = jnp.take_along_axis(prompts_bt, jnp.clip(i - shift_b1, 0, t - 1), axis=1)
    answer_at = jnp.clip(i - t, 0, n - 1)[0]
    tokens = jnp.where(in_prompt, prompt_tok, jnp.where(in_answer, tokens_bn[:, answer_at], 0))
    real = in_prompt | in_answer
    targets_answer = jnp.pad(in_answer[:, 1:], ((0, 0), (0, 1)))
    next_at = jnp.clip(i + 1 - t, 0, n - 1)[0]
    return {"tokens": tokens, "targets": jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))),
            "positions": jnp.where(real, i - shift_b1, 0).astype(jnp.int32),
            "segment_ids": real.astype(jnp.int32), "loss_weights": targets_answer.astype(jnp.float32),
            OLD_LOG_PROBS: jnp.where(targets_answer, log_probs_bn[:, next_at], 0.0)}


def make_rollout(config: ModelConfig, *, group: int, temperature: float, max_new_tokens: int, prompt_len: int,
                 stops, seed: int, reference: bool):
    """`rollout(params, frozen, reference, prompts, step) -> (batch, tokens_bn, stats)`, not jitted.

    config: the policy's model; prompts: a prompts batch (train/data/example_rows.py `PromptRows`:
    "tokens" [p, prompt_len], "lengths" [p]); step: the run's step (int32), which with `seed`
    keys the samples, so a resumed run draws the same answers. `reference`: compute the
    reference's log-probabilities (REFERENCE_LOG_PROBS; zeros otherwise) with the `reference`
    parameters, or for a LoRA policy with `frozen` (its base) and no adapters.
    Returns the update batch (`update_rows` plus REFERENCE_LOG_PROBS), the answers (int32
    [b, n], NO_TOKEN past each end) and float32 stats: response_length and entropy (means
    over answers and answer tokens) and log_prob_error (the largest |sampler - forward|).
    """
    policy = Llama(config)
    lora = config.lora is not None
    reference_model = Llama(config.replace(lora=None)) if lora else policy
    cache_len = cache_bucket(prompt_len + max_new_tokens)
    stops = jnp.asarray(sorted(stops), jnp.int32)

    def rollout(params, frozen, reference_params, prompts, step):
        full = join(frozen, params)
        key = jax.random.fold_in(jax.random.key(seed), step)
        tokens_bn, log_probs_bn, entropy_bn, lengths_b = sample_groups(
            policy, full, prompts["tokens"], prompts["lengths"], key, stops, group=group, temperature=temperature,
            steps=max_new_tokens, cache_len=cache_len)
        batch = update_rows(prompts["tokens"], prompts["lengths"], tokens_bn, log_probs_bn, group)
        weights = batch["loss_weights"]
        mine = sampled_log_probs(policy, full, batch, temperature)
        if reference:
            theirs = sampled_log_probs(reference_model, frozen if lora else reference_params, batch, temperature)
            batch[REFERENCE_LOG_PROBS] = jnp.where(weights > 0, theirs, 0.0)
        else:
            batch[REFERENCE_LOG_PROBS] = jnp.zeros_like(weights)
        answer_tokens = jnp.maximum(jnp.sum(lengths_b), 1)
        stats = {"response_length": jnp.mean(lengths_b.astype(jnp.float32)),
                 "entropy": jnp.sum(entropy_bn) / answer_tokens,
                 "log_prob_error": jnp.max(jnp.abs(mine - batch[OLD_LOG_PROBS]) * weights)}
        return batch, tokens_bn, stats

    return rollout
