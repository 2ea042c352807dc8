"""Goodput: where a run's wall time went, across all its attempts (restarts).

The definitions are those of Google's ml-goodput-measurement (which MaxText
uses): goodput = productive training time / total elapsed time, and the rest
is badput by cause. That package is not used: it writes and reads its records
through Cloud Logging only (docs/tpu.md, "Goodput", says why). Here each
attempt appends its records to a file in the run directory, as they happen:

    <run_dir>/goodput/attempt-<start time>-<pid>.jsonl

one JSON object a line, each with the wall-clock time `t` it was written and
the seconds spent since the attempt's previous record, by category:

    start   the attempt's process start (`python -m train`) or `train()` call
    ready   before the first step: start-up, compile, checkpoint restore
    step    after each step: the step's own time, waiting for data, checkpoint
            waits, evaluation, compile
    end     after the last step and the closing saves (status finished/failed)
    exit    when the process has ended (`python -m train`, local run directories):
            written by a small watcher process, since the summary, the loss plot
            and Python's own shutdown (seconds: it collects every object) follow
            the last record a process can write

A SIGKILLed attempt simply has no `end`: its time counts up to its last
record, and what follows (until the next attempt starts) is "between
attempts". Steps that a later attempt redoes (it resumed from an older
checkpoint) are moved from "productive" to "lost". Only process 0 records:
its timings stand for the job's, as its metrics do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import jax
from etils import epath

from llama_jax.paths import is_url, storage_error, user_path

# The categories, in the order reports show them, with their ml-goodput-measurement names.
CATEGORIES = {
    "startup": ("start-up", "PROGRAM_STARTUP, TPU_INITIALIZATION, TRAINING_PREP"),
    "compile": ("compile", "part of PROGRAM_STARTUP"),
    "restore": ("checkpoint restore", "UNPRODUCTIVE_CHECKPOINT_RESTORE_TIME"),
    "checkpoint": ("checkpoint waits", "UNPRODUCTIVE_CHECKPOINT_SAVE_TIME"),
    "data": ("waiting for data", "DATA_LOADING_SYNC"),
    "eval": ("evaluation", "CUSTOM_BADPUT_EVENTS"),
    "productive": ("productive steps", "goodput"),
    "lost": ("steps lost to restarts", "WASTED_PROGRESS_FROM_DISRUPTION"),
    "other": ("other", "OTHER"),
    "shutdown": ("shutdown", "OTHER"),
    "between": ("between attempts", "INFRASTRUCTURE_RECOVERY_FROM_DISRUPTION"),
}
# JAX's compile phases (tracing, lowering, XLA; a persistent-cache read is inside the last).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
UPLOAD_EVERY_S = 30.0  # gs:// objects cannot be appended to: step records are uploaded this often
# Run by the watcher: waits for process PID to end, then appends its `exit` record to PATH.
_WATCHER = """
import json, os, select, sys, time
pid, path, since = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
try:
    select.select([os.pidfd_open(pid)], [], [])
except ProcessLookupError:
    pass
except OSError:  # no pidfd in this kernel: poll until the process is gone or a zombie
    while True:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
now = time.time()
with open(path, "a") as f:
    f.write(json.dumps({"event": "exit", "t": now, "seconds": {"shutdown": round(now - since, 6)}}) + "\\n")
