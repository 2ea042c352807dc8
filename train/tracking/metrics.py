"""Training metrics: model FLOPs, MFU, and where the numbers go.

Model FLOPs per token (PaLM, appendix B): 6 N + 12 L H K T, where N counts
every parameter that takes part in a matmul (all but the input embedding
table, which is a lookup), L layers, H heads, K head_dim and T the sequence
length. MFU = achieved model FLOP/s / (peak FLOP/s x devices), in two
conventions that differ only in the attention term:
  - `mfu`: PaLM's, full attention (12 L H K T), as if every query saw every key;
  - `mfu_causal`: MaxText's, half of it (6 L H K T), the keys a causal mask leaves.
The same step time reads higher as `mfu`; compare with MaxText's tables in `mfu_causal`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath

from llama_jax.config import ModelConfig
from llama_jax.params import count_active_params
from llama_jax.paths import is_url, storage_error, user_path
from sharding.topology import CHIP_PEAK_FLOPS
from train.tracking.wandb_logging import WandbRun


def note(message: str):
    """One line on stderr, from process 0 only: `train: <message>`."""
    if jax.process_index() == 0:
        print(f"train: {message}", file=sys.stderr, flush=True)


def flops_per_token(config: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token: 6 N + 12 L H K T, or with `causal` (MaxText's convention)
    6 N + 6 L H K T (see the module docstring); N counts the parameters a token uses (a
    mixture-of-experts layer's routed experts only)."""
    n = count_active_params(config)
    if not config.tie_embeddings or config.head == "score":  # a tied table is also the output matmul
        n -= config.vocab_size * config.dim  # (the embedding is a lookup; a score head is [dim, 1])
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * n + (attention // 2 if causal else attention)


def mfu_flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """{metric key: FLOPs per token} for MFU in both conventions: "mfu" (PaLM's, full
    attention) and "mfu_causal" (MaxText's, attention halved)."""
    return {"mfu": flops_per_token(config, seq_len),
            "mfu_causal": flops_per_token(config, seq_len, causal=True)}


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """Float32 matmul FLOP/s of one device, measured now (the CPU's 'peak' for MFU)."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops(chip: str) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from): a TPU chip's published figure
    (sharding/topology.py), else (cpu) a matmul measured now."""
    if chip in CHIP_PEAK_FLOPS:
        return CHIP_PEAK_FLOPS[chip], f"{chip} published bf16 peak"
    return measure_matmul_flops(), "measured f32 matmul on this machine"


def scalar_tag(key: str) -> str:
    """A metrics.jsonl key's name in TensorBoard and W&B: eval_loss -> eval/loss, an lm-eval task's
    eval/<task>/<metric> as it is, the rest under train/."""
    if key.startswith("eval/"):
        return key
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class MetricsWriter:
    """Writes each logged step to metrics.jsonl and TensorBoard, and to Weights & Biases
    if `wandb` (a WandbConfig) is given (process 0 only).

    A run that resumes from step `start` recomputes the steps after it, which a
    killed run may already have logged: their rows are dropped from
    metrics.jsonl (and TensorBoard's events purged), so the file stays the
    record of one run, its steps strictly increasing. W&B history cannot be cut
    back: the recomputed steps (equal bit for bit) are not sent to it again.

    A local file is appended to; an object in gs:// (which cannot be appended
    to) is rewritten whole at every write, each version complete.

    `goodput`: a function giving the run's goodput so far (train/tracking/goodput.py),
    written with every row as "goodput".
    """

    def __init__(self, run_dir: str | os.PathLike, start: int = 0, wandb=None, run_config: dict | None = None,
                 goodput=None):
        self.active = jax.process_index() == 0
        self.run_dir = user_path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._rows: list[str] = []  # gs:// only: every row, for the next rewrite
        self._goodput = goodput
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            kept, logged_through = _rows_through(self.path, start)
            if wandb is not None:
                self._wandb = WandbRun(wandb, self.run_dir, run_config or {}, logged_through)
            if is_url(self.path):
                self._rows = kept
                self._upload()
            else:
                _replace(self.path, "".join(kept))
                self._jsonl = open(self.path, "a")
            # late: tensorboardX takes seconds to import (protobuf), and only process 0 writes
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start + 1)

    def _upload(self):
        try:
            self.path.write_text("".join(self._rows))
        except Exception as err:
            raise storage_error(err, self.path) from None

    def write(self, step: int, metrics: dict[str, float]):
        if not self.active:
            return
        if self._goodput is not None:
            metrics = {**metrics, "goodput": self._goodput()}
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self._jsonl is None:
            self._rows.append(line)
            self._upload()
        else:
            try:
                self._jsonl.write(line)
                self._jsonl.flush()
            except OSError as err:  # a flush names no file
                raise OSError(err.errno, err.strerror, str(self.path)) from None
        scalars = {scalar_tag(key): value for key, value in metrics.items()}
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        self._tb.flush()
        if self._wandb is not None:  # after metrics.jsonl: a step in the file counts as sent (a kill in
            self._wandb.log(step, scalars)  # between loses it from W&B rather than sending it twice)

    def close(self, failed: bool = False):
        """Close the files; `failed`: the run ends on an error (W&B marks the run failed)."""
        if self.active:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish(failed)


def _rows_through(path: epath.Path, step: int) -> tuple[list[str], int]:
    """(the lines of metrics.jsonl at `path` up to `step`, the last step it held at all);
    a torn last line is dropped."""
    if not path.exists():
        return [], 0
    kept, last = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        last = max(last, row["step"])
        if row["step"] <= step:
            kept.append(line + "\n")
    return kept, last


def _replace(path: epath.Path, text: str):
    """Write a local file through a temporary sibling, so a kill never leaves it half-written."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
