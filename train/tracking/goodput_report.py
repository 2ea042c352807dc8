"""A run's goodput breakdown as text lines and as a picture (train/tracking/goodput.py accounts)."""

from __future__ import annotations

import datetime

from train.tracking.goodput import CATEGORIES, Attempt, Breakdown

# One colour per category, the productive one green and the losses warm.
COLOURS = {"startup": "#9e9e9e", "compile": "#7e57c2", "restore": "#42a5f5", "checkpoint": "#26c6da",
           "data": "#ffca28", "eval": "#8d6e63", "productive": "#43a047", "lost": "#e53935",
           "other": "#bdbdbd", "shutdown": "#757575", "between": "#ff8a65"}


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rows(seconds: dict[str, float], elapsed: float) -> list[str]:
    """`  <category>  <seconds> s  <share>` for every category with time in it."""
    return [f"  {CATEGORIES[key][0]:<24}{seconds[key]:>10.2f} s {seconds[key] / elapsed:>7.1%}"
            for key in CATEGORIES if seconds.get(key, 0.0) > 0 and elapsed > 0]


def _steps(attempt: Attempt) -> str:
    if attempt.first_step is None:
        return "no step reached"
    lost = f", {attempt.lost_steps} redone later" if attempt.lost_steps else ""
    return f"steps {attempt.first_step}->{attempt.last_step}{lost}"


def report_lines(account: Breakdown) -> list[str]:
    """The breakdown per attempt and in total, as printed by `python -m train.goodput`."""
    lines = []
    for number, attempt in enumerate(account.attempts, 1):
        elapsed = attempt.end - attempt.start
        lines.append(f"attempt {number}: {_when(attempt.start)}, {elapsed:.2f} s, {_steps(attempt)}, "
                     f"{attempt.status}")
        lines.extend(_rows(attempt.seconds, elapsed))
    lines.append(f"total: {len(account.attempts)} attempt(s), {account.elapsed:.2f} s from the first start "
                 "to the last record")
    lines.extend(_rows(account.seconds, account.elapsed))
    lines.append(f"goodput {account.goodput:.1%} (productive {account.seconds['productive']:.2f} s "
                 f"of {account.elapsed:.2f} s); lost steps {account.lost_steps}")
    return lines


def plot(account: Breakdown, out) -> None:
    """Draw each attempt's time and the total as stacked horizontal bars by category,
    into `out` (an epath.Path; PNG)."""
    import matplotlib  # late: heavy, and only this picture needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"attempt {n}", a.seconds) for n, a in enumerate(account.attempts, 1)]
    bars.append(("total", account.seconds))
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(bars)))
    labels = [label for label, _ in bars][::-1]
    for key, (name, _) in CATEGORIES.items():
        widths = [seconds.get(key, 0.0) for _, seconds in bars][::-1]
        if any(widths):
            lefts = [sum(seconds.get(k, 0.0) for k in list(CATEGORIES)[:list(CATEGORIES).index(key)])
                     for _, seconds in bars][::-1]
            ax.barh(labels, widths, left=lefts, color=COLOURS[key], label=name)
    ax.set_xlabel("seconds")
    ax.set_title(f"goodput {account.goodput:.1%}, lost steps {account.lost_steps}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    with out.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