"""


def records_dir(run_dir) -> epath.Path:
    """Where a run directory keeps its goodput records."""
    return user_path(run_dir) / "goodput"


def process_start_time() -> float:
    """The wall-clock time (time.time()) this process started, from /proc (else now)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def _union_within(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by the union of `spans` (nested compiles count once)."""
    covered, reach = 0.0, lo
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            covered += end - start
            reach = end
    return covered


class GoodputRecorder:
    """Records one attempt of the run in `run_dir` (which exists): `waiting(kind)` around
    blocking work, `ready(step)` before the first step, `step(n)` after each, `close` at the end.

    The attempt counts from now, or with `whole_process` (the caller is the process's
    whole program, `python -m train`) from the process's start (interpreter and JAX
    start-up) to its exit. Inactive (records nothing) off process 0.
    """

    def __init__(self, run_dir, whole_process: bool = False):
        self.started = process_start_time() if whole_process else time.time()
        self.active = jax.process_index() == 0
        self._run_dir = run_dir
        self._watch_exit = whole_process
        self._last = self.started  # time of the previous record
        self._pending: dict[str, float] = {}
        self._spans: list[tuple[float, float]] = []  # compile spans since the previous record
        self._lines: list[str] = []  # gs:// only: the object's lines, for the next upload
        self._uploaded = 0.0
        self._file = None
        self._thread = threading.get_ident()
        self._before = None  # the earlier attempts' Breakdown, for goodput so far
        self._productive = 0.0
        if not self.active:
            return
        directory = records_dir(run_dir)
        self._path = directory / f"attempt-{self.started:017.6f}-{os.getpid()}.jsonl"
        if not is_url(directory):
            directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a")
        self._write({"event": "start", "t": self.started, "pid": os.getpid(), "host": os.uname().nodename,
                     "processes": jax.process_count()})
        jax.monitoring.register_event_time_span_listener(self._on_span)

    def _on_span(self, event: str, start: float, end: float, **_):
        # Only the training thread's compiles: a background thread's would overlap time
        # already counted (a save, a step) and the parts would add up to more than the whole.
        if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
            self._spans.append((start, end))

    @contextlib.contextmanager
    def waiting(self, kind: str, settle=None):
        """Count the time inside as `kind` (compile inside it stays compile).

        `settle`: arrays to wait for first, so a step still running on the devices
        (asynchronous dispatch) is not counted as `kind`."""
        if settle is not None and self.active:
            jax.block_until_ready(settle)
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            if self.active:
                spent = end - start - _union_within(self._spans, start, end)
                self._pending[kind] = self._pending.get(kind, 0.0) + spent

    def timed(self, kind: str, function):
        """`function`, its calls counted as `kind` (for an exit callback)."""
        def timed_function(*args, **kwargs):
            with self.waiting(kind):
                return function(*args, **kwargs)
        return timed_function

    def ready(self, step: int):
        """Before the first step, which follows `step` (the restored one, or 0)."""
        if not self.active:
            return
        self._record("ready", "startup", step=step)
        self._before = breakdown(read_attempts(self._run_dir), resumed_at=step,
                                 exclude=self._path.name)

    def step(self, step: int):
        """After step `step`'s work (its metrics row is written next)."""
        if self.active:
            self._productive += self._record("step", "step", step=step).get("step", 0.0)

    def goodput(self) -> float:
        """Productive time / elapsed time of the whole run so far (this attempt's steps taken as kept)."""
        before = self._before
        first = self.started if before is None or before.start is None else before.start
        productive = self._productive + (0.0 if before is None else before.seconds["productive"])
        return productive / max(time.time() - first, 1e-9)

    def close(self, failed: bool = False):
        """The attempt's `end` record (status finished or failed); stop listening to compiles."""
        if not self.active:
            return
        jax.monitoring.unregister_event_time_span_listener(self._on_span)
        self._record("end", "other", status="failed" if failed else "finished")
        if self._file is not None:
            self._file.close()
            if self._watch_exit and hasattr(os, "pidfd_open"):
                subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), str(self._path),
                                  repr(self._last)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        self._upload(force=True)

    def _record(self, event: str, rest: str, **fields) -> dict:
        """Write a record of the seconds since the previous one: the pending waits, compile,
        and the remainder as `rest`. Returns its seconds."""
        now = time.time()
        compiled = _union_within(self._spans, self._last, now)
        seconds = {**self._pending, "compile": self._pending.get("compile", 0.0) + compiled}
        seconds[rest] = seconds.get(rest, 0.0) + max(0.0, now - self._last - sum(seconds.values()))
        seconds = {k: round(v, 6) for k, v in seconds.items() if v > 0}
        self._write({"event": event, "t": now, **fields, "seconds": seconds})
        self._last, self._pending = now, {}
        self._spans = [span for span in self._spans if span[1] > now]
        return seconds

    def _write(self, record: dict):
        line = json.dumps(record) + "\n"
        if self._file is not None:  # appended and flushed: a SIGKILL keeps every record written
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self._upload(force=record["event"] != "step")

    def _upload(self, force: bool):
        if self._file is not None or not self._lines or not (force or time.time() - self._uploaded > UPLOAD_EVERY_S):
            return
        try:
            self._path.write_text("".join(self._lines))
        except Exception as err:
            raise storage_error(err, self._path) from None
        self._uploaded = time.time()


