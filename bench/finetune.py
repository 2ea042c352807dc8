"""Fine-tuning's cost: full fine-tuning against LoRA (rank 16) and QLoRA (LoRA over an int8 base).

    python bench/finetune.py [--steps 4] [--batch 4] [--seq-len 256] [--rank 16]

Each mode is a real `python -m train` run (train.loop.train, synthetic data)
of the bench-110m model on one CPU device, started from the same saved
float32 base checkpoint. Prints JSON lines per mode: the bytes one device
holds for trained parameters, the frozen base and the optimizer state, and
the step time (the fastest logged step after the first, which compiles).
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_MODEL, cpu_model, emit, log  # noqa: E402

LORA = {"rank": 16, "alpha": 32.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


def device_bytes(tree) -> int:
    """Bytes of the first device's shards of a tree of placed arrays."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.addressable_shards[0]
        total += shard.data.size * shard.data.dtype.itemsize
    return total


def run_mode(name: str, base: Path, workdir: Path, args, model: dict, lora: dict | None):
    from train.config import run_config_from_dict
    from train.loop import train

    run_dir = workdir / name
    fields = {"model": model, "layout": "dp", "init_from": str(base), "steps": args.steps, "log_every": 1,
              "checkpoint_every": args.steps, "run_dir": str(run_dir),
              "data": {"source": "synthetic", "vocab_size": model["vocab_size"], "seq_len": args.seq_len,
                       "global_batch": args.batch},
              "optimizer": {"learning_rate": 1e-4, "warmup_steps": 0}}
    if lora is not None:
        fields["lora"] = lora
    summary = train(run_config_from_dict(fields), progress=False)
    state = summary["state"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = min(r["step_time_s"] for r in rows[1:])
    figures = {"trained_bytes": device_bytes(state.params), "frozen_bytes": device_bytes(state.frozen),
               "optimizer_bytes": device_bytes(state.opt_state)}
    figures["total_bytes"] = sum(figures.values())
    for metric, value in figures.items():
        emit("finetune", name, BENCH_MODEL, metric, value / 2**20, "MiB", cpu=cpu_model())
    emit("finetune", name, BENCH_MODEL, "step_time", step_s, "s", batch=args.batch, seq_len=args.seq_len,
         cpu=cpu_model())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    import jax

    from llama_jax import init_params
    from llama_jax.formats.checkpoint import save_params
    from llama_jax.config import load_model_config

    config = load_model_config(BENCH_MODEL)
    lora = {**LORA, "rank": args.rank, "alpha": 2.0 * args.rank}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = workdir / "base"
        save_params(base, config, init_params(config, jax.random.key(0)))
        model = config.to_dict()
        for name, model_fields, adapters in (("full", model, None), (f"lora_r{args.rank}", model, lora),
                                             (f"qlora_int8_r{args.rank}", {**model, "quantize": "int8"}, lora)):
            log(f"finetune: {name}")
            run_mode(name, base, workdir, args, model_fields, adapters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
