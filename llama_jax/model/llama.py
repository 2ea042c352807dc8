"""The Llama decoder as functional Flax Linen modules.

    h = x + Attention(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))

Usage:
    model = Llama(config)
    logits, cache = model.apply({"params": params}, tokens, positions,
                                segment_ids=None, cache=None)

Llama 4 (docs/llama4.md) varies the layers by config: a layer's kind
(`ModelConfig.layer_kind`) makes its feed-forward a mixture of experts
(llama_jax/model/moe.py), drops its rotary embeddings (NoPE, with the query
temperature), or limits its attention to chunks of positions. Chunks are
segments: a chunked layer's segment id is (document, position // chunk),
so the one visibility rule of `attend` (same segment, `k_coord <= q_coord`)
covers them, in training, prefill and over the KV cache alike. The kinds
repeat every `layer_period` layers (Scout and Maverick: 4), so the stack is
scanned over blocks of one period (`DecoderBlock`, parameters
`layers/layer_0 ... layer_{p-1}`, each stacked over the blocks) instead of
over single layers: compile time stays flat in depth either way.

Letters in names: b batch, t time, d embed (dim), h heads, n kv heads,
k head_dim, f ffn hidden, v vocab, s cache length.
Parameters and activations carry logical axis names only; `sharding/` maps
them to a mesh. Without sharding rules in scope the names are inert.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax.config import REMAT_POLICIES, LayerKind, ModelConfig
from llama_jax.model import kv_cache, pipeline
from llama_jax.model.attention import attend
from llama_jax.model.context_parallel import balance, balanced_order, length_shards
from llama_jax.model.kv_cache import Cache
from llama_jax.model.layers import FeedForward, Linear, RMSNorm, _constrain, _init
from llama_jax.model.moe import MoE, no_router_statistics
from llama_jax.model.rope import apply_rotary, inverse_frequencies, rotary_angles


class Attention(nn.Module):
    """Self-attention of one layer of kind `kind` (rotary or NoPE; chunking is in its segments)."""

    config: ModelConfig
    kind: LayerKind = LayerKind()

    @nn.compact
    def __call__(self, x_btd, rope, coords, segments, cache, layer, positions_bt=None, ring_slots=None):
        """ring_slots [b, t]: where a chunked layer writes into the cache's ring (None: the
        layer writes at its positions in the full-length part)."""
        cfg = self.config
        d, h, n, k = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        linear = lambda shape, names, eq, name, n_in=1: Linear(  # noqa: E731
            shape, names, eq, cfg.dtype, cfg.param_dtype, n_in, cfg.lora_for(name), cfg.quantize_for(name),
            name=name)
        index = kv_cache.layer_index(cfg, layer, ring_slots is not None) if cache is not None else layer
        q_bthk = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wq")(x_btd)
        k_btnk = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wk")(x_btd)
        v_btnk = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wv")(x_btd)
        if self.kind.rope:
            q_bthk, k_btnk = apply_rotary(q_bthk, *rope), apply_rotary(k_btnk, *rope)
            if cfg.qk_norm:  # Llama 4: on rotary layers only, after the rotation
                q_bthk, k_btnk = l2_norm(q_bthk, cfg.norm_eps), l2_norm(k_btnk, cfg.norm_eps)
        elif cfg.attn_temperature_tuning is not None:
            q_bthk = temperature_scaled(q_bthk, positions_bt, cfg.attn_temperature_tuning)
        q_bthk = _constrain(q_bthk, "batch", "length", "heads", "head_dim")
        k_btnk = _constrain(k_btnk, "batch", "length", "kv_heads", "head_dim")
        v_btnk = _constrain(v_btnk, "batch", "length", "kv_heads", "head_dim")

        if coords is None:
            # The sequence attends to itself: static coordinates, its rows in
            # the order the model put them in (load-balanced when the layout
            # splits the length, see context_parallel).
            shards = length_shards()
            order = balanced_order(q_bthk.shape[1], shards)
            if ring_slots is not None:  # a prompt from position 0: its last chunk fills the ring
                cache = kv_cache.write(cache, index, ring_slots, k_btnk, v_btnk, kv_cache.LOCAL)
            elif cache is not None:  # a prompt from position 0: its keys fill this layer's slots 0..t-1
                b, t = k_btnk.shape[:2]
                cache = kv_cache.write(cache, index, jnp.broadcast_to(jnp.arange(t), (b, t)),
                                       balance(k_btnk, shards), balance(v_btnk, shards))
            coords = (order, order)
        elif ring_slots is not None:
            # The ring as it was before this step, then this step's own keys (coords[1]
            # is laid out the same way); only then is the step written into the ring.
            old_k, old_v = kv_cache.read(cache, index, cfg.dtype, kv_cache.LOCAL)
            cache = kv_cache.write(cache, index, ring_slots, k_btnk, v_btnk, kv_cache.LOCAL)
            k_btnk = jnp.concatenate([old_k, k_btnk.astype(cfg.dtype)], axis=1)
            v_btnk = jnp.concatenate([old_v, v_btnk.astype(cfg.dtype)], axis=1)
        elif cache is not None:
            # Write this step's keys and values at their positions in this layer's
            # part of the cache, then attend to the layer's whole cache; slots past
            # a query's position stay invisible.
            cache = kv_cache.write(cache, index, coords[0], k_btnk, v_btnk)
            k_btnk, v_btnk = kv_cache.read(cache, index, cfg.dtype)
        out_bthk = attend(q_bthk, k_btnk, v_btnk, *coords, *segments,
                          impl=cfg.attention, block=cfg.attention_block)
        out_bthk = checkpoint_name(out_bthk, "attention_out")
        out_btd = linear((h, k, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", "wo", 2)(out_bthk)
        return out_btd, cache


def l2_norm(x, eps: float):
    """x * rsqrt(mean(x^2, last axis) + eps): RMS norm without a weight, in float32, in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def temperature_scaled(q_bthk, positions_bt, tuning):
    """Queries times Llama 4's temperature for their positions: log(floor((p + 1) / floor_scale) + 1)
    * attn_scale + 1, which is 1 until p + 1 reaches floor_scale and grows slowly past it."""
    p = positions_bt.astype(jnp.float32)
    scale_bt = jnp.log1p(jnp.floor((p + 1.0) / tuning.floor_scale)) * tuning.attn_scale + 1.0
    return (q_bthk.astype(jnp.float32) * scale_bt[:, :, None, None]).astype(q_bthk.dtype)


