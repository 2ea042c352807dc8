"""Reward models: the score head against transformers' LlamaForSequenceClassification, the
Bradley-Terry loss by hand, Hugging Face export and import, infer.score, a tiny reward run
that learns, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import hf_model
from train_runs import REPO, metrics, subprocess_env

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.formats.checkpoint import save_params
from llama_jax.formats.weights import load_params
from llama_jax.model.reward import conversation_rewards
from llama_jax.text.chat import encode_conversation
from llama_jax.text.tokenizer import load_tokenizer
from train.data.config import DataConfig
from train.data.pipeline import make_dataset
from train.objectives.reward import reward

TOY = REPO / "configs" / "data" / "toy"
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=560,
                     rope_theta=10000.0, max_seq_len=256, head="score")
PAD = 304  # the toy tokenizer's <|finetune_right_pad_id|>: no conversation ends with it
PAIRS = [
    {"prompt": "3 + 4 =", "chosen": "7", "rejected": "8", "margin": 1 / 3},
    {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "1 + 1 ="},
                  {"role": "assistant", "content": "2"}, {"role": "user", "content": "9 + 8 ="}],
     "chosen": {"role": "assistant", "content": "17"}, "rejected": "15", "margin": 2 / 3},
    {"prompt": "0 + 5 =", "chosen": "5", "rejected": "6"},  # no margin: 0
]


def _rewards(params, rows):
    """Our reward of each token-id row, right-padded."""
    t = max(map(len, rows))
    tokens = np.full((len(rows), t), PAD, np.int32)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)] = ids
    return np.asarray(conversation_rewards(Llama(CONFIG), params, jnp.asarray(tokens),
                                           jnp.asarray([len(r) for r in rows], jnp.int32)))


def _conversation(pair, answer):
    messages = pair.get("messages") or [{"role": "user", "content": pair["prompt"]}]
    answer = pair[answer] if isinstance(pair[answer], dict) else {"role": "assistant", "content": pair[answer]}
    return [*messages, answer]


@pytest.fixture(scope="module")
def hf_reward(tmp_path_factory):
    """A transformers LlamaForSequenceClassification (one label) saved with save_pretrained, and
    our parameters read from its directory."""
    directory = tmp_path_factory.mktemp("hf_reward")
    model = hf_model(CONFIG, seed=3, pad_token_id=PAD)
    model.save_pretrained(directory)
    return model, directory, load_params(directory, CONFIG)


def test_reward_equals_transformers_sequence_classification_on_right_padded_rows(hf_reward):
    import torch

    model, _, params = hf_reward
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 300, n).tolist() for n in (23, 9, 16, 1)]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
    got = _rewards(params, rows)
    assert np.abs(want).max() > 0.1, "scores should be far from 0, so the comparison means something"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_bradley_terry_loss_with_and_without_margin_equals_numpy(tmp_path):
    """Pairs packed two conversations a row equal each conversation scored alone, and the loss,
    accuracy and gap equal a hand computation; the margin comes from the lines."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    data = DataConfig(source="preference", paths=(str(path),), tokenizer=str(TOY / "tokenizer.model"),
                      seq_len=192, global_batch=3, shuffle=False)
    batch = next(make_dataset(data, shard_index=0, shard_count=1, reward=True))
    params = init_params(CONFIG, jax.random.key(1))
    params["score"]["kernel"] = params["score"]["kernel"] * 50  # rewards of order 1
    tokenizer = load_tokenizer(TOY / "tokenizer.model")
    rows = [encode_conversation(tokenizer, _conversation(p, key))[0] for p in PAIRS for key in ("chosen", "rejected")]
    scores = _rewards(params, rows).astype(np.float64).reshape(len(PAIRS), 2)
    margins = np.array([p.get("margin", 0.0) for p in PAIRS])
    gap = scores[:, 0] - scores[:, 1]
    assert np.abs(gap).min() > 1e-2
    np.testing.assert_allclose(batch["margin"], margins, rtol=1e-7)
    losses = {}
    for margin, subtracted in ((False, np.zeros(3)), (True, margins)):
        want = {"loss": np.sum(np.log1p(np.exp(-(gap - subtracted)))), "accuracy": np.sum(gap > 0),
                "reward_gap": np.sum(gap), "chosen_reward": np.sum(scores[:, 0]),
                "rejected_reward": np.sum(scores[:, 1]), "weight": 3}
        value, sums = reward(CONFIG, margin).sums(params, {}, {}, batch)
        assert float(value) == float(sums["loss"])
        for name, expected in want.items():
            assert float(sums[name]) == pytest.approx(expected, rel=1e-5, abs=1e-5), (margin, name)
        losses[margin] = float(value)
    assert losses[True] > losses[False]  # the margin asks for a larger gap


