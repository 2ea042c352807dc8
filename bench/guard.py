"""Llama Guard classification throughput: conversations per second, ours against Hugging Face's
PyTorch Llama on the same weights and the same prompt ids.

    python bench/guard.py [--conversations 64] [--batch-sizes 1,8,16] [--max-new-tokens 6] [--threads N]

Prints one JSON line per measurement:
    {"bench": "guard", "impl": "llama_jax" | "hf_torch", "model": ..., "metric": "conversations_per_s",
     "value": ..., "unit": "conv/s", "batch": B, ...}
and first a setup line naming the CPU (lscpu's model name).

The model: bench_110m's layers (768 wide, 12 layers, float32) with Llama 3's
128,256-token vocabulary, because a Llama Guard prompt needs Llama 3's tokenizer
(Meta's tokenizer.model from the llama-models package); random weights, saved
as a Hugging Face directory that both implementations load. The conversations:
synthetic one- and two-turn chats, judged in Meta's prompt format (the 14
categories, about 300 tokens a prompt). Random weights never write a stop token,
so every conversation runs all --max-new-tokens steps: 6 covers Llama Guard 3's
usual answers ("\\n\\n", "unsafe", "\\n", "S", "1", then <|eot_id|>), so the
figures are what a trained guard costs at most for such answers. Ours: the
whole of `infer.guard_model.Guard.classify` (prompt ids in, verdicts and unsafe
probabilities out); Hugging Face: `generate` (greedy, left-padded batch) on the
same ids. One untimed warm-up pass compiles ours; the best of --repeats timed
passes counts. Measures only; never asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import cpu_model, emit  # noqa: E402  (bench/, this script's directory)

WORDS = ("apple river green table music stone cloud paper light garden window bread horse candle ocean "
         "silver forest winter yellow pocket ladder mirror rabbit violin how do I make a safe").split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))

    chats = []
    for _ in range(n):
        chat = [{"role": "user", "content": sentence()}]
        if rng.random() < 0.5:
            chat.append({"role": "assistant", "content": sentence()})
        chats.append(chat)
    return chats


def write_checkpoint(directory: Path, config, tokenizer_model) -> None:
    """Random Hugging Face weights of `config`, and Meta's Llama 3 tokenizer beside them."""
    import torch
    import transformers

    from llama_jax.formats.hf import config_to_hf

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                            if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(directory)
    shutil.copy(tokenizer_model, directory / "tokenizer.model")


def hf_generate(model, ids: list[list[int]], batch: int, new_tokens: int) -> None:
    """Greedy generation of every prompt, `batch` at a time, left-padded (what HF batches need)."""
    import torch

    for start in range(0, len(ids), batch):
        rows = ids[start:start + batch]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both")
    parser.add_argument("--only", choices=("llama_jax", "hf_torch"), default=None)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import importlib.resources

    import torch

    from infer.guard_model import Guard
    from llama_jax import load_model_config

    torch.set_num_threads(args.threads)
    config = load_model_config("bench_110m").replace(vocab_size=128256, rope_theta=500000.0)
    model_name = "bench_110m+llama3_vocab"
    print(f'{{"bench": "guard", "setup": {{"cpu": "{cpu_model()}", "threads": {args.threads}, '
          f'"conversations": {args.conversations}, "max_new_tokens": {args.max_new_tokens}}}}}', flush=True)
    chats = conversations(args.conversations)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "guard"
        write_checkpoint(directory, config, importlib.resources.files("llama_models.llama3") / "tokenizer.model")
        guard = Guard.load(directory, max_new_tokens=args.max_new_tokens)
        prompts = [guard.format.prompt(chat) for chat in chats]
        ids = [p.ids for p in prompts]
        tokens = sum(map(len, ids)) / len(ids)
        if args.only != "hf_torch":
            for batch in batches:
                guard.classify(prompts, batch_size=batch)  # compiles every bucket and batch shape
                best = min(_timed(lambda: guard.classify(prompts, batch_size=batch)) for _ in range(args.repeats))
                emit("guard", "llama_jax", model_name, "conversations_per_s", len(chats) / best, "conv/s",
                     batch=batch, mean_prompt_tokens=round(tokens, 1))
        if args.only != "llama_jax":
            import transformers

            model = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
            for batch in batches:
                hf_generate(model, ids[:batch], batch, args.max_new_tokens)  # warm-up
                best = min(_timed(lambda: hf_generate(model, ids, batch, args.max_new_tokens))
                           for _ in range(args.repeats))
                emit("guard", "hf_torch", model_name, "conversations_per_s", len(chats) / best, "conv/s",
                     batch=batch, mean_prompt_tokens=round(tokens, 1))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
