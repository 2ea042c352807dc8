"""lm-eval loglikelihood throughput on the same random bench_110m weights, three ways: the
in-process `llama-jax` model, lm-eval's `local-completions` model against `python -m
infer.serve` (the HTTP path: echo with prompt logprobs), and lm-eval's own Hugging Face
model (`hf`, PyTorch).

    python bench/lm_eval_throughput.py [--docs 32] [--batch 16] [--precisions float32,bfloat16]
                                       [--only llama_jax|server|hf_torch] [--dir /tmp/llama_jax_lm_eval_bench]

(Not bench/lm_eval.py: run as a script, that name would shadow the lm_eval
package for everything it imports.)

Requests are shaped like HellaSwag's: --docs documents of a 96-token
context (BOS first) with 4 continuations of 24 tokens each, random ids,
given to both models as lm-eval hands them over after tokenizing
(`_loglikelihood_tokens`: (key, context ids, continuation ids)). Each model
scores them all twice; the figure is requests per second of the second
call (the first compiles ours), with the first call's time beside it.
All use every core (torch.set_num_threads; XLA's CPU thread pool). The
server runs in its own process on the same machine (--max-batch and
--prefill-batch --batch, --max-seq-len 256); lm-eval sends --batch token
prompts per request, one request at a time (its default num_concurrent), each
scored by the server's prompt-logprob pass and then prefilled for the one
token lm-eval asks for (max_tokens 1). Prints JSON lines; the first names the
CPU (lscpu). Measures only; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from common import BENCH_MODEL, cpu_model, emit, threads  # noqa: E402  (bench/, this script's directory)

CONTEXT, CONTINUATION, CHOICES = 96, 24, 4


def requests(docs: int, vocab: int, bos: int) -> list[tuple[None, list[int], list[int]]]:
    """HellaSwag-shaped token requests: per document one context and CHOICES continuations."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(docs):
        context = [bos] + rng.integers(3, vocab, CONTEXT - 1).tolist()
        out += [(None, context, rng.integers(3, vocab, CONTINUATION).tolist()) for _ in range(CHOICES)]
    return out


def timed(lm, reqs) -> tuple[float, float]:
    """(seconds of the first call, seconds of the second) of scoring `reqs`."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def ours(checkpoint: Path, precision: str, batch: int):
    from train.lm_eval import LlamaJaxLM

    return LlamaJaxLM(checkpoint, dtype=precision, batch_size=batch)


def stub_tokenizer():
    """A Hugging Face tokenizer that knows BOS and EOS only: lm-eval's models need one, but the
    requests arrive as ids, and scoring them needs no text."""
    import transformers
    from tokenizers import Tokenizer, models

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def hugging_face(checkpoint: Path, precision: str, batch: int):
    """lm-eval's HFLM over transformers' LlamaForCausalLM."""
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, precision)).eval()
    return HFLM(pretrained=model, tokenizer=stub_tokenizer(), batch_size=batch, device="cpu")


SERVER_CONTEXT = 256  # the server's --max-seq-len: every request fits, and few prompt buckets compile


def served(checkpoint: Path, precision: str, batch: int):
    """lm-eval's `local-completions` model against `python -m infer.serve` on `checkpoint`, started
    here (`.close()` stops it): token prompts, `batch` per request, echo with logprobs."""
    import threading

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stub = checkpoint.parent / "stub_tokenizer"
    stub_tokenizer().save_pretrained(stub)
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_JAX_API_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "infer.serve", "--checkpoint", str(checkpoint), "--port",
                                str(port), "--model-name", "bench", "--dtype", precision, "--max-batch", str(batch),
                                "--prefill-batch", str(batch), "--max-seq-len", str(SERVER_CONTEXT)],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    serving = threading.Event()

    def read():  # drained to the end: a full pipe would stall the server
        for line in process.stderr:
            serving.set() if line.startswith("serving ") else None  # it prints this once it listens
        serving.set()

    threading.Thread(target=read, daemon=True).start()
    serving.wait()
    if process.poll() is not None:
        raise SystemExit(f"the server did not start (exit {process.returncode})")
    lm = LocalCompletionsAPI(model="bench", base_url=f"http://127.0.0.1:{port}/v1/completions",
                             tokenizer_backend="huggingface", tokenizer=str(stub), batch_size=batch,
                             max_length=SERVER_CONTEXT)
    lm.close = process.kill
    return lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=32, help=f"documents of {CHOICES} requests each")
    parser.add_argument("--batch", type=int, default=16, help="rows per forward pass, both models")
    parser.add_argument("--precisions", default="float32")
    parser.add_argument("--only", choices=("llama_jax", "server", "hf_torch"))
    parser.add_argument("--dir", default="/tmp/llama_jax_lm_eval_bench", help="work directory (about 0.5 GB)")
    args = parser.parse_args()

    # XLA reads its thread count when the CPU client starts: set it first.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()
    import torch

    from llama_jax.config import load_model_config
    from llama_jax.text.tokenizer_training import train_bpe
    from tiny import write_random_hf

    torch.set_num_threads(threads())
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    checkpoint = work / BENCH_MODEL
    config = load_model_config(BENCH_MODEL)
    total, _ = write_random_hf(checkpoint, config)
    # transformers reads the index's metadata, which write_random_hf leaves out
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, **json.loads(index.read_text())}))
    train_bpe(["byte-level tokenizer: no merges needed"], 256, checkpoint / "tokenizer.model")
    reqs = requests(args.docs, config.vocab_size, bos=1)
    print(json.dumps({"bench": "lm_eval", "cpu": cpu_model(), "threads": threads(), "requests": len(reqs),
                      "context_tokens": CONTEXT, "continuation_tokens": CONTINUATION, "batch": args.batch}),
          flush=True)
    impls = {"llama_jax": ours, "server": served, "hf_torch": hugging_face}
    for precision in args.precisions.split(","):
        for impl, build in impls.items():
            if args.only in (None, impl):
                lm = build(checkpoint, precision, args.batch)
                first, second = timed(lm, reqs)
                getattr(lm, "close", lambda: None)()
                emit("lm_eval", impl, BENCH_MODEL, "loglikelihood_requests_per_s", len(reqs) / second, "requests/s",
                     precision=precision, batch=args.batch, first_call_s=round(first, 2),
                     load_average_1min=os.getloadavg()[0])


if __name__ == "__main__":
    main()
