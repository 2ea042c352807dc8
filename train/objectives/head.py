"""The output head gathered once a step for a loss computed in chunks of positions.

A chunked loss (cross_entropy.py `chunked_sums`) projects hidden states to
logits a chunk at a time inside a scan. Used as a layer weight, the FSDP-split
head [embed, vocab] would be all-gathered in every chunk of the forward pass,
again in every chunk of the backward pass, and its gradient reduced every
chunk: 2 x chunks gathers and chunks reductions of the largest weight of a
Llama 3 model (4096 x 128256).

`chunk_projection` gathers it once, before the scan, into one whole copy per
device: a [devices, embed, vocab] array whose leading axis is split over the
mesh axes that split the tokens (batch, length), so each device holds its own
copy and nothing is duplicated in memory beyond that copy. Each chunk then
multiplies its local rows by the local copy inside `shard_map`, so the
gradient of the copy, summed over chunks by the scan, stays a per-device
partial sum, and leaves the step as one reduce-scatter into the head's
shards (the gather's backward pass). Vocabulary stays split over tensor as
the layout has it. The chunked loss's memory win is kept: logits of one
chunk at a time, plus the head in the compute dtype once.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.model import mesh_context
from llama_jax.model.llama import Llama


def chunk_projection(model: Llama, params) -> Callable:
    """`project(hidden [B, chunk, D]) -> float32 logits [B, chunk, V]` for a chunked loss.

    With a mesh and rules in scope and a plain untied head (no adapters, not
    quantised), the head is gathered once (module docstring); otherwise each
    call is the model's own `Llama.logits`.
    """
    cfg = model.config
    plan = _plan(cfg)
    if plan is None or "output" not in params:
        return lambda h: model.apply({"params": params}, h, method=Llama.logits)
    copies = gather_copies(params["output"]["kernel"].astype(cfg.dtype), plan)
    return lambda h: _copy_logits(h.astype(cfg.dtype), copies, plan).astype(jnp.float32)


def _plan(cfg):
    """(token axes, embed axes, vocab axes) of the mesh in scope, or None where the gathered
    head does not apply."""
    if (mesh_context.mesh() is None or not nn.get_logical_axis_rules() or cfg.tie_embeddings
            or cfg.lora_for("output") or cfg.quantize_for("output")):
        return None
    batch, length = mesh_context.spec("batch", "length")
    embed, vocab = mesh_context.spec("embed", "vocab")
    tokens = mesh_context.axes_of(batch) + mesh_context.axes_of(length)
    if not set(mesh_context.axes_of(embed)) <= set(tokens) or set(mesh_context.axes_of(vocab)) & set(tokens):
        return None  # the head split over an axis the tokens are not (or vocab over a token axis)
    return batch, length, embed, vocab


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_copies(kernel_dv, plan):
    """[D, V] split as the layout has it -> [devices along the token axes, D, V], one whole
    copy (vocab still split) per device. Backward: the copies' gradients reduce-scattered
    into the kernel's shards (summed over the token axes the kernel is not split on)."""
    batch, length, embed, vocab = plan
    embed_axes = mesh_context.axes_of(embed)

    def per_device(k):
        return (jax.lax.all_gather(k, embed_axes, axis=0, tiled=True) if embed_axes else k)[None]

    return jax.shard_map(per_device, in_specs=P(embed, vocab), out_specs=P(_tokens(plan), None, vocab),
                         check_vma=False)(kernel_dv)


def _tokens(plan):
    batch, length = plan[:2]
    return mesh_context.axes_of(batch) + mesh_context.axes_of(length) or None


def _gather_fwd(kernel_dv, plan):
    return gather_copies(kernel_dv, plan), None


def _gather_bwd(plan, _, d_copies):
    batch, length, embed, vocab = plan
    embed_axes = mesh_context.axes_of(embed)
    others = tuple(a for a in mesh_context.axes_of(_tokens(plan))
                   if a not in embed_axes and mesh_context.shards(a) > 1)

    def per_device(g):
        g = g[0]
        if embed_axes:
            g = jax.lax.psum_scatter(g, embed_axes, scatter_dimension=0, tiled=True)
        return jax.lax.psum(g, others) if others else g

    return (jax.shard_map(per_device, in_specs=P(_tokens(plan), None, vocab), out_specs=P(embed, vocab),
                          check_vma=False)(d_copies),)


gather_copies.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _copy_logits(hidden_btd, copies, plan):
    """Logits [B, T, V] (compute dtype) of hidden states by each device's own copy of the head."""
    batch, length, _, vocab = plan
    return jax.shard_map(lambda h, w: jnp.einsum("btd,dv->btv", h, w[0]),
                         in_specs=(P(batch, length, None), P(_tokens(plan), None, vocab)),
                         out_specs=P(batch, length, vocab), check_vma=False)(hidden_btd, copies)


def _copy_logits_fwd(hidden_btd, copies, plan):
    return _copy_logits(hidden_btd, copies, plan), (hidden_btd, copies)


def _copy_logits_bwd(plan, residuals, d_logits):
    """Hidden states' gradient summed over the vocabulary's shards; each copy's gradient is its
    device's own rows' sum, left unreduced (`gather_copies` reduces it once)."""
    batch, length, _, vocab = plan
    hidden_btd, copies = residuals
    vocab_axes = tuple(a for a in mesh_context.axes_of(vocab) if mesh_context.shards(a) > 1)

    def per_device(h, w, dy):
        dh = jnp.einsum("btv,dv->btd", dy, w[0])
        dh = jax.lax.psum(dh, vocab_axes) if vocab_axes else dh
        return dh, jnp.einsum("btd,btv->dv", h, dy)[None]

    row, copy = P(batch, length, None), P(_tokens(plan), None, vocab)
    return jax.shard_map(per_device, in_specs=(row, copy, P(batch, length, vocab)), out_specs=(row, copy),
                         check_vma=False)(hidden_btd, copies, d_logits.astype(hidden_btd.dtype))


_copy_logits.defvjp(_copy_logits_fwd, _copy_logits_bwd)
