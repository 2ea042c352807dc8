"""The building blocks of the decoder: RMSNorm, projections (quantised, adapted) and SwiGLU.

Letters in names: b batch, t time, d embed (dim), f ffn hidden.
Parameters carry logical axis names only (llama_jax/model/llama.py says more).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import LoraConfig, ModelConfig
from llama_jax.model import mesh_context, weight_grad
from llama_jax.model.quantize import ACTIVATION_CAP, kernel_reduce_axes, quantize, storage_dtype
from llama_jax.model.swiglu import swiglu

_INIT = nn.initializers.normal(stddev=0.02)

def _init(*names):
    return nn.with_logical_partitioning(_INIT, names)


def _constrain(x, *names):
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32, cast back to x's dtype.

    Normalises the last axis, whose logical name is `axis`.
    """

    eps: float
    param_dtype: Any
    axis: str = "embed"

    @nn.compact
    def __call__(self, x_btd):
        scale_d = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                             (x_btd.shape[-1],), self.param_dtype)
        x = x_btd.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        if x.ndim == 3 and self.axis == "embed":  # [batch, time, embed]: the scale's gradient reduce-scattered
            return weight_grad.project("btd,d->btd", x, scale_d.astype(jnp.float32)).astype(x_btd.dtype)
        return (x * scale_d.astype(jnp.float32)).astype(x_btd.dtype)


class Linear(nn.Module):
    """A bias-free projection `einsum(equation, x, kernel)` with named kernel axes,
    optionally quantised (`quant`), and optional low-rank adapters (`lora`).

    The kernel's first `n_in` axes are the ones contracted with x's last
    `n_in` axes. Quantised ("int8" or "fp8", llama_jax/model/quantize.py): the
    kernel holds the int8 / float8_e4m3fn values and `scale` [*out_axes]
    (float32) one scale per output channel, named with the kernel's output
    axes; since a scale is constant along the contraction, the einsum runs
    on the values (cast to the compute dtype) and its output is scaled. fp8
    also quantises x per row (Llama 3's recipe). Adapters: `lora_a`
    [*in_axes, rank] and `lora_b` [rank, *out_axes], float32, named with the
    kernel's logical axes (the rank axis is never split), so every layout
    shards them without new rules. A quantised kernel with adapters is
    QLoRA: the frozen quantised base plus the float adapters' delta.
    (Flax's DenseGeneral reshapes a flat kernel at init, which trips its own
    logical constraints for multi-axis kernels; an explicit shape does not.)
    """

    shape: tuple[int, ...]
    names: tuple[str, ...]
    equation: str
    dtype: Any
    param_dtype: Any
    n_in: int = 1
    lora: LoraConfig | None = None
    quant: str | None = None

    def setup(self):
        if self.quant is None:
            self.kernel = self.param("kernel", _init(*self.names), self.shape, self.param_dtype)
        else:
            # Quantised weights come from llama_jax.model.quantize (at load or conversion); a fresh
            # init is a zero model, there only for shapes and names.
            self.kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, self.names),
                                     self.shape, storage_dtype(self.quant))
            self.scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                          self.names[self.n_in:]),
                                    self.shape[self.n_in:], jnp.float32)
        if self.lora is not None:
            fan_in = math.prod(self.shape[:self.n_in])
            r = self.lora.rank
            self.lora_a = self.param(
                "lora_a", nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                       (*self.names[:self.n_in], None)),
                (*self.shape[:self.n_in], r), jnp.float32)
            self.lora_b = self.param(
                "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.names[self.n_in:])),
                (r, *self.shape[self.n_in:]), jnp.float32)

    def __call__(self, x):
        y = self._base(x)
        if self.lora is None:
            return y
        # x A then B: the frozen kernel needs no gradient and no merged copy.
        xa = jnp.tensordot(x.astype(self.dtype), self.lora_a.astype(self.dtype), axes=self.n_in)
        delta = jnp.tensordot(xa, self.lora_b.astype(self.dtype), axes=1)
        return y + (self.lora.scale * delta).astype(y.dtype)

    def _base(self, x):
        if self.quant is None:
            # "...d,dv->...v" (the head) on [batch, time, d] spells its letters for `project`.
            equation = self.equation.replace("...", "bt") if x.ndim == 3 else self.equation
            return weight_grad.project(equation, x.astype(self.dtype), converted_after(self.kernel, self.dtype, x))
        rows = kernel_reduce_axes(self.n_in)
        x_scale = None
        if self.quant == "fp8":
            x, x_scale = quantize(x, "fp8", tuple(-1 - a for a in rows), cap=ACTIVATION_CAP)
        y = jnp.einsum(self.equation, x.astype(self.dtype), converted_after(self.kernel, self.dtype, x))
        y = y.astype(jnp.float32) * self.scale
        if x_scale is not None:
            y = y * x_scale.reshape(x_scale.shape + (1,) * (y.ndim - x_scale.ndim))
        return y.astype(self.dtype)

    def weights(self, x):
        """The (unquantised) kernel in the compute dtype, for code that does its own maths with it
        on the input `x` (see `converted_after`)."""
        if self.quant is not None:
            raise ValueError("Linear.weights: a quantised kernel is used through the layer's own call")
        return converted_after(self.kernel, self.dtype, x)


