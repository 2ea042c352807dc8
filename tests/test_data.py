"""Training data pipeline: packing, token windows, shuffling, sharding, resumable state, prepare CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_jax.config import ConfigError
from train.data.config import DataConfig
from train.data.pipeline import checkpoint_restore_args, checkpoint_save_args, make_dataset
from train.data.sources import TokenDocuments
from train.prepare import main, prepare

BOS, EOS = 1, 2


class NumberTokenizer:
    """Stub tokenizer: text of space-separated integers -> those integers."""

    bos_id, eos_id = BOS, EOS

    def __init__(self, vocab_size: int = 100):
        self.vocab_size = vocab_size

    def encode(self, text, bos=False, eos=False):
        return [BOS] * bos + [int(word) for word in text.split()] + [EOS] * eos


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: text}) + "\n" for text in texts))
    return path


def token_dir(tmp_path, texts, vocab_size=100):
    """A prepared token directory holding `texts` as documents, in order."""
    prepare(NumberTokenizer(vocab_size), [str(write_jsonl(tmp_path / "docs.jsonl", texts))], tmp_path / "tok",
            progress=False)
    return tmp_path / "tok"


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"batch {step}, {key}")


def rows_of(batches):
    """Every row of `batches` as one dict of [seq_len] arrays, in order."""
    return [{k: v[r] for k, v in b.items()} for b in batches for r in range(len(b["tokens"]))]


def row_key(row):
    """A row's inputs and targets, hashable: rows with equal keys hold the same window."""
    return tuple(row["tokens"].tolist()) + tuple(row["targets"].tolist())


def corpus_texts(n=40):
    """Documents told apart by their first id (3 + i); lengths 1 to 11 ids."""
    return [" ".join([str(3 + i)] + [str(50 + (i * 7 + j) % 49) for j in range(i % 11)]) for i in range(n)]


def distinct_id_texts(lengths, first=3):
    """Documents whose ids are all different: 3, 4, 5, ... in order, `lengths[i]` ids in document i."""
    ends = np.cumsum([first, *lengths])
    return [" ".join(str(t) for t in range(a, b)) for a, b in zip(ends[:-1], ends[1:])]


# 10 documents framed BOS ... EOS make a stream of 97 ids: exactly 12 windows of 8 inputs (+1 target).
DISTINCT_LENGTHS = [30, 1, 12, 5, 9, 3, 7, 2, 6, 2]
DISTINCT_INPUTS = {t: 1 for t in range(3, 80)} | {BOS: 10, EOS: 9}  # the stream's last EOS is only a target


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", corpus_texts())


def text_config(paths, **overrides):
    paths = paths if isinstance(paths, list) else [paths]
    fields = dict(source="text", paths=paths, seq_len=8, global_batch=2, read_threads=2, shuffle_window=5)
    return DataConfig(**{**fields, **overrides})


def dataset(config, shard=(0, 1), tokenizer=None):
    return make_dataset(config, tokenizer=tokenizer or NumberTokenizer(), shard_index=shard[0], shard_count=shard[1])


def stream_documents(batches):
    """The first id of every document a row starts (the target of each BOS input), row by row."""
    return [int(row["targets"][j]) for row in rows_of(batches) for j in np.flatnonzero(row["tokens"] == BOS)]


def assert_rows_are_windows_of_the_stream(rows, seq_len):
    """Check each row against the document stream it was cut from (ids other than BOS/EOS distinct).

    Inputs continue one another inside a document, the targets are the inputs
    shifted by one, a segment starts at each BOS, positions count from each
    segment start, and only targets that cross into the next document get no
    loss weight.
    """
    for i, row in enumerate(rows):
        real = row["segment_ids"] > 0
        n = int(real.sum())
        assert real[:n].all(), f"row {i}: padding only at the end"
        tokens, targets = row["tokens"][:n], row["targets"][:n]
        np.testing.assert_array_equal(targets[:-1], tokens[1:], err_msg=f"row {i}: targets are the next inputs")
        stream = np.append(tokens, targets[-1])
        for a, b in zip(stream[:-1], stream[1:]):
            assert b == a + 1 or b in (BOS, EOS) or a in (BOS, EOS), f"row {i}: {a} then {b} is not the stream"
            assert (a == EOS) == (b == BOS) or b == 0, f"row {i}: {a} then {b} is not a document boundary"
        starts = (np.arange(n) == 0) | (tokens == BOS)
        np.testing.assert_array_equal(row["segment_ids"][:n], np.cumsum(starts), err_msg=f"row {i}: segment_ids")
        last_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n) - last_start, err_msg=f"row {i}: positions")
        weights = (targets != BOS) & (targets != 0)
        np.testing.assert_array_equal(row["loss_weights"][:n], weights, err_msg=f"row {i}: loss_weights")
        assert not row["loss_weights"][n:].any() and not row["positions"][n:].any()
        assert len(row["tokens"]) == seq_len


