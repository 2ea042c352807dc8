"""Llama 3.2 Vision: the Llama text model with gated cross-attention layers that read an image.

    model = LlamaVision(config)                     # config.vision is set
    logits, cache = model.apply({"params": params}, tokens, positions, images=images, cache=cache)

The text model is Llama's (llama_jax/model/llama.py: its embedding, decoder
layers, norm and head). Every `group` layers of the stack, one gated
cross-attention layer is inserted (Llama 3.2 11B: after self-attention layers
3, 7, ..., 31 of 32), so the stack is `n_cross` identical groups and one
`nn.scan` runs them: compile time stays flat in depth. A cross-attention
layer is

    h = x + tanh(g_attn) * CrossAttn(RMSNorm(x), image);  out = h + tanh(g_ffn) * SwiGLU(RMSNorm(h))

with RMSNorms on the queries and keys, no rotary embeddings, and both terms
zeroed for text tokens that see no image (Meta's reference; Hugging Face
skips the zeroing of the attention term, see docs/vision.md).

`images` (a dict, see `LlamaVision.__call__`) gives the pixels, when the
image is to be encoded, and which text positions see each tile: tile j is
visible from position p when `tile_from[j] <= p < tile_until[j]` (the
processor's spans: from an image's <|image|> token to the next image's, or
to the end). With a cache, each cross-attention layer's keys and values are
computed once, when the pixels are given (prefill), and stored in the cache
as "image_k"/"image_v" [n_cross, batch, vision tokens, kv_heads, head_dim];
decode steps read them there.

Letters in names: b batch, t time, d embed, j image tiles (images x tiles),
p tokens per tile, v vision tokens (j x p), n kv heads, h heads, k head_dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.kv_cache import Cache
from llama_jax.model.layers import FeedForward, Linear, RMSNorm
from llama_jax.model.llama import DecoderLayer, Llama, attention_inputs, check_concrete_ids, remat_layer
from llama_jax.vision.encoder import ImageEncoder
from llama_jax.vision.layers import attend_masked, gate

Images = dict[str, Any]  # pixels, aspect_ratio_ids, aspect_ratio_mask (optional), tile_from, tile_until


def _normal(*names):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), names)


class CrossAttention(nn.Module):
    """Queries from text, keys and values from the image, with RMSNorm on q and k."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        d, h, n, k = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        linear = lambda shape, names, eq, name, n_in=1: Linear(  # noqa: E731
            shape, names, eq, cfg.dtype, cfg.param_dtype, n_in, cfg.lora_for(name), name=name)
        self.wq = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wq")
        self.wk = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wk")
        self.wv = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wv")
        self.wo = linear((h, k, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", "wo", 2)
        self.q_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype, axis="head_dim")
        self.k_norm = RMSNorm(cfg.norm_eps, cfg.param_dtype, axis="head_dim")

    def keys_values(self, image_bvd) -> Cache:
        """This layer's keys and values of the projected image tokens: {"k", "v"} [b, v, n, k]."""
        k_bvnk = self.k_norm(self.wk(image_bvd))
        v_bvnk = self.wv(image_bvd)
        names = ("batch", "kv_length", "kv_heads", "head_dim")
        return {"k": nn.with_logical_constraint(k_bvnk, names), "v": nn.with_logical_constraint(v_bvnk, names)}

    def __call__(self, x_btd, image_kv: Cache, visible_btj):
        b, t, _ = x_btd.shape
        j = visible_btj.shape[-1]
        q_bthk = nn.with_logical_constraint(self.q_norm(self.wq(x_btd)), ("batch", "length", "heads", "head_dim"))
        k_bvnk, v_bvnk = (image_kv[name].astype(self.config.dtype) for name in ("k", "v"))
        per_tile = k_bvnk.shape[1] // j
        visible_btv = jnp.broadcast_to(visible_btj[..., None], (b, t, j, per_tile)).reshape(b, t, j * per_tile)
        out_bthk = attend_masked(q_bthk, k_bvnk, v_bvnk, visible_btv)
        return self.wo(out_bthk)


class CrossDecoderLayer(nn.Module):
    """A gated cross-attention layer; the identity for text tokens that see no tile."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, visible_btj, image_bvd, image_kv: Cache | None):
        """(output [b, t, d], this layer's image keys and values).

        The keys and values are computed from the projected image tokens
        `image_bvd` when given, else taken from `image_kv` (a decode step).
        """
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.param_dtype, name=name)  # noqa: E731
        attention = CrossAttention(cfg, name="attention")
        if image_bvd is not None:
            image_kv = attention.keys_values(image_bvd)
        sees_image_bt1 = visible_btj.any(axis=-1, keepdims=True).astype(cfg.dtype)
        attn_btd = attention(norm("attention_norm")(x_btd), image_kv, visible_btj)
        h_btd = x_btd + jnp.tanh(gate(self, "attention_gate")).astype(cfg.dtype) * sees_image_bt1 * attn_btd
        ffn_btd = FeedForward(cfg, name="feed_forward")(norm("ffn_norm")(h_btd))
        out_btd = h_btd + jnp.tanh(gate(self, "ffn_gate")).astype(cfg.dtype) * sees_image_bt1 * ffn_btd
        return nn.with_logical_constraint(out_btd, ("batch", "length", "embed")), image_kv


class DecoderGroup(nn.Module):
    """One repeat of the text stack: `n_self` decoder layers with the cross-attention layer among them.

    In `nn.scan` form, like DecoderLayer: carry (hidden, the whole KV cache or
    None), xs the group's index g. Self-attention layer i of the group is
    decoder layer g * n_self + i, which is where it writes and reads the
    cache's "k"/"v". Once an image was seen, the cache holds its keys and
    values per group ("image_k"/"image_v" [groups, b, v, n, k]). Without
    `images` the cross-attention layer is skipped (a text-only prompt), which
    is what it computes when no token sees a tile. ys: the image keys and
    values this group computed (prefill), or None.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, g, rope, coords, segments, images):
        x_btd, cache = carry
        cfg = self.config
        n_self, cross_at = cfg.vision.group(cfg.n_layers)
        fresh_kv = None
        for r in range(n_self + 1):
            if r == cross_at:
                if images is not None:
                    cached = None if cache is None or "image_k" not in cache else \
                        {"k": cache["image_k"][g], "v": cache["image_v"][g]}
                    x_btd, image_kv = remat_layer(CrossDecoderLayer, cfg)(cfg, name="cross")(
                        x_btd, images["visible"], images["tokens"], cached)
                    if images["tokens"] is not None:
                        fresh_kv = jax.tree.map(lambda a: a.astype(cfg.dtype), image_kv)
                continue
            i = r - (r > cross_at)
            (x_btd, cache), _ = remat_layer(DecoderLayer, cfg)(cfg, name=f"self_{i}")(
                (x_btd, cache), g * n_self + i, rope, coords, segments)
        # Image keys and values go out only when computed here (prefill); decode
        # steps read them from the cache without copying them through the scan.
        return (x_btd, cache), fresh_kv


class Projector(nn.Module):
    """The image features' projection into the text model's width: features @ kernel + bias."""

    config: ModelConfig

    @nn.compact
    def __call__(self, features_bcpe):
        cfg = self.config
        kernel_ed = self.param("kernel", _normal(None, "embed"), (cfg.vision.output_dim, cfg.dim), cfg.param_dtype)
        bias_d = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                            (cfg.dim,), cfg.param_dtype)
        out = jnp.einsum("...e,ed->...d", features_bcpe.astype(cfg.dtype), kernel_ed.astype(cfg.dtype))
        return out + bias_d.astype(cfg.dtype)


