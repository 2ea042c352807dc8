"""Fine-tuning: held-out evaluation, starting from published weights, LoRA runs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tokenizer_training import train_bpe
from sharding.layout import load_layout
from sharding.place import Placement
from train.data import DataConfig, make_dataset
from train.evaluate import Evaluator

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
