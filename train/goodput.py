"""python -m train.goodput RUN_DIR [--plot FILE]

Where a run's wall time went, per attempt and in total (start-up, compile,
checkpoint restore and waits, waiting for data, productive steps, steps lost
to restarts), and goodput = productive time / elapsed time. Draws the same
as a PNG (default RUN_DIR/goodput.png). Reads RUN_DIR/goodput/, which every
training run writes (train/tracking/goodput.py).
"""

from __future__ import annotations

import argparse
import sys

from llama_jax.cli import run_cli
from llama_jax.paths import user_path
from train.tracking.goodput import breakdown, read_attempts, records_dir
from train.tracking.goodput_report import plot, report_lines


def main(argv=None) -> int:
    return run_cli(_main, argv, prog="train.goodput")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.goodput", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="a training run directory (local or gs://)")
    parser.add_argument("--plot", metavar="FILE", help="where to write the picture (default RUN_DIR/goodput.png)")
    args = parser.parse_args(argv)
    attempts = read_attempts(args.run_dir)
    if not attempts:
        raise ValueError(f"{records_dir(args.run_dir)}: no goodput records; is {args.run_dir} a run directory "
                         "of a training run?")
    account = breakdown(attempts)
    print("\n".join(report_lines(account)))
    out = user_path(args.plot) if args.plot else user_path(args.run_dir) / "goodput.png"
    plot(account, out)
    print(f"picture: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
