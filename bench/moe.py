"""Tokens/s of a tiny mixture-of-experts Llama 4 against a dense model of the same active size, on CPU.

    python bench/moe.py [--model llama4_tiny] [--set KEY=VALUE ...] [--batch 8] [--seq-len 256]
        [--steps 3] [--repeats 3]

The MoE model is the config (float32) with `--set` overrides (YAML values, e.g.
`--set dim=256`). The dense model is the same config with `moe` removed and
every feed-forward a SwiGLU of width (top_k + shared expert) x ffn_dim_expert:
a token multiplies by the same weights' worth of parameters (the router's
dim x experts aside; both active counts are printed). Attention (chunks, NoPE,
QK norm) is the same in both. Only MoE on every layer (Scout's
interleave_step 1) has such a dense twin; other configs are refused.

Per model, back to back metric by metric (so a change of machine load touches
both alike):
- train: tokens/s, step time and MFU of one training step (bench/train_throughput.py's
  step on one device: AdamW, the step train.loop runs), the best of --steps after
  compiling; MFU counts the active parameters (6 N + attention) against JAX's
  f32 matmul measured in this run;
- decode: new tokens/s at batch 1 and 8 and prefill latency (bench/decode.py's
  engine: greedy, 32-token prompts, 128 new tokens; a 512-token prefill), the
  median of --repeats.
The first line names the CPU (lscpu's model name). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, cpu_model, emit, threads  # noqa: E402


def dense_twin(config):
    """`config` without experts, its feed-forwards as wide as a token's routed + shared experts."""
    moe = config.moe
    if moe is None:
        raise SystemExit("bench/moe.py: the model config has no moe section")
    if moe.interleave_step != 1:
        raise SystemExit(f"bench/moe.py: moe.interleave_step {moe.interleave_step}; the dense twin needs MoE "
                         "on every layer (interleave_step 1)")
    return config.replace(moe=None, ffn_dim=(moe.top_k + int(moe.shared_expert)) * moe.ffn_dim_expert)


def parse_sets(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama4_tiny", help="a MoE config in configs/models (float32 forced)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    parser.add_argument("--batch", type=int, default=8, help="training rows")
    parser.add_argument("--seq-len", type=int, default=256, help="training row length")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (the best is reported)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs (the median is reported)")
    args = parser.parse_args()
    args.loss_chunk = 0  # train_throughput's run config field

    # XLA reads its thread settings when the CPU client starts: before importing jax.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from decode import NEW_TOKENS, PREFILL_LEN, PROMPT_LEN, ours, timed
    from llama_jax.config import load_model_config
    from llama_jax.params import count_active_params
    from train.tracking.metrics import flops_per_token, measure_matmul_flops
    from train_throughput import jax_train_step

    moe = load_model_config(args.model, **{**parse_sets(args.set), "dtype": "float32", "param_dtype": "float32"})
    models = {"moe": moe, "dense": dense_twin(moe)}
    matmul = measure_matmul_flops(2048)
    print(json.dumps({"bench": "moe", "setup": {
        "cpu": cpu_model(), "threads": threads(), "model": args.model, "set": args.set,
        "experts": moe.moe.n_experts, "top_k": moe.moe.top_k, "ffn_dim_expert": moe.moe.ffn_dim_expert,
        "dense_ffn_dim": models["dense"].ffn_dim, "train_batch": args.batch, "train_seq_len": args.seq_len,
        "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS, "prefill_prompt": PREFILL_LEN,
        "jax_matmul_f32_gflops": round(matmul / 1e9, 2)}}), flush=True)
    for kind, config in models.items():
        emit("moe", kind, args.model, "active_params", count_active_params(config), "parameters")

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, moe.vocab_size, (8, PROMPT_LEN)).tolist()
    long_prompt = rng.integers(0, moe.vocab_size, PREFILL_LEN).tolist()
    train = {kind: jax_train_step(args, config) for kind, config in models.items()}
    decode = {kind: ours(config, "float32", prompts, long_prompt) for kind, config in models.items()}

    tokens = args.batch * args.seq_len
    for one_step in train.values():
        one_step()  # compile
    seconds = {kind: float("inf") for kind in train}
    for _ in range(args.steps):  # alternating, so both see the same load; the best of each
        for kind, one_step in train.items():
            seconds[kind] = min(seconds[kind], best_time(one_step, 1))
    for kind, config in models.items():
        emit("moe", kind, args.model, "train_tokens_per_s", tokens / seconds[kind], "tokens/s")
        emit("moe", kind, args.model, "train_step_time", seconds[kind], "s")
        emit("moe", kind, args.model, "train_mfu", tokens * flops_per_token(config, args.seq_len) / seconds[kind]
             / matmul, "fraction", peak="jax f32 matmul, this run")
    for metric in ("decode_tokens_per_s_batch1", "decode_tokens_per_s_batch8", "prefill_latency_ms"):
        for kind, runs in decode.items():
            run_seconds = timed(runs[metric], args.repeats)
            if metric == "prefill_latency_ms":
                emit("moe", kind, args.model, metric, 1000 * run_seconds, "ms")
            else:
                emit("moe", kind, args.model, metric, int(metric[-1]) * NEW_TOKENS / run_seconds, "tokens/s")
    emit("moe", "dense_vs_moe", args.model, "train_speedup", seconds["moe"] / seconds["dense"], "x")


if __name__ == "__main__":
    main()
