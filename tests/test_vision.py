"""Llama 3.2 Vision: the image encoder and cross-attention layers compute what Hugging Face's
MllamaForConditionalGeneration computes, on the same weights and the same real image, and the
image preprocessing gives HF's MllamaImageProcessor's arrays."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from llama_jax import count_params, load_model_config
from llama_jax.formats.checkpoint import restore_params
from llama_jax.config import ConfigError
from llama_jax.convert.hf_to_ours import convert_hf_to_ours
from llama_jax.convert.ours_to_hf import export_hf
from llama_jax.formats.hf import load_hf_params
from llama_jax.params import model_for
from llama_jax.vision.image import image_inputs, image_tiles, load_image, tile_spans
from tiny import VISION_LIKE, save_hf_vision_model

TOLERANCE = 1e-4  # max |logit difference|, float32
PIXEL_TOLERANCE = 1e-6
IMAGE_ID = VISION_LIKE.vision.image_token_id  # 320, the first id past the text vocabulary


def drawn_image(width, height, mode="RGB"):
    """A real picture: gradients, shapes and text-like strokes, in the given mode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    127 + 127 * np.sin(x / 3.0 + y / 5.0)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, 3 * width // 4, 4 * height // 5), outline=(250, 20, 40), width=2)
    draw.line((0, height - 1, width - 1, 0), fill=(10, 200, 30), width=1)
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.fromarray((255 * (x % 7 > 2)).astype(np.uint8), "L")
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    """(HF model, its directory, our config and params) on the same random weights."""
    directory = tmp_path_factory.mktemp("mllama")
    model = save_hf_vision_model(VISION_LIKE, directory, seed=1)
    config, params = load_hf_params(directory)
    return model, directory, config, params


@pytest.fixture(scope="module")
def hf_processor(hf_vision):
    return transformers.MllamaImageProcessor.from_pretrained(hf_vision[1])


def hf_inputs(processor, image, tokens):
    """HF's arrays for one prompt with one image: the processor's pixels and its cross-attention mask."""
    pixels = processor(images=[[image]], return_tensors="np")
    mask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(tokens, IMAGE_ID)], pixels["num_tiles"],
        VISION_LIKE.vision.max_tiles, len(tokens))
    return {"input_ids": torch.tensor([tokens]), "pixel_values": torch.tensor(pixels["pixel_values"]),
            "aspect_ratio_ids": torch.tensor(pixels["aspect_ratio_ids"]),
            "aspect_ratio_mask": torch.tensor(pixels["aspect_ratio_mask"]),
            "cross_attention_mask": torch.tensor(mask)}


def our_logits(config, params, tokens, image):
    images = {k: jnp.asarray(v) for k, v in image_inputs([[image]], [tokens], config.vision).items()}
    positions = np.arange(len(tokens))[None]
    logits, _ = jax.jit(model_for(config).apply)({"params": params}, np.asarray([tokens]), positions,
                                                 images=images)
    return np.asarray(logits)


@pytest.mark.parametrize("size, mode", [((50, 23), "RGB"), ((19, 61), "RGBA"), ((5, 4), "L"),
                                        ((90, 70), "P"), ((28, 28), "RGB")])
def test_pixel_values_equal_hugging_face_image_processor(hf_processor, size, mode, tmp_path):
    path = tmp_path / "picture.png"
    drawn_image(*size, mode).save(path)
    image = load_image(path)
    expected = hf_processor(images=[[image]], return_tensors="np")
    ours = image_inputs([[image]], [[IMAGE_ID, 1]], VISION_LIKE.vision)
    assert ours["pixels"].shape == expected["pixel_values"].shape
    np.testing.assert_allclose(ours["pixels"], expected["pixel_values"], rtol=0, atol=PIXEL_TOLERANCE)
    np.testing.assert_array_equal(ours["aspect_ratio_ids"], expected["aspect_ratio_ids"])
    np.testing.assert_array_equal(ours["aspect_ratio_mask"], expected["aspect_ratio_mask"])
    assert [len(image_tiles(image, VISION_LIKE.vision)[0])] == expected["num_tiles"][0]


