"""The data position saved in a checkpoint, global where the pipeline allows it.

Random-access pipelines (token windows, chat/completion/preference examples)
cut global batch k from rows [k*G, (k+1)*G) of one shuffled dataset, however
many shards share it (train/data/pipeline.py). Their position is therefore one
number for the whole job, `{"global_rows": rows read by all shards}`, and a
run saved with 2 processes resumes with 1 or 4 on exactly the batches it
would have read next (`GlobalRows`).

Streamed pipelines (text, synthetic, unpacked token documents) pack each
shard's own documents, so a global batch depends on the shard count: their
position stays per process, and a checkpoint written by another process count
is refused in one line (`DataPositionError`).

On disk the item is grain's: one `process_<i>-of-<n>.json` per process. A
process whose own file is missing (the process count changed) reads any file
holding a global position: all of them hold the same one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointHandler

GLOBAL_ROWS = "global_rows"
_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataPositionError(ValueError):
    """A saved data position that this process count cannot resume (one line)."""


class ShardBlocks(grain.MapDataset):
    """Shard `index` of `count`'s rows of a global dataset of `rows` cut in global batches of
    count * rows_per_shard: the contiguous block [index*B, (index+1)*B) of every batch.

    Contiguous blocks (not every count-th row) keep each row on the same device whatever
    the process count: a global batch assembles to the same array on 1, 2 or 4 processes.
    """

    def __init__(self, rows: grain.MapDataset, index: int, count: int, rows_per_shard: int):
        super().__init__(rows)
        self._index, self._count, self._block = index, count, rows_per_shard
        self._length = len(rows) // count

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._block)
        return self._parent[(batch * self._count + self._index) * self._block + row]

    def __str__(self) -> str:
        return f"ShardBlocks(shard {self._index} of {self._count}, {self._block} rows a batch)"


class GlobalRows(grain.DatasetIterator):
    """This shard's batches of a random-access pipeline, with a global state.

    `batches` iterates a `ShardBlocks` of the rows in batches (state
    `{"next_index": rows of this shard read}`); every shard reads in step, so
    the job has read `next_index * shard_count` rows, whichever shard asks.
    """

    def __init__(self, batches: grain.DatasetIterator, shard_count: int):
        super().__init__(batches)
        self._shard_count = shard_count

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {GLOBAL_ROWS: self._parent.get_state()["next_index"] * self._shard_count}

    def set_state(self, state: dict[str, Any]) -> None:
        if GLOBAL_ROWS not in state:  # written before positions were global: by this shard count
            self._parent.set_state(state)
            return
        rows = state[GLOBAL_ROWS]
        if rows % self._shard_count:
            raise DataPositionError(f"data: the saved position, row {rows}, is not a whole batch for "
                                    f"{self._shard_count} data shards")
        self._parent.set_state({"next_index": rows // self._shard_count})


class PositionHandler(CheckpointHandler):
    """grain's orbax handler, restoring a global position under any process count."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        own = directory / f"process_{index}-of-{count}.json"
        if own.exists():
            item.set_state(json.loads(own.read_text()))
        else:
            item.set_state(_global_state(directory, count))
        item.start_prefetch()
        return item


def _global_state(directory, count: int) -> dict[str, Any]:
    """The global position of a data item written by another process count."""
    saved = sorted((int(m[2]), path) for path in directory.iterdir() if (m := _FILE.fullmatch(path.name)))
    if not saved:
        raise DataPositionError(f"{directory}: no data position saved")
    state = json.loads(saved[0][1].read_text())
    if GLOBAL_ROWS not in state:
        raise DataPositionError(
            f"data: this checkpoint's position was saved by {saved[0][0]} processes and the data source "
            f"packs documents per process; resume with {saved[0][0]} processes (not {count}), or train "
            "on prepared tokens (data.source tokens) to resize")
    return state


@ocp.args.register_with_handler(PositionHandler, for_save=True)
@dataclasses.dataclass
class PositionSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PositionHandler, for_restore=True)
@dataclasses.dataclass
class PositionRestore(ocp.args.CheckpointArgs):
    item: Any