class DecoderLayer(nn.Module):
    """One layer of kind `kind`, in `nn.scan`'s (carry, xs) -> (carry, ys) form.

    carry: (hidden [b, t, d], the stacked KV cache or None); layer: this
    layer's index (where it writes and reads the cache); segments for global
    attention; chunks for chunked layers: (coords, segments, ring slots) (see
    `Llama.__call__`); positions [b, t] for NoPE's temperature. ys: the router statistics (llama_jax/model/moe.py), zeros
    without a router.
    """

    config: ModelConfig
    kind: LayerKind = LayerKind()

    @nn.compact
    def __call__(self, carry, layer, rope, coords, segments, chunks=None, positions_bt=None):
        x_btd, cache = carry
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.param_dtype, name=name)  # noqa: E731
        ring_slots = None
        if self.kind.chunked:
            coords, segments, ring_slots = chunks
        attn_btd, cache = Attention(cfg, self.kind, name="attention")(
            norm("attention_norm")(x_btd), rope, coords, segments, cache, layer, positions_bt, ring_slots)
        h_btd = x_btd + attn_btd
        if self.kind.moe:
            ffn_btd, statistics = MoE(cfg, name="feed_forward")(norm("ffn_norm")(h_btd))
        else:
            ffn_btd, statistics = FeedForward(cfg, name="feed_forward")(norm("ffn_norm")(h_btd)), \
                no_router_statistics()
        return (_constrain(h_btd + ffn_btd, "batch", "length", "embed"), cache), statistics


