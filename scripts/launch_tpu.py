"""Launch llama-jax on a Cloud TPU VM slice, or on several slices (multislice), with gcloud.

    python scripts/launch_tpu.py create my-tpu --zone us-east5-a --accelerator v5p-128 \\
        --runtime-version v2-alpha-tpuv5 [--slices 2] [--spot]
    python scripts/launch_tpu.py run my-tpu --zone us-east5-a [--slices 2] -- \\
        --config configs/runs/llama3_1_8b_v5p.yaml run_dir=gs://my-bucket/runs/8b
    python scripts/launch_tpu.py status my-tpu --zone us-east5-a
    python scripts/launch_tpu.py delete my-tpu --zone us-east5-a

`create` asks for the TPU through a queued resource (the way Cloud TPU hands
out capacity; multislice needs one): `--slices N` makes N slices named
my-tpu-0 .. my-tpu-(N-1) that train as one job over the data-centre network.
`run` runs `python -m train --distributed ...` on every host of the slice
(`tpu-vm ssh --worker=all`) or of every slice (`queued-resources ssh
--node=all --worker=all`); each host's jax.distributed.initialize() finds
the others. After a preemption (spot capacity, maintenance) run the same
`run` command again: training resumes from the run directory's latest
complete checkpoint. `--dry-run` prints the gcloud command instead of
running it. See docs/tpu.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

TPUS = ["gcloud", "compute", "tpus"]


def _location(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def remote_command(args) -> str:
    """The shell command every host runs: the training command from the checkout `args.repo`."""
    train = [args.python, "-m", "train", "--distributed", *args.train_args]
    return f"cd {shlex.quote(args.repo)} && {shlex.join(train)}"


def build_command(args) -> list[str]:
    """The gcloud command (argv) for parsed `args`."""
    if args.action == "create":
        command = [*TPUS, "queued-resources", "create", args.name, *_location(args),
                   f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime_version}"]
        command += ([f"--node-count={args.slices}", f"--node-prefix={args.name}"] if args.slices > 1
                    else [f"--node-id={args.name}"])
        return command + (["--spot"] if args.spot else [])
    if args.action == "run":
        if not args.train_args:
            raise SystemExit("launch_tpu: error: run: give the training arguments after --, "
                             "e.g. -- --config configs/runs/llama3_1_8b_v5p.yaml")
        if args.slices > 1:
            target = [*TPUS, "queued-resources", "ssh", args.name, *_location(args), "--node=all"]
        else:
            target = [*TPUS, "tpu-vm", "ssh", args.name, *_location(args)]
        return [*target, "--worker=all", f"--command={remote_command(args)}"]
    if args.action == "status":
        return [*TPUS, "queued-resources", "describe", args.name, *_location(args)]
    return [*TPUS, "queued-resources", "delete", args.name, *_location(args), "--force", "--quiet"]


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch_tpu", description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    for action in ("create", "run", "status", "delete"):
        sub = actions.add_parser(action)
        sub.add_argument("name", help="the queued resource and TPU name (slices: NAME-0, NAME-1, ...)")
        sub.add_argument("--zone", required=True)
        sub.add_argument("--project", help="default: gcloud's configured project")
        sub.add_argument("--dry-run", action="store_true", help="print the gcloud command, run nothing")
        if action in ("create", "run"):
            sub.add_argument("--slices", type=int, default=1, help="number of slices (multislice if > 1)")
        if action == "create":
            sub.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5litepod-256")
            sub.add_argument("--runtime-version", required=True, help="TPU VM image, e.g. v2-alpha-tpuv5")
            sub.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preemptible")
        if action == "run":
            sub.add_argument("--repo", default="llama-jax", help="the checkout on every host (default: ~/llama-jax)")
            sub.add_argument("--python", default=".venv/bin/python", help="its Python (default: .venv/bin/python)")
    # Everything after `--` is the training command's, passed on untouched.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_args = list(argv[split + 1:])
    if getattr(args, "slices", 1) < 1:
        parser.error("--slices: must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = build_command(args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
