"""The image encoder of Llama 3.2 Vision: image tiles in, one feature vector per patch out.

    features = ImageEncoder(config).apply({"params": p}, pixels, aspect_ratio_ids, aspect_ratio_mask)

An image arrives as up to `max_tiles` square tiles (llama_jax/vision/image.py
cuts them). Each tile is cut into patches, embedded by a strided projection,
and given a class token; tile and position embeddings, each scaled by a
learned tanh gate, say where a patch sits in its tile and how the tiles are
arranged (the aspect-ratio id). Then a local transformer (all tiles of one
image together), a gated global transformer, and the features: the global
transformer's output concatenated with the local transformer's outputs at
`feature_layers` (Meta's and Hugging Face's order: embed-major, layer-minor).

Tokens are padded to a multiple of 8 per tile. A real token (a patch of a
tile the image has) attends to every token; a padding token only to real
ones, as in Meta's and Hugging Face's masks.

Letters in names: b images, c tiles, p tokens per tile, d embed, F feature
layers, r aspect-ratio ids. The encoder's layers always scan, whatever
`scan_layers` says (it runs once per image, not per decoded token).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llama_jax.arith import round_up
from llama_jax.config import ModelConfig
from llama_jax.vision.layers import EncoderStack, LayerNorm, gate

# Meta's and Hugging Face's pre- and post-encoder LayerNorms use torch's default eps.
OUTER_NORM_EPS = 1e-5


def _param(module, name, shape, names, init=nn.initializers.normal(stddev=0.02)):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, module.config.param_dtype)


class TileEmbedding(nn.Module):
    """x + tanh(gate) * embedding[aspect-ratio id], one vector per tile."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_bcpd, aspect_ratio_ids_b):
        vis = self.config.vision
        table_rcd = _param(self, "embedding", (len(vis.aspect_ratios) + 1, vis.max_tiles, vis.dim),
                           (None, None, "embed"))
        tiles_bcd = jnp.take(table_rcd, aspect_ratio_ids_b, axis=0).astype(x_bcpd.dtype)
        return x_bcpd + jnp.tanh(gate(self, "gate")).astype(x_bcpd.dtype) * tiles_bcd[:, :, None, :]


class ImageEncoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, pixels_bc3hw, aspect_ratio_ids_b, aspect_ratio_mask_bc):
        """Features [b, c, p, output_dim] (compute dtype) of images given as tiles.

        pixels_bc3hw: float [b, max_tiles, 3, image_size, image_size], normalised
        (absent tiles are zeros); aspect_ratio_ids_b: int [b], 0 for no image;
        aspect_ratio_mask_bc: int or bool [b, max_tiles], which tiles the image has.
        """
        cfg, vis = self.config, self.config.vision
        b, c, _, size, _ = pixels_bc3hw.shape
        side, d, p = size // vis.patch_size, vis.dim, vis.patches
        dtype = cfg.dtype

        kernel = _param(self, "patch_embedding", (d, 3, vis.patch_size, vis.patch_size),
                        ("embed", None, None, None))
        pixels = pixels_bc3hw.reshape(b * c, 3, side, vis.patch_size, side, vis.patch_size).astype(dtype)
        x_bcpd = jnp.einsum("nzhywx,dzyx->nhwd", pixels, kernel.astype(dtype)).reshape(b, c, side * side, d)
        x_bcpd = TileEmbedding(cfg, name="pre_tile_embedding")(x_bcpd, aspect_ratio_ids_b)

        class_d = _param(self, "class_embedding", (d,), ("embed",)).astype(dtype)
        x_bcpd = jnp.concatenate([jnp.broadcast_to(class_d, (b, c, 1, d)), x_bcpd], axis=2)
        position_gate = jnp.tanh(gate(self, "position_gate")).astype(dtype)
        positions_pd = _param(self, "position_embedding", (p, d), (None, "embed")).astype(dtype)
        tile_positions = _param(self, "tile_position_embedding", (len(vis.aspect_ratios) + 1, vis.max_tiles, p, d),
                                (None, None, None, "embed"))
        x_bcpd = (x_bcpd + (1 - position_gate) * positions_pd
                  + position_gate * jnp.take(tile_positions, aspect_ratio_ids_b, axis=0).astype(dtype))
        x_bcpd = LayerNorm(OUTER_NORM_EPS, cfg.param_dtype, name="norm_pre")(x_bcpd)

        padded = round_up(p, 8)
        x_bcpd = jnp.pad(x_bcpd, ((0, 0), (0, 0), (0, padded - p), (0, 0)))
        real_bcp = (aspect_ratio_mask_bc.astype(bool)[:, :, None]
                    & (jnp.arange(padded) < p)[None, None, :])
        real_bt = real_bcp.reshape(b, c * padded)
        visible_bts = real_bt[:, :, None] | real_bt[:, None, :]

        x_btd = nn.with_logical_constraint(x_bcpd.reshape(b, c * padded, d), ("batch", "length", "embed"))
        x_btd, features_fbtd = EncoderStack(cfg, vis.n_layers, feature_layers=vis.feature_layers,
                                            name="local")(x_btd, visible_bts)
        x_btd = LayerNorm(OUTER_NORM_EPS, cfg.param_dtype, name="norm_post")(x_btd)
        x_bcpd = TileEmbedding(cfg, name="post_tile_embedding")(x_btd.reshape(b, c, padded, d),
                                                                 aspect_ratio_ids_b)
        x_btd, _ = EncoderStack(cfg, vis.n_global_layers, gated=True, name="global")(
            x_bcpd.reshape(b, c * padded, d), visible_bts)

        n_features = len(vis.feature_layers)
        features_bcpdf = jnp.moveaxis(features_fbtd, 0, -1).reshape(b, c, padded, d * n_features)
        out = jnp.concatenate([x_btd.reshape(b, c, padded, d), features_bcpdf], axis=-1)[:, :, :p]
        return nn.with_logical_constraint(out, ("batch", None, "length", None))
