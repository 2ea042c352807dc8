"""Training throughput of llama-jax and Hugging Face's PyTorch Llama, side by side.

    python bench/train_throughput.py [--steps 3] [--batch 8] [--seq-len 512] [--skip-hf]

Both train the bench-110m config (float32, AdamW, the same hyper-parameters)
on the same random batch with the same number of threads. Prints JSON lines:
tokens/s, step time and MFU per implementation, and each framework's own f32
matmul throughput measured in the same run (MFU is reported against it and,
for comparability, against JAX's matmul figure). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_MODEL, best_time, emit, log, threads  # noqa: E402


def bench_run(args, config):
    """The run config the JAX side trains: the model on one device (layout dp), AdamW at 1e-4
    without warm-up over a 1000-step schedule, `args.batch` rows of `args.seq_len` tokens."""
    from train.config import run_config_from_dict

    return run_config_from_dict({
        "model": config, "layout": "dp", "steps": 1000, "loss_chunk": args.loss_chunk,
        "optimizer": {"learning_rate": 1e-4, "warmup_steps": 0},
        "data": {"source": "synthetic", "vocab_size": config.vocab_size, "seq_len": args.seq_len,
                 "global_batch": args.batch}})


def jax_run(args, config):
    from train.tracking.metrics import flops_per_token, measure_matmul_flops

    matmul = measure_matmul_flops(2048)
    emit("train", "jax", "matmul_f32", "flops", matmul / 1e9, "GFLOP/s")
    one_step = jax_train_step(args, config)
    one_step()  # compile
    seconds = best_time(one_step, args.steps)
    return seconds, flops_per_token(config, args.seq_len), matmul


def jax_train_step(args, config):
    """A function running one training step of `config` (the step train.loop runs for
    `bench_run`'s run config, on one device) on a fixed random batch, blocking until done."""
    import jax
    import numpy as np

    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.program import build_train_step
    from train.step import init_state

    run = bench_run(args, config)
    placement = Placement.create(run.model, load_layout(run.layout, **run.mesh), devices=jax.devices()[:1])
    program = build_train_step(run, placement)
    state, _ = init_state(placement, program.optimizer, jax.random.key(0))
    step = program.step
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = placement.global_batch({
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len)).copy(),
        "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
        "loss_weights": np.ones((args.batch, args.seq_len), np.float32)})
    holder = {"state": state}

    def one_step():
        with placement.activate():
            holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return one_step


def hf_run(args, config):
    import torch
    import transformers

    from llama_jax.formats.hf import config_to_hf

    torch.set_num_threads(threads())
    size = 2048
    a = torch.ones(size, size)
    matmul = 2 * size ** 3 / best_time(lambda: a @ a, 5)
    emit("train", "hf_torch", "matmul_f32", "flops", matmul / 1e9, "GFLOP/s")
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                            if k not in ("architectures", "torch_dtype", "dtype")})
    model = transformers.LlamaForCausalLM(hf_config)
    model.train()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=gen)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens[:, :-1], labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss.reshape(-1, loss.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    one_step()
    return best_time(one_step, args.steps), matmul


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the best is reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--loss-chunk", type=int, default=0, help="chunked loss (0 = plain)")
    parser.add_argument("--model", default=BENCH_MODEL)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    from llama_jax.config import load_model_config
    config = load_model_config(args.model)
    tokens = args.batch * args.seq_len
    log(f"threads: {threads()}; model {args.model}; batch {args.batch} x {args.seq_len}")

    seconds, flops_token, jax_matmul = jax_run(args, config)
    emit("train", "jax", args.model, "tokens_per_s", tokens / seconds, "tokens/s")
    emit("train", "jax", args.model, "step_time", seconds, "s")
    emit("train", "jax", args.model, "mfu", tokens * flops_token / seconds / jax_matmul, "fraction",
         peak="jax f32 matmul, this run")
    if args.skip_hf:
        return
    hf_seconds, hf_matmul = hf_run(args, config)
    emit("train", "hf_torch", args.model, "tokens_per_s", tokens / hf_seconds, "tokens/s")
    emit("train", "hf_torch", args.model, "step_time", hf_seconds, "s")
    emit("train", "hf_torch", args.model, "mfu", tokens * flops_token / hf_seconds / hf_matmul, "fraction",
         peak="torch f32 matmul, this run")
    emit("train", "hf_torch", args.model, "mfu_vs_jax_peak", tokens * flops_token / hf_seconds / jax_matmul,
         "fraction", peak="jax f32 matmul, this run")
    emit("train", "jax_vs_hf", args.model, "speedup", hf_seconds / seconds, "x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