@pytest.mark.parametrize("tokens", [
    [IMAGE_ID, 1, 5, 6, 7],                                  # one image first (HF's prompt form)
    [1, 5, IMAGE_ID, 6, 7, 8],                               # one image after some text (chat)
    [1, IMAGE_ID, 5, 6, IMAGE_ID, 7, 8],                     # two images, each until the next
    [1, IMAGE_ID, IMAGE_ID, 5, 6, IMAGE_ID, 7, IMAGE_ID],    # consecutive images share the next span
])
def test_tile_visibility_equals_the_processors_cross_attention_mask(tokens):
    n = tokens.count(IMAGE_ID)
    tiles = [2, 1, 2, 1][:n]
    expected = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(tokens, IMAGE_ID)], [tiles], 2, len(tokens))[0]
    tile_from, tile_until = tile_spans(tokens, IMAGE_ID, tiles, 2)
    positions = np.arange(len(tokens))[:, None, None]
    ours = (tile_from <= positions) & (positions < tile_until)
    np.testing.assert_array_equal(ours, expected.astype(bool))
    # Generated tokens see what the last prompt token sees (HF repeats the mask's last row).
    later = np.arange(len(tokens), len(tokens) + 3)[:, None, None]
    np.testing.assert_array_equal((tile_from <= later) & (later < tile_until),
                                  np.broadcast_to(expected[-1].astype(bool), (3,) + expected.shape[1:]))


def test_logits_match_hugging_face_with_a_real_image(hf_vision, hf_processor):
    model, _, config, params = hf_vision
    assert config == VISION_LIKE
    image = drawn_image(50, 23)  # two tiles side by side
    tokens = [IMAGE_ID, 1] + np.random.default_rng(0).integers(3, config.vocab_size, 40).tolist()
    with torch.no_grad():
        expected = model(**hf_inputs(hf_processor, image, tokens)).logits.numpy()
        text_only = model(input_ids=torch.tensor([tokens])).logits.numpy()
    ours = our_logits(config, params, tokens, image)
    assert np.abs(expected).max() > 1.0, "logits too small for the comparison to mean anything"
    assert np.abs(expected - text_only).max() > 0.1, "the image does not change HF's logits"
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


def test_tokens_before_the_image_do_not_see_it(hf_vision, hf_processor):
    """Meta's reference zeroes cross-attention for text that sees no image; HF zeroes only the MLP
    term (its issue #39379), so before the image we compare with HF's text-only model instead."""
    model, _, config, params = hf_vision
    tokens = [1, 5, 6, 7, IMAGE_ID] + np.random.default_rng(1).integers(3, config.vocab_size, 8).tolist()
    with torch.no_grad():
        text_only = model(input_ids=torch.tensor([tokens])).logits.numpy()
    ours = our_logits(config, params, tokens, drawn_image(30, 60))
    np.testing.assert_allclose(ours[:, :4], text_only[:, :4], rtol=0, atol=TOLERANCE)
    assert np.abs(ours[:, 4:] - text_only[:, 4:]).max() > 0.1


@pytest.mark.parametrize("name, exact, billions", [("llama3_2_11b_vision", 10_670_220_835, 10.7),
                                                   ("llama3_2_90b_vision", 88_593_355_323, 88.6)])
def test_parameter_counts_equal_the_published_configs_shapes(name, exact, billions):
    # `exact`: transformers' MllamaForConditionalGeneration built from the published config.json.
    count = count_params(load_model_config(name))
    assert count == exact
    assert float(f"{count / 1e9:.3g}") == billions


@pytest.mark.parametrize("vision_changes, message", [
    ({"cross_attention_layers": (1, 3)}, "does not cut the 4 + 2 layers into equal groups"),
    ({"cross_attention_layers": (3, 6)}, "does not cut the 4 + 2 layers into equal groups"),
    ({"image_token_id": 328}, "vision.image_token_id: 328 is past the embedding's 320 + 8 rows"),
    ({"patch_size": 5}, "vision.patch_size: 5 does not divide vision.image_size 28"),
    ({"feature_layers": (3, 1)}, "vision.feature_layers: must be increasing"),
])
def test_bad_vision_config_is_one_line_naming_the_field(vision_changes, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        VISION_LIKE.replace(vision=dataclasses.replace(VISION_LIKE.vision, **vision_changes))


def test_mllama_checkpoint_converts_to_ours_and_back_unchanged(hf_vision, tmp_path):
    """HF -> ours -> HF, streamed tensor by tensor: every tensor comes back equal, the export loads
    in transformers (model and image processor), and ours holds what load_hf_params reads."""
    model, _, config, params = hf_vision
    assert convert_hf_to_ours(hf_vision[1], tmp_path / "ours", dtype="float32", show_progress=False) == config
    _, restored = restore_params(tmp_path / "ours")
    for keys, expected in jax.tree_util.tree_flatten_with_path(params)[0]:
        got = restored
        for key in keys:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=jax.tree_util.keystr(keys))
    text = model.config.text_config  # no tokenizer here: the special ids of the HF model's config
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", show_progress=False,
              bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id)
    again = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    expected_state = model.state_dict()
    assert again.state_dict().keys() == expected_state.keys()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name
    processor = transformers.MllamaImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size["height"] == config.vision.image_size
    assert processor.max_image_tiles == config.vision.max_tiles
