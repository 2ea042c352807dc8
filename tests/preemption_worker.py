"""One of two processes (4 CPU devices each) running `python -m train`'s main as one job.

python tests/preemption_worker.py PROCESS_ID PORT [train arguments ...]

Run by tests/test_preemption_multiprocess.py. `jax.distributed.initialize` on
127.0.0.1 (gloo collectives) starts JAX's preemption service, which owns
SIGTERM: a signal to either process reaches both, and they stop at one step.
Prints `pid <pid>` first (the test signals that process), exits with main's code.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, argv: list[str]) -> int:
    print(f"pid {os.getpid()}", flush=True)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from train.__main__ import main as train_main

    code = train_main(argv)
    jax.distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
