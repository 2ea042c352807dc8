"""Shared pieces of the benchmarks: JSON-line output, timing, the benchmark model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BENCH_MODEL = "bench_110m"


def emit(bench: str, impl: str, model: str, metric: str, value: float, unit: str, **extra):
    """Print one JSON line: {"bench", "impl", "model", "metric", "value", "unit", ...}."""
    print(json.dumps({"bench": bench, "impl": impl, "model": model, "metric": metric,
                      "value": round(float(value), 6), "unit": unit, **extra}), flush=True)


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn` (which must block until done), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def threads() -> int:
    """Threads both implementations may use: every core of this machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    """lscpu's model name: CPU figures mean little without it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")
