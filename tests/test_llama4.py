"""Llama 4 (text): the model computes what transformers' Llama4ForCausalLM computes on the same
weights, read through our Hugging Face reader, and decodes past chunk boundaries as it prefills."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import Llama, count_params, init_cache, load_model_config
from llama_jax.decoding import programs
from llama_jax.decoding.sampling import Sampling
from llama_jax.formats.hf import load_hf_params
from tiny import LLAMA4_MAVERICK_LIKE, LLAMA4_SHAPES, hf_llama4_model

TOLERANCE = 1e-4  # max |logit difference| relative to the largest logit, float32
PROMPT = 128      # four chunks of 32 positions, temperature tuning past position 15


@pytest.mark.parametrize("shape", sorted(LLAMA4_SHAPES))
def test_logits_match_transformers_llama4(shape, tmp_path):
    config = LLAMA4_SHAPES[shape]
    model = hf_llama4_model(config)
    model.save_pretrained(tmp_path)

    loaded_config, params = load_hf_params(tmp_path)
    assert loaded_config == config

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, PROMPT))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens))
    scale = np.abs(expected).max()
    assert scale > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(np.asarray(logits) / scale, expected / scale, rtol=0, atol=TOLERANCE)


# The published image encoder of both models (config.json vision_config) and its projector to
# the text width: what the published totals count beside the text model.
VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
              image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
              projector_output_dim=4096, vision_output_dim=4096)


@pytest.mark.parametrize("name, published, figures", [("llama4_scout_17b_16e", 109, 3),
                                                      ("llama4_maverick_17b_128e", 400, 2)])
def test_text_model_plus_image_encoder_is_the_published_total(name, published, figures):
    """Scout is published as 109B and Maverick as 400B (two figures: 401.6B) with their encoder."""
    import transformers
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    config = load_model_config(name)
    with torch.device("meta"):
        encoder = Llama4VisionModel(transformers.Llama4VisionConfig(**VISION))
    vision = sum(p.numel() for p in encoder.parameters()) + VISION["vision_output_dim"] * config.dim
    assert float(f"{(count_params(config) + vision) / 1e9:.{figures}g}") == published


@pytest.fixture(scope="module")
def maverick_params(tmp_path_factory):
    """Maverick-shaped weights with transformers' scale (large logits: argmax is not a near-tie)."""
    directory = tmp_path_factory.mktemp("maverick")
    hf_llama4_model(LLAMA4_MAVERICK_LIKE).save_pretrained(directory)
    return load_hf_params(directory)[1]


@pytest.mark.parametrize("prefill_chunk", [None, 8])
def test_greedy_decode_across_chunk_boundaries_equals_the_full_forward(maverick_params, prefill_chunk):
    """Ragged prompts of 45 and 9 tokens (padded to 48: the first crosses a chunk boundary in the
    prompt, the second's padding is longer than the ring), then 50 greedy steps crossing 64 (and
    the second row 32) while decoding; chunked layers keep a ring of one chunk (32 slots). Every
    decoded token is the full forward pass's argmax over prompt + decoded tokens, and its logits
    are that pass's."""
    config, params = LLAMA4_MAVERICK_LIKE, maverick_params
    model = Llama(config)
    rng = np.random.default_rng(1)
    lengths = np.array([45, 9], np.int32)
    prompts = np.zeros((2, 48), np.int32)
    for row, n in enumerate(lengths):
        prompts[row, :n] = rng.integers(0, config.vocab_size, n)
    steps = 50
    stops = jnp.array([-1], jnp.int32)
    state, first, first_logits = programs.prefill(
        model, params, jnp.asarray(prompts), jnp.asarray(lengths), jnp.full((2,), steps + 1, jnp.int32), 0,
        stops, sampling=Sampling(), cache_len=128, keep_logits=True, chunk=prefill_chunk)
    assert state["cache"]["local_k"].shape[:3] == (6, 2, 32) and state["cache"]["k"].shape[:3] == (2, 2, 128)
    _, tokens, logits = programs.decode(model, params, state, stops, sampling=Sampling(), steps=steps,
                                        keep_logits=True)
    generated = np.concatenate([np.asarray(first)[:, None], np.asarray(tokens)], axis=1)
    decoded_logits = np.concatenate([np.asarray(first_logits)[:, None], np.asarray(logits)], axis=1)
    for row, n in enumerate(lengths):
        sequence = np.concatenate([prompts[row, :n], generated[row]])[None]
        full, _ = model.apply({"params": params}, jnp.asarray(sequence))
        full = np.asarray(full)[0, n - 1:n - 1 + steps + 1]
        assert generated[row].tolist() == full.argmax(-1).tolist(), f"row {row}: greedy tokens differ"
        scale = np.abs(full).max()
        np.testing.assert_allclose(decoded_logits[row] / scale, full / scale, rtol=0, atol=TOLERANCE)


def test_chunked_layers_cache_only_their_chunk_at_scout_size():
    """Scout, 1 row of 131072 positions in bfloat16: 12 global layers keep all of them, 36 chunked
    layers a ring of 8192 slots, plus the ring's int32 positions (by hand below; before, all 48
    layers kept 131072 positions: 25,769,803,776 bytes)."""
    config = load_model_config("llama4_scout_17b_16e").replace(dtype="bfloat16")
    shapes = jax.eval_shape(lambda: init_cache(config, 1, 131072))
    per_position = 2 * 8 * 128 * 2  # k and v, 8 kv heads, head_dim 128, 2 bytes
    expected = 12 * 131072 * per_position + 36 * 8192 * per_position + 8192 * 4
    assert expected == 7_650_443_264
    assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) == expected


def test_hugging_face_directory_round_trips_through_our_checkpoint(tmp_path):
    """HF -> ours (unrolled layers too) -> our checkpoint -> HF: transformers loads the export and
    computes the original's logits; every tensor comes back bit for bit."""
    import transformers
    from safetensors.numpy import load_file

    from llama_jax.convert.ours_to_hf import export_hf
    from llama_jax.formats.checkpoint import save_params

    config = LLAMA4_SHAPES["scout"]
    original = hf_llama4_model(config)
    original.save_pretrained(tmp_path / "hf")
    unrolled = config.replace(scan_layers=False)
    _, params = load_hf_params(tmp_path / "hf", unrolled)
    save_params(tmp_path / "ours", unrolled, params)
    # No tokenizer here, and this vocabulary is no published one's: the export is told the special ids.
    export_hf(tmp_path / "ours", tmp_path / "export", dtype="float32", show_progress=False,
              bos_token_id=1, eos_token_id=2)

    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = {}
    for path in (tmp_path / "export").glob("*.safetensors"):
        after.update(load_file(str(path)))
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        np.testing.assert_array_equal(after[name], tensor, err_msg=name)
    exported = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    tokens = torch.tensor(np.random.default_rng(2).integers(0, config.vocab_size, size=(1, 80)))
    with torch.no_grad():
        np.testing.assert_array_equal(exported(tokens).logits.numpy(), original(tokens).logits.numpy())
