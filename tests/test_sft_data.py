"""Fine-tuning data: chat and prompt/completion JSONL into packed rows with answer-only loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_jax.text.chat import encode_conversation
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from train.data.config import DataConfig
from train.data.pipeline import make_dataset

QUESTIONS = [f"What is {a}+{b}?" for a in range(3, 9) for b in range(2, 7)]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "Answer with a number."},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [q + " " + str(eval(q[8:-1])) for q in QUESTIONS] * 5 + ["Answer with a number."]
    return load_tokenizer(train_bpe(corpus, 300, tmp_path_factory.mktemp("tok") / "tokenizer.model"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("".join(json.dumps(_chat(q, str(eval(q[8:-1])))) + "\n" for q in QUESTIONS))
    return path


def _rows(config: DataConfig, tokenizer, batches: int = 1):
    data = make_dataset(config, tokenizer=tokenizer, shard_index=0, shard_count=1)
    return [next(data) for _ in range(batches)]


def test_chat_rows_weigh_exactly_the_answers_of_whole_examples(tokenizer, chat_file):
    config = DataConfig(source="chat", paths=(str(chat_file),), seq_len=96, global_batch=4, shuffle=False)
    [batch] = _rows(config, tokenizer)
    expected = [encode_conversation(tokenizer, _chat(q, str(eval(q[8:-1])))["messages"]) for q in QUESTIONS]
    row, at = 0, 0
    for k in range(batch["segment_ids"].max()):  # the examples packed into row 0, in order
        ids, weights = expected[k]
        n = len(ids) - 1
        np.testing.assert_array_equal(batch["tokens"][row, at:at + n], ids[:-1])
        np.testing.assert_array_equal(batch["targets"][row, at:at + n], ids[1:])
        np.testing.assert_array_equal(batch["loss_weights"][row, at:at + n], weights[1:])
        np.testing.assert_array_equal(batch["positions"][row, at:at + n], np.arange(n))
        assert (batch["segment_ids"][row, at:at + n] == k + 1).all()
        at += n
    assert at <= 96 and at + len(expected[batch["segment_ids"][0].max()][0]) - 1 > 96, "the next example fits"
    assert (batch["loss_weights"][row, at:] == 0).all() and (batch["segment_ids"][row, at:] == 0).all()
    predicted = batch["targets"][0][batch["loss_weights"][0] > 0]
    assert tokenizer.decode(predicted.tolist()).startswith("5<|eot_id|>6<|eot_id|>")  # 3+2, then 3+3


def test_prompt_completion_rows_weigh_the_completion_and_eos(tokenizer, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "What is 3+4? ", "completion": "7"}) + "\n")
    config = DataConfig(source="completion", paths=(str(path),), seq_len=32, global_batch=1, shuffle=False)
    [batch] = _rows(config, tokenizer)
    prompt = tokenizer.encode("What is 3+4? ", bos=True)
    answer = tokenizer.encode("7", eos=True)
    n = len(prompt) + len(answer) - 1
    np.testing.assert_array_equal(batch["targets"][0, :n], (prompt + answer)[1:])
    np.testing.assert_array_equal(batch["loss_weights"][0, :n], [0] * (len(prompt) - 1) + [1] * len(answer))


def test_overlong_examples_are_dropped_or_truncated_and_counted(tokenizer, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    long = _chat("What is 3+4? " * 20, "7")
    path.write_text(json.dumps(_chat("What is 3+4?", "7")) + "\n" + json.dumps(long) + "\n")
    short_len = len(encode_conversation(tokenizer, _chat("What is 3+4?", "7")["messages"])[0]) - 1
    seq_len = short_len + 10
    config = DataConfig(source="chat", paths=(str(path),), seq_len=seq_len, global_batch=1, shuffle=False,
                        packing=False)
    with caplog.at_level("WARNING"):
        rows = _rows(config, tokenizer, 2)
    assert f"data: 1 of 2 examples are longer than seq_len {seq_len}; dropped" in caplog.text
    assert [int(r["segment_ids"][0].astype(bool).sum()) for r in rows] == [short_len, short_len]  # repeats
    caplog.clear()
    long_answer = _chat("What is 3+4?", "7 " * 60)
    path.write_text(json.dumps(long_answer) + "\n")
    truncated = _rows(DataConfig(source="chat", paths=(str(path),), seq_len=seq_len, global_batch=1,
                                 overlong="truncate"), tokenizer)[0]
    assert truncated["segment_ids"][0].all() and truncated["loss_weights"][0, -1] == 1


def test_holdout_splits_examples_deterministically_and_disjointly(tokenizer, chat_file):
    def questions(split):
        config = DataConfig(source="chat", paths=(str(chat_file),), seq_len=64, global_batch=1, packing=False,
                            holdout=0.2, split=split, shuffle=False, num_epochs=1)
        data = make_dataset(config, tokenizer=tokenizer, shard_index=0, shard_count=1)
        return {tokenizer.decode(b["tokens"][0][b["segment_ids"][0] > 0].tolist()) for b in data}

    train, held = questions("train"), questions("eval")
    assert len(held) == round(0.2 * len(QUESTIONS)) and len(train) == len(QUESTIONS) - len(held)
    assert not train & held
    assert held == questions("eval")


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:2: message 0: role 'robot' is not one of"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: message 0: content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: chat for training: the last message"),
    ({"text": "no messages"}, r'bad\.jsonl:2: a chat example needs a "messages" list'),
])
def test_a_bad_chat_line_is_one_line_naming_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_chat("What is 3+4?", "7")) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        _rows(DataConfig(source="chat", paths=(str(path),), seq_len=64, global_batch=1), tokenizer)
    assert "\n" not in str(err.value)
