"""Rotary position embeddings, with Llama 3.1/3.2 ("llama3") frequency scaling.

We rotate halves (dim i pairs with i + head_dim/2), as Hugging Face does;
Meta's checkpoints rotate adjacent pairs, so their q/k weights are permuted
on conversion (see llama_jax/convert/meta_to_ours.py).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llama_jax.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
    """The head_dim/2 rotation frequencies (float32), rescaled if `scaling` is set."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freqs = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return freqs
    low_freq_wavelen = scaling.original_context / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    # With low_freq_factor == high_freq_factor (Llama 4 Scout) no frequency is blended.
    band = max(scaling.high_freq_factor - scaling.low_freq_factor, 1e-30)
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / band
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = np.where(wavelen > low_freq_wavelen, freqs / scaling.factor, blended)
    scaled = np.where(wavelen < high_freq_wavelen, freqs, scaled)
    return scaled.astype(np.float32)


def rotary_angles(positions_bt: jnp.ndarray, inv_freq: np.ndarray):
    """cos and sin of shape [batch, time, head_dim] (float32) for integer positions."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_bthk: jnp.ndarray, cos_btk: jnp.ndarray, sin_btk: jnp.ndarray) -> jnp.ndarray:
    """Rotate q or k ([batch, time, heads, head_dim]); computed in float32."""
    x = x_bthk.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_btk[:, :, None, :], sin_btk[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_bthk.dtype)
