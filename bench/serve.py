"""Serving throughput and latency: `python -m infer.serve` on loopback against offline batch decoding.

    python bench/serve.py [--precisions float32,bfloat16,int8] [--concurrency 1,8,32] [--new-tokens 64]
                          [--min-requests 4] [--formats text,json_schema]
    python bench/serve.py --scenario prefill      # prefix cache and interleaved prefill, float32

Writes a random bench_110m Hugging Face checkpoint (with a byte-level
tokenizer) to --dir, then per precision:
- offline: `infer.generate` of 32 prompts at once (what `python -m infer`
  runs), output tokens/s of the second call (the first compiles);
- served: a server process on 127.0.0.1 (--max-batch 32, context 128: prompt and answer fit, as offline),
  and for each concurrency c, c client threads sending max(c, --min-requests)
  streamed completions in all (32-token prompts, --new-tokens tokens, greedy):
  output tokens/s over the wall time, p50/p99 time to first token and
  inter-token latency (gaps between streamed tokens); with --formats
  text,json_schema, each concurrency also under `response_format` json_schema
  (`SCHEMA`: structured outputs, one masked decode step per call while a slot
  has a grammar).
Prints one JSON line per figure; the first names the CPU (lscpu), and a
line with the 1-minute load average before each precision and at the end
shows how busy the machine was with other work. Every request has a timeout
and the server is stopped (SIGTERM) after each precision. Measures only;
never asserts a timing.

`--scenario prefill` serves the `demo` model's shape (5.4M parameters, random weights) with a
4,608-token context, 8 slots and prefill groups of 1, four times:
- time to first token of requests whose prompts share a 2,000-token system prompt (each after
  one request has sent it), with `--prefix-cache-mb 64` and without a prefix cache;
- inter-token latency of 4 running streams while a 4,000-token prompt arrives (p50, p99 and the
  longest gap over the streams' tokens from its arrival until its answer is in; p99 also over all
  their tokens after its arrival) and that prompt's time to first token,
  with its prefill in one program (`--prefill-chunk 8192`, the default) and in chunks of 512.

On a CPU a decode step of all 32 slots costs the same whatever the number
of busy slots, and bfloat16 matmuls are slow (XLA:CPU): a bounded run is
`--new-tokens 32 --min-requests 2` (just under 10 minutes for float32 and
bfloat16 on 2 busy cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from common import cpu_model, emit  # noqa: E402  (bench/, this script's directory)

PRECISIONS = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--dtype", "bfloat16", "--quantize", "int8"]}
PROMPT_LEN, CONTEXT, SLOTS = 32, 128, 32
MODEL = "bench_110m"
PREFILL_MODEL, PREFILL_CONTEXT = "demo", 4608  # --scenario prefill
SYSTEM_TOKENS, LONG_TOKENS = 2000, 4000
FORMATS = {"text": None,
           "json_schema": {"type": "json_schema", "json_schema": {"name": "llama", "schema": {
               "type": "object", "required": ["name", "kind", "tags"], "additionalProperties": False,
               "properties": {"name": {"type": "string"}, "kind": {"enum": ["cat", "dog", "llama"]},
                              "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}}}}


def prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, PROMPT_LEN).tolist() for _ in range(n)]


def offline(checkpoint: Path, precision: str, new_tokens: int) -> float:
    """Output tokens/s of one `generate` call over SLOTS prompts (after a compiling call)."""
    from infer import generate, load_model

    flags = PRECISIONS[precision]
    options = {flag.lstrip("-"): value for flag, value in zip(flags[::2], flags[1::2])}
    config, params, tokenizer = load_model(checkpoint, **options)
    batch = prompts(SLOTS)
    generate(params, tokenizer, batch, max_new_tokens=new_tokens, config=config, stop_ids=[])
    start = time.perf_counter()
    results = generate(params, tokenizer, batch, max_new_tokens=new_tokens, config=config, stop_ids=[])
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)


def start_server(checkpoint: Path, precision: str, *flags: str, slots: int = SLOTS, context: int = CONTEXT
                 ) -> tuple[subprocess.Popen, str]:
    """A server process of `slots` slots of `context` positions, with more `flags`, and its address."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "infer.serve", "--checkpoint", str(checkpoint),
                                "--model-name", MODEL, "--port", str(port), "--max-batch", str(slots),
                                "--max-seq-len", str(context), *PRECISIONS[precision], *flags], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(1)
    process.kill()
    raise SystemExit(f"the server for {precision} did not start")


