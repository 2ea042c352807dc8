"""Training data: documents -> packed rows -> per-process batches, with grain.

One public entry, `make_dataset(DataConfig(...))` (train/data/config.py), returns an iterator of
batches. How rows are cut depends on whether the documents' lengths are
known up front.

Pre-tokenized token directories with packing (the usual way to train):
rows are random-access windows over one token stream.

    stream               the documents (shuffled once by `seed`) end to end
    windows              row w = stream[w*L : (w+1)*L] (+1 id for targets)
    .shuffle(seed)       a global permutation of the rows, new every epoch
    .repeat(num_epochs)  None repeats forever
    shard blocks         each shard takes its block of every global batch
    .batch(rows_per_shard)

Every row of a batch therefore comes from a random place in the corpus,
however long its documents are (with streamed packing a 100k-token file
fills whole batches by itself, and the loss swings from batch to batch).
A global batch is a run of consecutive rows of the shuffled dataset, so
it holds the same rows however many shards share it, and the position saved
in a checkpoint is global: a run resumes under another process count
(train/data/position.py).

Text (tokenized on the fly), synthetic documents, and unpacked rows: lengths
are only known once a document is read, so documents are streamed.

    documents            random access: text/JSONL | synthetic | token files
    .shuffle(seed)       a global permutation, different in every epoch
    .repeat(num_epochs)  None repeats forever
    [index::count]       each shard reads only its own documents
    .map(tokenize)       text source only: BOS + ids + EOS, on the fly
                         (nothing for a document with no text)
    .to_iter_dataset()   worker threads read ahead, order kept
    skip empty           documents with no ids are dropped; none at all
                         in two passes is a ValueError
    pack                 documents -> rows of seq_len (or one per row)
    window shuffle       packed rows shuffled within windows of
                         `shuffle_window` rows (grain's WindowShuffleIterDataset)
    .batch(rows_per_shard)

Unpacked rows are whole documents, so the document shuffle already shuffles
rows. Streamed packed rows are only shuffled within a window: a document
longer than a window's tokens still lands in neighbouring batches.

Why grain datasets rather than `grain.DataLoader`: every random-access stage
keeps its position as a single index, and the streaming packer is a small
`DatasetIterator` whose state is the position of the first document it still
holds plus an offset into it; the window shuffle stores its parent's state
at the window start and replays at most one window on restore. `get_state()`
is therefore a small JSON dict that restores exactly, and the result is a
grain `DatasetIterator`, so grain's orbax handler saves it beside the model
(`checkpoint_save_args` / `checkpoint_restore_args`).

Batches are dicts of numpy arrays, each [B, seq_len] with
B = global_batch // shard_count:

    tokens       int32    input ids; 0 in padding
    targets      int32    the next id in the document stream; 0 in padding
    positions    int32    index within the document fragment: 0 at each
                          document start and at the start of every row
    segment_ids  int32    1, 2, ... for the document fragments of a row;
                          0 in padding
    loss_weights float32  1 where the target continues the input's document;
                          0 where it is the next document's first id, or pad
    images       dict     a vision model's rows only: each row's images
                          (llama_jax.vision.image.image_inputs, no batch axis)

The prompts source (reinforcement learning) gives no training rows but prompts,
one a row (train/data/example_rows.py `PromptRows`): tokens [B, seq_len]
right-padded with 0, lengths [B] and index [B] (the prompt's place in the files).

A packed row holds stream[r*L:(r+1)*L] as tokens and stream[r*L+1:(r+1)*L+1]
as targets. A document cut by a row boundary continues in another row with
positions restarting at 0: positions stay below seq_len, as at inference,
and every segment of a row is self-contained for attention. The last row
of a stream may be short and padded. Unpacked mode puts one document per
row, truncated to seq_len (+1 target) and padded.

Sharding: shard i of n feeds B = global_batch // n rows of every global
batch. By default a shard is a process (jax.process_index() of jax.process_count());
processes that are replicas along the batch (e.g. `tp` across hosts) must
pass the same shard (train.loop derives it from the Placement). With token
windows and a finite num_epochs, only whole global batches are kept, so all
shards yield the same number of batches. Streamed sources split documents
between shards and may pack slightly different numbers of rows: train for a
fixed number of steps with num_epochs=None (the default) to keep them in step.
"""

from __future__ import annotations

import functools

import grain
import grain.experimental
import jax
import numpy as np

