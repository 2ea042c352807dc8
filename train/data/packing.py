"""Rows of a document stream: fixed windows of a token file, and documents packed (or
one a row) into rows of `seq_len` with segment ids and positions that restart per document.

`train/data/pipeline.py`'s pipeline builds them from its sources.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from llama_jax.arith import ceil_div
from train.data.sources import TokenDocuments, no_text_error

def make_row(window: np.ndarray, segments: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One training row from a window of at most seq_len + 1 ids.

    window: int [n] ids; segments: int [n], 1-based and non-decreasing, the
    document fragment each id belongs to. Inputs are window[:seq_len],
    targets window[1:]; the rest is padding. Returns the row dict described
    in the module docstring, each array [seq_len].
    """
    n_in, n_target = min(len(window), seq_len), len(window) - 1
    row = {key: np.zeros(seq_len, np.int32) for key in ("tokens", "targets", "positions", "segment_ids")}
    row["tokens"][:n_in] = window[:n_in]
    row["targets"][:n_target] = window[1:]
    seg = segments[:n_in]
    row["segment_ids"][:n_in] = seg
    row["positions"][:n_in] = np.arange(n_in) - np.searchsorted(seg, seg, side="left")
    row["loss_weights"] = np.zeros(seq_len, np.float32)
    row["loss_weights"][:n_target] = segments[1:] == segments[:-1]
    return row


def unpacked_row(doc: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One document per row, truncated to seq_len inputs (plus one target) and padded."""
    window = doc[: seq_len + 1]
    return make_row(window, np.ones(len(window), np.int32), seq_len)


class TokenWindows:
    """Packed rows as random access: row w is window w of the documents' token stream.

    The stream is `docs` end to end in `order` (a permutation of document
    indices). Row w holds stream[w*seq_len : (w+1)*seq_len + 1] (inputs and
    targets, see `make_row`), read from the documents it spans; the last row
    may be short. Only each document's place in `order` and its stream offset
    are kept in memory (16 bytes a document).
    """

    def __init__(self, docs: TokenDocuments, order: np.ndarray, seq_len: int):
        self._docs, self._order, self._seq_len = docs, order, seq_len
        self._starts = np.concatenate([[0], np.cumsum(docs.lengths()[order])])  # [num_docs + 1]
        self._num_windows = max(0, ceil_div(int(self._starts[-1]) - 1, seq_len))  # rows with a target

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, w: int) -> dict[str, np.ndarray]:
        if not 0 <= w < self._num_windows:
            raise IndexError(f"window {w} is outside [0, {self._num_windows})")
        pos = w * self._seq_len
        stop = min(pos + self._seq_len + 1, int(self._starts[-1]))
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1  # the document holding `pos`
        pieces = []
        while pos < stop:
            doc_start, doc_stop = int(self._starts[k]), int(self._starts[k + 1])
            if doc_stop > pos:
                pieces.append(self._docs.read(int(self._order[k]), pos - doc_start, min(stop, doc_stop) - doc_start))
                pos = doc_stop
            k += 1
        segments = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), [len(p) for p in pieces])
        return make_row(np.concatenate(pieces), segments, self._seq_len)


class PackedRowsIterator(grain.DatasetIterator):
    """Cuts the stream of documents from `parent` into rows of seq_len inputs.

    Holds the documents the next row needs, each with the parent state from
    just before it was read. State: that parent state of the first held
    document, and how many of its ids earlier rows already consumed.
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._docs: collections.deque[tuple[dict, np.ndarray]] = collections.deque()
        self._offset = 0
        self._exhausted = False

    def _fill(self, needed: int) -> int:
        held = sum(len(doc) for _, doc in self._docs) - self._offset
        while held < needed and not self._exhausted:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self._docs.append((state, np.asarray(doc, np.int32)))  # never empty: see NonEmpty
            held += len(doc)
        return held

    def __next__(self) -> dict[str, np.ndarray]:
        needed = self._seq_len + 1
        if self._fill(needed) < 2:  # a lone id has no target left to predict
            raise StopIteration
        pieces, start, taken = [], self._offset, 0
        for _, doc in self._docs:
            piece = doc[start : start + needed - taken]
            pieces.append(piece)
            start, taken = 0, taken + len(piece)
            if taken == needed:
                break
        window = np.concatenate(pieces)
        segments = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), [len(p) for p in pieces])
        self._offset += self._seq_len
        while self._docs and self._offset >= len(self._docs[0][1]):
            self._offset -= len(self._docs.popleft()[1])
        if not self._docs:
            self._offset = 0
        return make_row(window, segments, self._seq_len)

    def get_state(self) -> dict[str, Any]:
        parent = self._docs[0][0] if self._docs else self._parent.get_state()
        return {"parent": parent, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._docs.clear()
        self._offset = int(state["offset"])
        self._exhausted = False


class NonEmptyIterator(grain.DatasetIterator):
    """The documents of `parent` that hold ids (a text document with no text holds none).

    `limit` empty documents in a row mean that no document holds any: it is
    twice the documents a shard reads in an epoch (a run of empty ones can
    span the end of one epoch and the start of the next), so an input with
    no text ends in ValueError instead of an endless search.
    """

    def __init__(self, parent: grain.DatasetIterator, limit: int, paths: tuple[str, ...]):
        super().__init__(parent)
        self._limit, self._paths = limit, paths

    def __next__(self) -> np.ndarray:
        for _ in range(self._limit):
            doc = next(self._parent)
            if len(doc):
                return doc
        raise no_text_error(self._paths)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class NonEmpty(grain.IterDataset):
    """An IterDataset of the documents that hold ids (see `NonEmptyIterator`)."""

    def __init__(self, parent: grain.IterDataset, limit: int, paths: tuple[str, ...]):
        super().__init__(parent)
        self._limit, self._paths = limit, paths

    def __iter__(self) -> NonEmptyIterator:
        return NonEmptyIterator(self._parent.__iter__(), self._limit, self._paths)


class PackedRows(grain.IterDataset):
    """An IterDataset of packed rows (see `PackedRowsIterator`)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), self._seq_len)