def test_hf_round_trip_is_bit_exact_and_transformers_reads_the_export(tmp_path, hf_reward):
    """ours -> HF (score.weight, pad_token_id) -> ours gives the same bits; transformers' own
    LlamaForSequenceClassification loads the export and scores as we do."""
    import torch
    import transformers

    from llama_jax.convert.hf_to_ours import convert_hf_to_ours
    from llama_jax.convert.ours_to_hf import export_hf

    params = init_params(CONFIG, jax.random.key(2))
    save_params(tmp_path / "ours", CONFIG, params)
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", tokenizer=TOY, show_progress=False)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["pad_token_id"] == PAD and len(hf_config["id2label"]) == 1
    convert_hf_to_ours(tmp_path / "hf", tmp_path / "back", dtype="float32", show_progress=False)
    back = load_params(tmp_path / "back", CONFIG)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert set(back) == {"embed", "layers", "norm", "score"}

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    rows = [[300, 5, 6, 7, 8, 9], [300, 11, 12]]
    ids = torch.tensor([rows[0], rows[1] + [PAD] * 3])
    with torch.no_grad():  # no attention mask: transformers finds the last token by pad_token_id alone
        want = model(input_ids=ids).logits[:, 0].numpy()
    np.testing.assert_allclose(_rewards(params, rows), want, rtol=0, atol=1e-5)


