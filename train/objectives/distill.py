"""Logit distillation (Hinton et al. 2015), as in Llama 3.2 1B/3B's pre-training.

A teacher (any Llama with the student's vocabulary, possibly larger, sharded
on the same mesh by its own placement) gives logits on the fly; per weighted
target token

    loss = alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE(s, target)

where s and t are the student's and teacher's logits. The tau^2 factor keeps
the soft term's gradients the same size whatever the temperature (Hinton et
al.). With `chunk`, both models' logits are made `chunk` positions at a time
(train/objectives/cross_entropy.py, `chunked_sums`): a 128K-vocabulary batch is never held whole
for either. Packed rows work as in pre-training: both models see the same
tokens, positions and segment ids. Metrics per token: loss, kl (the KL term
before alpha), ce, accuracy (of the student on the targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.model.llama import Llama
from llama_jax.model.trees import join
from train.objectives.cross_entropy import chunked_sums, cross_entropy_sums
from train.objectives.head import chunk_projection
from train.objectives.objective import Objective


def distill_terms(student_btv, teacher_btv, targets_bt, weights_bt, temperature: float):
    """(weighted sum of tau^2 KL(teacher || student), of the student's NLL, of its correct
    predictions), float32 scalars, from logits [B, T, V] of both models."""
    s = student_btv.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_btv.astype(jnp.float32))
    log_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_t = jax.nn.log_softmax(t / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * temperature ** 2
    nll, _, correct = cross_entropy_sums(s, targets_bt, weights_bt)
    return jnp.sum(weights_bt * kl_bt), nll, correct


def check_teacher(teacher: ModelConfig, student: ModelConfig, source) -> None:
    """ConfigError (one line) if the teacher's vocabulary is not the student's."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"distill.teacher {source}: its vocab_size {teacher.vocab_size} differs from the "
                          f"student's {student.vocab_size}; distillation compares distributions over one "
                          "vocabulary (use a teacher with the student's tokenizer)")


def teacher_config(stored: ModelConfig, student: ModelConfig) -> ModelConfig:
    """The teacher's architecture as stored, computed like the student (dtype, attention), no remat."""
    return stored.replace(dtype=student.dtype, attention=student.attention,
                          attention_block=student.attention_block, remat="none")


def distill(student: ModelConfig, teacher: ModelConfig, alpha: float, temperature: float,
            chunk: int = 0) -> Objective:
    """The distillation objective (see the module docstring); the teacher's parameters are
    the step's `reference`."""
    student_model, teacher_model = Llama(student), Llama(teacher)

    def sums(params, frozen, reference, batch):
        params = join(frozen, params)
        args = (batch["tokens"], batch["positions"], batch.get("segment_ids"))
        weights = batch["loss_weights"].astype(jnp.float32)
        if chunk:
            mine, _ = student_model.apply({"params": params}, *args, return_hidden=True)
            theirs, _ = teacher_model.apply({"params": reference}, *args, return_hidden=True)
            # each head gathered once, not once a chunk (train/objectives/head.py)
            student_head, teacher_head = (chunk_projection(student_model, params),
                                          chunk_projection(teacher_model, reference))

            def terms(mine, theirs, targets, weights):
                return distill_terms(student_head(mine), teacher_head(theirs), targets, weights, temperature)

            kl, nll, correct = chunked_sums(terms, chunk, mine, jax.lax.stop_gradient(theirs),
                                            batch["targets"], weights)
        else:
            s, _ = student_model.apply({"params": params}, *args)
            t, _ = teacher_model.apply({"params": reference}, *args)
            kl, nll, correct = distill_terms(s, t, batch["targets"], weights, temperature)
        value = alpha * kl + (1 - alpha) * nll
        return value, {"loss": value, "kl": kl, "ce": nll, "accuracy": correct, "weight": jnp.sum(weights)}

    return Objective(sums)