class LlamaVision(Llama):
    """Llama with images: the text model, the image encoder, the projector, the cross-attention layers.

    Parameters beside the text model's (embed, layers, norm, output):
    `extra_embedding` (the token rows past the vocabulary, <|image|> first),
    `encoder`, `projector`. `layers` holds the groups: self_0, ... (decoder
    layers) and cross, each stacked on the `layers` axis (one entry per group).
    """

    def setup(self):
        cfg = self.config
        vis = cfg.vision
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=_normal("vocab", "embed"))
        self.extra_embedding = self.param("extra_embedding", _normal(None, "embed"),
                                          (vis.extra_token_rows, cfg.dim), cfg.param_dtype)
        groups = len(vis.cross_attention_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                DecoderGroup, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=groups,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [DecoderGroup(cfg, name=f"layers_{g}") for g in range(groups)]
        self.norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        self.output = Linear((cfg.dim, cfg.vocab_size), ("embed", "vocab"), "...d,dv->...v",
                             cfg.dtype, cfg.param_dtype)
        self.encoder = ImageEncoder(cfg)
        self.projector = Projector(cfg)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache: Cache | None = None,
                 return_hidden: bool = False, images: Images | None = None):
        """Logits [batch, time, vocab] (float32), or final hidden states, and the updated cache.

        As `Llama.__call__`, plus `images`, a dict of arrays with a leading batch axis:
          pixels [b, i, tiles, 3, size, size] float, aspect_ratio_ids [b, i] int,
          aspect_ratio_mask [b, i, tiles]: the images (from llama_jax.vision.image);
            leave them out when the cache already holds the image's keys and values;
          tile_from, tile_until [b, i, tiles] int32: position p sees a tile when
            tile_from <= p < tile_until (both 0 for absent tiles and images).
        Token ids past the vocabulary take the `extra_embedding` rows (<|image|>); ids
        outside the table are checked as `Llama.__call__` checks them (eager calls only).
        """
        cfg = self.config
        check_concrete_ids(tokens_bt, cfg.vocab_size + cfg.vision.extra_token_rows)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
        rope, coords, segments = attention_inputs(cfg, positions_bt, segment_ids_bt, cache)
        x_btd = nn.with_logical_constraint(self.embed_tokens(tokens_bt), ("batch", "length", "embed"))
        image_inputs = None
        if images is not None:
            image_inputs = {"visible": tile_visibility(positions_bt, images),
                            "tokens": self.image_tokens(images) if "pixels" in images else None}
            if image_inputs["tokens"] is None and (cache is None or "image_k" not in cache):
                raise ValueError("images without pixels need a cache holding their keys and values "
                                 "(from the prefill that saw the pixels)")
        groups = len(cfg.vision.cross_attention_layers)
        carry = (x_btd, cache)
        if cfg.scan_layers:
            (x_btd, cache), fresh = self.layers(carry, jnp.arange(groups), rope, coords, segments, image_inputs)
        else:
            outs = []
            for g, layer in enumerate(self.layers):
                carry, fresh_kv = layer(carry, g, rope, coords, segments, image_inputs)
                outs.append(fresh_kv)
            (x_btd, cache) = carry
            fresh = None if outs[0] is None else jax.tree.map(lambda *kv: jnp.stack(kv), *outs)
        if cache is not None and fresh is not None:
            cache = {**cache, "image_k": fresh["k"], "image_v": fresh["v"]}
        hidden_btd = self.norm(x_btd)
        if return_hidden:
            return hidden_btd, cache
        return self.logits(hidden_btd), cache

    def embed_tokens(self, tokens_bt):
        """Token embeddings [b, t, d]: the vocabulary's table, and `extra_embedding` for ids past it."""
        cfg = self.config
        extra_bt = tokens_bt >= cfg.vocab_size
        text_btd = self.embed(jnp.where(extra_bt, 0, tokens_bt))
        rows = jnp.clip(tokens_bt - cfg.vocab_size, 0, cfg.vision.extra_token_rows - 1)
        extra_btd = jnp.take(self.extra_embedding, rows, axis=0).astype(text_btd.dtype)
        return jnp.where(extra_bt[..., None], extra_btd, text_btd)

    def image_tokens(self, images: Images):
        """The images encoded and projected: [b, v, d] (compute dtype), v = images x tiles x tokens per tile."""
        pixels = images["pixels"]
        b, i, c = pixels.shape[:3]
        features = self.encoder(pixels.reshape((b * i,) + pixels.shape[2:]),
                                images["aspect_ratio_ids"].reshape(b * i),
                                images["aspect_ratio_mask"].reshape(b * i, c))
        tokens = self.projector(features)
        return nn.with_logical_constraint(tokens.reshape(b, -1, tokens.shape[-1]),
                                          ("batch", "kv_length", "embed"))


def is_image_adapter(path: tuple[str, ...]) -> bool:
    """Whether a parameter (by key path) joins the image to the text: the cross-attention
    layers, the projector and the extra token rows (<|image|>). Meta's adapter training
    trains these over the frozen text model and image encoder (torchtune's "fusion"
    parameters are the same set)."""
    if path[0] in ("projector", "extra_embedding"):
        return True
    return (path[0] == "layers" or path[0].startswith("layers_")) and len(path) > 1 and path[1] == "cross"


def tile_visibility(positions_bt, images: Images):
    """bool [b, t, tiles of all images]: which tiles the token at each position sees."""
    b = positions_bt.shape[0]
    from_bj = images["tile_from"].reshape(b, 1, -1)
    until_bj = images["tile_until"].reshape(b, 1, -1)
    positions_bt1 = positions_bt[:, :, None]
    return (from_bj <= positions_bt1) & (positions_bt1 < until_bj)
