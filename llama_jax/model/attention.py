"""Grouped-query attention: one entry point, implementations chosen by config.

Letters in names: b batch, t query time, s key time, h heads, n kv heads, g
query heads per kv head, k head_dim. Which keys a query sees is decided by
coordinates: key j is visible to query i when `k_coord[j] <= q_coord[i]` and
both belong to the same segment (packed documents never see each other).

Coordinates come in two kinds. A sequence attending to itself (training, a
prompt from its start) has static coordinates: numpy int32 [t], the same for
every row, known when the program is built (its row order, load-balanced
under context parallelism). Attention over a KV cache has traced
coordinates: int32 [b, t] positions and [b, s] cache slots.

Implementations (`ModelConfig.attention`):
- `xla`: scores and softmax as einsums; holds [t, s] float32 scores per head.
- `blocked`: online softmax over blocks with a recomputing backward pass
  (llama_jax/model/blocked_attention.py); memory O(t x block), skips blocks no
  query can see; any coordinates.
- `splash`: the Pallas TPU kernel (llama_jax/model/splash.py), per device under the
  layout in scope, with context parallelism when `length` is split; static
  coordinates only. Where it does not apply (traced coordinates of a KV
  cache, or shapes the layout's axes do not divide, such as
  initialisation's one-token input) it hands over to `blocked`, or to `xla`
  for a single query.
- `auto` (default): on TPU as `splash`; elsewhere `xla` for decode steps
  and up to AUTO_XLA_MAX_KEYS keys, `blocked` beyond (the faster of the two
  on CPU by `python bench/attention.py --cpu`, see docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import mesh_context
from llama_jax.model.blocked_attention import MASKED_SCORE, blocked_attend
from llama_jax.model.splash import fits_layout, splash_attend

AUTO_XLA_MAX_KEYS = 512


def implementation(impl: str, static_coords: bool, q_shape, k_shape) -> str:
    """The implementation `attend` runs for config value `impl` on the platform in scope,
    for queries [b, t, h, k] and keys [b, s, n, k]."""
    (b, t, h, _), (_, s, n, _) = q_shape, k_shape
    if impl == "auto":
        if mesh_context.platform() == "tpu":
            impl = "splash"
        else:
            return "xla" if t == 1 or s <= AUTO_XLA_MAX_KEYS else "blocked"
    if impl == "splash" and not (static_coords and fits_layout(b, t, h, n)):
        return "xla" if t == 1 else "blocked"
    return impl


def attend(q_bthk, k_bsnk, v_bsnk, q_coord, k_coord, q_segment_bt=None, k_segment_bs=None, *,
           impl="auto", block=512):
    """Causal GQA attention; returns [batch, time, heads, head_dim] in q's dtype.

    q_coord / k_coord: static numpy int32 [t] / [s] or traced int32 [b, t] /
    [b, s] (see the module docstring). Scores and softmax are float32
    whatever the compute dtype.
    """
    b, t, h, k = q_bthk.shape
    s, n = k_bsnk.shape[1], k_bsnk.shape[2]
    static = isinstance(q_coord, np.ndarray)
    impl = implementation(impl, static, q_bthk.shape, k_bsnk.shape)
    q_bthk = q_bthk * jnp.asarray(k ** -0.5, q_bthk.dtype)
    if impl == "splash":
        return splash_attend(q_bthk, k_bsnk, v_bsnk, q_coord, k_coord, q_segment_bt, k_segment_bs,
                             block=block).astype(q_bthk.dtype)
    if static:
        q_coord = jnp.broadcast_to(jnp.asarray(q_coord), (b, t))
        k_coord = jnp.broadcast_to(jnp.asarray(k_coord), (b, s))
    q_btngk = q_bthk.reshape(b, t, n, h // n, k)
    if impl == "xla":
        out = _attend_xla(q_btngk, k_bsnk, v_bsnk, q_coord, k_coord, q_segment_bt, k_segment_bs)
    elif impl == "blocked":
        out = blocked_attend(q_btngk, k_bsnk, v_bsnk, q_coord, k_coord, q_segment_bt, k_segment_bs,
                             block)
    else:
        raise ValueError(f"attention: unknown implementation {impl!r}")
    return out.reshape(b, t, h, k).astype(q_bthk.dtype)


def _attend_xla(q_btngk, k_bsnk, v_bsnk, q_coord, k_coord, q_seg, k_seg):
    # Scores as [b, n, t, g, s]: XLA:CPU then needs no transpose of the
    # (large) scores between the two matmuls; measured 10% faster than
    # [b, n, g, t, s] for forward+backward at 512 tokens.
    scores = jnp.einsum("btngk,bsnk->bntgs", q_btngk, k_bsnk,
                        preferred_element_type=jnp.float32)
    mask_bts = k_coord[:, None, :] <= q_coord[:, :, None]
    if q_seg is not None:
        mask_bts &= k_seg[:, None, :] == q_seg[:, :, None]
    scores = jnp.where(mask_bts[:, None, :, None, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bsnk.dtype)
    return jnp.einsum("bntgs,bsnk->btngk", probs, v_bsnk)
