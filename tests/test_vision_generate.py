"""Llama 3.2 Vision inference: greedy decoding with an image equals Hugging Face's generate, the
image is encoded once per request, layouts agree with one device, and `python -m infer --image`
prints what `generate` makes; bad input is one line, exit 2."""

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from infer import generate, load_model
from infer.__main__ import main as infer_main
from infer.engine import engine_for
from llama_jax import load_model_config
from llama_jax.text.chat import format_chat
from llama_jax.formats.hf import load_hf_params
from llama_jax.decoding.sampling import Sampling
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from llama_jax.vision.image import image_inputs, load_image
from sharding.layout import LayoutError, available_layouts, load_layout
from sharding.place import Placement
from test_vision import IMAGE_ID, drawn_image, hf_inputs
from tiny import VISION_LIKE, hf_model, save_hf_vision_model

REPO = Path(__file__).resolve().parent.parent
NEW_TOKENS = 32
_rng = np.random.default_rng(0)
# HF's prompt form, <|image|> first, so that HF's and Meta's masking agree (see test_vision.py).
PROMPTS = [[IMAGE_ID, 1] + _rng.integers(3, VISION_LIKE.vocab_size, n).tolist() for n in (5, 19)]


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mllama")
    model = save_hf_vision_model(VISION_LIKE, directory, seed=2)
    _, params = load_hf_params(directory)
    return model, directory, params


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two real pictures on disk: a wide one (two tiles) and a tall one."""
    directory = tmp_path_factory.mktemp("pictures")
    paths = [directory / "wide.png", directory / "tall.jpg"]
    drawn_image(50, 23).save(paths[0])
    drawn_image(21, 44).save(paths[1], quality=95)
    return paths


@pytest.fixture(scope="module")
def greedy_one_device(hf_vision, images):
    _, _, params = hf_vision
    return generate(params, None, PROMPTS, max_new_tokens=NEW_TOKENS, config=VISION_LIKE,
                    images=[[images[0]], [images[1]]], return_logits=True)


def test_greedy_decoding_with_an_image_matches_hugging_face_generate(hf_vision, images, greedy_one_device):
    model, directory, _ = hf_vision
    processor = transformers.MllamaImageProcessor.from_pretrained(directory)
    for prompt, path, ours in zip(PROMPTS, images, greedy_one_device):
        # One prompt at a time, unpadded, so HF's padding rules play no part.
        inputs = hf_inputs(processor, load_image(path), prompt)
        with torch.no_grad():
            out = model.generate(**inputs, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert len(expected) == NEW_TOKENS and len(set(expected)) > 3
        assert ours.tokens == expected, f"prompt of {len(prompt)} tokens diverges from HF"


def test_decode_steps_read_the_image_from_the_cache_not_the_encoder(hf_vision, images):
    """With the encoder, projector and cross-attention key/value weights replaced by NaN after
    prefill, decoding gives the same tokens: the image was encoded once, at prefill."""
    _, _, params = hf_vision
    engine = engine_for(VISION_LIKE, None)  # generate's engine: the shapes below reuse its programs
    placed = engine.place_params(params)
    arrays = image_inputs([[load_image(images[0])], [load_image(images[1])]], PROMPTS, VISION_LIKE.vision)

    def poisoned(tree, path=()):
        if not isinstance(tree, dict):
            touched = path[0] in ("encoder", "projector") or (
                "cross" in path and any(name in path for name in ("wk", "wv", "k_norm")))
            return jax.numpy.full_like(tree, jax.numpy.nan) if touched else tree
        return {key: poisoned(value, path + (key,)) for key, value in tree.items()}

    runs = []
    for decode_params in (placed, engine.place_params(poisoned(placed))):
        state, first, _ = engine.prefill(placed, PROMPTS, NEW_TOKENS, Sampling(), keep_logits=True, images=arrays)
        assert state["cache"]["image_k"].shape[:3] == (2, 2, 2 * 17)  # cross layers, rows, tiles x tokens
        _, tokens, _ = engine.decode(decode_params, state, NEW_TOKENS - 1, Sampling(), keep_logits=True, rows=2)
        runs.append(np.concatenate([first[:, None], tokens], axis=1).tolist())
    assert runs[0] == runs[1]


def test_fsdp_tp_on_8_devices_equals_one_device(hf_vision, images, greedy_one_device):
    _, _, params = hf_vision
    sharded = generate(params, None, PROMPTS, max_new_tokens=NEW_TOKENS, config=VISION_LIKE,
                       images=[[images[0]], [images[1]]], return_logits=True, layout="fsdp_tp")
    for one, many in zip(greedy_one_device, sharded):
        assert many.tokens == one.tokens
        np.testing.assert_allclose(many.logits, one.logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name, layout", [("llama3_2_11b_vision", layout) for layout in available_layouts()]
                         + [("llama3_2_90b_vision", "fsdp_tp")])
def test_every_layout_places_the_published_vision_models_by_logical_names(name, layout):
    """The encoder, projector and cross-attention layers take the text model's names, so every
    layout's rules split them like the text weights (here on the 8 test devices)."""
    config = load_model_config(name)
    plan = Placement.create(config, load_layout(layout))
    shardings = {tuple(k.key for k in keys): sharding for keys, sharding in
                 jax.tree_util.tree_flatten_with_path(plan.param_shardings())[0]}
    specs = {path: sharding.spec for path, sharding in shardings.items()}
    assert specs[("encoder", "local", "layers", "wq", "kernel")] == plan.spec(
        "layers", "embed", "heads", "head_dim")
    assert specs[("encoder", "global", "layers", "feed_forward", "fc1", "kernel")] == plan.spec(
        "layers", "embed", "mlp")
    assert specs[("layers", "cross", "attention", "wk", "kernel")] == specs[
        ("layers", "self_0", "attention", "wk", "kernel")] == plan.spec("layers", "embed", "kv_heads", "head_dim")
    assert specs[("projector", "kernel")] == plan.spec(None, "embed")
    if layout == "tp":  # the encoder's 16 heads really are split 8 ways
        shape = (32, 1280, 16, 80)
        assert shardings[("encoder", "local", "layers", "wq", "kernel")].shard_shape(shape) == (32, 1280, 2, 80)