from llama_jax.arith import ceil_div
from llama_jax.text.tokenizer import load_tokenizer
from train.data.config import EXAMPLE_SOURCES, DataConfig
from train.data.example_rows import ExampleRows, PairRows, PromptRows
from train.data.packing import NonEmpty, PackedRows, TokenWindows, unpacked_row
from train.data.position import GlobalRows, PositionRestore, PositionSave, ShardBlocks
from train.data.prompts import Prompts
from train.data.sources import (Examples, Preferences, SyntheticDocuments, TextDocuments, TextTokenizer,
                                TokenDocuments, encode_document)

# --- The pipeline. ----------------------------------------------------------


class _Subset:
    """Random access to the documents `indices` of `source` (a holdout split)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._source[int(self._indices[i])]


def split_indices(n_docs: int, config: DataConfig) -> np.ndarray:
    """The document indices of `config.split`: a `holdout` fraction drawn from `seed` is
    "eval", the rest "train" (all of them when nothing is held out)."""
    held = np.zeros(n_docs, bool)
    if config.holdout:
        count = max(1, round(config.holdout * n_docs))
        held[np.random.default_rng([config.seed, 1]).permutation(n_docs)[:count]] = True
    indices = np.flatnonzero(held if config.split == "eval" else ~held)
    if len(indices) == 0:
        raise ValueError(f"data.holdout: {config.holdout} leaves no documents for split {config.split!r}")
    return indices


def _documents(config: DataConfig, tokenizer: TextTokenizer | None, model_vocab_size: int | None, vision=None):
    """(random-access source, per-document function to int32 ids or None)."""
    if config.source == "tokens":
        docs = TokenDocuments(config.paths)
        for path, vocab_size in zip(docs.dirs, docs.vocab_sizes):
            if model_vocab_size is not None and vocab_size > model_vocab_size:
                raise ValueError(f"{path}: prepared with a vocabulary of {vocab_size} ids, more than the "
                                 f"model's vocab_size {model_vocab_size}; prepare it with the model's "
                                 "tokenizer")
        return docs, None
    if config.source == "synthetic":
        return SyntheticDocuments(config.vocab_size, config.synthetic_docs, config.seq_len, config.seed), None
    if tokenizer is None:
        if config.tokenizer is None:
            raise ValueError(f"data.tokenizer: must name a tokenizer file for source {config.source!r}")
        tokenizer = load_tokenizer(config.tokenizer)
    if vision is not None and model_vocab_size is not None:  # HF's Mllama tokenizer counts <|image|> too
        model_vocab_size += vision.extra_token_rows
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer: vocabulary of {tokenizer.vocab_size} exceeds the model's vocab_size "
                         f"{model_vocab_size}")
    if config.source in EXAMPLE_SOURCES:
        return Examples(config.paths, tokenizer, config.source, vision), None
    if config.source == "preference":
        return Preferences(config.paths, tokenizer), None
    if config.source == "prompts":
        return Prompts(config.paths, tokenizer), None
    return TextDocuments(config.paths, config.text_key), functools.partial(encode_document, tokenizer)


def make_dataset(
    config: DataConfig,
    *,
    tokenizer: TextTokenizer | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    model_vocab_size: int | None = None,
    vision=None,
    reward: bool = False,
) -> grain.DatasetIterator:
    """An iterator of this shard's batches (see the module docstring for their dict).

    tokenizer: overrides `config.tokenizer` for the text source (any object
      with encode/bos_id/eos_id).
    model_vocab_size: the ids the model accepts; a token directory or text
      tokenizer with a larger vocabulary is refused (ValueError, one line).
      (Inside the model an id past the vocabulary gives a row of NaN logits.)
    vision: a Llama 3.2 Vision model's VisionConfig: chat examples may hold
      images (train.data.sources.Examples), one example per row (no packing), and
      every batch gains "images" (llama_jax.vision.image.image_inputs, one
      entry per row). Only the chat and completion sources feed a vision model.
    reward: preference pairs for a reward model (train/data/example_rows.py `PairRows`):
      each conversation whole as inputs, and every batch gains "margin" (float32 [B]).
    shard_index, shard_count: this process feeds global_batch // shard_count
      rows of every global batch, disjoint from other shards' rows. Default:
      jax.process_index() of jax.process_count(). Processes that are replicas
      along the batch pass the same shard; for a `Placement`, shard_count is
      global_batch // placement.process_rows(global_batch) (train.loop).
    The iterator's get_state() is a JSON-serialisable dict; set_state() on
    an iterator made from the same config and shard resumes exactly.
    """
    if (shard_index is None) != (shard_count is None):
        raise ValueError("make_dataset: pass shard_index and shard_count together, or neither")
    if shard_index is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, shard_count {shard_count})")
    if config.global_batch % shard_count:
        raise ValueError(f"data.global_batch: {config.global_batch} is not divisible by shard_count {shard_count}")
    if vision is not None and config.source not in EXAMPLE_SOURCES:
        raise ValueError(f"data.source {config.source!r}: a vision model fine-tunes on chat (or completion) "
                         "examples; use data.source chat")
    source, encode = _documents(config, tokenizer, model_vocab_size, vision)
    indices = split_indices(len(source), config)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4 * config.read_threads)
    if config.source in EXAMPLE_SOURCES or config.source in ("preference", "prompts"):
        if config.source == "preference":
            rows = PairRows(source, indices, config, reward=reward)
        elif config.source == "prompts":
            rows = PromptRows(source, indices, config)
        else:
            rows = ExampleRows(source, indices, config)
        rows = _global_rows(rows, config)
    elif config.source == "tokens" and config.packing:
        rows = _window_rows(source, indices, config)
    else:
        rows = _streamed_rows(_Subset(source, indices), encode, config, shard_index, shard_count, read)
        return iter(rows.batch(config.global_batch // shard_count, drop_remainder=True))
    # one global dataset of rows: the position is global too (train/data/position.py)
    per_shard = config.global_batch // shard_count
    rows = ShardBlocks(rows, shard_index, shard_count, per_shard).to_iter_dataset(read)
    return GlobalRows(iter(rows.batch(per_shard, drop_remainder=True)), shard_count)


def _window_rows(docs: TokenDocuments, indices: np.ndarray, config: DataConfig) -> grain.MapDataset:
    """All shards' rows in order: token windows, shuffled per epoch, whole global batches only."""
    order = indices
    if config.shuffle:
        order = indices[np.random.default_rng(config.seed).permutation(len(indices))]
    windows = TokenWindows(docs, order, config.seq_len)
    if len(windows) == 0:
        raise ValueError(f"data.paths: hold too few tokens for one row: {', '.join(config.paths)}")
    return _global_rows(windows, config)


