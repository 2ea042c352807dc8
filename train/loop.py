"""`train(run_config)`: the whole training run, one call (the CLI is a thin wrapper)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import ConfigError
from sharding.layout import load_layout
from sharding.place import Placement, validate
from train.config import RunConfig
from train.data import make_dataset
from train.metrics import MetricsWriter, flops_per_token, peak_flops
from train.nonfinite import NonfiniteWatch
from train.optimizer import learning_rate_schedule, make_optimizer
from train.step import init_state, jit_train_step, make_train_step


# Logged as the mean over the steps since the last log (the rest: the last step's value).
AVERAGED = ("loss", "z_loss", "accuracy")


def _tokenizer(run: RunConfig):
    path = run.data.tokenizer or run.tokenizer
    if run.data.source != "text" or path is None:
        return None
    from llama_jax.tokenizer import load_tokenizer
    return load_tokenizer(path)


def _data_shard(placement: Placement, global_batch: int) -> tuple[int, int]:
    """(index, count) of the block of each batch's rows this process feeds.

    Processes that are replicas along the batch (e.g. `tp` across hosts) hold
    the same rows, so they get the same block.
    """
    rows = placement.process_rows(global_batch)
    indices = placement.sharding("batch").devices_indices_map((global_batch,))
    first = min(index[0].start or 0 for device, index in indices.items()
                if device.process_index == jax.process_index())
    return first // rows, global_batch // rows


def _read_first_batch(data):
    """Read one batch and rewind, so bad data fails before the run directory is created."""
    start = data.get_state()
    next(data)
    data.set_state(start)


def _create_run_dir(run_dir: str):
    """Create `run_dir` (and its parents); ConfigError, one line, if it cannot be written."""
    path = Path(run_dir)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"run_dir {run_dir}: {blocker} is a file, not a directory; choose another run_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run_dir {run_dir}: cannot create it ({err.strerror}); choose another "
                          "run_dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir}: not writable (read-only or no permission); choose another "
                          "run_dir")


def _empty_window() -> dict:
    return {**{k: jnp.zeros((), jnp.float32) for k in AVERAGED}, "applied": jnp.zeros((), jnp.int32)}


@jax.jit
def _add_to_window(window: dict, metrics: dict) -> dict:
    """Add a step's AVERAGED metrics to the window's sums if its update was applied."""
    applied = metrics["nonfinite"] == 0
    return {**{k: window[k] + jnp.where(applied, metrics[k], 0.0) for k in AVERAGED},
            "applied": window["applied"] + applied}


def train(run: RunConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train as the run config says; resume from the run directory's latest checkpoint.

    Returns a summary dict (final step, last logged metrics, checkpoint dir).
    `stop_after` ends the run early after that many steps of this call
    (tests use it to stop mid-run); the schedule still follows `run.steps`.
    Raises DivergenceError (train/nonfinite.py) if a step's loss, gradient
    norm or update norm is not finite and `run.on_nonfinite` is "stop".
    """
    from train.checkpointing import Checkpointer  # late: orbax is slow to import

    layout = load_layout(run.layout, **run.mesh)
    placement = Placement.create(run.model, layout)
    validate(run.model, layout, placement.mesh, batch=run.data.global_batch // run.grad_accum,
             seq_len=run.data.seq_len)
    shard_index, shard_count = _data_shard(placement, run.data.global_batch)
    data = make_dataset(run.data, tokenizer=_tokenizer(run), shard_index=shard_index,
                        shard_count=shard_count, model_vocab_size=run.model.vocab_size)
    _read_first_batch(data)
    _create_run_dir(run.run_dir)

    schedule = learning_rate_schedule(run.optimizer, run.steps)
    optimizer = make_optimizer(run.optimizer, run.steps)
    state, shardings = init_state(placement, optimizer, jax.random.key(run.seed))
    checkpointer = Checkpointer(run, shardings)
    state = checkpointer.restore_latest(state, data)
    step = start = int(state.step)
    step_fn = jit_train_step(
        make_train_step(run.model, optimizer, schedule, shardings.params, run.grad_accum, run.z_loss,
                        run.loss_chunk),
        placement, shardings)

    peak, peak_source = peak_flops(run.chip)
    flops_token = flops_per_token(run.model, run.data.seq_len)
    writer = MetricsWriter(run.run_dir)
    last_steps = run.steps if stop_after is None else min(run.steps, start + stop_after)
    bar = tqdm(total=run.steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="train", unit="step", dynamic_ncols=True)
    watch = NonfiniteWatch(run.on_nonfinite, run.optimizer.learning_rate)

    def check_finite():
        saved = checkpointer.last_saved
        watch.check(None if saved is None else f"step {saved} ({checkpointer.directory / str(saved)})")

    logged: dict = {}
    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
    window = _empty_window()  # on-device sums of the averaged metrics; adding them never waits
    try:
        with placement.activate():
            while step < last_steps and not checkpointer.reached_preemption(step):
                batch = placement.global_batch(next(data))
                state, metrics = step_fn(state, batch)
                step += 1
                window_steps += 1
                window_tokens += run.data.global_batch * run.data.seq_len
                window = _add_to_window(window, metrics)
                watch.add(step, metrics["nonfinite"])
                log_now = step % run.log_every == 0 or step == last_steps
                if log_now or checkpointer.due(step, force=step == last_steps):
                    check_finite()
                if log_now:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()
                               if k != "nonfinite"}  # a bit mask; skipped_steps counts them
                    sums = jax.device_get(window)
                    if sums["applied"]:  # means over the applied steps (else the last step's values)
                        metrics.update({k: float(sums[k]) / int(sums["applied"]) for k in AVERAGED})
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / elapsed
                    logged = {**metrics, "skipped_steps": watch.skipped, "tokens_per_s": tokens_per_s,
                              "step_time_s": elapsed / window_steps,
                              "mfu": tokens_per_s * flops_token / (peak * jax.device_count())}
                    writer.write(step, logged)
                    bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    mfu=f"{logged['mfu']:.1%}")
                    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
                    window = _empty_window()
                bar.update(1)
                checkpointer.maybe_save(step, state, data, force=step == last_steps)
            if checkpointer.preempted:
                check_finite()
                checkpointer.maybe_save(step, state, data, force=True)
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    return {"step": step, "metrics": logged, "peak_flops": peak,
            "peak_source": peak_source, "run_dir": str(Path(run.run_dir)), "state": state,
            "preempted": checkpointer.preempted}


def loss_curve_png(run_dir: str | Path) -> Path:
    """Plot loss against step from metrics.jsonl into run_dir/loss.png."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = np.array([r["step"] for r in rows])
    losses = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
