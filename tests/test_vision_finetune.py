"""Llama 3.2 Vision fine-tuning (Meta's adapter training): chat examples with images train the
cross-attention layers and the projector from a Hugging Face Mllama directory, the text model and
the image encoder stay frozen, step 1's loss is transformers', layouts agree with one device."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from llama_jax.config import ConfigError
from llama_jax.formats.hf import load_hf_params
from llama_jax.model.trees import join, partition
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from llama_jax.vision.model import is_image_adapter
from llama_jax.formats.weights import load_params
from test_vision import drawn_image
from tiny import VISION_LIKE, hf_vision_model, save_hf_vision_model
from train.data.config import DataConfig
from train.data.pipeline import make_dataset

STEPS = 3
# The trained leaves, by path: per cross-attention layer (stacked on `layers`) its attention
# (q, k, v, o and the q/k norms), its SwiGLU, its two norms and two gates; the projector's
# kernel and bias; the <|image|> rows.
TRAINED = 13 + 2 + 1


def chat_line(i: int, picture: str | None) -> str:
    question = [{"type": "text", "text": f"What is in picture {i}?"}]
    if picture is not None:
        question.insert(i % 2, {"type": "image", "path": picture})  # before or after the text
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": f"A red ring {i}"}]}) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenizer, pictures beside a chat JSONL (paths relative to it, one example without an
    image), the vision config sized to the tokenizer, and a HF Mllama directory of it."""
    root = tmp_path_factory.mktemp("vision_finetune")
    train_bpe([f"What is in picture {i}? A red ring {i}" for i in range(40)], 300, root / "tokenizer.model")
    tokenizer = load_tokenizer(root / "tokenizer.model")
    (root / "data" / "pictures").mkdir(parents=True)
    sizes = [(50, 23), (21, 44), (28, 28), (60, 30)]
    for k, size in enumerate(sizes):
        drawn_image(*size).save(root / "data" / "pictures" / f"p{k}.png")
    (root / "data" / "chat.jsonl").write_text("".join(
        chat_line(i, None if i == 5 else f"pictures/p{i % len(sizes)}.png") for i in range(16)))
    vocab = tokenizer.vocab_size
    config = VISION_LIKE.replace(vocab_size=vocab,
                                 vision=dataclasses.replace(VISION_LIKE.vision, image_token_id=vocab))
    save_hf_vision_model(config, root / "hf", seed=3)
    return root, config


def _run(root, config, run_dir, **fields):
    from train.config import run_config_from_dict

    data = {"source": "chat", "paths": [str(root / "data" / "chat.jsonl")],
            "tokenizer": str(root / "tokenizer.model"), "seq_len": 40, "global_batch": 8, "shuffle": False,
            "packing": False}
    return run_config_from_dict({
        "model": config.to_dict(), "layout": "fsdp", "init_from": str(root / "hf"), "data": data,
        "steps": STEPS, "log_every": 1, "checkpoint_every": 100, "run_dir": str(run_dir),
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0}, **fields})


def hf_loss(root, config, batch) -> float:
    """transformers' loss on our batch: labels masked like our loss weights, and Meta's rule that
    the cross-attention term is zero for tokens that see no tile (docs/vision.md: HF zeroes only
    the MLP term, issue 39379), applied with a hook on each cross-attention module's output."""
    import torch

    model = hf_vision_model(config, seed=3)
    images = batch["images"]
    positions = np.arange(batch["tokens"].shape[1])[None, :, None, None]
    visible = (images["tile_from"][:, None] <= positions) & (positions < images["tile_until"][:, None])
    sees_image = torch.as_tensor(visible.any(axis=(2, 3))[..., None], dtype=torch.float32)
    for layer in model.model.language_model.layers:
        if hasattr(layer, "cross_attn"):
            layer.cross_attn.register_forward_hook(lambda module, args, out: (out[0] * sees_image, *out[1:]))
    labels = np.full(batch["tokens"].shape, -100)
    labels[:, 1:] = np.where(batch["loss_weights"][:, :-1] > 0, batch["targets"][:, :-1], -100)
    assert not batch["loss_weights"][:, -1].any(), "HF's shifted labels drop the last position's target"
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(batch["tokens"], dtype=torch.long),
                    pixel_values=torch.as_tensor(images["pixels"]),
                    aspect_ratio_ids=torch.as_tensor(images["aspect_ratio_ids"], dtype=torch.long),
                    aspect_ratio_mask=torch.as_tensor(images["aspect_ratio_mask"], dtype=torch.long),
                    cross_attention_mask=torch.as_tensor(visible.astype(np.int64)),
                    labels=torch.as_tensor(labels))
    return float(out.loss)


