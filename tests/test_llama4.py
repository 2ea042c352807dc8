"""Llama 4 (text): the model computes what transformers' Llama4ForCausalLM computes on the same
weights, read through our Hugging Face reader, and decodes past chunk boundaries as it prefills."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import Llama
from llama_jax.formats.hf import load_hf_params
from tiny import LLAMA4_SHAPES, hf_llama4_model

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
