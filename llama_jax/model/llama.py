"""The Llama decoder as functional Flax Linen modules.

    h = x + Attention(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))

Usage:
    model = Llama(config)
    logits, cache = model.apply({"params": params}, tokens, positions,
                                segment_ids=None, cache=None)

Letters in names: b batch, t time, d embed (dim), h heads, n kv heads,
k head_dim, f ffn hidden, v vocab, s cache length.
Parameters and activations carry logical axis names only; `sharding/` maps
them to a mesh. Without sharding rules in scope the names are inert.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model import kv_cache, mesh_context
from llama_jax.model.attention import attend
from llama_jax.config import REMAT_POLICIES, LoraConfig, ModelConfig
from llama_jax.model.context_parallel import balance, balanced_order, length_shards
from llama_jax.model.kv_cache import Cache
from llama_jax.model.quantize import ACTIVATION_CAP, kernel_reduce_axes, quantize, storage_dtype
from llama_jax.model.rope import apply_rotary, inverse_frequencies, rotary_angles
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
            return jnp.einsum(self.equation, x.astype(self.dtype), converted_after(self.kernel, self.dtype, x))
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


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, rope, coords, segments, cache, layer):
        cfg = self.config
        d, h, n, k = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        linear = lambda shape, names, eq, name, n_in=1: Linear(  # noqa: E731
            shape, names, eq, cfg.dtype, cfg.param_dtype, n_in, cfg.lora_for(name), cfg.quantize_for(name),
            name=name)
        q_bthk = linear((d, h, k), ("embed", "heads", "head_dim"), "btd,dhk->bthk", "wq")(x_btd)
        k_btnk = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wk")(x_btd)
        v_btnk = linear((d, n, k), ("embed", "kv_heads", "head_dim"), "btd,dnk->btnk", "wv")(x_btd)
        q_bthk = _constrain(apply_rotary(q_bthk, *rope), "batch", "length", "heads", "head_dim")
        k_btnk = _constrain(apply_rotary(k_btnk, *rope), "batch", "length", "kv_heads", "head_dim")
        v_btnk = _constrain(v_btnk, "batch", "length", "kv_heads", "head_dim")

        if coords is None:
            # The sequence attends to itself: static coordinates, its rows in
            # the order the model put them in (load-balanced when the layout
            # splits the length, see context_parallel).
            shards = length_shards()
            order = balanced_order(q_bthk.shape[1], shards)
            if cache is not None:  # a prompt from position 0: its keys fill this layer's slots 0..t-1
                b, t = k_btnk.shape[:2]
                cache = kv_cache.write(cache, layer, jnp.broadcast_to(jnp.arange(t), (b, t)),
                                       balance(k_btnk, shards), balance(v_btnk, shards))
            coords = (order, order)
        elif cache is not None:
            # Write this step's keys and values at their positions in this layer's
            # part of the cache, then attend to the layer's whole cache; slots past
            # a query's position stay invisible.
            cache = kv_cache.write(cache, layer, coords[0], k_btnk, v_btnk)
            k_btnk, v_btnk = kv_cache.read(cache, layer, cfg.dtype)
        out_bthk = attend(q_bthk, k_btnk, v_btnk, *coords, *segments,
                          impl=cfg.attention, block=cfg.attention_block)
        out_bthk = checkpoint_name(out_bthk, "attention_out")
        out_btd = linear((h, k, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", "wo", 2)(out_bthk)
        return out_btd, cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    With `swiglu_backward: manual` (what `auto` picks on CPU), no adapters on
    w1/w2/w3 and unquantised kernels it runs `llama_jax.model.swiglu`, a
    hand-written backward pass tuned for XLA:CPU (see there); otherwise the
    projections' own calls under plain autodiff, which leaves XLA free to
    fuse on TPU and skips frozen kernels' gradients under LoRA.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        d, f = cfg.dim, cfg.ffn_dim
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


class DecoderLayer(nn.Module):
    """One layer, in `nn.scan`'s (carry, xs) -> (carry, ys) form.

    carry: (hidden [b, t, d], the stacked KV cache or None); layer: this
    layer's index (where it writes and reads the cache). No ys.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, rope, coords, segments):
        x_btd, cache = carry
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.param_dtype, name=name)  # noqa: E731
        attn_btd, cache = Attention(cfg, name="attention")(
            norm("attention_norm")(x_btd), rope, coords, segments, cache, layer)
        h_btd = x_btd + attn_btd
        out_btd = h_btd + FeedForward(cfg, name="feed_forward")(norm("ffn_norm")(h_btd))
        return (_constrain(out_btd, "batch", "length", "embed"), cache), None


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
        # Layers outside the stack (fp8 keeps the first and last unquantised) are their own modules.
        own = range(cfg.n_layers) if not cfg.scan_layers else [i for i in range(cfg.n_layers) if i not in stacked]
        own_class = remat_layer(DecoderLayer, cfg.replace(scan_layers=False))
        self.own_layers = {i: own_class(_layer_config(cfg, i), name=f"layers_{i}") for i in own}
        if cfg.scan_layers:
            # DecoderLayer already has scan's (carry, xs) -> (carry, ys) form; xs are layer indices.
            self.layers = nn.scan(
                remat_layer(DecoderLayer, cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=len(stacked),
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        self.norm = RMSNorm(cfg.norm_eps, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.output = Linear((cfg.dim, cfg.vocab_size), ("embed", "vocab"), "...d,dv->...v",
                                 cfg.dtype, cfg.param_dtype)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache: Cache | None = None,
                 return_hidden: bool = False):
        """Logits [batch, time, vocab] (float32) and the updated cache (None if none given).

        tokens_bt, positions_bt: int32 [batch, time]; positions None means
        0..time-1 in every row. segment_ids_bt: int32 [batch, time] document
        ids of packed rows (tokens attend within their own id only). cache:
        from `init_cache`; keys and values are written at `positions_bt`, and
        attention runs over the whole cache. With a cache and positions None
        the tokens are a prompt from its start: they fill slots 0..time-1 and
        attend to each other (as without a cache, so the splash kernel and
        context parallelism apply). With `return_hidden`, the final-normed
        hidden states [batch, time, dim] are returned instead of logits, for
        a loss that projects them in chunks (see `logits`).

        Token ids are not checked here (under jit a data-dependent error is
        impossible): an id >= vocab_size gives NaN logits (the embedding gather
        fills out-of-range rows with NaN) and a negative id counts from the end
        of the table. Host code checks ids where they enter, with
        `check_token_ids` (generate, the data sources).
        """
        cfg = self.config
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
        else:
            rope, coords, segments = attention_inputs(cfg, positions_bt, segment_ids_bt, cache)
        carry = (_constrain(self.embed(tokens_bt), "batch", "length", "embed"), cache)
        stacked = cfg.stacked_layers if cfg.scan_layers else range(0)
        for i in range(cfg.n_layers):
            if i in self.own_layers:
                carry, _ = self.own_layers[i](carry, i, rope, coords, segments)
            elif i == stacked.start:
                carry, _ = self.layers(carry, jnp.arange(stacked.start, stacked.stop), rope, coords, segments)
        x_btd, cache = carry
        hidden_btd = balance(self.norm(x_btd), shards)
        if return_hidden:
            return hidden_btd, cache
        return self.logits(hidden_btd), cache

    def logits(self, hidden_btd):
        """Project final-normed hidden states to float32 logits [..., vocab]."""
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


def check_token_ids(ids, vocab_size: int, what: str = "tokens") -> None:
    """ValueError (one line) naming the first id of `ids` outside [0, vocab_size)."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what}: token id {int(bad.flat[0])} is outside the model's vocabulary "
                         f"[0, {vocab_size})")