@pytest.fixture(scope="module")
def trained(workdir, tmp_path_factory):
    """A run of STEPS steps under fsdp on 8 devices, stopped after 2 and resumed for the last
    (its checkpoint holds the adapters; the frozen weights come from init_from again)."""
    from train.loop import train

    root, config = workdir
    run_dir = tmp_path_factory.mktemp("run")
    run = _run(root, config, run_dir)
    train(run, progress=False, stop_after=STEPS - 1)
    summary = train(run, progress=False)
    assert summary["step"] == STEPS
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run, summary["state"], [row["loss"] for row in rows]


def test_adapter_training_from_a_hf_mllama_directory_starts_at_transformers_loss(workdir, trained):
    root, config = workdir
    run, _, losses = trained
    tokenizer = load_tokenizer(root / "tokenizer.model")
    batch = next(make_dataset(run.data, tokenizer=tokenizer, shard_index=0, shard_count=1, vision=config.vision))
    assert batch["images"]["pixels"].shape == (8, 1, 2, 3, 28, 28)
    assert (batch["images"]["aspect_ratio_ids"][:, 0] > 0).sum() == 7, "row 5 has no image"
    theirs = hf_loss(root, config, batch)
    assert abs(losses[0] - theirs) <= 1e-4 * theirs, (losses[0], theirs)
    assert losses[-1] < losses[0]


def test_only_the_image_adapters_train_and_only_they_have_optimizer_state(workdir, trained):
    root, config = workdir
    run, state, _ = trained
    _, start = load_hf_params(root / "hf")
    start_trained, start_frozen = partition(start, is_image_adapter)
    frozen, params = jax.device_get((state.frozen, state.params))
    jax.tree.map(np.testing.assert_array_equal, frozen, start_frozen)  # bit-identical after the steps
    assert set(frozen) == {"embed", "encoder", "layers", "norm", "output"}
    assert set(frozen["layers"]) == {"self_0", "self_1"}
    assert set(params) == {"extra_embedding", "layers", "projector"} and set(params["layers"]) == {"cross"}
    assert len(jax.tree.leaves(params)) == TRAINED
    assert not np.array_equal(params["layers"]["cross"]["attention"]["wq"]["kernel"],
                              start_trained["layers"]["cross"]["attention"]["wq"]["kernel"])
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.size > 1]
    assert len(moments) == 2 * TRAINED  # Adam's mu and nu, for the trained leaves only
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(params))
    # The run directory loads whole: its adapters over the base's text model and image encoder.
    loaded = jax.device_get(load_params(run.run_dir, config))
    jax.tree.map(np.testing.assert_array_equal, loaded, join(frozen, params))


def test_fsdp_on_8_devices_and_resumed_trains_as_one_device_does(workdir, trained):
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.optimizer import learning_rate_schedule, make_optimizer
    from train.step import init_state, jit_train_step, make_train_step

    root, config = workdir
    run, _, losses = trained
    placement = Placement.create(config, load_layout("fsdp"), devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(run.optimizer, run.steps), learning_rate_schedule(run.optimizer, run.steps)
    start = placement.put(load_hf_params(root / "hf")[1], placement.param_shardings())
    state, shardings = init_state(placement, optimizer, jax.random.key(0), start)
    step = jit_train_step(make_train_step(config, optimizer, schedule, shardings.params), placement, shardings)
    data = make_dataset(run.data, tokenizer=load_tokenizer(root / "tokenizer.model"), shard_index=0,
                        shard_count=1, vision=config.vision)
    one_device = []
    with placement.activate():
        for _ in range(STEPS):
            state, metrics = step(state, placement.global_batch(next(data)))
            one_device.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, one_device, rtol=1e-5, atol=0)


