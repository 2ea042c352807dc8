"""A lost host ends the run in one line, within `peer_timeout` seconds, instead of a hang.

When one process of a multi-process run is killed without a SIGTERM (its VM
vanished) or stops answering (SIGSTOP, a wedged host), the others wait in
their next collective forever: gloo, like the TPU interconnect, has no
timeout. JAX's coordination service notices a silent process only after its
heartbeat timeout (100 s by default), and then aborts every process with a
C++ stack trace that names no checkpoint.

So every process of the run beats a counter into JAX's key-value store (the
coordination service on process 0) from a thread of its own, and watches the
others' counters from another; the threads run while the main thread is
blocked in a collective or a compile. A process whose counter has not moved
for `peer_timeout` seconds is lost. The watcher then prints one line naming the lost
process and the last complete checkpoint, and ends its process at once with
exit code 3 (`os._exit`: Python's exit would wait for the collectives and for
jax.distributed's shutdown barrier, which wait for the lost process).

A process that finishes marks its counter done, so a peer still finishing
its last save does not take it for lost. A process beats only once its
second training step has finished, and is watched only from its first beat:
start-up (restore, compiles, the first collectives) runs at each host's own
pace, and a host lost before that is left to JAX's heartbeat timeout.

Keep `peer_timeout` below JAX's heartbeat timeout (`python -m train
--distributed` sets that to max(100, 2 * peer_timeout)). Process 0 holds the
store, so its own loss is JAX's to report: when it dies outright, JAX's
client on every other process aborts at once with its own message ("the
leader task was preempted/died"; jaxlib's hook for that moment,
missed_heartbeat_callback, cannot reach Python in jaxlib 0.10.2: its status
argument fails to convert), and when it stops answering, the others' calls
to the store block until JAX's heartbeat timeout aborts them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

import jax
# JAX has no public accessor for jax.distributed's key-value client; orbax's public one follows it.
from orbax.checkpoint import multihost

from llama_jax.formats.checkpoint import latest_step
from llama_jax.paths import user_path

KEY_DIR = "llama_jax/peers/"
DONE = "done"
EXIT_CODE = 3
LISTING_WAIT_S = 10  # how long the last line waits for the checkpoint listing


def initialize(peer_timeout: int, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None):
    """`jax.distributed.initialize`, with JAX's heartbeat timeout at max(100, 2 * peer_timeout)
    s, so a PeerWatch has the first word. Without a coordinator JAX detects the cluster
    (Cloud TPU, Slurm, Open MPI); with one (host:port of process 0), pass all three."""
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=max(100, 2 * peer_timeout))


class PeerWatch:
    """Beats for this process and watches the others (see the module docstring).

    `client`: a jax.distributed client (key_value_set, key_value_dir_get);
    `describe_checkpoint()`: the last complete checkpoint, for the last line;
    `end(line)`: prints the line and ends the process (tests pass their own).
    """

    def __init__(self, timeout: float, describe_checkpoint: Callable[[], str], client, index: int, count: int,
                 end: Callable[[str], None] | None = None):
        self.timeout, self.interval = timeout, min(max(timeout / 5, 0.1), 5.0)
        self._describe, self._client, self._index, self._count = describe_checkpoint, client, index, count
        self._end = end or _end_process
        self._stop, self._ended, self._armed = threading.Event(), threading.Event(), threading.Event()
        self._seen: dict[int, str] = {}  # each peer's last counter
        self._heard: dict[int, float] = {}  # when it last moved
        self._answered = time.monotonic()  # when the store last answered a full round
        self._threads = [threading.Thread(target=self._beat, name="peer-beat", daemon=True),
                         threading.Thread(target=self._watch, name="peer-watch", daemon=True)]

    def start(self) -> PeerWatch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, finished: bool = True):
        """Stop beating and watching; `finished` marks this process done, so peers do not
        take it for lost (a failed process says nothing: its silence is the news)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.interval + 1)
        if finished:
            try:
                self._client.key_value_set(KEY_DIR + str(self._index), DONE, allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the store is gone: nobody is left to tell
                pass

    def arm(self):
        """Start beating (the first beat now, before this process goes on): from now on the
        peers watch this process."""
        self._client.key_value_set(KEY_DIR + str(self._index), "0", allow_overwrite=True)
        self._armed.set()

    def wrap(self, step_fn):
        """`step_fn(state, batch)` arming the watch once the second step has finished: start-up
        (restore, compiles, the first collectives) runs at each host's own pace, and a host
        blocked there for a slower one must not be taken for lost."""
        calls = 0

        def step(state, batch):
            nonlocal calls
            calls += 1
            result = step_fn(state, batch)
            if calls == 2:
                jax.block_until_ready(result)
                self.arm()
            return result

        return step

    def settle(self):
        """Wait until the watch has had time to find a lost process (it then ends this one)."""
        self._ended.wait(self.timeout + 2 * self.interval)

    def _beat(self):
        beat = 0
        while not self._armed.wait(self.interval):
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            beat += 1
            try:
                self._client.key_value_set(KEY_DIR + str(self._index), str(beat), allow_overwrite=True)
                entries = self._client.key_value_dir_get(KEY_DIR)
            except Exception:  # noqa: BLE001 - the store did not answer: the watcher counts the silence
                entries = None
            now = time.monotonic()
            if entries is not None:
                self._answered = now
                for key, value in entries:
                    peer = int(key.rsplit("/", 1)[-1])
                    if peer != self._index and self._seen.get(peer) != value:
                        self._seen[peer], self._heard[peer] = value, now
            self._stop.wait(self.interval)

    def _watch(self):
        while not self._stop.wait(self.interval / 2):
            lost = self.lost(time.monotonic())
            if lost is not None and not self._stop.is_set():
                self._end(f"train: error: {lost}; last complete checkpoint: {_bounded(self._describe)}; "
                          "run the same command on every host to resume")
                self._ended.set()
                return

    def lost(self, now: float) -> str | None:
        """What is lost at time `now` (monotonic seconds), or None.

        Silence is measured between this process's own answered rounds: a process starved
        of CPU (a busy host) does not take its own slowness for a peer's."""
        for peer, heard in sorted(self._heard.items()):
            if self._seen[peer] != DONE and self._answered - heard > self.timeout:
                return (f"process {peer} of {self._count} stopped answering for {self.timeout:g} s "
                        "(killed, stopped or cut off)")
        return None


def watch_peers(timeout: int, run_dir) -> PeerWatch | None:
    """Start a PeerWatch for this process of a multi-process run (None: one process, or timeout 0)."""
    if jax.process_count() == 1 or not timeout or not multihost.is_jax_distributed_client_initialized():
        return None
    client = multihost.get_jax_distributed_client()
    directory = user_path(run_dir) / "checkpoints"

    def describe() -> str:
        step = latest_step(directory)
        return "none" if step is None else str(directory / str(step))

    return PeerWatch(timeout, describe, client, jax.process_index(), jax.process_count()).start()


def _bounded(describe: Callable[[], str]) -> str:
    """`describe()`, or "unknown" if it fails or takes longer than LISTING_WAIT_S (a bucket gone quiet)."""
    result = ["unknown"]

    def run():
        try:
            result[0] = describe()
        except Exception:  # noqa: BLE001 - the last line must still be printed
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LISTING_WAIT_S)
    return result[0]


def _end_process(line: str):
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)
