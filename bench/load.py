"""Serve an 8B-shaped bfloat16 checkpoint from a 24 GiB host: peak host memory and time.

    python bench/load.py [--dir /tmp/llama_jax_load] [--model llama3_1_8b] [--keep]

1. Writes a Hugging Face directory of random bfloat16 weights in the model's
   shapes (16 GB for 8B; random bits below 2 in magnitude, which do not
   compress) and a byte-level tokenizer.
2. Loads it with `infer.load_model` (stored dtype: bfloat16), then serves four
   tokens from it with `python -m infer`.
3. Converts it with `hf_to_ours --dtype bfloat16`, and loads and serves our
   checkpoint the same way.
Each step runs in its own process, whose peak resident memory (VmHWM) is
reported against the checkpoint's bytes, as JSON lines. The directory is
removed afterwards unless --keep. Measures only; asserts nothing.

On a CPU host the serve steps hold a little more than the load: XLA:CPU has
no bfloat16 matmul, so each step converts the weights it reads to float32
(the output head and one layer at a time; see llama_jax.decoding.programs.loop_compiler_options).
docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Runs a module's main (or, for "load", infer.load_model on a directory and a tokenizer)
# in this process and reports its peak resident memory.
CHILD = """
import json, re, runpy, sys
from pathlib import Path
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "load":
        from infer import load_model
        load_model(sys.argv[1], tokenizer=sys.argv[2])
    else:
        runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code or 0
else:
    code = 0
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"peak_kb": peak, "exit": code}), file=sys.stderr)
"""


def measured(module: str, *args: str) -> dict:
    """Run `python -m module args` (or a "load") with the memory probe: {seconds, peak_bytes, exit, stdout}."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, module, *args], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    lines = run.stderr.strip().splitlines()
    if run.returncode or not lines or not lines[-1].startswith("{"):
        # Killed (e.g. out of memory: -9) or crashed before the probe could report.
        print(run.stderr[-3000:], file=sys.stderr)
        return {"seconds": round(seconds, 1), "peak_bytes": None, "exit": run.returncode, "stdout": run.stdout.strip()}
    probe = json.loads(lines[-1])
    if probe["exit"]:
        print(run.stderr[-3000:], file=sys.stderr)
    return {"seconds": round(seconds, 1), "peak_bytes": probe["peak_kb"] * 1024, "exit": probe["exit"],
            "stdout": run.stdout.strip()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/llama_jax_load", help="work directory (needs 2x the checkpoint)")
    parser.add_argument("--model", default="llama3_1_8b", help="a config in configs/models")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()

    from common import cpu_model
    from llama_jax.config import load_model_config
    from llama_jax.text.tokenizer_training import train_bpe
    from tiny import write_random_hf

    config = load_model_config(args.model)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    total, largest = write_random_hf(work / "hf", config, "bfloat16")
    train_bpe(["byte-level tokenizer: no merges needed"], 256, work / "hf" / "tokenizer.model")
    print(json.dumps({"bench": "load", "model": args.model, "checkpoint_bytes": total, "largest_tensor_bytes": largest,
                      "write_seconds": round(time.perf_counter() - start, 1), "cpu": cpu_model()}), flush=True)

    serve = ["--prompt", "Hello", "--max-new-tokens", "4"]
    runs = {"load_hf_dir": ("load", str(work / "hf"), str(work / "hf")),
            "serve_hf_dir": ("infer", "--checkpoint", str(work / "hf"), *serve),
            "hf_to_ours": ("llama_jax.convert.hf_to_ours", str(work / "hf"), str(work / "ours"), "--dtype",
                           "bfloat16", "--no-progress"),
            "load_ours": ("load", str(work / "ours"), str(work / "hf")),
            "serve_ours": ("infer", "--checkpoint", str(work / "ours"), "--tokenizer", str(work / "hf"), *serve)}
    try:
        for name, command in runs.items():
            result = measured(*command)
            ratio = None if result["peak_bytes"] is None else round(result["peak_bytes"] / total, 3)
            print(json.dumps({"bench": "load", "model": args.model, "step": name, **result,
                              "peak_over_checkpoint": ratio}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
