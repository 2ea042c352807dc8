"""The auxiliary losses of mixture-of-experts routers (Llama 4), added to cross-entropy.

The model returns its routers' statistics (`Llama(..., return_aux=True)`, summed
over the MoE layers; llama_jax/model/moe.py `router_statistics`): Switch
Transformer's load-balancing loss and ST-MoE's router z-loss, each a mean over
the micro-batch's tokens. Meta's reference and transformers' Llama4ForCausalLM
train with neither, so their weights (`moe.load_balance_weight`,
`moe.router_z_weight` in the model config) default to 0.

Objectives are sums over tokens (train/step.py divides once by the batch's
weight), so the per-token mean enters times the micro-batch's loss weight.
"""

from __future__ import annotations

import jax

from llama_jax.config import MoeConfig

METRICS = {"load_balance": "router_load_balance", "router_z": "router_z_loss"}


def router_terms(moe: MoeConfig, statistics: dict[str, jax.Array], weight: jax.Array):
    """(term to add to the summed objective, {metric name: sum to log}) for one micro-batch
    of total loss weight `weight` (the step logs each sum divided by the batch's weight)."""
    value = (moe.load_balance_weight * statistics["load_balance"] + moe.router_z_weight * statistics["router_z"])
    return value * weight, {METRICS[name]: x * weight for name, x in statistics.items()}
