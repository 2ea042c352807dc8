"""Decode throughput and prefill latency: ours against Hugging Face's PyTorch Llama,
at several precisions.

    python bench/decode.py [--model bench_110m] [--threads N] [--repeats 3] [--precisions float32,int8]

Prints one JSON line per measurement:
    {"bench": "decode", "impl": "llama_jax" | "hf_torch", "precision": ..., "model": ...,
     "metric": ..., "value": ..., "unit": ...}

Precisions (the same random weights, cast or quantised): ours float32,
bfloat16, int8 and fp8 weights (llama_jax/model/quantize.py; bfloat16 compute) and
float32 with an int8 KV cache ("float32+kv_int8"); Hugging Face float32 and
bfloat16. The first setup line names the CPU (lscpu's model name).

Metrics, the same way for both implementations (median of --repeats runs,
after one untimed warm-up run that also compiles ours):
- decode_tokens_per_s_batch{1,8}: new tokens / wall time of one generate
  call (greedy, a 32-token prompt per row, 128 new tokens, no stop token);
- prefill_latency_ms: time to the first token of a 512-token prompt
  (one forward over the prompt, filling the cache, plus choosing a token).
Both use random weights of the same config and the same CPU threads
(torch.set_num_threads, and XLA's CPU thread pool sized to match).
Measures only; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Run as a script from anywhere: the repository root holds infer/ and llama_jax/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import cpu_model  # noqa: E402  (bench/, this script's directory)

PROMPT_LEN, NEW_TOKENS, PREFILL_LEN = 32, 128, 512


# Ours: the config changes of each precision.
OURS = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16", "param_dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "param_dtype": "bfloat16", "quantize": "int8"},
    "fp8": {"dtype": "bfloat16", "param_dtype": "bfloat16", "quantize": "fp8"},
    "float32+kv_int8": {"kv_cache_dtype": "int8"},
}
HF = ("float32", "bfloat16")


def emit(impl, precision, model, metric, value, unit):
    print(json.dumps({"bench": "decode", "impl": impl, "precision": precision, "model": model,
                      "metric": metric, "value": round(value, 2), "unit": unit}), flush=True)


def timed(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(config, precision, prompts, long_prompt):
    """Our implementation at one precision: {metric: run once}."""
    import jax

    from infer.engine import Engine
    from llama_jax.formats.assemble import converted_params
    from llama_jax.params import init_params
    from llama_jax.decoding.sampling import Sampling

    served = config.replace(**OURS[precision])
    engine = Engine(served)  # one device: the CPU
    weights = jax.device_get(jax.jit(init_params, static_argnums=0)(config, jax.random.key(0)))
    target = engine.model_config
    params = converted_params(weights, config, target, engine.placement.param_shardings(target))
    del weights
    greedy = Sampling()

    def generate(batch):
        for _ in engine.run(params, prompts[:batch], NEW_TOKENS, greedy):
            pass

    return {"decode_tokens_per_s_batch1": lambda: generate(1),
            "decode_tokens_per_s_batch8": lambda: generate(8),
            "prefill_latency_ms": lambda: engine.prefill(params, [long_prompt], 1, greedy)}


def hugging_face(config, precision, prompts, long_prompt):
    """transformers' LlamaForCausalLM.generate on the same config: {metric: run once}."""
    import torch
    import transformers

    from llama_jax.formats.hf import config_to_hf

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                            if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval().to(getattr(torch, precision))

    def generate(ids, new_tokens):
        ids = torch.tensor(ids)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    return {"decode_tokens_per_s_batch1": lambda: generate(prompts[:1], NEW_TOKENS),
            "decode_tokens_per_s_batch8": lambda: generate(prompts[:8], NEW_TOKENS),
            "prefill_latency_ms": lambda: generate([long_prompt], 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench_110m", help="a config in configs/models (float32 forced)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("llama_jax", "hf_torch"), default=None)
    parser.add_argument("--precisions", default=",".join(OURS),
                        help=f"ours to measure, comma-separated (of {', '.join(OURS)}); HF runs {', '.join(HF)}")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in OURS:
            parser.error(f"--precisions: unknown {precision!r} (known: {', '.join(OURS)})")

    # XLA reads its thread count when the CPU client starts: set it first.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=true").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from llama_jax.config import load_model_config

    config = load_model_config(args.model, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (8, PROMPT_LEN)).tolist()
    long_prompt = rng.integers(0, config.vocab_size, PREFILL_LEN).tolist()
    print(json.dumps({"bench": "decode", "setup": {"cpu": cpu_model(), "threads": args.threads,
                                                   "torch_threads": torch.get_num_threads(),
                                                   "prompt": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                                                   "prefill_prompt": PREFILL_LEN, "repeats": args.repeats}}),
          flush=True)
    impls = {}
    if args.only in (None, "llama_jax"):
        for precision in precisions:
            impls[("llama_jax", precision)] = ours(config, precision, prompts, long_prompt)
    if args.only in (None, "hf_torch"):
        for precision in HF:
            impls[("hf_torch", precision)] = hugging_face(config, precision, prompts, long_prompt)
    # Metric by metric, every implementation back to back, so a change in
    # machine load between measurements touches them alike.
    for metric in ("decode_tokens_per_s_batch1", "decode_tokens_per_s_batch8", "prefill_latency_ms"):
        for (impl, precision), runs in impls.items():
            seconds = timed(runs[metric], args.repeats)
            if metric == "prefill_latency_ms":
                emit(impl, precision, args.model, metric, 1000 * seconds, "ms")
            else:
                batch = int(metric[-1])
                emit(impl, precision, args.model, metric, batch * NEW_TOKENS / seconds, "tokens/s")

if __name__ == "__main__":
    main()