def converted_after(kernel, dtype, x):
    """`kernel.astype(dtype)`, computed after `x` exists when XLA:CPU would otherwise hoist it.

    XLA:CPU has no bfloat16 or int8 matmul: it converts such kernels to float32 and, as the
    conversions depend on nothing, schedules them all at the start of the program, so
    serving a bfloat16 model holds a float32 copy of every weight at once (30 GB for 8B).
    A select on a condition computed from `x` (always true: the bits of one of its values with
    the low bit set are never zero, which XLA does not prove) makes each conversion wait for
    its layer's input, so one layer's copy lives at a time.
    Other platforms (and float32 kernels) convert as they are: a TPU fuses the cast into
    the matmul.
    """
    if kernel.dtype != jnp.float32 and mesh_context.platform() == "cpu":
        first = x.reshape(-1)[0]
        bits = jax.lax.bitcast_convert_type(first, jnp.dtype(f"int{first.dtype.itemsize * 8}"))
        kernel = jnp.where((bits | 1) != 0, kernel, jnp.zeros((), kernel.dtype))
    return kernel.astype(dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    With `swiglu_backward: manual` (what `auto` picks on CPU), no adapters on
    w1/w2/w3 and unquantised kernels it runs `llama_jax.model.swiglu`, a
    hand-written backward pass tuned for XLA:CPU (see there); otherwise the
    projections' own calls under plain autodiff, which leaves XLA free to
    fuse on TPU and skips frozen kernels' gradients under LoRA.
    """

    config: ModelConfig
    ffn_dim: int | None = None  # the hidden width, if not config.ffn_dim (Llama 4's shared expert)

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        d, f = cfg.dim, self.ffn_dim or cfg.ffn_dim
        linear = lambda shape, names, eq, name: Linear(  # noqa: E731
            shape, names, eq, cfg.dtype, cfg.param_dtype, lora=cfg.lora_for(name),
            quant=cfg.quantize_for(name), name=name)
        w1 = linear((d, f), ("embed", "mlp"), "btd,df->btf", "w1")
        w3 = linear((d, f), ("embed", "mlp"), "btd,df->btf", "w3")
        w2 = linear((f, d), ("mlp", "embed"), "btf,fd->btd", "w2")
        x_btd = x_btd.astype(cfg.dtype)
        manual = cfg.swiglu_backward == "manual" or (
            cfg.swiglu_backward == "auto" and mesh_context.platform() == "cpu")
        if manual and not any(cfg.lora_for(name) or cfg.quantize_for(name) for name in ("w1", "w2", "w3")):
            return swiglu(x_btd, w1.weights(x_btd), w3.weights(x_btd), w2.weights(x_btd))
        hidden_btf = nn.with_logical_constraint(jax.nn.silu(w1(x_btd)) * w3(x_btd), ("batch", "length", "mlp"))
        return w2(hidden_btf)