class DecoderBlock(nn.Module):
    """`config.layer_period` consecutive layers of the kinds the pattern gives them (Llama 4);
    in `nn.scan` form like DecoderLayer, with xs the block's index g: layer r of the block
    is decoder layer g * period + r (whose kind is layer r's, the pattern repeating)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, block, rope, coords, segments, chunks=None, positions_bt=None):
        cfg = self.config
        period = cfg.layer_period
        total = no_router_statistics()
        for r in range(period):
            layer = remat_layer(DecoderLayer, cfg)(cfg, cfg.layer_kind(r), name=f"layer_{r}")
            carry, statistics = layer(carry, block * period + r, rope, coords, segments, chunks,
                                      positions_bt)
            total = jax.tree.map(jnp.add, total, statistics)
        return carry, total


def _layer_config(cfg: ModelConfig, layer: int) -> ModelConfig:
    """Layer `layer`'s config: unquantised where `quantize_for` leaves the layer alone (fp8's first and last)."""
    if cfg.quantize is not None and cfg.quantize_for("w1", layer) is None:
        return cfg.replace(quantize=None)
    return cfg


def remat_layer(layer: type[nn.Module], cfg: ModelConfig) -> type[nn.Module]:
    """The layer class wrapped in `nn.remat` with the config's policy (as it is for "none")."""
    if cfg.remat == "none":
        return layer
    kept = REMAT_POLICIES[cfg.remat]
    policy = (jax.checkpoint_policies.save_only_these_names(*kept) if isinstance(kept, tuple)
              else getattr(jax.checkpoint_policies, kept))
    return nn.remat(layer, policy=policy, prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
    """The whole model: embedding, decoder stack, final norm, output head."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              embedding_init=_init("vocab", "embed"))
        stacked = cfg.stacked_layers
        # The stack's units: decoder layers, or blocks of one layer pattern (Llama 4).
        units = cfg.n_layers // cfg.layer_period
        # Units outside the stack (fp8 keeps the first and last layers unquantised) are their own modules.
        own = range(units) if not cfg.scan_layers else [i for i in range(units) if i not in stacked]
        if cfg.layer_period > 1:
            self.own_layers = {i: DecoderBlock(cfg, name=f"layers_{i}") for i in own}
        else:
            own_class = remat_layer(DecoderLayer, cfg.replace(scan_layers=False))
            self.own_layers = {i: own_class(_layer_config(cfg, i), cfg.layer_kind(0), name=f"layers_{i}")
                               for i in own}
        if cfg.scan_layers:
            # Both units already have scan's (carry, xs) -> (carry, ys) form; xs are unit indices.
            unit, kind = (DecoderBlock, ()) if cfg.layer_period > 1 else \
                (remat_layer(DecoderLayer, cfg), (cfg.layer_kind(0),))
            self.layers = nn.scan(
                unit, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0,) + (nn.broadcast,) * 5, length=len(stacked),
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, *kind)
        self.norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        if cfg.head == "score":  # a reward or value model: one scalar a position (llama_jax/model/reward.py)
            self.score = Linear((cfg.dim, 1), ("embed", None), "...d,dv->...v", cfg.dtype, cfg.param_dtype)
        elif not cfg.tie_embeddings:
            self.output = Linear((cfg.dim, cfg.vocab_size), ("embed", "vocab"), "...d,dv->...v",
                                 cfg.dtype, cfg.param_dtype)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache: Cache | None = None,
                 return_hidden: bool = False, return_aux: bool = False, lengths_b=None):
        """Logits [batch, time, vocab] (float32), or with the score head scores [batch, time]
        (float32), and the updated cache (None if none given).

        tokens_bt, positions_bt: int32 [batch, time]; positions None means
        0..time-1 in every row. segment_ids_bt: int32 [batch, time] document
        ids of packed rows (tokens attend within their own id only). cache:
        from `init_cache`; keys and values are written at `positions_bt`, and
        attention runs over the whole cache. With a cache and positions None
        the tokens are a prompt from its start: they fill slots 0..time-1 and
        attend to each other (as without a cache, so the splash kernel and
        context parallelism apply). With `return_hidden`, the final-normed
        hidden states [batch, time, dim] are returned instead of logits, for
        a loss that projects them in chunks (see `logits`). With `return_aux`,
        a third output: the router statistics summed over the MoE layers
        (llama_jax/model/moe.py `router_statistics`; zeros without experts).
        lengths_b: int32 [batch], with a cache: each row's prompt length;
        tokens at or past it are padding, which the chunked layers' ring
        buffer does not keep (llama_jax/model/kv_cache.py). None: none are.

        Token ids are checked (`check_token_ids`, ValueError) only when they
        are concrete, i.e. `apply` called eagerly from the host. Under jit a
        data-dependent error is impossible: there an id >= vocab_size gives NaN
        logits (the embedding gather fills out-of-range rows with NaN) and a
        negative id counts from the end of the table, so host code checks ids
        where they enter (generate, the server, the data sources).
        """
        cfg = self.config
        check_concrete_ids(tokens_bt, cfg.vocab_size)
        b, t = tokens_bt.shape
        self_attention = cache is None or positions_bt is None
        shards = length_shards() if self_attention else 1
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if self_attention:
            # Under context parallelism every shard gets an early and a late
            # part of the sequence (context_parallel.balance), undone below.
            tokens_bt, positions_bt = balance(tokens_bt, shards), balance(positions_bt, shards)
            segment_ids_bt = None if segment_ids_bt is None else balance(segment_ids_bt, shards)
            coords, segments = None, (segment_ids_bt, segment_ids_bt)
            rope = rotary_angles(positions_bt, inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                   cfg.rope_scaling))
            chunks = (coords, chunk_segments(cfg, positions_bt, positions_bt, segments), None)
        else:
            rope, coords, segments = attention_inputs(cfg, positions_bt, segment_ids_bt, cache)
            chunks = (coords, chunk_segments(cfg, positions_bt, coords[1], segments), None)
        if cache is not None and "local_pos" in cache:
            chunks, cache = ring_inputs(cfg, cache, positions_bt, lengths_b, chunks, self_attention)
        carry = (_constrain(self.embed(tokens_bt), "batch", "length", "embed"), cache)
        inputs = (rope, coords, segments, chunks, positions_bt)
        statistics = no_router_statistics()
        stacked = cfg.stacked_layers if cfg.scan_layers else range(0)
        # A layout that splits `layers` over stages runs the stack as a pipeline (llama_jax/model/pipeline.py).
        schedule = None if self.is_initializing() else pipeline.schedule_in_scope()
        for i in range(cfg.n_layers // cfg.layer_period):
            if i in self.own_layers:
                carry, unit_statistics = self.own_layers[i](carry, i, *inputs)
            elif i == stacked.start and cache is None and schedule is not None:
                carry, unit_statistics = (self.pipelined(carry[0], inputs, schedule, i), None), \
                    no_router_statistics()
            elif i == stacked.start:
                carry, stacked_statistics = self.layers(carry, jnp.arange(stacked.start, stacked.stop), *inputs)
                unit_statistics = jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked_statistics)
            else:
                continue
            statistics = jax.tree.map(jnp.add, statistics, unit_statistics)
        x_btd, cache = carry
        hidden_btd = balance(self.norm(x_btd), shards)
        out = hidden_btd if return_hidden else self.logits(hidden_btd)
        return (out, cache, statistics) if return_aux else (out, cache)

    def pipelined(self, x_btd, inputs, schedule: pipeline.Schedule, first_unit: int):
        """The stacked units on x_btd [b, t, d] under `schedule`: each unit applied functionally to its
        slice of the stacked parameters (the same ones `self.layers` scans over)."""
        cfg = self.config
        if cfg.moe is not None:
            raise ValueError("pipeline stages do not run mixture-of-experts layers (their router "
                             "statistics); use a layout without a stage axis")
        if cfg.layer_period > 1:
            unit = DecoderBlock(cfg, parent=None)
        else:
            unit = remat_layer(DecoderLayer, cfg)(cfg, cfg.layer_kind(0), parent=None)

        def apply_unit(params, x_btd, index, rows):
            (x_btd, _), _ = unit.apply({"params": params}, (x_btd, None), index, *rows)
            return x_btd

        return pipeline.run(apply_unit, self.variables["params"]["layers"], x_btd, inputs, schedule, first_unit)

    def logits(self, hidden_btd):
        """Project final-normed hidden states to float32 logits [..., vocab]; with the score
        head (`ModelConfig.head`), to float32 scores [...], one a position."""
        if self.config.head == "score":
            scores = self.score(hidden_btd)[..., 0].astype(jnp.float32)
            return _constrain(scores, "batch", "length") if scores.ndim == 2 else scores
        if self.config.tie_embeddings:
            logits = self.embed.attend(hidden_btd)
        else:
            logits = self.output(hidden_btd)
        return _constrain(logits.astype(jnp.float32), "batch", "length", "vocab")


def attention_inputs(config: ModelConfig, positions_bt, segment_ids_bt=None, cache: Cache | None = None):
    """(rope, coords, segments) for the decoder layers: rotary angles of the positions, and the
    query and key coordinates and segments of `attend`'s visibility rule.

    Without a cache, coordinates are row indices and segments the given ids;
    with one, queries sit at their positions and keys at the cache slots.
    """
    rope = rotary_angles(positions_bt, inverse_frequencies(config.head_dim, config.rope_theta,
                                                           config.rope_scaling))
    if cache is None:
        rows_bt = jnp.broadcast_to(jnp.arange(positions_bt.shape[1]), positions_bt.shape)
        return rope, (rows_bt, rows_bt), (segment_ids_bt, segment_ids_bt)
    slots_bs = jnp.broadcast_to(jnp.arange(cache["k"].shape[2]), (positions_bt.shape[0], cache["k"].shape[2]))
    return rope, (positions_bt, slots_bs), (None, None)


def ring_inputs(config: ModelConfig, cache: Cache, positions_bt, lengths_b, chunks, self_attention: bool):
    """Chunked layers' (coords, segments, ring slots) over the cache's ring, and the cache with the
    ring's positions updated: keys are the ring's slots (at the positions they held before this
    step) followed by the step's own tokens, except for a prompt attending to itself."""
    slots_bt = kv_cache.ring_slots(positions_bt, lengths_b, cache["local_pos"].shape[1])
    coords, segments = chunks[:2]
    if not self_attention:
        keys_bs = jnp.concatenate([cache["local_pos"], positions_bt], axis=1)
        coords = (positions_bt, keys_bs)
        segments = chunk_segments(config, positions_bt, keys_bs, (None, None))
    rows_b1 = jnp.arange(positions_bt.shape[0])[:, None]
    ring = cache["local_pos"].at[rows_b1, slots_bt].set(positions_bt, mode="drop")
    return (coords, segments, slots_bt), {**cache, "local_pos": ring}


def chunk_segments(config: ModelConfig, q_positions_bt, k_positions_bs, segments):
    """The (query, key) segment ids of chunked layers, or None without `attention_chunk_size`.

    A chunk is a segment: key and query see each other when their positions
    share `position // chunk` (and their documents share a segment id, if
    any), so `attend`'s rule does the rest. Keys are at `k_positions_bs`
    ([b, s]: the rows' own positions, or the cache slots, which are positions).
    Document and chunk combine as `document * chunks_per_row + chunk`.
    """
    chunk = config.attention_chunk_size
    if chunk is None:
        return None
    per_row = config.max_seq_len // chunk + 1
    out = []
    for positions, segment in zip((q_positions_bt, k_positions_bs), segments):
        ids = positions // chunk
        out.append(ids if segment is None else segment * per_row + ids)
    return tuple(out)


def check_concrete_ids(tokens_bt, rows: int) -> None:
    """`check_token_ids` on ids the host holds (an eager `apply`); nothing for traced ids,
    whose values are unknown until run, or for ids spread over other processes' devices."""
    if not isinstance(tokens_bt, jax.core.Tracer) and getattr(tokens_bt, "is_fully_addressable", True):
        check_token_ids(tokens_bt, rows)


def check_token_ids(ids, vocab_size: int, what: str = "tokens") -> None:
    """ValueError (one line) naming the first id of `ids` outside [0, vocab_size)."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what}: token id {int(bad.flat[0])} is outside the model's vocabulary "
                         f"[0, {vocab_size})")