def test_vision_width_that_the_tensor_axis_does_not_divide_is_one_line():
    config = VISION_LIKE.replace(vision=dataclasses.replace(VISION_LIKE.vision, n_heads=4))
    with pytest.raises(LayoutError, match=r"layout tp: heads \(vision.n_heads\) of size 4 does not divide by "
                                          r"tensor = 8"):
        Placement.create(config, load_layout("tp"))


# ---------------------------------------------------------------- python -m infer --image

CORPUS = ["A llama stands in a green field under a wide blue sky.",
          "The picture shows two red circles and a line across the grass."] * 20


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """A Hugging Face Mllama directory with a Llama 3 (tiktoken) tokenizer trained here."""
    directory = tmp_path_factory.mktemp("vision_hf")
    train_bpe(CORPUS, 256, directory / "tokenizer.model")
    vocab = load_tokenizer(directory).vocab_size  # 256 bytes + 256 specials
    config = VISION_LIKE.replace(vocab_size=vocab, max_seq_len=128, vision=dataclasses.replace(
        VISION_LIKE.vision, image_token_id=vocab))
    save_hf_vision_model(config, directory, seed=3)
    return directory


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "infer", *map(str, args)], cwd=REPO, env=dict(os.environ),
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_cli_prints_what_generate_makes_for_an_image_and_a_prompt(vision_checkpoint, images):
    result = run_cli("--checkpoint", vision_checkpoint, "--image", images[0], "--prompt", "A llama",
                     "--max-new-tokens", 12)
    assert result.returncode == 0, result.stderr
    config, params, tokenizer = load_model(vision_checkpoint)
    expected = generate(params, tokenizer, "A llama", max_new_tokens=12, config=config, images=[[images[0]]])[0]
    image_token = config.vision.image_token_id
    assert expected.prompt_tokens[:2] == [tokenizer.bos_id, image_token]
    assert result.stdout == expected.text + "\n"



def test_cli_chat_puts_the_image_in_the_first_user_turn(vision_checkpoint, images, capsys, monkeypatch):
    """In Meta's vision prompt format; run in this process (the CLI's code, the engine already compiled)."""
    config, params, tokenizer = load_model(vision_checkpoint)
    image_token = config.vision.image_token_id
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(vision_checkpoint), "--image", str(images[0]), "--chat", "--prompt",
                       "What is it?", "--max-new-tokens", "12"]) == 0
    ids = format_chat(tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                     "text": "What is it?"}]}],
                      image_token)
    header = tokenizer.encode("user") + [tokenizer.token_id("<|end_header_id|>")] + tokenizer.encode("\n\n")
    assert ids[:len(header) + 3] == [tokenizer.bos_id, tokenizer.token_id("<|start_header_id|>"), *header,
                                     image_token]
    answer = generate(params, tokenizer, ids, max_new_tokens=12, config=config, images=[[images[0]]])[0]
    assert capsys.readouterr().out == answer.text + "\n"


def one_line_error(argv, capsys):
    capsys.readouterr()
    assert infer_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_file_that_is_not_an_image_is_one_line(vision_checkpoint, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    assert "notes.png: not an image Pillow can read" in one_line_error(
        ["--checkpoint", vision_checkpoint, "--image", fake, "--prompt", "hi"], capsys)


def test_more_images_than_the_model_takes_is_one_line(vision_checkpoint, images, capsys):
    assert "2 images given; this model takes at most 1 per prompt (vision.max_images)" in one_line_error(
        ["--checkpoint", vision_checkpoint, "--image", images[0], "--image", images[1], "--prompt", "hi"], capsys)


def test_an_image_for_a_text_only_model_is_one_line(tmp_path, images, capsys):
    hf_model(VISION_LIKE.replace(vision=None), seed=0).save_pretrained(tmp_path / "text")
    assert "this checkpoint is a text-only model" in one_line_error(
        ["--checkpoint", tmp_path / "text", "--image", images[0], "--prompt", "hi"], capsys)
    with pytest.raises(ValueError, match="images were given, but this model is text-only"):
        generate({}, None, [[1, 2]], config=VISION_LIKE.replace(vision=None), images=[[images[0]]])
