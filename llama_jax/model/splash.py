"""Attention through JAX's Pallas TPU splash-attention kernel, per device.

Letters: b batch, t query time, s key time, h heads, n kv heads, g query heads
per kv head, k head_dim.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) keeps no
[t, s] scores in memory, skips key blocks no query of a block can see, and
has its own backward kernels. It decides visibility from a mask known when
the program is built: here `CausalMask` with its query sequence set to the
queries' coordinates, so the kernel applies this project's rule (key j is
visible to query i when k_coord[j] <= q_coord[i], within one segment) for
any static order of the queries. Keys are put in coordinate order first.

Under a layout (a mesh and logical rules in scope, see mesh_context) the
kernel runs per device inside `shard_map` over the batch and head axes. When
the layout splits `length` as well (context parallelism), each device keeps
its queries, all-gathers keys, values and key segment ids over the length
axes, and the kernel's block mask is split by query rows, so each device
only visits the blocks its own queries need. Off TPU the kernel runs in
Pallas interpret mode (tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.arith import round_up
from llama_jax.model import mesh_context

LANES = 128  # the kernel's blocks are multiples of the TPU vector lane count
_PAD_SEGMENT = -1  # segment id of padding rows: they see only each other


def _block_for(length: int, block: int) -> int:
    """The largest multiple of LANES that divides `length` (itself one) and is at most
    `block`, or LANES."""
    return next(size for size in range(max(LANES, block - block % LANES), 0, -LANES)
                if length % size == 0)


def fits_layout(b: int, t: int, h: int, n: int) -> bool:
    """Whether [b, t, h] queries and n kv heads split evenly under the layout in scope,
    in whole blocks of LANES tokens per length shard (always true without a mesh)."""
    q_spec = mesh_context.spec("batch", "length", "heads", "head_dim")
    kv_heads = mesh_context.shards(mesh_context.spec("batch", "length", "kv_heads", "head_dim")[2])
    length = mesh_context.shards(q_spec[1])
    return (b % mesh_context.shards(q_spec[0]) == 0 and h % mesh_context.shards(q_spec[2]) == 0
            and n % kv_heads == 0 and (length == 1 or t % (length * LANES) == 0))


def _kernel(q_coord_t: np.ndarray, heads: int, block_q: int, block_kv: int, q_shards: int,
            interpret: bool):
    """A splash kernel for `heads` query heads sharing one kv head.

    JAX caches the analysis of the mask (seconds at 128K tokens) by its value.
    """
    mask = sa.CausalMask((q_coord_t.size, q_coord_t.size))
    mask.q_sequence = q_coord_t  # documented attribute: the coordinate of each query row
    sizes = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    return sa.make_splash_mqa(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=q_shards, interpret=interpret)


def splash_attend(q_bthk, k_bsnk, v_bsnk, q_coord_t: np.ndarray, k_coord_s: np.ndarray,
                  q_segment_bt=None, k_segment_bs=None, *, block: int = 512):
    """Causal GQA attention by the splash kernel; returns [b, t, h, k] in q's dtype.

    q must already carry the 1/sqrt(head_dim) scale. Coordinates are static
    (numpy int32, the same for every row): q_coord_t any order of the rows,
    k_coord_s a permutation of 0..s-1. Segment ids: int32 [b, t] / [b, s] or None.
    """
    b, t, h, k = q_bthk.shape
    s, n = k_bsnk.shape[1], k_bsnk.shape[2]
    if t != s or sorted(k_coord_s.tolist()) != list(range(s)):
        raise ValueError("attention=splash attends a sequence to itself: key coordinates must be "
                         "a permutation of 0..t-1")
    key_order = np.argsort(k_coord_s)
    mesh = mesh_context.mesh()
    q_spec = mesh_context.spec("batch", "length", "heads", "head_dim")
    kv_spec = mesh_context.spec("batch", "length", "kv_heads", "head_dim")
    kv_spec = PartitionSpec(kv_spec[0], q_spec[1], *kv_spec[2:])
    seg_spec = PartitionSpec(q_spec[0], q_spec[1])
    length_axes = mesh_context.axes_of(q_spec[1])
    q_shards = mesh_context.shards(q_spec[1])
    head_axes = mesh_context.axes_of(q_spec[2])
    g = h // n
    h_local = h // mesh_context.shards(q_spec[2])
    n_local = n // mesh_context.shards(kv_spec[2])
    # kv heads replicated while query heads are split (tensor axis > n_kv_heads):
    # each device's query heads then all belong to one kv head.
    one_kv_head = n_local * g != h_local
    g_local = h_local if one_kv_head else g

    pad = 0
    if q_shards == 1:  # pad to whole blocks (with the length split, each shard must be whole)
        lanes_block = max(LANES, block - block % LANES)
        pad = round_up(t, min(lanes_block, round_up(t, LANES))) - t
    if pad:
        q_bthk = jnp.pad(q_bthk, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_bsnk, v_bsnk = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k_bsnk, v_bsnk))
        # Padding rows come after every real coordinate and form their own
        # segment: each sees itself, and no real row sees them.
        q_coord_t = np.concatenate([q_coord_t, np.arange(t, t + pad, dtype=np.int32)])
        key_order = np.concatenate([key_order, np.arange(t, t + pad)])
        if q_segment_bt is None:
            q_segment_bt = k_segment_bs = jnp.zeros((b, t), jnp.int32)
        q_segment_bt = jnp.pad(q_segment_bt, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
        k_segment_bs = jnp.pad(k_segment_bs, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    t_all = t + pad
    kernel = _kernel(np.asarray(q_coord_t, np.int32), g_local,
                     _block_for(t_all // q_shards, block), _block_for(t_all, block), q_shards,
                     mesh_context.platform() != "tpu")
    unsorted = not np.array_equal(key_order, np.arange(t_all))
    segments = () if q_segment_bt is None else (q_segment_bt, k_segment_bs)

    def per_device(kernel, q_bthk, k_bsnk, v_bsnk, q_seg=None, k_seg=None):
        if q_shards > 1:
            gather = functools.partial(jax.lax.all_gather, axis_name=length_axes, axis=1, tiled=True)
            k_bsnk, v_bsnk = gather(k_bsnk), gather(v_bsnk)
            k_seg = None if k_seg is None else gather(k_seg)
        if unsorted:
            k_bsnk, v_bsnk = jnp.take(k_bsnk, key_order, axis=1), jnp.take(v_bsnk, key_order, axis=1)
            k_seg = None if k_seg is None else jnp.take(k_seg, key_order, axis=1)
        bl, tl, hl, _ = q_bthk.shape
        nl = k_bsnk.shape[2]
        if one_kv_head:
            first = jax.lax.axis_index(head_axes) * hl // g
            k_bsnk = jax.lax.dynamic_slice_in_dim(k_bsnk, first, 1, axis=2)
            v_bsnk = jax.lax.dynamic_slice_in_dim(v_bsnk, first, 1, axis=2)
            nl = 1
        q_bngtk = q_bthk.reshape(bl, tl, nl, g_local, k).transpose(0, 2, 3, 1, 4)
        k_bnsk, v_bnsk = (x.transpose(0, 2, 1, 3) for x in (k_bsnk, v_bsnk))
        segment_rows = () if q_seg is None else (q_seg, k_seg)

        def one_row(q_ngtk, k_nsk, v_nsk, *segment_row):
            ids = sa.SegmentIds(*segment_row) if segment_row else None
            return jax.vmap(lambda q, k_, v: kernel(q, k_, v, segment_ids=ids))(q_ngtk, k_nsk, v_nsk)

        out_bngtk = jax.vmap(one_row)(q_bngtk, k_bnsk, v_bnsk, *segment_rows)
        return out_bngtk.transpose(0, 3, 1, 2, 4).reshape(bl, tl, hl, k)

    if mesh is None:
        out = per_device(kernel, q_bthk, k_bsnk, v_bsnk, *segments)
    else:
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, q_spec[1])))
        out = jax.shard_map(per_device, mesh=mesh,
                            in_specs=(kernel_spec, q_spec, kv_spec, kv_spec) + (seg_spec,) * len(segments),
                            out_specs=q_spec, check_vma=False)(kernel, q_bthk, k_bsnk, v_bsnk, *segments)
    return out[:, :t]
