"""`train(run_config)`: the whole training run, one call (the CLI is a thin wrapper)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import ConfigError
from llama_jax.formats.weights import check_architecture, load_params, stored_config
from llama_jax.model.trees import join, partition
from llama_jax.paths import check_bucket, is_url, storage_error, user_path
from llama_jax.text.tokenizer import load_tokenizer
from sharding.layout import load_layout
from sharding.place import Placement, validate
from train.checkpoints import Checkpointer
from train.config import RunConfig
from train.data.pipeline import make_dataset
from train.eval import Evaluator, eval_data
from train.lm_eval.run import TaskEvaluator, require_lm_eval
from train.nonfinite import NonfiniteWatch
from train.objectives.run import load_reference, teacher_placement
from train.peers import watch_peers
from train.program import build_train_step, step_shape
from train.rl.build import build_rl_step, check_reward
from train.runtime import StepProfiler
from train.step import init_state, trainable
from train.tracking.goodput import GoodputRecorder
from train.tracking.metrics import MetricsWriter, mfu_flops_per_token, peak_flops
from train.tracking.wandb_logging import require_wandb


# Logged as the mean over the steps since the last log (the rest: the last step's value);
# each objective logs some of them (train/step.py, train/objectives/: dpo.py, reward.py, distill.py, grpo.py).
AVERAGED = ("loss", "z_loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "reward_gap", "kl", "ce",
            "reward_mean", "reward_std", "clip_fraction", "response_length", "entropy")


def _tokenizer(run: RunConfig):
    path = run.data.tokenizer or run.tokenizer
    if run.data.source not in ("text", "chat", "completion", "preference", "prompts") or path is None:
        return None
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


def _starting_params(run: RunConfig, shardings, resuming: bool):
    """The weights `init_from` gives the run, placed (None: random initialisation).

    Full fine-tuning starts from them and then resumes from its own checkpoints;
    checkpoints hold only the trained parameters, so the frozen ones (a LoRA
    run's base, a vision run's text model and image encoder) are loaded every
    time (when resuming, only they are returned).
    """
    if run.init_from is None or (resuming and run.model.lora is None and run.model.vision is None):
        return None
    if run.model.lora is not None:
        return load_params(run.init_from, run.model.replace(lora=None), shardings.frozen)
    params = load_params(run.init_from, run.model, join(shardings.frozen, shardings.params))
    return partition(params, trainable(run.model))[1] if resuming else params


def _closing(close, tell_failure: bool = False):
    """An ExitStack exit callback calling `close()` (`close(failed=...)` with `tell_failure`),
    whose own error (a full disk fails the close too) yields to the error already on its way out."""
    def exit_(exc_type, exc, traceback):
        try:
            if tell_failure:
                close(failed=exc_type is not None)
            else:
                close()
        except Exception:
            if exc_type is None:
                raise
        return False
    return exit_


def _read_first_batch(data):
    """Read one batch and rewind, so bad data fails before the run directory is created."""
    start = data.get_state()
    next(data)
    data.set_state(start)


def _create_run_dir(run_dir: str):
    """Create `run_dir` (and its parents); ConfigError, one line, if it cannot be written.

    A gs:// run_dir needs no creating: its bucket is checked, and a small object
    written and deleted, so a bucket we may not write to fails here, not at the
    first save."""
    if is_url(run_dir):
        check_bucket(run_dir)
        probe = user_path(run_dir) / ".write-check"
        try:
            probe.write_text("")
            probe.unlink()
        except Exception as err:
            raise storage_error(err, run_dir) from None
        return
    path = user_path(run_dir)
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


class _Window:
    """The steps since the last log: on-device sums of the AVERAGED metrics over the
    steps whose update was applied (adding them never waits), their tokens and time."""

    def __init__(self):
        self.start, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.sums = None  # made at the first step, for the AVERAGED metrics the objective logs

    def add(self, metrics: dict, tokens: int):
        if self.sums is None:
            self.sums = {**{k: jnp.zeros((), jnp.float32) for k in AVERAGED if k in metrics},
                         "applied": jnp.zeros((), jnp.int32)}
        self.sums = _add_to_window(self.sums, metrics)
        self.tokens, self.steps = self.tokens + tokens, self.steps + 1

    def row(self, metrics: dict, flops_per_token: dict[str, float], mesh_peak: float) -> dict:
        """The logged row: the last step's metrics, the window's means, throughput (waits).

        `flops_per_token`: {MFU key: model FLOPs per token} (metrics.mfu_flops_per_token);
        `mesh_peak`: the peak FLOP/s of all the mesh's devices together, for MFU."""
        row = {k: float(v) for k, v in jax.device_get(metrics).items()
               if k != "nonfinite"}  # a bit mask; train/nonfinite.py counts the skipped steps
        sums = jax.device_get(self.sums)
        if sums["applied"]:  # else the last step's values
            row.update({k: float(sums[k]) / int(sums["applied"]) for k in sums if k != "applied"})
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.tokens / elapsed
        return {**row, "tokens_per_s": tokens_per_s, "step_time_s": elapsed / self.steps,
                **{key: tokens_per_s * flops / mesh_peak for key, flops in flops_per_token.items()}}