def input_counts(rows):
    """How often each id is an input, over `rows`."""
    ids = np.concatenate([row["tokens"][row["segment_ids"] > 0] for row in rows])
    return dict(zip(*(v.tolist() for v in np.unique(ids, return_counts=True))))


# --- Rows. -------------------------------------------------------------------

HAND_DOCS = ["10 11", "20", "30 31 32 33 34"]  # BOS 10 11 EOS | BOS 20 EOS | BOS 30 ... 34 EOS


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_packed_rows_carry_segments_positions_targets_and_loss_weights(tmp_path, source):
    path = write_jsonl(tmp_path / "hand.jsonl", HAND_DOCS) if source == "text" else token_dir(tmp_path, HAND_DOCS)
    config = text_config(path, source=source, seq_len=4, global_batch=1, shuffle=False, num_epochs=1)
    rows = rows_of(dataset(config))
    want = [  # tokens, targets, segment_ids, positions, loss_weights
        ([1, 10, 11, 2], [10, 11, 2, 1], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 1, 0]),
        ([1, 20, 2, 1], [20, 2, 1, 30], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 0, 1]),
        # The third document continues from the last row: positions restart at 0.
        ([30, 31, 32, 33], [31, 32, 33, 34], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 1, 1]),
        ([34, 2, 0, 0], [2, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]),
    ]
    assert len(rows) == len(want)
    for row, (tokens, targets, segments, positions, weights) in zip(rows, want):
        np.testing.assert_array_equal(row["tokens"], tokens)
        np.testing.assert_array_equal(row["targets"], targets)
        np.testing.assert_array_equal(row["segment_ids"], segments)
        np.testing.assert_array_equal(row["positions"], positions)
        np.testing.assert_array_equal(row["loss_weights"], weights)


def test_token_rows_are_shuffled_windows_covering_the_stream_once_per_epoch(tmp_path):
    path = token_dir(tmp_path, distinct_id_texts(DISTINCT_LENGTHS))
    config = text_config(path, source="tokens", global_batch=1, num_epochs=2)
    rows = rows_of(dataset(config))
    assert len(rows) == 2 * 12
    assert_rows_are_windows_of_the_stream(rows, seq_len=8)
    epoch1, epoch2 = rows[:12], rows[12:]
    # Every id is an input once per epoch (BOS and EOS once per document, but the last
    # EOS is only a target), and the window after a row starts with that row's last
    # target: a permutation of one stream's windows.
    assert input_counts(epoch1) == input_counts(epoch2) == DISTINCT_INPUTS
    firsts = {int(row["tokens"][0]) for row in epoch1}
    assert sum(int(row["targets"][-1]) in firsts for row in epoch1) == 11  # all but the last window
    assert {row_key(r) for r in epoch1} == {row_key(r) for r in epoch2}
    assert [row_key(r) for r in epoch1] != [row_key(r) for r in epoch2]