@dataclasses.dataclass
class Attempt:
    """One attempt's account: its span, steps, status, seconds by category (CATEGORIES)."""
    name: str
    start: float
    end: float
    first_step: int | None  # the step it resumed from (None: it never reached the first step)
    last_step: int | None  # the last step it completed
    status: str  # finished, failed, or killed (no end record)
    seconds: dict[str, float]
    lost_steps: int = 0


@dataclasses.dataclass
class Breakdown:
    """A run's account: its attempts and the totals (gaps between attempts included)."""
    attempts: list[Attempt]
    seconds: dict[str, float]
    start: float | None
    end: float | None

    @property
    def elapsed(self) -> float:
        return 0.0 if self.start is None else self.end - self.start

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def lost_steps(self) -> int:
        return sum(a.lost_steps for a in self.attempts)


def read_attempts(run_dir) -> list[tuple[str, list[dict]]]:
    """Every attempt's records under `run_dir`, by start time: [(file name, records)]; a
    line cut short by a kill is dropped."""
    directory = records_dir(run_dir)
    attempts = []
    for path in sorted(directory.glob("attempt-*.jsonl")) if directory.exists() else []:
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        if records and records[0]["event"] == "start":
            attempts.append((path.name, records))
    return sorted(attempts, key=lambda named: named[1][0]["t"])


def breakdown(attempts: list[tuple[str, list[dict]]], resumed_at: int | None = None,
              exclude: str | None = None) -> Breakdown:
    """Account for `attempts` (read_attempts). A step is lost when a later attempt resumed
    from an earlier step (`resumed_at`: the step an attempt still running resumed from);
    its own time, data waits and evaluation move to "lost" (compile and checkpoint waits
    inside it keep their categories). `exclude`: an attempt's file name to leave out."""
    attempts = [(name, records) for name, records in attempts if name != exclude]
    resumes = [next((r["step"] for r in records if r["event"] == "ready"), None) for _, records in attempts]
    out, total, previous_end = [], dict.fromkeys(CATEGORIES, 0.0), None
    for index, (name, records) in enumerate(attempts):
        later = [step for step in resumes[index + 1:] + [resumed_at] if step is not None]
        redo_after = min(later) if later else None
        seconds, lost_steps = dict.fromkeys(CATEGORIES, 0.0), 0
        for record in records[1:]:
            spent = dict(record["seconds"])
            if record["event"] == "step":
                lost = redo_after is not None and record["step"] > redo_after
                lost_steps += lost
                spent["lost" if lost else "productive"] = sum(spent.pop(k, 0.0) for k in (
                    ("step", "data", "eval") if lost else ("step",)))
            for key, value in spent.items():
                seconds[key] = seconds.get(key, 0.0) + value
        steps = [r["step"] for r in records if r["event"] in ("ready", "step")]
        status = next((r["status"] for r in records if r["event"] == "end"), "killed")
        attempt = Attempt(name, records[0]["t"], records[-1]["t"], steps[0] if steps else None,
                          steps[-1] if steps else None, status, seconds, lost_steps)
        out.append(attempt)
        if previous_end is not None:
            total["between"] += max(0.0, attempt.start - previous_end)
        previous_end = max(attempt.end, previous_end or attempt.end)
        for key, value in seconds.items():
            total[key] = total.get(key, 0.0) + value
    return Breakdown(out, total, out[0].start if out else None, previous_end)