@jax.jit
def _add_to_window(sums: dict, metrics: dict) -> dict:
    applied = metrics["nonfinite"] == 0
    return {**{k: sums[k] + jnp.where(applied, metrics[k], 0.0) for k in sums if k != "applied"},
            "applied": sums["applied"] + applied}


def train(run: RunConfig, *, progress: bool = True, stop_after: int | None = None,
          whole_process: bool = False) -> dict:
    """Train as the run config says; resume from the run directory's latest checkpoint.

    Returns a summary dict (final step, last logged metrics, checkpoint dir).
    `stop_after` ends the run early after that many steps of this call
    (tests use it to stop mid-run); the schedule still follows `run.steps`.
    `whole_process`: this call is the process's program (`python -m train`), so the
    goodput records (train/tracking/goodput.py) count from the process's start to its exit.
    Raises DivergenceError (train/nonfinite.py) if a step's loss, gradient
    norm or update norm is not finite and `run.on_nonfinite` is "stop".
    Nothing is written until the data has given its first batch.
    With several processes, one lost for `run.peer_timeout` seconds ends the
    others (train/peers.py).
    """
    watch = watch_peers(run.peer_timeout, run.run_dir)
    if watch is None:
        return _train(run, progress, stop_after, whole_process)
    try:
        summary = _train(run, progress, stop_after, whole_process, watch)
    except jax.errors.JaxRuntimeError:
        watch.settle()  # a collective failed: a lost process is the likely cause, and the line to print
        watch.stop(finished=False)
        raise
    except BaseException:
        watch.stop(finished=False)
        raise
    watch.stop()
    return summary


def _train(run: RunConfig, progress: bool, stop_after: int | None, whole_process: bool, watch=None) -> dict:
    if run.metrics.wandb is not None:  # a missing extra fails now, not after the compiles
        require_wandb()
    if run.eval.tasks:  # lm-eval is optional: asked for (and imported) only by runs with tasks
        require_lm_eval("eval.tasks")
    layout = load_layout(run.layout, **run.mesh)
    placement = Placement.create(run.model, layout)
    validate(run.model, layout, placement.mesh, batch=run.data.global_batch // run.grad_accum,
             seq_len=run.data.seq_len)
    shard_index, shard_count = _data_shard(placement, run.data.global_batch)
    tokenizer = _tokenizer(run)
    data = make_dataset(run.data, tokenizer=tokenizer, shard_index=shard_index,
                        shard_count=shard_count, model_vocab_size=run.model.vocab_size, vision=run.model.vision,
                        reward=run.reward is not None)
    _read_first_batch(data)
    precomputed = run.data.reference_log_probs is not None  # DPO holding no reference model
    sources = [run.init_from]
    if run.dpo is not None and not precomputed:
        sources.append(run.dpo.reference)
    if run.grpo is not None:
        sources.append(run.grpo.reference)
    for source in sources:  # a wrong source fails here, before anything is written
        if source is not None:
            check_architecture(source, stored_config(source), run.model)
    tasks = None
    if run.eval.tasks:  # an unknown task fails here, before the compiles
        tasks = TaskEvaluator(run.model, placement, tokenizer or load_tokenizer(run.data.tokenizer or run.tokenizer),
                              run.eval.tasks, limit=run.eval.task_limit, include_path=run.eval.include_path,
                              max_length=min(run.data.seq_len, run.model.max_seq_len))
    teacher = teacher_placement(run, layout)
    program = build_train_step(run, placement, teacher)
    reward_config = check_reward(run) if run.grpo is not None else None
    held_out = None
    if run.eval.every and (run.eval.paths or run.data.holdout):
        held_out = Evaluator(run.model, eval_data(run.data, run.eval.paths), placement, run.eval.batches,
                             tokenizer, (shard_index, shard_count), run.loss_chunk,
                             objective=None if run.dpo is None and run.distill is None and run.reward is None
                             else program.objective)

    def evaluator(state) -> dict[str, float]:
        """The held-out figures and the tasks' metrics of the live parameters (nothing reloaded)."""
        figures = held_out(state.params, state.frozen, state.reference) if held_out is not None else {}
        return {**figures, **(tasks(join(state.frozen or {}, state.params)) if tasks is not None else {})}

    _create_run_dir(run.run_dir)
    goodput = GoodputRecorder(run.run_dir, whole_process)

    shardings = program.shardings
    with contextlib.ExitStack() as cleanup:
        cleanup.push(_closing(goodput.close, tell_failure=True))  # last: after the closing saves
        checkpointer = Checkpointer(run, shardings)
        cleanup.push(_closing(goodput.timed("checkpoint", checkpointer.close)))
        resuming = checkpointer.has_checkpoint()
        starting = _starting_params(run, shardings, resuming)
        reference = load_reference(run, shardings.reference, teacher)
        if resuming:  # nothing random to draw: the checkpoint fills the state (a LoRA base rides beside)
            with goodput.waiting("restore"):
                state = checkpointer.restore_latest(program.state.replace(frozen=starting or {},
                                                                          reference=reference), data)
        else:
            state, _ = init_state(placement, program.optimizer, jax.random.key(run.seed), starting)
            state = state.replace(reference=reference)
        start = int(state.step)
        writer = MetricsWriter(run.run_dir, start, wandb=run.metrics.wandb, run_config=run.to_dict(),
                               goodput=goodput.goodput)
        cleanup.push(_closing(writer.close, tell_failure=True))
        profiler = StepProfiler(run.profile, run.run_dir, active=jax.process_index() == 0)
        cleanup.push(_closing(profiler.close))
        step_fn = program.step
        if run.grpo is not None:  # rollouts and rewards around the update (train/rl/)
            step_fn = build_rl_step(run, placement, program.step, tokenizer, reward_config)
        step_fn = profiler.wrap(step_fn, start)
        if watch is not None:
            step_fn = watch.wrap(step_fn)
        last_steps = run.steps if stop_after is None else min(run.steps, start + stop_after)
        bar = tqdm(total=run.steps, initial=start, disable=not progress or jax.process_index() != 0,
                   desc="train", unit="step", dynamic_ncols=True)
        cleanup.callback(bar.close)
        peak, peak_source = peak_flops(run.chip)
        flops_token = mfu_flops_per_token(run.model, step_shape(run)[1])  # outside the rules: shapes only
        goodput.ready(start)
        with placement.activate():
            state, step, logged = _run_steps(run, state, data, placement, step_fn, checkpointer, writer, bar,
                                             start, last_steps, flops_token, peak,
                                             evaluator if run.eval.every else None, goodput=goodput)
    return {"step": step, "metrics": logged, "peak_flops": peak,
            "peak_source": peak_source, "run_dir": str(user_path(run.run_dir)), "state": state,
            "preempted": checkpointer.preempted}


