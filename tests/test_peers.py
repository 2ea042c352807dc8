"""PeerWatch's rules on an in-memory key-value store (tests/test_hosts.py runs real processes)."""

from __future__ import annotations

import time

from train.peers import PeerWatch

TIMEOUT = 0.5


class Store:
    """The two calls PeerWatch makes on jax.distributed's client."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in list(self.values.items()) if k.startswith(prefix)]


def _pair(store):
    ended = {0: [], 1: []}
    watches = [PeerWatch(TIMEOUT, lambda: "/run/checkpoints/4", store, i, 2, end=ended[i].append).start()
               for i in range(2)]
    for watch in watches:
        watch.arm()
    time.sleep(4 * watches[0].interval)  # every process heard once
    return watches, ended


def _line(lost):
    return (f"train: error: {lost} stopped answering for {TIMEOUT:g} s (killed, stopped or cut off); "
            "last complete checkpoint: /run/checkpoints/4; run the same command on every host to resume")


def test_a_silent_process_is_named_within_the_timeout():
    watches, ended = _pair(Store())
    watches[1].stop(finished=False)  # silent, as if killed
    start = time.monotonic()
    while not ended[0] and time.monotonic() - start < 5:
        time.sleep(0.02)
    assert ended[0] == [_line("process 1 of 2")]
    assert TIMEOUT - watches[0].interval <= time.monotonic() - start < TIMEOUT + 1
    watches[0].stop()


def test_a_process_is_not_watched_before_it_is_armed():
    store, ended = Store(), []
    watches = [PeerWatch(TIMEOUT, lambda: "none", store, i, 2, end=ended.append).start() for i in range(2)]
    time.sleep(3 * TIMEOUT)  # neither beats yet (start-up): nothing is lost, and nothing was written
    assert store.values == {} and ended == []
    for watch in watches:
        watch.stop()


def test_a_finished_process_is_not_lost():
    watches, ended = _pair(Store())
    watches[1].stop()  # done: process 0 may still be saving
    time.sleep(3 * TIMEOUT)
    assert ended == {0: [], 1: []}
    watches[0].stop()
