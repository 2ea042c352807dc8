"""The model computes what Hugging Face's PyTorch Llama computes, on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import Llama
from llama_jax.formats.hf import load_hf_params
from tiny import SHAPES, hf_model

TOLERANCE = 1e-4  # max |logit difference|, float32


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_hugging_face(shape, tmp_path):
    config = SHAPES[shape]
    model = hf_model(config)
    model.save_pretrained(tmp_path)

    loaded_config, params = load_hf_params(tmp_path)
    assert loaded_config == config

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(2, 256))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    positions = np.broadcast_to(np.arange(256), tokens.shape)
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(positions))
    assert np.abs(expected).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=TOLERANCE)
