"""GRPO step throughput: rollout and update tokens/s, and the share of a step in each phase.

    python bench/rl.py [--model bench_110m] [--prompts 4] [--group 4] [--new-tokens 32] [--steps 3]

Runs the GRPO step of train/rl/ (configs/runs/grpo_tiny.yaml with the model swapped in,
random weights, one device, full fine-tuning, KL k3 against a frozen copy) for --steps
steps after one untimed step that compiles, and prints one JSON line per metric (the
median over the timed steps); the first setup line names the CPU (lscpu's model name):
- rollout_tokens_per_s: answer tokens sampled / rollout time (one prefill per prompt, the
  group's decode, and the training forward passes of the log-prob check and the reference);
- update_tokens_per_s: rows x row length x grpo.updates / update time (forward and backward
  of every optimizer step on the rollouts);
- rollout_share, reward_share, update_share: of the step's time.
Measures only; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import cpu_model, emit  # noqa: E402  (bench/, this script's directory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench_110m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from llama_jax.text.tokenizer import load_tokenizer
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.config import load_run_config
    from train.data.pipeline import make_dataset
    from train.program import build_train_step
    from train.rl.build import build_rl_step
    from train.step import init_state

    print(json.dumps({"bench": "rl", "setup": {"cpu": cpu_model(), "model": args.model, "prompts": args.prompts,
                                               "group": args.group, "new_tokens": args.new_tokens}}), flush=True)
    run = load_run_config("grpo_tiny", [f"model={args.model}", "model_overrides={}", "chip=v4",
                                        f"data.global_batch={args.prompts}", f"grpo.group={args.group}",
                                        f"grpo.max_new_tokens={args.new_tokens}", f"steps={args.steps + 1}"])
    placement = Placement.create(run.model, load_layout("dp"), devices=jax.devices()[:1])
    program = build_train_step(run, placement)
    step = build_rl_step(run, placement, program.step, load_tokenizer(run.data.tokenizer), None)
    state, _ = init_state(placement, program.optimizer, jax.random.key(0))
    state = state.replace(reference=jax.tree.map(lambda x: x.copy(), state.params))
    data = make_dataset(run.data, shard_index=0, shard_count=1, model_vocab_size=run.model.vocab_size)
    rows, row_len = args.prompts * args.group, run.data.seq_len + args.new_tokens
    figures = []
    with placement.activate():
        for i in range(args.steps + 1):
            state, metrics = step(state, placement.global_batch(next(data)))
            if i:  # the first step compiles
                figures.append({key: float(value) for key, value in jax.device_get(metrics).items()})
    median = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    total = median["rollout_time_s"] + median["reward_time_s"] + median["update_time_s"]
    answer_tokens = median["response_length"] * rows
    emit("rl", "llama_jax", args.model, "rollout_tokens_per_s", answer_tokens / median["rollout_time_s"], "tokens/s")
    emit("rl", "llama_jax", args.model, "update_tokens_per_s",
         rows * row_len * run.grpo.updates / median["update_time_s"], "tokens/s")
    for phase in ("rollout", "reward", "update"):
        emit("rl", "llama_jax", args.model, f"{phase}_share", median[f"{phase}_time_s"] / total, "fraction")
    emit("rl", "llama_jax", args.model, "step_time_s", total, "s", log_prob_error=float(np.max(
        [f["log_prob_error"] for f in figures])))


if __name__ == "__main__":
    main()
