"""Rejection sampling: the best of N by rescoring, deterministic given the seed, bad reward paths."""

from __future__ import annotations

import json

import jax
import pytest
from train_runs import REPO

from infer.rejection import main
from llama_jax import ModelConfig, init_params
from llama_jax.formats.checkpoint import save_params

TOKENIZER = REPO / "configs" / "data" / "toy" / "tokenizer.model"
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=560,
                     rope_theta=10000.0, max_seq_len=128)
REWARD = "def score(messages, answer):\n    return sum(map(ord, answer)) % 97 + len(messages) / 10\n"


def _score(messages, answer):  # the reward module's function, written out again to rescore
    return sum(map(ord, answer)) % 97 + len(messages) / 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rejection")
    save_params(root / "ckpt", CONFIG, init_params(CONFIG, jax.random.key(0)))
    (root / "toy_rewards.py").write_text(REWARD)
    prompts = [{"prompt": f"Agree: {w}"} for w in ("apple river stone", "tiger lemon piano", "cloud rocket garden")]
    prompts.append({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Disagree: silver candle pepper"}]})
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root, prompts


def _run(root, output, *extra):
    return main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(TOKENIZER), "--prompts",
                 str(root / "prompts.jsonl"), "--reward", "toy_rewards:score", "--samples", "4",
                 "--max-new-tokens", "6", "--batch", "8", "--output", str(output), "--quiet", *extra])


def test_the_written_answer_is_the_best_of_n_by_rescoring_and_the_seed_fixes_the_file(setup, monkeypatch):
    from infer.generate import load_model
    from infer.rejection import read_prompts, rejection_sample

    root, prompts = setup
    monkeypatch.syspath_prepend(str(root))
    assert _run(root, root / "a.jsonl") == 0
    assert _run(root, root / "b.jsonl") == 0
    assert _run(root, root / "c.jsonl", "--seed", "1") == 0
    written = (root / "a.jsonl").read_text()
    assert written == (root / "b.jsonl").read_text(), "the same seed gives the same file"
    assert written != (root / "c.jsonl").read_text(), "another seed draws other answers"

    config, params, tokenizer = load_model(root / "ckpt", tokenizer=TOKENIZER)
    conversations = read_prompts(root / "prompts.jsonl")
    results = rejection_sample(params, config, tokenizer, conversations, lambda m, a: 0.0, 4,
                               max_new_tokens=6, batch=8)
    lines = [json.loads(line) for line in written.splitlines()]
    assert len(lines) == len(prompts)
    distinct = 0
    for line, conversation, result in zip(lines, conversations, results):
        answers = result["answers"]
        distinct += len(set(answers)) > 1
        scores = [_score(conversation, a) for a in answers]
        assert line["messages"][:-1] == conversation
        assert line["messages"][-1] == {"role": "assistant", "content": answers[scores.index(max(scores))]}
        assert line["reward"] == pytest.approx(max(scores))
    assert distinct >= 3, "samples at temperature 1 should differ, so the choice means something"


@pytest.mark.parametrize("reward, message", [
    ("no_such_module:score", "cannot import module 'no_such_module'"),
    ("toy_rewards:missing", "module 'toy_rewards' has no function 'missing'"),
    ("toy_rewards", "expected module:function"),
])
def test_a_reward_that_does_not_import_is_one_line_and_writes_nothing(setup, monkeypatch, capsys, reward, message):
    root, _ = setup
    monkeypatch.syspath_prepend(str(root))
    output = root / "bad.jsonl"
    code = main(["--checkpoint", str(root / "ckpt"), "--prompts", str(root / "prompts.jsonl"),
                 "--reward", reward, "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not output.exists()
