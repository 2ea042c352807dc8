"""Structured pruning: nothing pruned is the same checkpoint; dropped layers, FFN neurons and kv
groups equal the original model with them switched off; the result trains under init_from."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from train_runs import REPO

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.formats.checkpoint import save_params
from llama_jax.model.llama import DecoderLayer
from llama_jax.model.moe import no_router_statistics
from llama_jax.prune import main, prune_checkpoint
from llama_jax.formats.weights import load_params, stored_config

TOKENIZER = REPO / "configs" / "data" / "toy" / "tokenizer.model"
CONFIG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=560,
                     rope_theta=10000.0, max_seq_len=64)
WORDS = "apple river stone cloud tiger lemon piano rocket garden silver candle pepper".split()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random model whose layer 1 barely changes the residual stream (its output
    projections scaled down), and calibration text."""
    root = tmp_path_factory.mktemp("prune")
    params = init_params(CONFIG, jax.random.key(0))
    layers = params["layers"]
    for name, path in (("attention", "wo"), ("feed_forward", "w2")):
        kernel = layers[name][path]["kernel"]
        layers[name][path]["kernel"] = kernel.at[1].multiply(1e-3)
    save_params(root / "model", CONFIG, params)
    rng = np.random.default_rng(0)
    (root / "calibration.jsonl").write_text("".join(
        json.dumps({"text": "Agree: " + " ".join(rng.choice(WORDS, 6))}) + "\n" for _ in range(16)))
    return root


def _prune(source, name, **sizes):
    return prune_checkpoint(source / "model", source / name, [str(source / "calibration.jsonl")], str(TOKENIZER),
                            seq_len=32, batch=8, batches=2, **sizes)


def _logits(config, params, tokens, interceptor=None):
    config = config.replace(scan_layers=False)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    if interceptor is None:
        return np.asarray(Llama(config).apply({"params": params}, tokens, positions)[0])
    with nn.intercept_methods(interceptor):
        return np.asarray(Llama(config).apply({"params": params}, tokens, positions)[0])


TOKENS = np.random.default_rng(1).integers(0, 556, (2, 24)).astype(np.int32)


def test_nothing_pruned_gives_the_same_checkpoint(source):
    record = _prune(source, "same")
    assert record["kept"]["layers"] == [0, 1, 2]
    assert stored_config(source / "same") == stored_config(source / "model")
    a, b = load_params(source / "same", CONFIG), load_params(source / "model", CONFIG)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_dropping_a_layer_equals_running_the_remaining_layers(source):
    record = _prune(source, "shallow", drop_layers=1)
    assert record["kept"]["layers"] == [0, 2], record["scores"]["layers"]  # layer 1 turns the stream least
    pruned = stored_config(source / "shallow")
    assert pruned.n_layers == 2
    original = load_params(source / "model", CONFIG.replace(scan_layers=False))

    def skip_layer_1(next_fun, args, kwargs, context):
        if isinstance(context.module, DecoderLayer) and context.module.name == "layers_1":
            return args[0], no_router_statistics()  # the carry passes through untouched; no router
        return next_fun(*args, **kwargs)

    want = _logits(CONFIG, original, TOKENS, skip_layer_1)
    got = _logits(pruned, load_params(source / "shallow", pruned.replace(scan_layers=False)), TOKENS)
    np.testing.assert_array_equal(got, want)


def test_narrower_ffn_and_fewer_kv_groups_equal_the_original_with_them_zeroed(source):
    record = _prune(source, "narrow", ffn_dim=96, kv_heads=1)
    pruned = stored_config(source / "narrow")
    assert (pruned.ffn_dim, pruned.n_kv_heads, pruned.n_heads, pruned.head_dim) == (96, 1, 2, 16)
    params = jax.tree.map(np.array, load_params(source / "model", CONFIG.replace(scan_layers=False)))
    for i in range(CONFIG.n_layers):
        layer = params[f"layers_{i}"]
        dropped = sorted(set(range(128)) - set(record["kept"]["ffn"][i]))
        layer["feed_forward"]["w2"]["kernel"][dropped] = 0.0  # a neuron without output does nothing
        kept_heads = [2 * g + r for g in record["kept"]["kv_groups"][i] for r in range(2)]
        layer["attention"]["wo"]["kernel"][sorted(set(range(4)) - set(kept_heads))] = 0.0
    want = _logits(CONFIG, params, TOKENS)
    got = _logits(pruned, load_params(source / "narrow", pruned.replace(scan_layers=False)), TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_pruned_checkpoint_trains_under_init_from(source, tmp_path):
    from train.config import run_config_from_dict
    from train.loop import train

    _prune(source, "small", drop_layers=1, ffn_dim=64)
    config = stored_config(source / "small")
    run = run_config_from_dict({
        "model": config.to_dict(), "init_from": str(source / "small"), "layout": "dp", "mesh": {"data": 1}, "steps": 2,
        "data": {"source": "synthetic", "vocab_size": 556, "seq_len": 32, "global_batch": 8},
        "log_every": 1, "checkpoint_every": 2, "run_dir": str(tmp_path / "run")})
    summary = train(run, progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])


def test_pruning_more_layers_than_there_are_is_one_line_and_writes_nothing(source, capsys):
    code = main(["--checkpoint", str(source / "model"), "--output", str(source / "bad"), "--calibration",
                 str(source / "calibration.jsonl"), "--tokenizer", str(TOKENIZER), "--drop-layers", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--drop-layers 3: must be in [0, 3) for 3 layers" in err and len(err.splitlines()) == 1
    assert not (source / "bad").exists() and not (source / ".bad.tmp").exists()


def test_chat_calibration_data_is_read_in_the_chat_format_of_fine_tuning(tmp_path):
    """A chat-schema line ({"messages": [...]}) is calibrated on the ids fine-tuning would train
    on (encode_conversation), beside a text line's BOS text EOS."""
    from llama_jax.prune import calibration_batches
    from llama_jax.text.chat import encode_conversation
    from llama_jax.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    messages = [{"role": "user", "content": "apple river"}, {"role": "assistant", "content": "stone cloud"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n\n" + json.dumps({"text": "tiger lemon"}) + "\n")
    [batch] = calibration_batches(tokenizer, [str(path)], seq_len=64, batch=2, batches=1)
    chat, text = encode_conversation(tokenizer, messages)[0], tokenizer.encode("tiger lemon", bos=True, eos=True)
    assert batch["tokens"][0, :len(chat)].tolist() == chat and batch["mask"][0].sum() == len(chat)
    assert batch["tokens"][1, :len(text)].tolist() == text and batch["mask"][1].sum() == len(text)


@pytest.mark.parametrize("line, problem", [
    ('{"text": "apple", ', "not valid JSON (Expecting property name enclosed in double quotes at column 19)"),
    ('{"prompt": "apple"}', 'expected a JSON object with a "text" string or a "messages" list'),
    ('{"messages": [{"role": "user", "content": "apple"}]}',
     "chat for training: the last message must be the assistant's answer, got 'user'"),
])
def test_a_malformed_calibration_line_names_file_and_line_and_writes_nothing(source, tmp_path, capsys, line,
                                                                             problem):
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text(json.dumps({"text": "apple river"}) + "\n\n" + line + "\n")
    code = main(["--checkpoint", str(source / "model"), "--output", str(tmp_path / "out"), "--calibration",
                 str(calibration), "--tokenizer", str(TOKENIZER)])
    assert code == 2
    assert capsys.readouterr().err == f"llama_jax.prune: error: {calibration}:3: {problem}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.jsonl"]
