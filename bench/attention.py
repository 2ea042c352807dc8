"""Attention implementations: time on this CPU, memory per TPU chip from AOT compiles.

    python bench/attention.py --cpu [--lengths 512,2048,8192] [--repeats 3]
    python bench/attention.py --aot [--lengths 8192,32768,131072] [--impls xla,blocked,splash] \\
        [--config llama3_1_8b_v5p] [--topology v5p:4x4x4] [--layout fsdp_sp] [--sequence 8]

Prints one JSON line per measurement (bench/common.py's `emit`):
- `--cpu`: seconds for one forward and backward pass of attention alone
  (bench-110m's 12 heads / 4 kv heads of 64, batch 1, float32) for `xla`
  and `blocked` (block 512) at each length, the fastest of --repeats after
  a compile; `auto` picks between them on CPU by these figures
  (llama_jax.model.attention.AUTO_XLA_MAX_KEYS).
- `--aot`: the run config's whole train step compiled for the topology with
  libtpu (no TPU needed) for each attention and length, one row of
  `seq_len` tokens per data-parallel shard: peak HBM per chip
  (memory_analysis), the verdict, and the step-time floor (model FLOPs per
  chip / peak FLOP/s). `--layout`/`--sequence` choose context parallelism.
Measures only; never asserts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import best_time, emit, log  # noqa: E402


def cpu(lengths: list[int], repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.model.attention import attend
    from llama_jax.config import load_model_config

    config = load_model_config("bench_110m")
    h, n, k = config.n_heads, config.n_kv_heads, config.head_dim
    for t in lengths:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(1, t, h, k)), jnp.float32)
        kv = jnp.asarray(rng.normal(size=(1, t, n, k)), jnp.float32)
        rows = np.arange(t, dtype=np.int32)
        for impl in ("xla", "blocked"):
            step = jax.jit(jax.grad(lambda q, kk, v, impl=impl: jnp.sum(
                attend(q, kk, v, rows, rows, impl=impl, block=512)), argnums=(0, 1, 2)))
            run = lambda: jax.block_until_ready(step(q, kv, kv))  # noqa: E731
            run()
            emit("attention", impl, "bench_110m", "forward_backward_s", best_time(run, repeats), "s",
                 seq_len=t, platform="cpu")


def aot(lengths: list[int], impls: list[str], config: str, topology: str, layout: str | None,
        sequence: int | None):
    from sharding.layout import load_layout
    from sharding.mesh import mesh_shape
    from sharding.topology import topology_devices
    from train.compile.aot import compile_run
    from train.config import load_run_config

    devices = topology_devices(topology)
    for t in lengths:
        for impl in impls:
            overrides = [f"model_overrides.attention={impl}", f"data.seq_len={t}"]
            if layout:
                overrides.append(f"layout={layout}")
            if sequence:
                overrides.append(f"mesh.sequence={sequence}")
            run = load_run_config(config, overrides)
            sizes = mesh_shape(load_layout(run.layout, **run.mesh), len(devices))
            rows = sizes["data"] * sizes["fsdp"]
            run = load_run_config(config, overrides + [f"data.global_batch={rows}"])
            log(f"{config} {impl} at {t} tokens on {topology} ({run.layout}, {rows} rows)")
            result = compile_run(run, devices, topology=topology)
            peak = result.used_bytes
            extra = dict(seq_len=t, topology=topology, layout=run.layout, mesh=result.mesh,
                         global_batch=rows, verdict=result.verdict, compile_s=round(result.compile_s, 1))
            emit("attention", impl, config, "peak_hbm_per_chip", float("nan") if peak is None else peak / 2**30, "GiB", **extra)
            if result.step_s_at_full_mfu is not None:
                emit("attention", impl, config, "step_s_floor", result.step_s_at_full_mfu, "s", **extra)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="time xla and blocked on this CPU")
    parser.add_argument("--aot", action="store_true", help="compile train steps for a TPU topology")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="xla,blocked,splash")
    parser.add_argument("--config", default="llama3_1_8b_v5p", help="run config for --aot")
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("--layout", default=None, help="override the run's layout (--aot)")
    parser.add_argument("--sequence", type=int, default=None, help="mesh.sequence (--aot)")
    args = parser.parse_args()
    if not (args.cpu or args.aot):
        parser.error("choose --cpu and/or --aot")
    if args.cpu:
        cpu([int(x) for x in (args.lengths or "512,2048,4096,8192").split(",")], args.repeats)
    if args.aot:
        aot([int(x) for x in (args.lengths or "8192,32768,131072").split(",")], args.impls.split(","),
            args.config, args.topology, args.layout, args.sequence)


if __name__ == "__main__":
    main()
