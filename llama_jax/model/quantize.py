"""Quantised tensors: int8 and FP8 (e4m3) values with float32 absmax scales.

A tensor x is stored as (values, scale) with x ~= values * scale, one scale
per slice along the axes that are kept (the others are reduced for the
absmax). Symmetric, no zero point:

- int8: scale = max|x| / 127 and values = round(x / scale) in [-127, 127]
  (round half to even). Each element is off by at most scale / 2.
- fp8 (float8_e4m3fn): scale = max|x| / 448 (e4m3's largest finite value)
  and values = x / scale rounded to the nearest e4m3 number. e4m3 keeps 3
  mantissa bits, so an element whose |x| / scale >= 2^-6 (a normal e4m3
  number) is off by at most 2^-4 |x|; smaller ones (subnormals, spaced 2^-9)
  by at most 2^-10 scale.

Weights: one scale per output channel (the kernel's contracted input axes are
reduced), the "per output channel" / "row-wise" scaling of int8 weight-only
serving and of the Llama 3 FP8 recipe. KV cache: one scale per token and kv
head (head_dim reduced). FP8 activations (the recipe quantises the
feed-forward inputs too): one scale per row, with max|x| capped at 1200, past
which values are clipped (the recipe's guard against the huge activations of
high-perplexity tokens such as dates).

The same jax code serves jitted model code (KV cache, activations) and
weights at load or conversion time, where it runs on one tensor at a time
(XLA fuses the absmax and the rounding, so no float32 copy of the tensor is
made).

Why not Qwix (Google's JAX quantisation library): its post-training mode
intercepts `jnp.einsum` / `lax.dot_general` inside the model and recognises a
weight by finding the parameter object among the operands. Our `Linear`
casts its kernel before the einsum and the FFN passes its kernels through a
custom-VJP SwiGLU, both of which hide that object; LoRA's `x A` product is a
dot of a parameter too, so an intercepted float32 adapter would be quantised
as well. Its quantised leaves are wrapper objects (WithAux / QArray) that our
checkpoint writer, HF reader, memory plan and logical-axis sharding would
each have to learn, while the recipe here (absmax scales, int8 or e4m3,
Meta's 1200 cap) is a few lines. Explicit `kernel` + `scale` parameters keep
the model readable and every layout shards them by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.cli import first_line
from llama_jax.config import ConfigError

# Largest representable magnitude of each stored format.
TOP = {"int8": 127.0, "fp8": 448.0}
ACTIVATION_CAP = 1200.0  # Llama 3's FP8 recipe: upper bound on an activation row's max|x|


def storage_dtype(kind: str):
    """The array dtype of a format's values: int8, or float8_e4m3fn (ConfigError if this JAX lacks it)."""
    if kind == "int8":
        return jnp.int8
    if kind == "fp8":
        dtype = getattr(jnp, "float8_e4m3fn", None)
        if dtype is None:
            raise ConfigError(f"fp8: jax {jax.__version__} has no float8_e4m3fn type; use int8 instead")
        return dtype
    raise ConfigError(f"quantize: unknown format {kind!r} (known: int8, fp8)")


def require_fp8() -> None:
    """ConfigError (one line) unless this JAX has float8_e4m3fn and its default backend converts
    to it. Call on the host, before anything is traced."""
    dtype = storage_dtype("fp8")
    try:
        jax.jit(lambda x: x.astype(dtype).astype(jnp.float32))(jnp.ones((1,), jnp.float32)).block_until_ready()
    except Exception as err:  # noqa: BLE001 - a backend without the type raises its own error kinds
        reason = first_line(err)
        raise ConfigError(f"fp8: the {jax.default_backend()} backend cannot convert to float8_e4m3fn "
                          f"({reason}); use int8 instead") from None


def quantize(x, kind: str, reduce_axes: tuple[int, ...], cap: float | None = None):
    """(values, scale) of `x` in format `kind` ("int8" or "fp8").

    reduce_axes: the axes each scale spans (absmax over them); scale has x's
    shape without them, float32. cap: an upper bound on the absmax (values
    past it are clipped). An all-zero slice gets scale 1.
    """
    reduce_axes = tuple(a % x.ndim for a in reduce_axes)
    top = TOP[kind]
    x32 = jnp.asarray(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=reduce_axes)
    if cap is not None:
        amax = jnp.minimum(amax, cap)
    scale = jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)
    scaled = jnp.clip(x32 / jnp.expand_dims(scale, reduce_axes), -top, top)
    if kind == "int8":
        scaled = jnp.round(scaled)
    return scaled.astype(storage_dtype(kind)), scale


def dequantize(values, scale, reduce_axes: tuple[int, ...], dtype=jnp.float32):
    """values * scale in `dtype`, `scale` broadcast over `reduce_axes` of `values`."""
    reduce_axes = tuple(a % values.ndim for a in reduce_axes)
    return (values.astype(jnp.float32) * jnp.expand_dims(scale, reduce_axes)).astype(dtype)


def kernel_reduce_axes(n_in: int, stacked: bool = False, experts: bool = False) -> tuple[int, ...]:
    """The input (contracted) axes of a kernel [*in, *out] (after a leading layers axis if stacked,
    then an experts axis if `experts`: one scale per expert and output channel): what one
    per-output-channel scale spans."""
    first = int(stacked) + int(experts)
    return tuple(range(first, first + n_in))


def quantize_kernel(kernel, kind: str, n_in: int, stacked: bool = False, experts: bool = False):
    """(values, scale) of one kernel [(layers,) (experts,) *in, *out], per output channel, jitted.

    Runs where `kernel` lives: a placed (sharded) array gives placed results,
    with the values sharded as the kernel; a numpy array runs on the default device.
    """
    storage_dtype(kind)  # fails in one line before anything is traced
    return _quantize_jitted(kernel, kind, kernel_reduce_axes(n_in, stacked, experts))


_quantize_jitted = jax.jit(quantize, static_argnums=(1, 2, 3))