def test_bad_vision_training_data_is_one_line(workdir, tmp_path):
    root, config = workdir
    tokenizer = load_tokenizer(root / "tokenizer.model")

    def error(lines, **fields):
        path = root / "data" / f"bad{len(list((root / 'data').glob('bad*')))}.jsonl"
        path.write_text("".join(lines))
        data = DataConfig(**{"source": "chat", "paths": (str(path),), "seq_len": 40, "global_batch": 1,
                             "packing": False, **fields})
        with pytest.raises(ValueError) as err:
            next(make_dataset(data, tokenizer=tokenizer, shard_index=0, shard_count=1, vision=config.vision))
        assert "\n" not in str(err.value)
        return str(err.value)

    good = chat_line(0, "pictures/p0.png")
    assert "set data.packing to false" in error([good], packing=True)
    assert "use data.source chat" in error([good], source="text")
    assert ":1: image pictures/gone.png: file not found" in error([chat_line(0, "pictures/gone.png")])
    (root / "data" / "pictures" / "text.png").write_text("not a picture")
    assert ":1: " in error([chat_line(0, "pictures/text.png")]) and "not an image" in error(
        [chat_line(0, "pictures/text.png")])
    two = json.loads(chat_line(0, "pictures/p0.png"))
    two["messages"][0]["content"].append({"type": "image", "path": "pictures/p1.png"})
    assert "2 images; this model takes at most 1 per example" in error([json.dumps(two) + "\n"])
    answer = json.loads(chat_line(0, None))
    answer["messages"][1]["content"] = [{"type": "image", "path": "pictures/p1.png"}]
    assert "put images in user messages" in error([json.dumps(answer) + "\n"])
    no_path = json.loads(good)
    no_path["messages"][0]["content"][0] = {"type": "image"}
    assert 'an image part needs a "path"' in error([json.dumps(no_path) + "\n"])
    # HF's Mllama tokenizer counts <|image|> (one id past the text vocabulary): it is accepted.
    data = DataConfig(source="chat", paths=(str(root / "data" / "chat.jsonl"),), seq_len=40, global_batch=1,
                      packing=False)
    past = dataclasses.replace(config.vision, image_token_id=tokenizer.vocab_size - 1)
    batch = next(make_dataset(data, tokenizer=tokenizer, shard_index=0, shard_count=1,
                              model_vocab_size=tokenizer.vocab_size - 1, vision=past))
    assert batch["images"]["aspect_ratio_ids"][0, 0] > 0
    with pytest.raises(ValueError, match="exceeds the model's vocab_size"):
        make_dataset(data, tokenizer=tokenizer, shard_index=0, shard_count=1,
                     model_vocab_size=tokenizer.vocab_size - 9, vision=past)
    with pytest.raises(ConfigError, match="init_from: a vision run trains the image adapters over a fixed"):
        _run(root, config, tmp_path, init_from=None)


def test_a_lora_section_on_a_vision_model_trains_only_lora_adapters(workdir):
    from llama_jax.params import abstract_params
    from train.step import trainable

    _, config = workdir
    lora = config.replace(lora={"rank": 4, "alpha": 8.0, "targets": ["wq", "wv"]})
    trained, frozen = partition(abstract_params(lora), trainable(lora))
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trained)}
    assert paths == {f"['layers']['{layer}']['attention']['{w}']['{ab}']" for layer in ("self_0", "self_1", "cross")
                     for w in ("wq", "wv") for ab in ("lora_a", "lora_b")}
    assert {"encoder", "projector", "extra_embedding"} <= set(frozen)