def test_infer_score_cli_writes_one_reward_a_conversation(tmp_path, hf_reward):
    from infer.score import main

    _, directory, params = hf_reward
    tokenizer = load_tokenizer(TOY / "tokenizer.model")
    conversations = [_conversation(p, key) for p in PAIRS for key in ("chosen", "rejected")]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    code = main(["--checkpoint", str(directory), "--input", str(tmp_path / "chats.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--tokenizer", str(TOY / "tokenizer.model"), "--batch-size", "4"])
    assert code in (0, None)
    got = [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = _rewards(params, [encode_conversation(tokenizer, c)[0] for c in conversations])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_infer_score_on_a_checkpoint_without_a_score_head_is_one_line(tmp_path, capsys):
    from infer.score import main

    lm = CONFIG.replace(head="lm")
    save_params(tmp_path / "lm", lm, init_params(lm, jax.random.key(0)))
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": _conversation(PAIRS[0], "chosen")}) + "\n")
    code = main(["--checkpoint", str(tmp_path / "lm"), "--input", str(tmp_path / "chats.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--tokenizer", str(TOY / "tokenizer.model")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a reward model (score head)" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_reward_run_on_pairs_without_chosen_is_one_line(tmp_path, capsys):
    from train.__main__ import main

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "2 + 2 =", "answer": "4"}) + "\n")
    code = main(["--config", "reward_tiny", "--quiet", f"run_dir={tmp_path / 'run'}", f"data.paths=[{path}]",
                 f"data.tokenizer={TOY / 'tokenizer.model'}", "eval.every=0", "data.holdout=0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path}:2: a preference pair needs a \"chosen\" answer" in err
    assert not (tmp_path / "run").exists()


def test_reward_tiny_through_the_cli_learns_held_out_pairs_and_train_eval_reports_them(tmp_path):
    """From random weights the two answers score alike (loss ~ log(1 + e^m)); after the run the
    held-out pair accuracy is at least 95%, in metrics.jsonl and from python -m train.eval."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "train", "--config", "reward_tiny", "--quiet",
                             f"run_dir={run_dir}", "log_every=1"],
                            cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metrics(run_dir)
    first, last = rows[0], rows[-1]
    assert first["step"] == 1 and abs(first["reward_gap"]) < 0.05 and first["pairs"] == 32
    assert last["step"] == 200 and last["eval_accuracy"] >= 0.95, last
    assert last["eval_reward_gap"] > 1 and last["eval_chosen_reward"] > last["eval_rejected_reward"]
    assert "pair accuracy" in result.stdout

    evaluated = subprocess.run([sys.executable, "-m", "train.eval", "--checkpoint", str(run_dir), "--data",
                                str(TOY / "sums.jsonl"), "--tokenizer", str(TOY / "tokenizer.model"),
                                "--holdout", "0.142", "--seq-len", "64", "--batch", "32", "--batches", "1",
                                "--layout", "dp"],
                               cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    figures = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert figures["eval_pairs"] == 32 and figures["eval_accuracy"] >= 0.95, figures


def test_a_score_model_starts_from_a_next_token_models_weights_with_its_head_at_zero(tmp_path):
    """Llama 2 starts its reward models from the chat model: from our checkpoint or a HF
    LlamaForCausalLM, every weight but lm_head, and the score head at zero."""
    lm = CONFIG.replace(head="lm")
    params = init_params(lm, jax.random.key(4))
    save_params(tmp_path / "lm", lm, params)
    hf_model(lm, seed=5).save_pretrained(tmp_path / "hf_lm")
    for source, want in ((tmp_path / "lm", params), (tmp_path / "hf_lm", load_params(tmp_path / "hf_lm", lm))):
        got = load_params(source, CONFIG)
        assert set(got) == {"embed", "layers", "norm", "score"}
        np.testing.assert_array_equal(np.asarray(got["score"]["kernel"]), np.zeros((CONFIG.dim, 1), np.float32))
        body = {key: value for key, value in want.items() if key != "output"}
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(body),
                                jax.tree.leaves({key: got[key] for key in body})):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_generating_from_a_reward_model_is_one_line(hf_reward, capsys):
    from infer.__main__ import main

    _, directory, _ = hf_reward
    code = main(["--checkpoint", str(directory), "--prompt", "3 + 4 =", "--tokenizer", str(TOY / "tokenizer.model")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a reward model (score head)" in err and "infer.score" in err


def test_reward_under_fsdp_tp_in_two_micro_batches_equals_one_device():
    """The score head is split like the embedding's rows ("embed"); sums and gradients of 8
    pairs on 8 devices in two micro-batches equal one device's."""
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.step import make_gradients

    data = DataConfig(source="preference", paths=(str(TOY / "sums.jsonl"),), tokenizer=str(TOY / "tokenizer.model"),
                      seq_len=64, global_batch=8, shuffle=False)
    batch = next(make_dataset(data, shard_index=0, shard_count=1, reward=True))
    params = init_params(CONFIG, jax.random.key(6))
    params["score"]["kernel"] = params["score"]["kernel"] * 50
    objective = reward(CONFIG, margin=True)
    one = Placement.create(CONFIG, load_layout("dp"), devices=jax.devices()[:1])
    want_grads, want = jax.device_get(jax.jit(make_gradients(CONFIG, one.param_shardings(), objective=objective))(
        params, batch, None, None))
    placement = Placement.create(CONFIG, load_layout("fsdp_tp"))
    shardings = placement.param_shardings()
    assert placement.shards_along("embed") > 1 and len(jax.devices()) == 8
    with placement.activate():
        grads, sums = jax.jit(make_gradients(CONFIG, shardings, grad_accum=2, objective=objective))(
            placement.put(params, shardings), placement.global_batch(batch), None, None)
    assert float(want["weight"]) == 8
    for name in want:
        np.testing.assert_allclose(float(sums[name]), float(want[name]), rtol=1e-5, atol=1e-5, err_msg=name)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"
