"""Building blocks of the image encoder, and attention under an explicit mask.

The encoder is a plain pre-norm ViT: LayerNorm (with bias), multi-head
attention without biases, a GELU MLP with biases. Its global layers scale the
attention and MLP outputs by learned tanh gates.

Letters in names: b batch (images), t query tokens, s key tokens, d embed,
h heads, n kv heads, g query heads per kv head, k head_dim, f MLP hidden.
Parameters carry the text model's logical axis names (embed, heads,
head_dim, mlp), so every layout places the encoder without new rules.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.layers import Linear

# Added to the scores of invisible keys: finite, so a query that sees no key
# gets a uniform (finite) average rather than NaN; its callers zero such rows.
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attend_masked(q_bthk, k_bsnk, v_bsnk, visible_bts):
    """Attention where query i sees key j when `visible_bts[b, i, j]`; [b, t, h, k] in q's dtype.

    Not causal: the mask alone decides. Grouped-query when k and v have fewer
    heads than q. Scores (scaled by 1/sqrt(head_dim)) and softmax are float32.
    """
    b, t, h, k = q_bthk.shape
    n = k_bsnk.shape[2]
    q_btngk = q_bthk.reshape(b, t, n, h // n, k) * (k ** -0.5)
    scores_bntgs = jnp.einsum("btngk,bsnk->bntgs", q_btngk, k_bsnk, preferred_element_type=jnp.float32)
    scores_bntgs = jnp.where(visible_bts[:, None, :, None, :], scores_bntgs, MASKED_SCORE)
    probs_bntgs = jax.nn.softmax(scores_bntgs, axis=-1).astype(v_bsnk.dtype)
    out_btngk = jnp.einsum("bntgs,bsnk->btngk", probs_bntgs, v_bsnk)
    return out_btngk.reshape(b, t, h, k).astype(q_bthk.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last (embed) axis, in float32."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x_btd):
        d = x_btd.shape[-1]
        scale_d = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                             (d,), self.param_dtype)
        bias_d = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                            (d,), self.param_dtype)
        x = x_btd.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * scale_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(x_btd.dtype)


def gate(module: nn.Module, name: str, init_value: float = 0.0):
    """A learned scalar gate parameter (shape [1], as Hugging Face stores it)."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.constant(init_value), (None,)),
                        (1,), module.config.param_dtype)


class EncoderLayer(nn.Module):
    """One ViT layer: x + [tanh(g_a)] Attn(LN(x)), then + [tanh(g_f)] MLP(LN(x)).

    In `nn.scan` form: the carry is (x, features); `slot` is where in
    `features` this layer's output is kept (the last, spare slot for layers
    whose output is not a feature), so the encoder never stacks all outputs.
    """

    config: ModelConfig
    gated: bool = False

    @nn.compact
    def __call__(self, carry, slot, visible_bts):
        x_btd, features = carry
        cfg, vis = self.config, self.config.vision
        d, h, k = vis.dim, vis.n_heads, vis.head_dim
        linear = lambda shape, names, eq, name, n_in=1: Linear(  # noqa: E731
            shape, names, eq, cfg.dtype, cfg.param_dtype, n_in, name=name)
        norm = lambda name: LayerNorm(vis.norm_eps, cfg.param_dtype, name=name)  # noqa: E731

        y_btd = norm("attention_norm")(x_btd)
        q_bthk = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wq")(y_btd)
        k_bshk = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wk")(y_btd)
        v_bshk = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wv")(y_btd)
        out_bthk = attend_masked(q_bthk, k_bshk, v_bshk, visible_bts)
        attn_btd = linear((h, k, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", "wo", 2)(out_bthk)
        if self.gated:
            attn_btd = jnp.tanh(gate(self, "attention_gate")).astype(attn_btd.dtype) * attn_btd
        x_btd = x_btd + attn_btd

        mlp_btd = Mlp(cfg, name="feed_forward")(norm("ffn_norm")(x_btd))
        if self.gated:
            mlp_btd = jnp.tanh(gate(self, "ffn_gate")).astype(mlp_btd.dtype) * mlp_btd
        x_btd = nn.with_logical_constraint(x_btd + mlp_btd, ("batch", "length", "embed"))
        if features is not None:
            features = features.at[slot].set(x_btd.astype(features.dtype))
        return (x_btd, features), None


class Mlp(nn.Module):
    """fc2(gelu(fc1 x + b1)) + b2, with the exact (erf) GELU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg, vis = self.config, self.config.vision
        d, f = vis.dim, vis.ffn_dim
        bias = lambda name, size, axis: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(nn.initializers.zeros, (axis,)), (size,), cfg.param_dtype)
        fc1 = Linear((d, f), ("embed", "mlp"), "btd,df->btf", cfg.dtype, cfg.param_dtype, name="fc1")
        fc2 = Linear((f, d), ("mlp", "embed"), "btf,fd->btd", cfg.dtype, cfg.param_dtype, name="fc2")
        hidden_btf = fc1(x_btd) + bias("fc1_bias", f, "mlp").astype(cfg.dtype)
        hidden_btf = nn.with_logical_constraint(jax.nn.gelu(hidden_btf, approximate=False),
                                                ("batch", "length", "mlp"))
        return fc2(hidden_btf) + bias("fc2_bias", d, "embed").astype(cfg.dtype)


class EncoderStack(nn.Module):
    """`n_layers` encoder layers under one `nn.scan` (parameters stacked on a `layers` axis).

    Returns the last layer's output and, when `feature_layers` is given, the
    outputs of those layers stacked as [len(feature_layers), b, t, d].
    """

    config: ModelConfig
    n_layers: int
    gated: bool = False
    feature_layers: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x_btd, visible_bts):
        n_features = len(self.feature_layers)
        slots = [self.feature_layers.index(i) if i in self.feature_layers else n_features
                 for i in range(self.n_layers)]
        features = jnp.zeros((n_features + 1,) + x_btd.shape, x_btd.dtype) if n_features else None
        stack = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast), length=self.n_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        (x_btd, features), _ = stack(self.config, self.gated, name="layers")(
            (x_btd, features), jnp.asarray(slots, jnp.int32), visible_bts)
        return x_btd, None if features is None else features[:n_features]