def _global_rows(rows, config: DataConfig) -> grain.MapDataset:
    """A random-access set of rows, shuffled per epoch, repeated, whole global batches only."""
    rows = grain.MapDataset.source(rows)
    if config.shuffle:
        rows = rows.shuffle(seed=config.seed)
    rows = rows.repeat(config.num_epochs)
    if config.num_epochs is not None:  # keep shards in step: drop the last partial global batch
        rows = rows[: len(rows) - len(rows) % config.global_batch]
    return rows


def _streamed_rows(source, encode, config: DataConfig, shard_index: int, shard_count: int,
                   read: grain.ReadOptions) -> grain.IterDataset:
    """This shard's rows from its own documents: packed by streaming, or one per row."""
    docs = grain.MapDataset.source(source)
    if config.shuffle:
        docs = docs.shuffle(seed=config.seed)
    docs = docs.repeat(config.num_epochs)[shard_index::shard_count]
    if encode is not None:
        docs = docs.map(encode)
    limit = 2 * (ceil_div(len(source), shard_count) + 1)
    docs = NonEmpty(docs.to_iter_dataset(read), limit, config.paths)
    if not config.packing:
        return docs.map(functools.partial(unpacked_row, seq_len=config.seq_len))
    rows = PackedRows(docs, config.seq_len)
    if config.shuffle and config.shuffle_window > 1:
        # index_shuffle takes 32-bit seeds and adds the window number to this one.
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=config.shuffle_window, seed=config.seed % 2**31)
    return rows


# --- Checkpointing with orbax. ----------------------------------------------


def checkpoint_save_args(iterator: grain.DatasetIterator):
    """Orbax args saving `iterator`'s state (one JSON file per process), e.g.

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=checkpoint_save_args(iterator)))
    """
    return PositionSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator):
    """Orbax args restoring into `iterator` (made from the same config) in place; a global
    position (random-access sources) restores under any process count (train/data/position.py)."""
    return PositionRestore(iterator)
