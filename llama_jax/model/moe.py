"""The mixture-of-experts feed-forward of Llama 4 (Scout, Maverick): router, experts, shared expert.

    out = shared_expert(x) + sum over the token's top_k experts e of expert_e(x * sigmoid(logit_e))

as Meta's reference (llama_models/llama4/moe.py) and transformers' Llama4TextMoe
compute it: the router's top_k logits go through a sigmoid (not a softmax over
the experts), and the score scales the token *before* its expert's SwiGLU,
not the expert's output. Each expert and the shared expert are SwiGLUs of
width `moe.ffn_dim_expert`.

Dropless, by choice. Every token reaches its experts however many other
tokens chose the same ones. A capacity bound (GShard, Switch) drops the
overflow of busy experts, and then a token's output depends on the other
tokens of its batch: a row's logits would change with the rows beside it,
prefill and decode would disagree, and nothing would equal the reference
(which computes every expert on every token, with zero scores where it was
not chosen). This project keeps a row independent of its batch (ragged
decoding, per-row sampling keys), so the routed tokens are instead sorted
by expert and each expert multiplies exactly its own rows: a grouped matmul
(`jax.lax.ragged_dot`; one kernel per projection on TPU, expanded by XLA:CPU
into a masked dense product, which is what the reference computes, fine at
test sizes).

Under a layout, each device sorts only the tokens it holds (`shard_map`),
so no device sorts another's tokens; with experts split over devices
(expert parallelism), each routed row travels to the device holding its
expert by an all-to-all and its result comes back by another
(`_per_device`, `_exchanged`): dropless in fixed-size slots, since XLA:CPU
has no ragged all-to-all.

Expert weights are named ("expert", "embed", "mlp") / ("expert", "mlp",
"embed"): a layout decides where experts live (configs/layouts/expert_fsdp.yaml
splits them over the data axis, docs/llama4.md). The router's kernel is
("embed", None): it is small, and every device needs all of its experts'
logits.

Letters in names: b batch, t time, d embed, e experts, f expert hidden,
k top_k, m routed tokens of a row (t x k, sorted by expert), n devices exchanging rows,
c rows of their exchange buffer (n slots of `capacity`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.config import ModelConfig
from llama_jax.model import mesh_context
from llama_jax.model.layers import FeedForward, Linear
from llama_jax.model.quantize import dequantize, storage_dtype

_INIT = nn.initializers.normal(stddev=0.02)
STATISTICS = ("load_balance", "router_z")


class MoE(nn.Module):
    """Router, `n_experts` SwiGLU experts (w1, w3 [e, d, f], w2 [e, f, d]) and the shared expert."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        """(output [b, t, d] in the compute dtype, router statistics: a dict of float32 scalars,
        see `router_statistics`)."""
        cfg, moe = self.config, self.config.moe
        d, e, f = cfg.dim, moe.n_experts, moe.ffn_dim_expert
        x_btd = x_btd.astype(cfg.dtype)
        router = Linear((d, e), ("embed", None), "btd,de->bte", cfg.dtype, cfg.param_dtype, name="router")
        logits_bte = router(x_btd).astype(jnp.float32)
        top_btk, expert_btk = jax.lax.top_k(logits_bte, moe.top_k)
        score_btk = jax.nn.sigmoid(top_btk)

        def weight(name, shape, names):
            kind = cfg.quantize_for(name)
            if kind is None:
                kernel = self.param(name, nn.with_logical_partitioning(_INIT, names), shape, cfg.param_dtype)
                return kernel.astype(cfg.dtype)
            # Quantised as Linear's kernels (llama_jax/model/quantize.py): one float32 scale per expert
            # and output channel, `{name}_scale`. Dequantised before the grouped matmul, which takes
            # one weight per expert group, not a scale per sorted row.
            values = self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, names), shape,
                                storage_dtype(kind))
            scale = self.param(name + "_scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                             (names[0], names[2])),
                               (shape[0], shape[2]), jnp.float32)
            return dequantize(values, scale, (1,), cfg.dtype)

        w1_edf = weight("w1", (e, d, f), ("expert", "embed", "mlp"))
        w3_edf = weight("w3", (e, d, f), ("expert", "embed", "mlp"))
        w2_efd = weight("w2", (e, f, d), ("expert", "mlp", "embed"))
        out_btd = routed_experts(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd)
        if moe.shared_expert:
            out_btd = out_btd + FeedForward(cfg, f, name="shared_expert")(x_btd)
        out_btd = nn.with_logical_constraint(out_btd, ("batch", "length", "embed"))
        return out_btd, router_statistics(logits_bte, expert_btk)


def routed_experts(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd):
    """The routed part of the output [b, t, d]: for each token, the sum over its k experts of
    expert(x * score), dropless (module docstring).

    x_btd in the compute dtype; expert_btk int32 [b, t, k]; score_btk float32
    [b, t, k]; expert weights in the compute dtype. Under a layout whose
    shapes fit (`_fits`), each device sorts its own tokens inside `shard_map`
    (`_per_device`); otherwise (one device, or initialisation's one-token
    input) the whole batch is one group of tokens and XLA places the work.
    """
    mesh = mesh_context.mesh()
    x_spec = mesh_context.spec("batch", "length", "embed")
    w_in_spec = mesh_context.spec("expert", "embed", "mlp")
    w_out_spec = mesh_context.spec("expert", "mlp", "embed")
    if mesh is None or not _fits(x_btd.shape, w1_edf.shape[0], x_spec, w_in_spec):
        return _experts_here(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, 0)
    rows = P(x_spec[0], x_spec[1], None)
    per_device = functools.partial(_per_device, x_spec=x_spec, w_in_spec=w_in_spec, w_out_spec=w_out_spec)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(x_spec, rows, rows, w_in_spec, w_in_spec, w_out_spec),
                         out_specs=rows, check_vma=False)(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd)


def _fits(x_shape, n_experts: int, x_spec: P, w_spec: P) -> bool:
    b, t, _ = x_shape
    return (b % mesh_context.shards(x_spec[0]) == 0 and t % mesh_context.shards(x_spec[1]) == 0
            and n_experts % mesh_context.shards(w_spec[0]) == 0)


def _per_device(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, *, x_spec, w_in_spec, w_out_spec):
    """One device's part of `routed_experts`, inside `shard_map` over the whole mesh.

    Weights arrive split as the layout stores them: experts over the expert
    axes, embed (FSDP) and mlp (tensor) as any weight. Embed is gathered
    (FSDP's gather of one layer). Along the expert axes that also split the
    batch, the devices hold different tokens: each routed row travels to the
    device holding its expert and back (`_exchanged`, the all-to-all
    dispatch). Along expert axes that do not split the batch, the devices
    hold the same tokens: each computes the rows of its own experts and the
    partial outputs are summed, as are the partial products of a split mlp.
    """
    def gather(x, entry, axis):
        axes = mesh_context.axes_of(entry)
        return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x

    x_btd = gather(x_btd, x_spec[2], 2)
    w1_edf, w3_edf = gather(w1_edf, w_in_spec[1], 1), gather(w3_edf, w_in_spec[1], 1)
    w2_efd = gather(w2_efd, w_out_spec[2], 2)
    expert_axes = mesh_context.axes_of(w_in_spec[0])
    batch_axes = mesh_context.axes_of(x_spec[0])
    dispatch = tuple(a for a in expert_axes if a in batch_axes)  # devices along these hold other rows
    summed = tuple(a for a in expert_axes if a not in batch_axes)  # ... and along these, the same rows
    if dispatch:
        y_btd = _exchanged(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, expert_axes, dispatch)
    else:
        first = jax.lax.axis_index(expert_axes) * w1_edf.shape[0] if expert_axes else 0
        y_btd = _experts_here(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, first)
    partial = summed + mesh_context.axes_of(w_in_spec[2])
    return jax.lax.psum(y_btd, partial) if partial else y_btd


def _exchanged(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, expert_axes, dispatch):
    """This device's routed output [b, t, d], its rows computed where their experts live.

    The routed rows (token x score, one per chosen expert) are sorted by the
    device along `dispatch` that holds their expert into n equal slots of
    `capacity` rows, exchanged by one all-to-all (with each row's expert),
    multiplied there by the grouped matmul, and returned by a second
    all-to-all into the slots they left. XLA:CPU has no ragged all-to-all
    (jax 0.10), so the slots are fixed: capacity = tokens x min(k, local
    experts) rows, the most one device can send one peer (a token's k experts
    are distinct, at most that many live on one device), so nothing is ever
    dropped. Unused rows travel as zeros with expert id `e` (sorted past
    every group, computed by no one). Rows of experts held at another
    coordinate of a non-dispatch expert axis are left to that device.
    """
    b, t, k = expert_btk.shape
    e, d = w1_edf.shape[0], x_btd.shape[-1]
    n = mesh_context.shards(dispatch)
    capacity = b * t * min(k, e)
    shard_m = expert_btk.reshape(-1) // e  # which slice of the experts (row-major over expert_axes)
    dest_m, keep_m, stride = 0, True, mesh_context.shards(expert_axes)
    for axis in expert_axes:
        size = mesh_context.shards(axis)
        stride //= size
        coord_m = shard_m // stride % size
        if axis in dispatch:
            dest_m = dest_m * size + coord_m
        else:
            keep_m = keep_m & (coord_m == jax.lax.axis_index(axis))
    key_m = jnp.where(keep_m, dest_m, n)
    order_m = jnp.argsort(key_m, stable=True)
    sorted_m = key_m[order_m]
    count_n = jnp.bincount(key_m, length=n + 1)
    rank_m = jnp.arange(order_m.shape[0]) - (jnp.cumsum(count_n) - count_n)[sorted_m]
    slot_m = jnp.where(sorted_m < n, sorted_m * capacity + rank_m, n * capacity)  # out of range: not sent
    token_m = order_m // k
    x_md = x_btd.reshape(b * t, d)[token_m] * score_btk.reshape(-1)[order_m, None].astype(x_btd.dtype)
    send_cd = jnp.zeros((n * capacity, d), x_btd.dtype).at[slot_m].set(x_md, mode="drop")
    expert_c = jnp.full((n * capacity, 1), e, jnp.int32).at[slot_m, 0].set(
        expert_btk.reshape(-1)[order_m] % e, mode="drop")
    recv_cd, expert_c = (jax.lax.all_to_all(a, dispatch, 0, 0, tiled=True) for a in (send_cd, expert_c))
    y_cd = _experts_here(recv_cd[None], expert_c[None], None, w1_edf, w3_edf, w2_efd, 0)[0]
    y_md = jax.lax.all_to_all(y_cd, dispatch, 0, 0, tiled=True).at[slot_m].get(mode="fill", fill_value=0)
    return jnp.zeros((b * t, d), x_btd.dtype).at[token_m].add(y_md).reshape(x_btd.shape)


def _experts_here(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd, first):
    """The output [b, t, d] of experts first .. first + e - 1 (the e of the weights given) on
    all the tokens given, each scaled by its score (None: unscaled), sorted by expert into one
    grouped matmul per projection."""
    b, t, k = expert_btk.shape
    e = w1_edf.shape[0]
    x_ad = x_btd.reshape(b * t, -1)
    local_m = expert_btk.reshape(b * t * k) - first
    key_m = jnp.where((local_m >= 0) & (local_m < e), local_m, e)  # other devices' experts sort last
    order_m = jnp.argsort(key_m, stable=True)
    token_m = order_m // k
    x_md = x_ad[token_m]
    if score_btk is not None:
        x_md = x_md * score_btk.reshape(b * t * k)[order_m, None].astype(x_ad.dtype)
    # Rows past the groups' total (tokens of experts held elsewhere) come out zero.
    sizes_e = jnp.bincount(key_m, length=e + 1)[:e].astype(jnp.int32)
    gate_mf = jax.lax.ragged_dot(x_md, w1_edf, sizes_e)
    up_mf = jax.lax.ragged_dot(x_md, w3_edf, sizes_e)
    y_md = jax.lax.ragged_dot(jax.nn.silu(gate_mf) * up_mf, w2_efd, sizes_e)
    return jnp.zeros_like(x_ad).at[token_m].add(y_md.astype(x_ad.dtype)).reshape(x_btd.shape)


def router_statistics(logits_bte, expert_btk) -> dict[str, jax.Array]:
    """The router's auxiliary losses over a batch's tokens (float32 scalars):

    load_balance: Switch Transformer's `e * sum_i frac_i * prob_i` (frac_i: the share of
      routed tokens sent to expert i, prob_i: the mean softmax probability of expert i);
      1 when routing is uniform, up to e when one expert takes everything.
    router_z: ST-MoE's router z-loss, the mean of logsumexp(logits)^2 over tokens.
    Meta's reference and transformers' Llama4ForCausalLM train with neither; a training
    objective adds them with `moe.load_balance_weight` and `moe.router_z_weight`.
    """
    e = logits_bte.shape[-1]
    frac_e = jnp.mean(jax.nn.one_hot(expert_btk, e, dtype=jnp.float32), axis=(0, 1, 2))
    prob_e = jnp.mean(jax.nn.softmax(logits_bte, axis=-1), axis=(0, 1))
    z_bt = jax.nn.logsumexp(logits_bte, axis=-1)
    return {"load_balance": e * jnp.sum(frac_e * prob_e), "router_z": jnp.mean(z_bt * z_bt)}


def no_router_statistics() -> dict[str, jax.Array]:
    """The statistics of a layer without a router: zeros (so scanned layers' outputs agree)."""
    return {name: jnp.zeros((), jnp.float32) for name in STATISTICS}
