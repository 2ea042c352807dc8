"""DPO: preference data, the loss against transformers' log-probs, LoRA's reference, layouts, the CLI,
reference log-probabilities computed once (train/dpo_reference.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import hf_model
from train_runs import REPO, metrics, subprocess_env

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.config import LoraConfig
from llama_jax.model.lora import merge
from llama_jax.model.trees import join, partition
from llama_jax.text.tokenizer import load_tokenizer
from sharding.layout import load_layout
from sharding.place import Placement
from train.data.config import DataConfig
from train.data.pipeline import make_dataset
from train.objectives.dpo import answer_log_probs, dpo
from train.data.sources import Preferences
from train.step import make_gradients

TOY = REPO / "configs" / "data" / "toy"
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=560,
                     rope_theta=10000.0, max_seq_len=256)
PAIRS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Agree: apple river stone"},
                  {"role": "assistant", "content": "apple river stone yes"},
                  {"role": "user", "content": "Disagree: tiger lemon piano"}],
     "chosen": {"role": "assistant", "content": "tiger lemon piano no"}, "rejected": "tiger lemon piano yes"},
    {"prompt": "Agree: cloud rocket garden", "chosen": "cloud rocket garden yes", "rejected": "no"},
]


def _pair_batch(path, pairs, rows=2, seq_len=256):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    data = DataConfig(source="preference", paths=(str(path),), tokenizer=str(TOY / "tokenizer.model"),
                      seq_len=seq_len, global_batch=rows, shuffle=False)
    return next(make_dataset(data, shard_index=0, shard_count=1))


def _answer_log_prob(model, tokenizer, messages, answer) -> float:
    """log p(answer and its end-of-turn | conversation) under a transformers model, from the
    chat prompt's ids alone (no loss weights involved)."""
    import torch

    from llama_jax.text.chat import format_chat

    prompt = format_chat(tokenizer, messages)
    ids = prompt + tokenizer.encode(answer) + [tokenizer.token_id("<|eot_id|>")]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(len(prompt), len(ids))))


def test_dpo_loss_equals_one_computed_from_transformers_log_probs(tmp_path):
    from llama_jax.formats.weights import load_params

    tokenizer = load_tokenizer(TOY / "tokenizer.model")
    models, params = [], []
    for seed, name in ((0, "policy"), (1, "reference")):
        models.append(hf_model(CONFIG, seed=seed))
        models[-1].save_pretrained(tmp_path / name)
        params.append(load_params(tmp_path / name, CONFIG))
    batch = _pair_batch(tmp_path / "pairs.jsonl", PAIRS)
    beta = 0.3
    sums = jax.jit(dpo(CONFIG, beta).sums)(params[0], {}, params[1], batch)[1]

    margins, chosen_rewards, rejected_rewards = [], [], []
    for pair in PAIRS:
        messages = pair.get("messages") or [{"role": "user", "content": pair["prompt"]}]
        answers = [a if isinstance(a, str) else a["content"] for a in (pair["chosen"], pair["rejected"])]
        logp = [[_answer_log_prob(m, tokenizer, messages, a) for a in answers] for m in models]
        chosen_rewards.append(beta * (logp[0][0] - logp[1][0]))
        rejected_rewards.append(beta * (logp[0][1] - logp[1][1]))
        margins.append(chosen_rewards[-1] - rejected_rewards[-1])
    want = {"loss": sum(math.log1p(math.exp(-m)) for m in margins), "margin": sum(margins),
            "chosen_reward": sum(chosen_rewards), "rejected_reward": sum(rejected_rewards),
            "accuracy": sum(m > 0 for m in margins), "weight": 2}
    assert all(abs(m) > 0.05 for m in margins), "the two models should disagree, so the check means something"
    for name, value in want.items():
        assert abs(float(sums[name]) - value) <= 1e-4 * max(1.0, abs(value)), (name, float(sums[name]), value)

    same = jax.jit(dpo(CONFIG, beta).sums)(params[0], {}, params[0], batch)[1]
    assert float(same["loss"]) == pytest.approx(2 * math.log(2), rel=1e-7)
    assert float(same["margin"]) == 0.0 and float(same["accuracy"]) == 0.0


