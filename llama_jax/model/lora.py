"""Low-rank adapters as parameters: separate them from the base, fold them in.

With `ModelConfig.lora` set, every targeted projection holds `lora_a`
[*in_axes, rank] and `lora_b` [rank, *out_axes] beside its `kernel`
(llama_jax/model/llama.py, `Linear`), and computes `x W + (alpha / rank) (x A) B`.
A LoRA run trains the adapter leaves only; `merge` folds them into the
kernels, giving a plain model that computes the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model.trees import partition

ADAPTER_LEAVES = ("lora_a", "lora_b")


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether the leaf at `path` (key names) is an adapter weight."""
    return path[-1] in ADAPTER_LEAVES


def split_adapters(params) -> tuple[dict, dict]:
    """(adapters, base): two trees of the same nesting, holding the adapter leaves and the rest."""
    return partition(params, is_adapter)


def count_adapter_params(params) -> int:
    """Number of adapter parameters in a tree."""
    adapters, _ = split_adapters(params)
    return sum(leaf.size for leaf in jax.tree.leaves(adapters))


def _delta(lora_a, lora_b, scale: float):
    """(alpha / rank) A B with A's last (rank) axis contracted against B's first."""
    return scale * jnp.tensordot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), axes=1)


def merge(params, config: ModelConfig):
    """(params without adapters, config without lora): kernels become W + (alpha / rank) A B.

    The merged kernels keep the base's dtype. Works on scan (stacked) and
    unrolled parameter trees.
    """
    if config.lora is None:
        raise ValueError("merge: the config has no lora section, so there are no adapters to fold in")
    if config.quantize is not None:
        raise ValueError(f"merge: the base is quantised ({config.quantize}); fold the adapters into the "
                         "unquantised base, then quantise the merged checkpoint")
    scale = config.lora.scale

    def fold(node, stacked: bool):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            delta = jax.vmap(_delta, in_axes=(0, 0, None))(node["lora_a"], node["lora_b"], scale) \
                if stacked else _delta(node["lora_a"], node["lora_b"], scale)
            kernel = node["kernel"]
            return {"kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
        return {key: fold(value, stacked or key == "layers") for key, value in node.items()}

    return fold(params, False), config.replace(lora=None)
