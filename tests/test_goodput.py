"""Goodput: a run killed and rerun accounts for its whole wall time, and for the steps it redid."""

from __future__ import annotations

import json
import time

import pytest

from llama_jax.formats.checkpoint import latest_step
from train.goodput import main as goodput_main
from train.tracking.goodput import CATEGORIES, breakdown, read_attempts
from train_runs import cli, finish, kill_at_step, metrics, start

TIMEOUT = 150  # seconds for one tiny run of `python -m train` on a busy 2-core machine
STEPS = ("steps=14", "log_every=1", "checkpoint_every=5")


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    """`python -m train` SIGKILLed after step 7 (step 5 saved), then the same command again:
    (run dir, wall time from the first start to the rerun's exit, last step the killed run
    logged, the step the rerun resumed from)."""
    tmp = tmp_path_factory.mktemp("goodput")
    run_dir, cache = tmp / "run", tmp / "compilation_cache"
    began = time.time()
    killed = start(cli(run_dir, *STEPS), tmp / "killed.log", compilation_cache=cache)
    kill_at_step(run_dir, 7, killed, saved=5)
    killed_at = metrics(run_dir)[-1]["step"]
    resumed_from = latest_step(run_dir / "checkpoints")
    rerun = start(cli(run_dir, *STEPS), tmp / "rerun.log", compilation_cache=cache)
    output = finish(rerun, tmp / "rerun.log", TIMEOUT)
    ended = time.time()
    assert rerun.returncode == 0, output
    deadline = time.monotonic() + 10  # the exit record comes from a watcher, as the process ends
    while not any(r["event"] == "exit" for r in read_attempts(run_dir)[-1][1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return run_dir, ended - began, killed_at, resumed_from


def test_breakdown_of_a_killed_and_rerun_run_adds_up_to_its_wall_time(restarted_run):
    run_dir, wall, killed_at, resumed_from = restarted_run
    account = breakdown(read_attempts(run_dir))
    assert [a.status for a in account.attempts] == ["killed", "finished"]
    assert sum(account.seconds.values()) == pytest.approx(wall, rel=0.02)
    for key in ("startup", "compile", "productive", "checkpoint", "restore", "between", "shutdown"):
        assert account.seconds[key] > 0, key  # each part of this run's time has a name
    assert account.attempts[0].seconds["restore"] == 0  # the first attempt started afresh


def test_lost_steps_are_the_steps_redone_after_resuming(restarted_run):
    run_dir, _, killed_at, resumed_from = restarted_run
    # killed past its last complete save (on a starved machine the kill can land a few steps late)
    assert resumed_from in (5, 10) and resumed_from < killed_at < 14, (resumed_from, killed_at)
    account = breakdown(read_attempts(run_dir))
    first, second = account.attempts
    assert (first.first_step, first.last_step, second.first_step, second.last_step) == (0, killed_at, resumed_from,
                                                                                       14)
    assert account.lost_steps == first.lost_steps == killed_at - resumed_from
    assert second.lost_steps == 0
    assert account.seconds["lost"] > 0


def test_metrics_carry_goodput_so_far_without_the_redone_steps(restarted_run):
    """The last row's goodput: productive time of the kept steps / time since the first start."""
    run_dir, *_ = restarted_run
    account = breakdown(read_attempts(run_dir))
    last_step = next(r for r in read_attempts(run_dir)[-1][1] if r["event"] == "step" and r["step"] == 14)
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 15))
    assert all(0 < row["goodput"] < 1 for row in rows)
    # After step 14's row come only the closing saves and the shutdown: no productive time.
    assert rows[-1]["goodput"] == pytest.approx(account.seconds["productive"] / (last_step["t"] - account.start),
                                                rel=0.01)


def test_goodput_command_prints_each_attempt_and_the_total_and_draws_them(restarted_run, tmp_path, capsys):
    run_dir, _, killed_at, resumed_from = restarted_run
    picture = tmp_path / "goodput.png"
    assert goodput_main([str(run_dir), "--plot", str(picture)]) == 0
    lines = capsys.readouterr().out.splitlines()
    account = breakdown(read_attempts(run_dir))
    lost = killed_at - resumed_from
    assert lines[0].startswith("attempt 1: ")
    assert lines[0].endswith(f"steps 0->{killed_at}, {lost} redone later, killed")
    second = next(i for i, line in enumerate(lines) if line.startswith("attempt 2: "))
    assert lines[second].endswith("steps 5->14, finished")
    total = lines.index(next(line for line in lines if line.startswith("total: 2 attempt(s), ")))
    shown = {line[:26].strip(): float(line[26:].split(" s")[0]) for line in lines[total + 1:-2]}
    expected = {CATEGORIES[key][0]: round(seconds, 2) for key, seconds in account.seconds.items() if seconds > 0}
    assert shown == expected
    assert lines[-2] == (f"goodput {account.goodput:.1%} (productive {account.seconds['productive']:.2f} s "
                         f"of {account.elapsed:.2f} s); lost steps {lost}")
    assert lines[-1] == f"picture: {picture}"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goodput_command_on_a_directory_without_records_is_one_line(tmp_path, capsys):
    assert goodput_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"train.goodput: error: {tmp_path / 'goodput'}: no goodput records; is {tmp_path} a run "
                   "directory of a training run?\n")
    assert not (tmp_path / "goodput.png").exists()


def _attempt(tmp, name: str, start: float, resumed: int | None, steps: range, end: str | None):
    """An attempt's records: start, ready at `resumed`, one second a step (0.25 s of it data), end."""
    records = [{"event": "start", "t": start}]
    t = start + 10
    if resumed is not None:
        records.append({"event": "ready", "t": t, "step": resumed, "seconds": {"startup": 7.0, "restore": 3.0}})
    for step in steps:
        t += 1
        records.append({"event": "step", "t": t, "step": step, "seconds": {"step": 0.75, "data": 0.25}})
    if end:
        t += 2
        records.append({"event": "end", "t": t, "status": end, "seconds": {"checkpoint": 2.0}})
    (tmp / "goodput").mkdir(exist_ok=True)
    (tmp / "goodput" / f"attempt-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_step_is_lost_when_any_later_attempt_resumes_before_it(tmp_path):
    """The second attempt dies before its first save, so the third resumes from step 5 too:
    steps 6-7 of the first and 6-8 of the second were both redone."""
    _attempt(tmp_path, "a", 1000.0, 0, range(1, 8), None)  # ends at 1017
    _attempt(tmp_path, "b", 1020.0, 5, range(6, 9), None)  # ends at 1033
    _attempt(tmp_path, "c", 1040.0, 5, range(6, 11), "finished")  # ends at 1057
    account = breakdown(read_attempts(tmp_path))
    assert [(a.first_step, a.last_step, a.lost_steps, a.status) for a in account.attempts] == [
        (0, 7, 2, "killed"), (5, 8, 3, "killed"), (5, 10, 0, "finished")]
    assert account.lost_steps == 5
    seconds = {k: v for k, v in account.seconds.items() if v}
    assert seconds == {"startup": 21.0, "restore": 9.0, "data": 0.25 * 10, "productive": 0.75 * 10,
                       "lost": 5.0, "checkpoint": 2.0, "between": 10.0}
    assert sum(seconds.values()) == account.elapsed == 57.0
    assert account.goodput == pytest.approx(7.5 / 57)