def one_request(base: str, prompt: list[int], new_tokens: int, stamps: list | None = None,
                response_format: dict | None = None) -> tuple[float, list[float], int]:
    """(time to first token, gaps between later tokens, tokens) of one streamed greedy completion;
    each token's arrival time is appended to `stamps` as it comes, if given."""
    import httpx

    body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},  # the last chunk counts the tokens
            "logprobs": 0}  # logprobs: one chunk per token, so gaps are per token
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    stamps, tokens = [] if stamps is None else stamps, 0
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as answer:
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["logprobs"] and choice["logprobs"]["tokens"]:
                    stamps.append(time.perf_counter())
    return stamps[0] - start, list(np.diff(stamps)), tokens


def served(base: str, concurrency: int, new_tokens: int, min_requests: int, response_format=None) -> dict:
    """Output tokens/s and latency percentiles of max(concurrency, min_requests) requests from
    `concurrency` threads (each under `response_format`, if given)."""
    work = prompts(max(concurrency, min_requests))
    results, lock = [], threading.Lock()

    def client(mine):
        for prompt in mine:
            outcome = one_request(base, prompt, new_tokens, response_format=response_format)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(work[i::concurrency],)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"output_tokens_per_s": sum(r[2] for r in results) / wall,
            "ttft_p50_ms": 1e3 * np.percentile(ttft, 50), "ttft_p99_ms": 1e3 * np.percentile(ttft, 99),
            "itl_p50_ms": 1e3 * np.percentile(gaps, 50), "itl_p99_ms": 1e3 * np.percentile(gaps, 99)}


def prefill_scenario(work: Path) -> None:
    """The prefix cache's time to first token and interleaved prefill's inter-token latency (docstring)."""
    from llama_jax.config import load_model_config
    from llama_jax.text.tokenizer_training import train_bpe
    from tiny import write_random_hf

    checkpoint = work / PREFILL_MODEL
    write_random_hf(checkpoint, load_model_config(PREFILL_MODEL).replace(max_seq_len=PREFILL_CONTEXT))
    train_bpe(["byte-level tokenizer: no merges needed"], 256, checkpoint / "tokenizer.model")
    rng = np.random.default_rng(1)
    system = rng.integers(0, 256, SYSTEM_TOKENS).tolist()
    common = {"slots": 8, "context": PREFILL_CONTEXT}
    for cache_mb in ("0", "64"):
        process, base = start_server(checkpoint, "float32", "--prefill-batch", "1", "--prefix-cache-mb", cache_mb, **common)
        try:
            one_request(base, system + rng.integers(0, 256, 16).tolist(), 2)  # the system prompt, sent once
            ttft = [one_request(base, system + rng.integers(0, 256, 16).tolist(), 2)[0] for _ in range(3)]
            health = httpx_health(base)
        finally:
            process.terminate()
            process.wait(timeout=120)
        emit("serve", "prefix_cache", PREFILL_MODEL, "ttft_ms", 1e3 * float(np.median(ttft)), "ms",
             prefix_cache_mb=float(cache_mb), system_tokens=SYSTEM_TOKENS, each_ms=[round(1e3 * t, 1) for t in ttft],
             prefill_tokens=health["prefill_tokens"], prefix_cache=health.get("prefix_cache"))
    for chunk in ("8192", "512"):
        process, base = start_server(checkpoint, "float32", "--prefill-batch", "1", "--prefill-chunk", chunk, **common)
        try:
            one_request(base, rng.integers(0, 256, LONG_TOKENS).tolist(), 2)  # compiles nothing: warmed up
            streams = [[] for _ in range(4)]
            threads = [threading.Thread(target=one_request, args=(base, rng.integers(0, 256, 16).tolist(), 400, st))
                       for st in streams]
            for t in threads:
                t.start()
            while not all(streams):
                time.sleep(0.01)
            time.sleep(0.5)
            arrived = time.perf_counter()
            long_ttft = one_request(base, rng.integers(0, 256, LONG_TOKENS).tolist(), 2)[0]
            prefilled = time.perf_counter()  # its first token and the second have come
            for t in threads:
                t.join()
            health = httpx_health(base)
        finally:
            process.terminate()
            process.wait(timeout=120)
        # Gaps that end while the long prompt is prefilled (until its answer is in), and all after it came.
        during = [g for st in streams for a, g in zip(st[1:], np.diff(st)) if arrived <= a <= prefilled]
        after = [g for st in streams for a, g in zip(st[1:], np.diff(st)) if a >= arrived]
        for metric, value in (("itl_p50_ms", np.percentile(during, 50)), ("itl_p99_ms", np.percentile(during, 99)),
                              ("itl_max_ms", max(during)), ("itl_p99_ms_to_the_end", np.percentile(after, 99)),
                              ("long_prompt_ttft_ms", long_ttft)):
            emit("serve", "interleaved_prefill", PREFILL_MODEL, metric, 1e3 * value, "ms", prefill_chunk=int(chunk),
                 long_prompt_tokens=LONG_TOKENS, running_streams=4, prefill_pieces=health.get("prefill_pieces"))


