"""Fine-tuning: held-out evaluation, starting from published weights, LoRA runs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from sharding.layout import load_layout
from sharding.place import Placement
from train.data.config import DataConfig
from train.data.pipeline import make_dataset
from train.eval import Evaluator

PAIRS = [(a, b) for a in range(10, 40) for b in range(10, 40, 3)]


def chat_line(a: int, b: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                    {"role": "assistant", "content": str(a + b)}]}) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    corpus = [f"What is {a}+{b}? {a + b}" for a, b in PAIRS]
    train_bpe(corpus, 300, root / "tokenizer.model")
    (root / "chat.jsonl").write_text("".join(chat_line(a, b) for a, b in PAIRS))
    return root


def _config(tokenizer) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=tokenizer.vocab_size,
                       rope_theta=10000.0, max_seq_len=64)


def test_the_eval_loss_equals_a_separate_forward_pass_over_the_same_batches(workdir):
    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    config = _config(tokenizer)
    data = DataConfig(source="chat", paths=(str(workdir / "chat.jsonl"),), seq_len=48, global_batch=8,
                      holdout=0.2, split="eval", shuffle=False)
    placement = Placement.create(config, load_layout("fsdp"))
    params = init_params(config, jax.random.key(1))
    evaluator = Evaluator(config, data, placement, batches=3, tokenizer=tokenizer, shard=(0, 1))
    figures = evaluator(placement.put(params, placement.param_shardings()))
    assert figures == evaluator(placement.put(params, placement.param_shardings())), "the same batches each time"

    batches = make_dataset(data, tokenizer=tokenizer, shard_index=0, shard_count=1)
    nll = correct = weight = 0.0
    for _ in range(3):
        batch = next(batches)
        logits = np.asarray(Llama(config).apply({"params": params}, batch["tokens"], batch["positions"],
                                                batch["segment_ids"])[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        w = batch["loss_weights"]
        nll += -(picked * w).sum()
        correct += ((logits.argmax(-1) == batch["targets"]) * w).sum()
        weight += w.sum()
    assert figures["eval_tokens"] == weight
    assert abs(figures["eval_loss"] - nll / weight) <= 1e-5 * nll / weight
    assert abs(figures["eval_perplexity"] - np.exp(nll / weight)) <= 1e-4 * np.exp(nll / weight)
    assert abs(figures["eval_accuracy"] - correct / weight) <= 1e-6


def _run(workdir, run_dir, **fields):
    from train.config import run_config_from_dict

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    data = {"source": "chat", "paths": [str(workdir / "chat.jsonl")], "tokenizer": str(workdir / "tokenizer.model"),
            "seq_len": 48, "global_batch": 8, "shuffle": False, "holdout": 0.2}
    base = {"model": _config(tokenizer).to_dict(), "layout": "fsdp", "data": data, "steps": 4, "log_every": 1,
            "checkpoint_every": 2, "run_dir": str(run_dir), "optimizer": {"learning_rate": 3e-3, "warmup_steps": 0}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return run_config_from_dict(base)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_full_finetuning_from_a_hf_directory_starts_at_transformers_loss(workdir, tmp_path):
    import torch

    from tiny import hf_model
    from train.loop import train

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    hf_model(_config(tokenizer), seed=3).save_pretrained(tmp_path / "hf")
    run = _run(workdir, tmp_path / "run", init_from=str(tmp_path / "hf"), steps=1,
               data={"packing": False, "holdout": 0.0})
    train(run, progress=False)
    ours = _rows(tmp_path / "run")[0]["loss"]

    batch = next(make_dataset(run.data, tokenizer=tokenizer, shard_index=0, shard_count=1))
    model = hf_model(_config(tokenizer), seed=3)
    with torch.no_grad():
        logits = model(torch.as_tensor(batch["tokens"], dtype=torch.long)).logits.double()
    nll = -torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(batch["targets"], dtype=torch.long)[..., None])
    weights = torch.as_tensor(batch["loss_weights"], dtype=torch.float64)
    theirs = float((nll[..., 0] * weights).sum() / weights.sum())
    assert abs(ours - theirs) <= 1e-4 * theirs, (ours, theirs)


@pytest.fixture(scope="module")
def base_checkpoint(workdir, tmp_path_factory):
    from llama_jax.formats.checkpoint import save_params

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    path = tmp_path_factory.mktemp("base") / "ckpt"
    params = init_params(_config(tokenizer), jax.random.key(5))
    save_params(path, _config(tokenizer), params)
    return path, params


LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


def test_a_lora_run_trains_only_the_adapters_and_leaves_the_base_bit_identical(workdir, base_checkpoint,
                                                                              tmp_path):
    from llama_jax.formats import checkpoint
    from llama_jax.model.lora import count_adapter_params, is_adapter, split_adapters
    from llama_jax.model.trees import partition
    from llama_jax.formats.weights import base_of, load_params
    from train.loop import train

    path, base = base_checkpoint
    run = _run(workdir, tmp_path / "lora", init_from=str(path), lora=LORA, eval={"every": 2, "batches": 2})
    summary = train(run, progress=False)
    state = summary["state"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), base)
    adapters = jax.device_get(state.params)
    assert partition(adapters, lambda p: not is_adapter(p))[0] == {}
    n_adapter = count_adapter_params(adapters)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.size > 1]
    assert sum(x.size for x in moments) == 2 * n_adapter  # Adam's mu and nu, for the adapters only
    assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(base))

    rows = _rows(tmp_path / "lora")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("eval_loss" in rows[i] for i in (1, 3))
    assert rows[-1]["loss"] < rows[0]["loss"]

    ckpt = tmp_path / "lora" / "checkpoints"
    assert base_of(ckpt) == str(path.absolute())
    _, stored = checkpoint.restore_params(ckpt, config=run.model, only=is_adapter)
    jax.tree.map(np.testing.assert_array_equal, stored, adapters)
    loaded = jax.device_get(load_params(tmp_path / "lora", run.model))
    got_adapters, got_base = split_adapters(loaded)
    jax.tree.map(np.testing.assert_array_equal, got_base, base)
    jax.tree.map(np.testing.assert_array_equal, got_adapters, adapters)

    from llama_jax.convert.lora import export_peft, merge_lora
    plain = merge_lora(tmp_path / "lora", tmp_path / "merged")
    tokens = np.asarray([[1, 5, 9, 12, 40, 41]], np.int32)
    positions = np.arange(6, dtype=np.int32)[None]
    adapted = Llama(run.model).apply({"params": loaded}, tokens, positions)[0]
    merged = Llama(plain).apply({"params": load_params(tmp_path / "merged", plain)}, tokens, positions)[0]
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)
    from infer import generate, load_model  # served as python -m infer serves it: sharded, layers unrolled
    served_config, served, _ = load_model(tmp_path / "lora", layout="fsdp_tp", tokenizer=workdir / "tokenizer.model")
    want = generate(loaded, None, [[1, 5, 9, 12]], max_new_tokens=6, config=run.model)
    got = generate(served, None, [[1, 5, 9, 12]], max_new_tokens=6, config=served_config, layout="fsdp_tp")
    assert got[0].tokens == want[0].tokens
    export_peft(tmp_path / "lora", tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_a_qlora_run_trains_adapters_over_the_base_quantised_to_int8(workdir, base_checkpoint, tmp_path):
    """QLoRA: the float checkpoint is quantised to int8 per output channel as it loads, stays
    frozen, and step 1's loss is the int8 model's; a quantised model without adapters is refused."""
    from llama_jax.config import ConfigError
    from llama_jax.model.quantize import quantize_kernel
    from train.loop import train

    path, base = base_checkpoint
    run = _run(workdir, tmp_path / "q", init_from=str(path), lora=LORA, model={"quantize": "int8"}, steps=2,
               data={"packing": False, "holdout": 0.0})
    state = train(run, progress=False)["state"]
    frozen = jax.device_get(state.frozen)
    values, scale = quantize_kernel(base["layers"]["attention"]["wq"]["kernel"], "int8", n_in=1, stacked=True)
    wq = frozen["layers"]["attention"]["wq"]
    assert wq["kernel"].dtype == np.int8
    np.testing.assert_array_equal(wq["kernel"], values)
    np.testing.assert_array_equal(wq["scale"], scale)

    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    batch = next(make_dataset(run.data, tokenizer=tokenizer, shard_index=0, shard_count=1))
    int8_model = Llama(run.model.replace(lora=None))
    logits = np.asarray(int8_model.apply({"params": frozen}, batch["tokens"], batch["positions"])[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want = float((nll * batch["loss_weights"]).sum() / batch["loss_weights"].sum())
    assert abs(_rows(tmp_path / "q")[0]["loss"] - want) <= 1e-5 * want
    with pytest.raises(ConfigError, match="quantised weights stay frozen; add a lora section"):
        train(_run(workdir, tmp_path / "full", init_from=str(path), model={"quantize": "int8"}), progress=False)
    assert not (tmp_path / "full").exists()


def test_the_eval_command_gives_a_runs_held_out_figures(workdir, base_checkpoint, tmp_path):
    import subprocess
    import sys

    from train.loop import train

    path, _ = base_checkpoint
    train(_run(workdir, tmp_path / "lora", init_from=str(path), lora=LORA, steps=2,
               eval={"every": 2, "batches": 2}), progress=False)
    logged = _rows(tmp_path / "lora")[-1]
    out = subprocess.run([sys.executable, "-m", "train.eval", "--checkpoint", str(tmp_path / "lora"),
                          "--data", str(workdir / "chat.jsonl"), "--source", "chat", "--tokenizer",
                          str(workdir / "tokenizer.model"), "--seq-len", "48", "--batch", "8", "--batches", "2",
                          "--holdout", "0.2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    for key in ("eval_loss", "eval_accuracy", "eval_tokens"):
        assert abs(figures[key] - logged[key]) <= 1e-5 * abs(logged[key]), key
    bad = subprocess.run([sys.executable, "-m", "train.eval", "--checkpoint", str(tmp_path / "nope"),
                          "--data", str(workdir / "chat.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr


def test_a_lora_run_resumes_bit_exactly(workdir, base_checkpoint, tmp_path):
    from train.loop import train

    path, _ = base_checkpoint
    train(_run(workdir, tmp_path / "whole", init_from=str(path), lora=LORA), progress=False)
    train(_run(workdir, tmp_path / "split", init_from=str(path), lora=LORA), progress=False, stop_after=2)
    train(_run(workdir, tmp_path / "split", init_from=str(path), lora=LORA), progress=False)
    assert [r["loss"] for r in _rows(tmp_path / "split")] == [r["loss"] for r in _rows(tmp_path / "whole")]


WORDS = ("apple river stone cloud tiger lemon piano rocket garden silver candle pepper forest window planet "
         "marble violet copper meadow falcon").split()


def test_lora_sft_teaches_a_chat_model_a_new_task_that_holds_on_unseen_questions(tmp_path):
    """A small chat model that reverses three words learns, by LoRA-SFT alone, to repeat them.

    The base is trained first (full training, chat format) to answer "Reverse: a b c" with
    "c b a", so it knows the chat format and its end-of-turn token; the adapters then learn
    "Repeat: a b c" -> "a b c". Held-out questions use word triples never seen in training.
    """
    import random

    from infer import generate
    from llama_jax.text.chat import format_chat
    from llama_jax.formats.weights import load_params
    from train.config import run_config_from_dict
    from train.loop import train

    rng = random.Random(0)
    triples = list(dict.fromkeys(tuple(rng.sample(WORDS, 3)) for _ in range(800)))
    held_out, seen = triples[:60], triples[60:]

    def conversation(verb, words, answer=None):
        question = [{"role": "user", "content": f"{verb}: {' '.join(words)}"}]
        return question if answer is None else question + [{"role": "assistant", "content": " ".join(answer)}]

    for name, verb, order in (("reverse", "Reverse", -1), ("repeat", "Repeat", 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"messages": conversation(verb, w, w[::order])}) + "\n" for w in seen))
    train_bpe([f"Repeat: {' '.join(w)} Reverse: " for w in triples], 420, tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         vocab_size=tokenizer.vocab_size, rope_theta=10000.0, max_seq_len=64)

    def run(name, steps, **fields):
        data = {"source": "chat", "paths": [str(tmp_path / f"{name}.jsonl")], "tokenizer": str(tmp_path / "tokenizer.model"),
                "seq_len": 64, "global_batch": 16}
        return run_config_from_dict({"model": config.to_dict(), "layout": "dp", "mesh": {"data": 1}, "data": data,
                                     "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10, "weight_decay": 0.0},
                                     "steps": steps, "log_every": 100, "checkpoint_every": steps,
                                     "run_dir": str(tmp_path / name), **fields})

    train(run("reverse", 300), progress=False)
    lora = run("repeat", 300, init_from=str(tmp_path / "reverse"),
               lora={"rank": 8, "alpha": 16.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]})
    train(lora, progress=False)

    prompts = [format_chat(tokenizer, conversation("Repeat", w)) for w in held_out]

    def exact(params, model_config):
        outputs = generate(params, tokenizer, prompts, max_new_tokens=8, config=model_config)
        return np.mean([out.text.strip() == " ".join(w) for out, w in zip(outputs, held_out)])

    base_score = exact(load_params(tmp_path / "reverse", config), config)
    tuned_score = exact(load_params(tmp_path / "repeat", lora.model), lora.model)
    assert base_score <= 0.05, f"the base should not repeat yet ({base_score:.0%})"
    assert tuned_score >= 0.9, f"held-out exact answers after LoRA-SFT: {tuned_score:.0%}"


def test_bad_fine_tuning_input_is_one_line_and_writes_nothing(workdir, base_checkpoint, tmp_path):
    import subprocess
    import sys

    import yaml

    path, _ = base_checkpoint
    tokenizer = load_tokenizer(workdir / "tokenizer.model")
    other = _config(tokenizer).replace(dim=96, n_heads=4)
    run = {"model": other.to_dict(), "layout": "fsdp", "init_from": str(path), "steps": 2,
           "data": {"source": "chat", "paths": [str(workdir / "chat.jsonl")],
                    "tokenizer": str(workdir / "tokenizer.model"), "seq_len": 48, "global_batch": 8}}
    config = tmp_path / "run.yaml"

    def train_cli(**changes):
        config.write_text(yaml.safe_dump({**run, **changes}))
        return subprocess.run([sys.executable, "-m", "train", "--config", str(config), "--quiet",
                               f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)

    wrong = train_cli()
    assert wrong.returncode == 2 and "its dim is 64 but the model's is 96" in wrong.stderr, wrong.stderr
    lora = train_cli(model=_config(tokenizer).to_dict(), lora={"rank": 4, "targets": ["wz"]})
    assert lora.returncode == 2 and "lora.targets: 'wz' names no weight" in lora.stderr, lora.stderr
    for result in (wrong, lora):
        assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr
    assert not (tmp_path / "run").exists()

    peft = subprocess.run([sys.executable, "-m", "llama_jax.convert.lora", "peft", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert peft.returncode == 2 and "not a LoRA run's checkpoint (no adapters to export)" in peft.stderr
    assert not (tmp_path / "out").exists()


def test_init_from_a_directory_of_another_model_type_names_the_directory(tmp_path, capsys):
    """A Hugging Face directory of another architecture: one line naming its config.json and the type."""
    import json

    from train.__main__ import main

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    assert main(["--config", "tiny_cpu", "--quiet", f"init_from={bert}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == (f"train: error: {bert / 'config.json'}: model_type 'bert' is not llama "
                                       "(read here: llama, llama4_text, mllama)\n")
    assert not (tmp_path / "run").exists()