def test_a_window_spanning_several_documents_restarts_segments_at_each(tmp_path):
    path = token_dir(tmp_path, distinct_id_texts([1, 1, 1, 3]))  # BOS 3 EOS BOS 4 EOS BOS 5 EOS BOS 6 7 8 EOS
    config = text_config(path, source="tokens", seq_len=13, global_batch=1, shuffle=False, num_epochs=1)
    (row,) = rows_of(dataset(config))
    np.testing.assert_array_equal(row["tokens"], [1, 3, 2, 1, 4, 2, 1, 5, 2, 1, 6, 7, 8])
    np.testing.assert_array_equal(row["targets"], [3, 2, 1, 4, 2, 1, 5, 2, 1, 6, 7, 8, 2])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    np.testing.assert_array_equal(row["loss_weights"], [1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("source, shuffle_window", [("tokens", 0), ("text", 128)])
def test_rows_of_a_batch_come_from_different_documents_even_when_documents_are_long(tmp_path, source, shuffle_window):
    # 4 documents of 200 ids, 25 rows each: streamed in order, a batch of 8 rows would be one document.
    texts = distinct_id_texts([200] * 4)
    path = token_dir(tmp_path, texts, vocab_size=1000) if source == "tokens" else write_jsonl(tmp_path / "l.jsonl", texts)
    config = text_config(path, source=source, global_batch=8, shuffle_window=shuffle_window)
    for step, batch in enumerate(take(dataset(config, tokenizer=NumberTokenizer(1000)), 6)):
        ids = batch["tokens"][batch["tokens"] > EOS]
        assert len(np.unique((ids - 3) // 200)) >= 3, f"batch {step} holds rows of fewer than 3 documents"


def test_unpacked_rows_hold_one_document_truncated_or_padded(tmp_path):
    path = write_jsonl(tmp_path / "hand.jsonl", HAND_DOCS)
    config = text_config(path, seq_len=4, global_batch=3, shuffle=False, num_epochs=1, packing=False)
    (batch,) = list(dataset(config))
    np.testing.assert_array_equal(batch["tokens"], [[1, 10, 11, 2], [1, 20, 2, 0], [1, 30, 31, 32]])
    np.testing.assert_array_equal(batch["targets"], [[10, 11, 2, 0], [20, 2, 0, 0], [30, 31, 32, 33]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(batch["loss_weights"], [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_int32_rows_of_seq_len_per_shard(packing):
    config = DataConfig(seq_len=16, global_batch=8, packing=packing, read_threads=2, shuffle_window=8)
    batch = next(dataset(config, shard=(1, 2)))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((4, 16), "int32"), "targets": ((4, 16), "int32"), "positions": ((4, 16), "int32"),
        "segment_ids": ((4, 16), "int32"), "loss_weights": ((4, 16), "float32"),
    }
    assert batch["tokens"].max() < config.vocab_size


# --- Order and sharding. ----------------------------------------------------


@pytest.mark.parametrize("source", ["text", "synthetic", "tokens"])
def test_same_seed_gives_same_batches_and_another_seed_others(tmp_path, corpus, source):
    path = token_dir(tmp_path, corpus_texts()) if source == "tokens" else corpus

    def batches(seed):
        return take(dataset(text_config(path, source=source, seed=seed, global_batch=4)), 5)

    assert_same_batches(batches(seed=7), batches(seed=7))
    assert not np.array_equal(batches(seed=7)[0]["tokens"], batches(seed=8)[0]["tokens"])


def test_each_epoch_visits_every_document_once_in_a_new_order(corpus):
    config = text_config(corpus, packing=False, global_batch=1, seq_len=16, num_epochs=2)
    firsts = stream_documents(list(dataset(config)))
    epoch1, epoch2 = firsts[:40], firsts[40:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(3, 43))
    assert epoch1 != epoch2 and epoch1 != sorted(epoch1)


@pytest.mark.parametrize("packing", [True, False])
def test_two_shards_read_disjoint_documents_covering_the_corpus(corpus, packing):
    config = text_config(corpus, packing=packing, seq_len=16, num_epochs=1)
    seen = [stream_documents(list(dataset(config, shard=(p, 2)))) for p in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(3, 43))


@pytest.mark.parametrize("shard_count", [2, 4])
def test_token_window_shards_split_each_global_batch_disjointly(tmp_path, shard_count):
    path = token_dir(tmp_path, distinct_id_texts(DISTINCT_LENGTHS))
    config = text_config(path, source="tokens", global_batch=4, num_epochs=2)
    whole = list(dataset(config))
    shards = [list(dataset(config, shard=(p, shard_count))) for p in range(shard_count)]
    assert len(whole) == 6 and all(len(batches) == 6 for batches in shards)
    for step in range(6):  # each global batch holds the same rows however many shards share it
        split = [row_key(r) for batches in shards for r in rows_of([batches[step]])]
        assert len(set(split)) == len(split) == 4, f"batch {step}: shards overlap"
        assert set(split) == {row_key(r) for r in rows_of([whole[step]])}, f"batch {step}"
    epoch = rows_of(whole[:3])
    assert len({row_key(r) for r in epoch}) == 12  # the 12 windows, each once
    assert input_counts(epoch) == DISTINCT_INPUTS


def test_finite_token_epochs_keep_only_whole_global_batches(tmp_path):
    path = token_dir(tmp_path, distinct_id_texts(DISTINCT_LENGTHS))  # 12 windows
    config = text_config(path, source="tokens", global_batch=5, num_epochs=1)
    assert [len(list(dataset(config, shard=(p, 5)))) for p in range(5)] == [2] * 5  # 10 of 12 rows


def test_default_shard_is_this_jax_process(corpus):
    config = text_config(corpus)
    assert_same_batches(take(make_dataset(config, tokenizer=NumberTokenizer()), 2), take(dataset(config), 2))


# --- Resumable state. -------------------------------------------------------


@pytest.mark.parametrize("steps_before_save", [0, 3, 11])
@pytest.mark.parametrize(
    "source, packing, shard_index",
    [("text", True, 0), ("text", False, 0), ("text", True, 1), ("synthetic", True, 0),
     ("tokens", True, 1), ("tokens", False, 0)],
)
def test_restored_iterator_yields_exactly_the_next_batches(tmp_path, corpus, source, packing, shard_index,
                                                           steps_before_save):
    # 40 short documents in rows of 8 span several epochs (and shuffle windows) over 11 + 6 batches.
    path = token_dir(tmp_path, corpus_texts()) if source == "tokens" else corpus
    config = text_config(path, source=source, packing=packing, synthetic_docs=5, global_batch=4)

    def fresh():
        return dataset(config, shard=(shard_index, 2))

    original = fresh()
    take(original, steps_before_save)
    state = json.loads(json.dumps(original.get_state()))
    want = take(original, 6)

    restored = fresh()
    take(restored, 2)  # set_state must also rewind an iterator that has run
    restored.set_state(state)
    assert_same_batches(take(restored, 6), want)


def test_token_windows_restore_exactly_from_every_step_across_epochs(tmp_path):
    path = token_dir(tmp_path, distinct_id_texts(DISTINCT_LENGTHS))  # 12 windows: 3 global batches an epoch
    config = text_config(path, source="tokens", global_batch=4, num_epochs=3)
    original = dataset(config, shard=(1, 2))
    states, batches = [], []
    for batch in original:
        states.append(json.loads(json.dumps(original.get_state())))
        batches.append(batch)
    assert len(batches) == 9
    for step in range(8):
        restored = dataset(config, shard=(1, 2))
        restored.set_state(states[step])
        assert_same_batches(list(restored), batches[step + 1:])


def test_orbax_checkpoint_manager_saves_the_iterator_beside_the_model(corpus, tmp_path):
    import orbax.checkpoint as ocp

    config = text_config(corpus)
    original = make_dataset(config, tokenizer=NumberTokenizer())
    take(original, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=checkpoint_save_args(original)))
        manager.wait_until_finished()
        restored = make_dataset(config, tokenizer=NumberTokenizer())
        manager.restore(4, args=ocp.args.Composite(data=checkpoint_restore_args(restored)))
    assert_same_batches(take(restored, 3), take(original, 3))


@pytest.mark.parametrize("new_count", [1, 4])
def test_a_token_position_saved_by_2_shards_resumes_the_same_global_batches_on_another_count(tmp_path,
                                                                                           new_count):
    path = token_dir(tmp_path, corpus_texts())
    config = text_config(path, source="tokens", global_batch=4)
    saved = [dataset(config, shard=(p, 2)) for p in range(2)]
    for shard in saved:
        take(shard, 5)
    states = [json.loads(json.dumps(shard.get_state())) for shard in saved]
    assert states[0] == states[1] == {"global_rows": 20}  # one position for the whole job
    want = [{k: np.concatenate(parts) for k, parts in zip(b[0], zip(*(x.values() for x in b)))}
            for b in zip(*(take(shard, 3) for shard in saved))]
    resumed = [dataset(config, shard=(p, new_count)) for p in range(new_count)]
    for shard in resumed:
        shard.set_state(states[0])
    got = [{k: np.concatenate(parts) for k, parts in zip(b[0], zip(*(x.values() for x in b)))}
           for b in zip(*(take(shard, 3) for shard in resumed))]
    assert_same_batches(got, want)


def _save_as_two_processes(config, tmp_path):
    """Save a dataset's position as orbax does, then name the file as if 2 processes wrote it."""
    import orbax.checkpoint as ocp

    original = dataset(config)
    take(original, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=checkpoint_save_args(original)))
        manager.wait_until_finished()
    item = tmp_path / "ckpt" / "3" / "data"
    (item / "process_0-of-1.json").rename(item / "process_1-of-2.json")
    return original


def _restore(config, tmp_path):
    import orbax.checkpoint as ocp

    restored = dataset(config)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=checkpoint_restore_args(restored)))
    return restored


def test_orbax_restores_a_global_position_written_by_another_process_count(tmp_path):
    config = text_config(token_dir(tmp_path, corpus_texts()), source="tokens", global_batch=4)
    original = _save_as_two_processes(config, tmp_path)
    assert_same_batches(take(_restore(config, tmp_path), 3), take(original, 3))


def test_a_per_process_position_written_by_another_process_count_is_one_line(tmp_path, corpus):
    config = text_config(corpus, global_batch=4)  # streamed text: rows packed per process
    _save_as_two_processes(config, tmp_path)
    with pytest.raises(Exception) as err:
        _restore(config, tmp_path)
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert str(cause) == ("data: this checkpoint's position was saved by 2 processes and the data source packs "
                          "documents per process; resume with 2 processes (not 1), or train on prepared tokens "
                          "(data.source tokens) to resize")


# --- Token files and the prepare command. -------------------------------------


def test_prepare_writes_token_files_the_tokens_source_reads_back(tmp_path, corpus):
    txt = tmp_path / "extra.txt"
    txt.write_text("7 8\n9\n")  # a .txt file is one document
    meta = prepare(NumberTokenizer(), [str(corpus), str(txt)], tmp_path / "tok", progress=False)
    assert (meta["dtype"], meta["num_docs"]) == ("uint16", 41)

    tokenizer, texts = NumberTokenizer(), corpus_texts() + ["7 8\n9\n"]
    docs = TokenDocuments([tmp_path / "tok"])
    assert [docs[i].tolist() for i in range(len(docs))] == [tokenizer.encode(t, bos=True, eos=True) for t in texts]

    # The same documents give the same rows whether prepared or tokenized on the fly
    # (in the same order when unshuffled; token windows are shuffled differently).
    for fields in (dict(shuffle=False), dict(packing=False)):
        from_text = dataset(text_config([corpus, txt], **fields))
        from_tokens = dataset(text_config(tmp_path / "tok", source="tokens", **fields))
        assert_same_batches(take(from_tokens, 8), take(from_text, 8))


def test_prepare_stores_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", ["70000 3", "65536"])
    meta = prepare(NumberTokenizer(vocab_size=70001), [str(path)], tmp_path / "tok", progress=False)
    docs = TokenDocuments([tmp_path / "tok"])
    assert meta["dtype"] == "uint32"
    assert [docs[0].tolist(), docs[1].tolist()] == [[BOS, 70000, 3, EOS], [BOS, 65536, EOS]]


def test_prepare_rejects_a_token_id_outside_the_vocabulary_and_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["3 4", "5 60"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: token id 60 is outside the vocabulary \[0, 50\)"):
        prepare(NumberTokenizer(vocab_size=50), [str(path)], tmp_path / "tok", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    from llama_jax.text.tokenizer_training import train_sentencepiece

    texts = ["the quick brown fox jumps over the lazy dog", "packing rows of tokens for training"] * 20
    return train_sentencepiece(texts, 300, tmp_path_factory.mktemp("sp") / "tokenizer.model")


def test_prepare_command_tokenizes_a_glob_with_a_real_tokenizer(tmp_path, sentencepiece_path):
    from llama_jax.text.tokenizer import load_tokenizer

    texts = ["the lazy fox", "rows of tokens", "training the dog"]
    write_jsonl(tmp_path / "a.jsonl", texts[:2], key="body")
    write_jsonl(tmp_path / "b.jsonl", texts[2:], key="body")
    argv = ["--tokenizer", str(sentencepiece_path), "--input", str(tmp_path / "*.jsonl"),
            "--output", str(tmp_path / "tok"), "--text-key", "body", "--quiet"]
    assert main(argv) == 0
    tokenizer, docs = load_tokenizer(sentencepiece_path), TokenDocuments([tmp_path / "tok"])
    assert [docs[i].tolist() for i in range(len(docs))] == [tokenizer.encode(t, bos=True, eos=True) for t in texts]


def test_prepare_command_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--text-key" in capsys.readouterr().out


@pytest.mark.parametrize(
    "inputs, message",
    [
        (["missing.jsonl"], "missing.jsonl: file not found"),
        (["nothing-*.jsonl"], "nothing-*.jsonl: no file matches this pattern"),
        (["broken.jsonl"], "broken.jsonl:2: not valid JSON"),
        (["wrong_key.jsonl"], "wrong_key.jsonl:1: no string field 'text'"),
        (["image.bin"], "image.bin:1: not valid UTF-8"),
    ],
)
def test_prepare_command_rejects_bad_input_with_one_line(tmp_path, capsys, sentencepiece_path, inputs, message):
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    write_jsonl(tmp_path / "wrong_key.jsonl", ["hello"], key="body")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\xff\xfe")
    argv = ["--tokenizer", str(sentencepiece_path), "--output", str(tmp_path / "tok"), "--quiet",
            "--input", *(str(tmp_path / name) for name in inputs)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: ") and message in err and err.count("\n") == 1
    assert not any(p.name.startswith((".tok", "tok")) for p in tmp_path.iterdir())


def test_prepare_command_refuses_to_overwrite_without_the_flag(tmp_path, capsys, sentencepiece_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["the fox"])
    argv = ["--tokenizer", str(sentencepiece_path), "--input", str(path), "--output", str(tmp_path / "tok"), "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


# --- Validation. -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(source="parquet"), "source"),
        (dict(source="tokens"), "paths"),
        (dict(source="text", paths=[["a.txt"]]), "paths"),
        (dict(seq_len=0), "seq_len"),
        (dict(global_batch=-1), "global_batch"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(seed=2**32), "seed"),
        (dict(read_threads=-1), "read_threads"),
        (dict(shuffle_window=-1), "shuffle_window"),
        (dict(text_key=""), "text_key"),
        (dict(seq_len=True), "seq_len"),
        (dict(num_epochs=True), "num_epochs"),
        (dict(seed=False), "seed"),
        (dict(read_threads=True), "read_threads"),
    ],
)
def test_config_rejects_bad_fields_naming_them(fields, field):
    """One line in the run config's style (a ConfigError naming data.<field>); a boolean is no integer."""
    with pytest.raises(ConfigError, match=rf"^data\.{field}: "):
        DataConfig(**fields)


def test_make_dataset_rejects_inputs_it_cannot_use(corpus, tmp_path):
    with pytest.raises(ValueError, match="global_batch: 6 is not divisible by shard_count 4"):
        make_dataset(DataConfig(global_batch=6), shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match=r"shard_index 2 is outside \[0, shard_count 2\)"):
        make_dataset(DataConfig(), shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="pass shard_index and shard_count together"):
        make_dataset(DataConfig(), shard_index=0)
    with pytest.raises(ValueError, match="data.tokenizer: must name a tokenizer file"):
        make_dataset(text_config(corpus), shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="not a prepared token directory"):
        make_dataset(text_config(tmp_path, source="tokens"), shard_index=0, shard_count=1)


def test_a_token_directory_with_a_larger_vocabulary_than_the_model_is_refused(tmp_path):
    directory = token_dir(tmp_path, ["3 4 5", "6 7"], vocab_size=300)
    config = text_config(directory, source="tokens")
    with pytest.raises(ValueError) as err:
        make_dataset(config, shard_index=0, shard_count=1, model_vocab_size=256)
    assert str(err.value) == (f"{directory}: prepared with a vocabulary of 300 ids, more than the model's "
                              "vocab_size 256; prepare it with the model's tokenizer")
    assert next(make_dataset(config, shard_index=0, shard_count=1, model_vocab_size=300))["tokens"].shape[0] > 0


def test_train_refuses_a_token_directory_prepared_for_a_larger_vocabulary(tmp_path, capsys):
    """It used to train to exit 0 with NaN losses (ids past the model's 256 give NaN logits)."""
    from train.__main__ import main as train_main

    directory = token_dir(tmp_path, [" ".join(str(i) for i in range(250, 300))] * 4, vocab_size=300)
    run_dir = tmp_path / "run"
    code = train_main(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "data.source=tokens",
                       f"data.paths=[{directory}]", "steps=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"train: error: {directory}: prepared with a vocabulary of 300 ids, more than the "
                   "model's vocab_size 256; prepare it with the model's tokenizer\n")
    assert not run_dir.exists()


# --- Documents with no text, and inputs with none. -------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_documents_with_no_text_are_skipped(tmp_path, packing):
    """An empty .txt and JSONL records with empty or blank text used to train as BOS, EOS."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    write_jsonl(tmp_path / "docs.jsonl", ["", "3 4", "  ", "5 6 7"])
    paths = [tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "docs.jsonl"]
    batches = take(dataset(text_config(paths, shuffle=False, packing=packing, global_batch=1)), 2)
    rows = rows_of(batches)
    if packing:
        assert rows[0]["tokens"].tolist() == [BOS, 3, 4, EOS, BOS, 5, 6, 7]
    else:
        assert [row["tokens"][:5].tolist() for row in rows] == [[BOS, 3, 4, EOS, 0], [BOS, 5, 6, 7, EOS]]


@pytest.mark.parametrize("files", [{"empty.txt": ""}, {"blank.jsonl": '{"text": ""}\n{"text": " "}\n\n'}])
@pytest.mark.parametrize("packing", [True, False])
def test_inputs_without_any_text_are_one_line(tmp_path, files, packing):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    paths = [str(tmp_path / name) for name in files]
    with pytest.raises(ValueError) as err:
        next(dataset(text_config(paths, packing=packing)))
    assert str(err.value) == f"{paths[0]}: no document holds any text"


def test_prepare_skips_documents_without_text_and_refuses_inputs_with_none(tmp_path, capsys,
                                                                           sentencepiece_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "docs.jsonl", ["3 4", "", "5"])
    meta = prepare(NumberTokenizer(), [str(tmp_path / "empty.txt"), str(tmp_path / "docs.jsonl")],
                   tmp_path / "tok", progress=False)
    docs = TokenDocuments([tmp_path / "tok"])
    assert meta["num_docs"] == 2 and [docs[0].tolist(), docs[1].tolist()] == [[BOS, 3, 4, EOS], [BOS, 5, EOS]]

    write_jsonl(tmp_path / "blank.jsonl", ["", " \n "])
    for name in ("empty.txt", "blank.jsonl"):
        argv = ["--tokenizer", str(sentencepiece_path), "--input", str(tmp_path / name),
                "--output", str(tmp_path / "out"), "--quiet"]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"prepare: error: {tmp_path / name}: no document holds any text\n"
        assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("inputs, message", [
    ({"empty.txt": ""}, "{}/empty.txt: no document holds any text"),
    ({"broken.jsonl": '{"text": "a b"}\n{"text": oops}\n'},
     "{}/broken.jsonl:2: not valid JSON (Expecting value at column 10)"),
])
def test_train_on_bad_text_is_one_line_and_leaves_no_run_dir(tmp_path, capsys, sentencepiece_path, inputs,
                                                             message):
    """These used to train on BOS/EOS only, or fail after creating an empty run-dir skeleton."""
    from train.__main__ import main as train_main

    for name, content in inputs.items():
        (tmp_path / name).write_text(content)
    run_dir = tmp_path / "run"
    code = train_main(["--config", "tiny_cpu", "--quiet", f"run_dir={run_dir}", "data.source=text",
                       f"data.paths=[{tmp_path / name}]", f"data.tokenizer={sentencepiece_path}",
                       "model_overrides.vocab_size=320", "data.shuffle=false", "steps=2"])
    assert code == 2
    assert capsys.readouterr().err == f"train: error: {message.format(tmp_path)}\n"
    assert not run_dir.exists()