def test_a_lora_runs_reference_is_its_base_without_adapters(tmp_path):
    """No second copy: at B = 0 the loss is log 2; with adapters trained, it equals full DPO of
    the merged model against the base."""
    lora = CONFIG.replace(lora=LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w1")))
    base = init_params(CONFIG, jax.random.key(0))
    adapters, _ = partition(init_params(lora, jax.random.key(1)), lambda path: path[-1].startswith("lora"))
    batch = _pair_batch(tmp_path / "pairs.jsonl", PAIRS)
    objective = jax.jit(dpo(lora, 0.5).sums)
    fresh = objective(adapters, base, {}, batch)[1]
    assert float(fresh["loss"]) == pytest.approx(2 * math.log(2), rel=1e-7)

    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    merged, _ = merge(join(base, trained), lora)
    got = objective(trained, base, {}, batch)[1]
    want = jax.jit(dpo(CONFIG, 0.5).sums)(merged, {}, base, batch)[1]
    assert abs(float(got["margin"])) > 1e-3
    for name in ("loss", "margin", "chosen_reward", "rejected_reward"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_dpo_under_fsdp_tp_equals_one_device(tmp_path):
    """Chunked over the vocabulary, in two micro-batches, on 8 devices; plain on one."""
    lines = [json.loads(line) for line in (TOY / "preferences.jsonl").read_text().splitlines()[:8]]
    batch = _pair_batch(tmp_path / "pairs.jsonl", lines, rows=8, seq_len=96)
    policy, reference = init_params(CONFIG, jax.random.key(0)), init_params(CONFIG, jax.random.key(1))
    objective = dpo(CONFIG, 0.1, chunk=24)
    one_device = Placement.create(CONFIG, load_layout("dp"), devices=jax.devices()[:1])
    want_grads, want = jax.device_get(jax.jit(make_gradients(
        CONFIG, one_device.param_shardings(), objective=dpo(CONFIG, 0.1)))(policy, batch, None, reference))
    # Rewards are beta times differences of log-probabilities: their float32 error is
    # relative to the log-probabilities, not to the (much smaller) difference.
    scale = 0.1 * float(sum(jnp.sum(jnp.abs(x)) for x in answer_log_probs(Llama(CONFIG), policy, batch)))

    placement = Placement.create(CONFIG, load_layout("fsdp_tp"))
    shardings = placement.param_shardings()
    with placement.activate():
        gradients = jax.jit(make_gradients(CONFIG, shardings, grad_accum=2, objective=objective))
        grads, sums = gradients(placement.put(policy, shardings), placement.global_batch(batch), None,
                                placement.put(reference, shardings))
    assert float(want["weight"]) == 8
    for name in want:
        np.testing.assert_allclose(float(sums[name]), float(want[name]), rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"


def test_dpo_tiny_through_the_cli_learns_held_out_preferences(tmp_path):
    """Step 1 starts at policy == reference (loss log 2, margin 0); after 40 steps the held-out
    preference accuracy is at least 95%, logged to metrics.jsonl and TensorBoard."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "train", "--config", "dpo_tiny", "--quiet", f"run_dir={run_dir}",
                             "chip=v4", "steps=40", "log_every=1", "eval.every=40", "checkpoint_every=40"],
                            cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metrics(run_dir)
    first, last = rows[0], rows[-1]
    # (not bit-equal: the policy's pass is compiled for its gradient, the reference's is not)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert abs(first["margin"]) <= 1e-6 and first["pairs"] == 16
    assert last["step"] == 40 and last["eval_accuracy"] >= 0.95, last
    assert last["eval_margin"] > 0 and last["eval_chosen_reward"] > last["eval_rejected_reward"]
    assert "preference accuracy" in result.stdout
    assert list((run_dir / "tensorboard").glob("events.*"))


def test_a_preference_line_without_chosen_is_one_line_naming_it(tmp_path, capsys):
    from train.__main__ import main

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[1]) + "\n" + json.dumps({"prompt": "Agree: a b c", "rejected": "no"}) + "\n")
    code = main(["--config", "dpo_tiny", "--quiet", f"run_dir={tmp_path / 'run'}", f"data.paths=[{path}]",
                 f"data.tokenizer={TOY / 'tokenizer.model'}", "eval.every=0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path}:2: a preference pair needs a \"chosen\" answer" in err
    assert not (tmp_path / "run").exists()


def test_a_resumed_dpo_run_draws_its_reference_again(tmp_path):
    """The reference is not in checkpoints: a resumed run (without init_from) draws the
    policy's random start from the seed again, bit for bit as the first run had it."""
    from train.config import load_run_config
    from train.loop import train
    from train_runs import assert_trees_equal

    run = load_run_config("dpo_tiny", [f"run_dir={tmp_path / 'run'}", "steps=3", "checkpoint_every=1",
                                       "eval.every=0", f"data.paths=[{TOY / 'preferences.jsonl'}]",
                                       f"data.tokenizer={TOY / 'tokenizer.model'}"])
    first = jax.device_get(train(run, progress=False, stop_after=1)["state"].reference)
    resumed = train(run, progress=False)
    assert resumed["step"] == 3 and resumed["metrics"]["pairs"] == 16
    assert_trees_equal(resumed["state"].reference, first, "reference")


def _toy_pairs(path, count):
    """The first `count` toy preference pairs, written to `path`."""
    path.write_text("".join(f"{line}\n" for line in (TOY / "preferences.jsonl").read_text().splitlines()[:count]))
    return path


def test_dpo_on_reference_log_probs_computed_once_equals_the_frozen_copy_and_holds_no_reference(tmp_path):
    """python -m train.dpo_reference writes every pair's reference log-probabilities; the same
    run reading them (data.reference_log_probs) holds no reference model, and logs the frozen
    copy's losses, rewards, margins and accuracies, in training and on held-out pairs."""
    from train.config import load_run_config
    from train.dpo_reference import main as precompute
    from train.loop import train

    pairs = _toy_pairs(tmp_path / "pairs.jsonl", 40)
    settings = [f"data.paths=[{pairs}]", f"data.tokenizer={TOY / 'tokenizer.model'}", "data.global_batch=8",
                "data.holdout=0.2", "steps=3", "log_every=1", "eval.every=3", "eval.batches=1",
                "checkpoint_every=3", "chip=v4"]
    stored = tmp_path / "reference.json"
    assert precompute(["--config", "dpo_tiny", "--quiet", "--out", str(stored), *settings]) == 0
    assert json.loads(stored.read_text())["pairs"] == 40
    runs = {}
    for name, extra in (("frozen", []), ("stored", [f"data.reference_log_probs={stored}"])):
        runs[name] = train(load_run_config("dpo_tiny", [f"run_dir={tmp_path / name}", *settings, *extra]),
                           progress=False)
    assert runs["stored"]["state"].reference == {} and runs["frozen"]["state"].reference != {}
    frozen, precomputed = metrics(tmp_path / "frozen"), metrics(tmp_path / "stored")
    assert [r["step"] for r in precomputed] == [1, 2, 3] and abs(frozen[-1]["eval_margin"]) > 1e-3
    for want, got in zip(frozen, precomputed):
        for name in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "pairs", "eval_loss",
                     "eval_margin", "eval_chosen_reward", "eval_accuracy", "eval_pairs"):
            if name in want:  # rewards: beta times differences of log-probs of about -30 (float32)
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), (want["step"], name)


def test_a_missing_or_mismatching_reference_log_probs_file_is_one_line(tmp_path, capsys):
    from train.__main__ import main
    from train.dpo_reference import main as precompute

    pairs = _toy_pairs(tmp_path / "pairs.jsonl", 3)
    lines = pairs.read_text().splitlines()
    stored = tmp_path / "reference.json"
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.paths=[{pairs}]", f"data.tokenizer={TOY / 'tokenizer.model'}",
                 "eval.every=0", "data.holdout=0", "data.global_batch=2"]
    assert precompute(["--config", "dpo_tiny", "--quiet", "--out", str(stored), *overrides]) == 0
    capsys.readouterr()

    def fails(reference, fragment):
        code = main(["--config", "dpo_tiny", "--quiet", *overrides, f"data.reference_log_probs={reference}"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert fragment in err, err
        assert not (tmp_path / "run").exists()

    fails(tmp_path / "missing.json", f"data.reference_log_probs {tmp_path / 'missing.json'}: no such file; "
                                     "compute it for these pairs with python -m train.dpo_reference")
    edited = json.loads(lines[1]) | {"chosen": "another answer"}
    pairs.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    fails(stored, f"{pairs}:2 is not the pair its log-probabilities were computed for")
    pairs.write_text("\n".join(lines + lines[:1]) + "\n")
    fails(stored, "made for 3 preference pairs, the data holds 4")


def test_a_pair_longer_than_seq_len_loses_the_start_of_its_prompt_and_keeps_its_answers(tmp_path, caplog):
    """Both conversations lose the same oldest prompt ids, no more than make the pair fit;
    the answers stay whole; a pair whose answers alone do not fit is dropped; both counted."""
    from train.data.example_rows import PairRows

    long_prompt = {"messages": [{"role": "system", "content": "Be brief. " * 20},
                                {"role": "user", "content": "Agree: apple river stone"}],
                   "chosen": "apple river stone yes", "rejected": "apple river stone no"}
    long_answers = {"prompt": "Agree: a", "chosen": "river " * 60, "rejected": "stone " * 60}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in (long_prompt, long_answers, PAIRS[1])))
    pairs = Preferences([path], load_tokenizer(TOY / "tokenizer.model"))
    assert sum(c.shape[1] - 1 for c in pairs[0]) > 96
    with caplog.at_level("WARNING"):
        rows = PairRows(pairs, np.arange(3), DataConfig(source="preference", paths=(str(path),), seq_len=96))
    assert rows.pairs == [0, 2]
    assert ("2 of 3 preference pairs do not fit seq_len 96 with both answers: 1 with the start of their prompt "
            "cut, 1 dropped (their answers alone do not fit)") in caplog.text

    row, cuts = rows[0], []
    for segment, (ids, weights) in ((1, pairs[0][0]), (2, pairs[0][1])):
        at = row["segment_ids"] == segment
        kept = int(at.sum()) + 1  # the segment's inputs and its last target
        assert (np.append(row["tokens"][at], row["targets"][at][-1]) == ids[-kept:]).all()
        assert (row["targets"][at][row["loss_weights"][at] > 0] == ids[weights > 0]).all()  # the whole answer
        assert row["positions"][at][0] == 0
        cuts.append(len(ids) - kept)
    assert cuts[0] == cuts[1] > 0  # the same prompt ids, from the start
    assert int((row["segment_ids"] > 0).sum()) in (95, 96)  # no more cut than makes it fit