def httpx_health(base: str) -> dict:
    import httpx

    return httpx.get(f"{base}/health", timeout=10).json()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/llama_jax_serve_bench", help="work directory (about 0.5 GB)")
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=4,
                        help="requests per concurrency level at least (default 4; fewer bound the run's time)")
    parser.add_argument("--scenario", choices=("throughput", "prefill"), default="throughput",
                        help="throughput (default): served against offline tokens/s; prefill: the prefix cache's "
                             "time to first token and interleaved prefill's inter-token latency")
    parser.add_argument("--formats", default="text", help=f"response formats to serve ({', '.join(FORMATS)})")
    args = parser.parse_args()
    if not set(args.formats.split(",")) <= set(FORMATS):
        raise SystemExit(f"error: --formats takes {', '.join(FORMATS)}, got {args.formats}")
    if args.new_tokens < 2 or args.min_requests < 1:
        raise SystemExit("error: --new-tokens must be at least 2 (one gap between tokens) and --min-requests at least 1")

    from llama_jax.config import load_model_config
    from llama_jax.text.tokenizer_training import train_bpe
    from tiny import write_random_hf

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.scenario == "prefill":
        print(json.dumps({"bench": "serve", "scenario": "prefill", "cpu": cpu_model(), "cores": os.cpu_count()}),
              flush=True)
        emit("serve", "machine", PREFILL_MODEL, "load_average_1min", os.getloadavg()[0], "runnable tasks", before="run")
        prefill_scenario(work)
        emit("serve", "machine", PREFILL_MODEL, "load_average_1min", os.getloadavg()[0], "runnable tasks", before="end")
        shutil.rmtree(work, ignore_errors=True)
        return
    checkpoint = work / MODEL
    write_random_hf(checkpoint, load_model_config(MODEL))
    train_bpe(["byte-level tokenizer: no merges needed"], 256, checkpoint / "tokenizer.model")
    print(json.dumps({"bench": "serve", "cpu": cpu_model(), "cores": os.cpu_count(), "slots": SLOTS,
                      "prompt_tokens": PROMPT_LEN, "new_tokens": args.new_tokens,
                      "min_requests": args.min_requests}), flush=True)
    for precision in args.precisions.split(","):
        emit("serve", "machine", MODEL, "load_average_1min", os.getloadavg()[0], "runnable tasks", before=precision)
        emit("serve", "offline_generate", MODEL, "output_tokens_per_s", offline(checkpoint, precision, args.new_tokens),
             "tokens/s", precision=precision, batch=SLOTS)
        process, base = start_server(checkpoint, precision)
        try:
            for concurrency, kind in itertools.product(map(int, args.concurrency.split(",")),
                                                       args.formats.split(",")):
                figures = served(base, concurrency, args.new_tokens, args.min_requests, FORMATS[kind])
                for metric, value in figures.items():
                    emit("serve", "server", MODEL, metric, value, "tokens/s" if metric.endswith("per_s") else "ms",
                         precision=precision, concurrency=concurrency, response_format=kind)
        finally:
            process.terminate()
            process.wait(timeout=120)
    emit("serve", "machine", MODEL, "load_average_1min", os.getloadavg()[0], "runnable tasks", before="end")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
