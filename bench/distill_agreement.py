"""How often a distilled student's greedy continuation agrees with its teacher's, against the
same student trained on the same text for the same steps with cross-entropy alone (JSON lines).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python bench/distill_agreement.py [--steps 150]

The toy task is a noisy rule. A sequence starts with two uniform ids out of VOCAB;
every later id is RULE[the id two places back] (a fixed permutation) with probability
1 - NOISE, else uniform. Its greedy answer is the rule, which takes attention (the id
two back, not the last one), but a sampled next id is the rule's only about half the
time. The teacher (two layers, width 64) learns the rule by cross-entropy on a corpus
of such sequences. The student (two layers, half the teacher's width: a quarter of its
weights) then trains on the same corpus twice, from the same random start on the same
batches for the same steps: with the `distill` objective (the teacher's whole next-id
distribution at every position; alpha 1, tau 1) and with cross-entropy alone (the one
sampled id a position, right about half the time).

Agreement: the held-out prompts are PROMPT_LEN-id sequences of the task drawn with
another seed; a prompt agrees when the student's greedy continuation of CONTINUATION
ids equals the teacher's, every id. Also printed: the agreement per continuation id,
and how often the teacher's own continuation follows the rule (that it learned it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_jax import Llama, ModelConfig  # noqa: E402
from sharding.layout import load_layout  # noqa: E402
from sharding.place import Placement  # noqa: E402
from train.config import OptimizerConfig  # noqa: E402
from train.objectives.cross_entropy import cross_entropy  # noqa: E402
from train.objectives.distill import distill  # noqa: E402
from train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from train.step import TrainState, init_state, jit_train_step, make_train_step  # noqa: E402

VOCAB, NOISE, LENGTH = 32, 0.5, 32  # ids, share of uniform ids, ids per training sequence
PROMPT_LEN, CONTINUATION = 8, 8
RULE = np.random.default_rng(0).permutation(VOCAB)
TEACHER = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=VOCAB,
                      rope_theta=10000.0, max_seq_len=64)
STUDENT = TEACHER.replace(dim=32, ffn_dim=64)


def task_rows(count: int, length: int, seed: int) -> np.ndarray:
    """int32 [count, length]: two uniform ids, then RULE[id two back] or (NOISE) a uniform id."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, VOCAB, (count, length)).astype(np.int32)
    for t in range(2, length):
        rows[:, t] = np.where(rng.random(count) < NOISE, rows[:, t], RULE[rows[:, t - 2]])
    return rows


def rows_batch(rows: np.ndarray) -> dict:
    """A training batch (train/data/pipeline.py's dict) with one whole sequence a row."""
    shape = (rows.shape[0], rows.shape[1] - 1)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
            "segment_ids": np.ones(shape, np.int32), "loss_weights": np.ones(shape, np.float32)}


@dataclasses.dataclass(frozen=True)
class Start:
    """A model's training set-up on one device: placement, optimizer and its random start."""

    placement: Placement
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    shardings: TrainState
    steps: int


def start(config: ModelConfig, steps: int, seed: int) -> Start:
    """AdamW for `steps` steps (peak rate 1e-2, a tenth warm-up, cosine), weights drawn from `seed`."""
    placement = Placement.create(config, load_layout("dp"), devices=jax.devices()[:1])
    settings = OptimizerConfig(learning_rate=1e-2, warmup_steps=steps // 10, weight_decay=0.0)
    optimizer = make_optimizer(settings, steps)
    state, shardings = init_state(placement, optimizer, jax.random.key(seed))
    return Start(placement, optimizer, learning_rate_schedule(settings, steps), state, shardings, steps)


def fit(begin: Start, objective, corpus: np.ndarray, batch: int, seed: int, teacher=None):
    """The parameters after `begin.steps` steps of `objective` from `begin`, on batches of
    `batch` corpus rows drawn at random from `seed`; `teacher`: the distillation
    objective's teacher's parameters."""
    state, shardings = begin.state, begin.shardings
    if teacher is not None:
        state = state.replace(reference=teacher)
        shardings = shardings.replace(reference=jax.tree.map(lambda x: x.sharding, teacher))
    state = jax.tree.map(jnp.copy, state)  # the step donates it: `begin` and `teacher` stay for other runs
    step = jit_train_step(make_train_step(begin.placement.config, begin.optimizer, begin.schedule,
                                          shardings.params, objective=objective), begin.placement, shardings)
    draw = np.random.default_rng(seed)
    with begin.placement.activate():
        for _ in range(begin.steps):
            state, _ = step(state, rows_batch(corpus[draw.choice(len(corpus), batch, replace=False)]))
    return state.params


def continuations(config: ModelConfig, params, prompts: np.ndarray) -> np.ndarray:
    """int32 [prompts, CONTINUATION]: each prompt's greedy continuation (the argmax id appended,
    CONTINUATION times; a whole forward pass each, one compile for all)."""
    count, length = prompts.shape
    tokens = np.zeros((count, length + CONTINUATION), np.int32)
    tokens[:, :length] = prompts
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    forward = jax.jit(lambda params, tokens: Llama(config).apply({"params": params}, tokens, positions)[0])
    for t in range(length, length + CONTINUATION):  # causal: the zeros after t do not change its logits
        tokens[:, t] = np.asarray(forward(params, tokens)[:, t - 1].argmax(-1))
    return tokens[:, length:]


def measure(steps: int = 150, batch: int = 8, teacher_steps: int = 200, teacher_batch: int = 32,
            rows: int = 4096, prompts: int = 512, alpha: float = 1.0, temperature: float = 1.0) -> list[dict]:
    """The teacher's figures, then the distilled and the cross-entropy student's (JSON-ready dicts)."""
    corpus = task_rows(rows, LENGTH, seed=1)
    teacher = fit(start(TEACHER, teacher_steps, seed=0), cross_entropy(TEACHER), corpus, teacher_batch, seed=0)
    held_out = task_rows(prompts, PROMPT_LEN, seed=2)
    target = continuations(TEACHER, teacher, held_out)
    both = np.concatenate([held_out, target], axis=1)
    figures = [{"bench": "distill_agreement", "model": "teacher", "steps": teacher_steps, "batch": teacher_batch,
                "follows_rule": float(np.mean(target == RULE[both[:, PROMPT_LEN - 2:-2]]))}]
    student = start(STUDENT, steps, seed=1)  # both objectives train the same start on the same batches
    for name, objective in (("distill", distill(STUDENT, TEACHER, alpha, temperature)),
                            ("cross_entropy", cross_entropy(STUDENT))):
        got = continuations(STUDENT, fit(student, objective, corpus, batch, seed=1,
                                         teacher=teacher if name == "distill" else None), held_out)
        figures.append({"bench": "distill_agreement", "model": "student", "objective": name, "steps": steps,
                        "batch": batch, "held_out_prompts": prompts, "continuation": CONTINUATION,
                        "agreement": float(np.mean((got == target).all(axis=1))),
                        "agreement_per_token": float(np.mean(got == target))})
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of each student")
    parser.add_argument("--batch", type=int, default=8, help="sequences per student step")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=1.0, help="the KL term's weight (1 - alpha: CE's)")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    for figures in measure(args.steps, args.batch, args.teacher_steps, alpha=args.alpha,
                           temperature=args.temperature):
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