def _run_steps(run: RunConfig, state, data, placement: Placement, step_fn, checkpointer, writer, bar,
               start: int, last_steps: int, flops_token: dict[str, float], peak: float, evaluator=None, *,
               goodput: GoodputRecorder):
    """Steps `start + 1 .. last_steps` (or to a preemption): (state, last step, last logged row).

    With an evaluator (state -> figures), every `run.eval.every` steps (and at the last step)
    its figures (held-out loss, lm-eval tasks) join that step's row, or make a row of their own.
    `goodput` (a GoodputRecorder) is told where each step's time went."""
    watch = NonfiniteWatch(run.on_nonfinite, run.optimizer.learning_rate)
    tokens_a_step = math.prod(step_shape(run))  # tokens trained on: tokens/s and MFU

    def check_finite():
        saved = checkpointer.last_saved
        watch.check(None if saved is None else f"step {saved} ({checkpointer.location(saved)})")

    step, logged, window = start, {}, _Window()
    while step < last_steps and not checkpointer.reached_preemption(step):
        with goodput.waiting("data"):
            batch = placement.global_batch(next(data))
        state, metrics = step_fn(state, batch)
        step += 1
        with goodput.waiting("checkpoint"):
            checkpointer.check_saves()
        window.add(metrics, tokens_a_step)
        watch.add(step, metrics["nonfinite"])
        log_now = step % run.log_every == 0 or step == last_steps
        eval_now = evaluator is not None and (step % run.eval.every == 0 or step == last_steps)
        if log_now or checkpointer.due(step, force=step == last_steps):
            check_finite()
        row = {}
        if log_now:
            row = logged = {**window.row(metrics, flops_token, peak * placement.mesh.size),
                            "skipped_steps": watch.skipped}
            window = _Window()
        if eval_now:
            with goodput.waiting("eval"):
                figures = evaluator(state)
            row = {**row, **figures}
            logged = {**logged, **figures}
        goodput.step(step)  # just before the row: a kill between the two is all but impossible
        if row:
            writer.write(step, row)
            bar.set_postfix(_progress(logged))
        bar.update(1)
        saving = checkpointer.due(step, force=step == last_steps)
        with goodput.waiting("checkpoint", settle=state if saving else None):
            checkpointer.maybe_save(step, state, data, force=step == last_steps)
    if checkpointer.preempted:
        check_finite()
        with goodput.waiting("checkpoint"):
            checkpointer.maybe_save(step, state, data, force=True)
    return state, step, logged


def _progress(logged: dict) -> dict:
    """The progress bar's figures from the last logged row."""
    shown = {}
    if "loss" in logged:
        shown = {"loss": f"{logged['loss']:.3f}", "tok_s": f"{logged['tokens_per_s']:,.0f}",
                 "mfu": f"{logged['mfu']:.1%}", "mfu_causal": f"{logged['mfu_causal']:.1%}"}
    if "eval_loss" in logged:
        shown["eval"] = f"{logged['eval_loss']:.3f}"
    return shown


def loss_curve_png(run_dir: str | os.PathLike):
    """Plot loss against step from metrics.jsonl into run_dir/loss.png."""
    import matplotlib  # late: heavy, and only this summary plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = user_path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "training"), ("eval_loss", "held-out")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*np.array(points).T, label=label, marker="o" if key == "eval_loss" else None)
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    with out.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out
