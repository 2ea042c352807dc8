"""Hugging Face `Llama4ForCausalLM` (model_type "llama4_text"): weight table and config.json.

The text model of Llama 4 Scout and Maverick. Beside Llama's tensors
(llama_jax/formats/hf_llama.py) a MoE layer has

    feed_forward.router.weight              [experts, dim]
    feed_forward.experts.gate_up_proj       [experts, dim, 2 * expert ffn]   (w1 | w3, side by side)
    feed_forward.experts.down_proj          [experts, expert ffn, dim]       (w2, already [in, out])
    feed_forward.shared_expert.{gate,up,down}_proj.weight

and a dense layer `feed_forward.{gate,up,down}_proj.weight` (no `mlp.`).

Rotary pairs: transformers' Llama 4 rotates adjacent pairs (dims 2i, 2i+1, as
complex numbers, like Meta's checkpoints) where our `apply_rotary` rotates
halves (i, i + head_dim/2); the q and k projections' rows are therefore
permuted within each head on the way in ("heads_out_pairs") and back on the
way out. The attention scores are unchanged: q and k get the same
permutation, and the L2 norm of QK norm does not see the order.

`gate_up_proj` holds two of our leaves; it is read once for each (its
halves), so a reader holds one such tensor at a time.
"""

from __future__ import annotations

from typing import Any

from llama_jax.config import ConfigError, ModelConfig, MoeConfig, RopeScaling, TemperatureTuning
from llama_jax.formats.hf_llama import HF_WEIGHTS, HFTensor, WeightRule

# Llama 4 has no score-head (reward model) form here: the dense Llama's score.weight is left out.
GLOBAL_WEIGHTS = tuple(rule for rule in HF_WEIGHTS if "{i}" not in rule.hf_name and rule.path[0] != "score")
ATTENTION_WEIGHTS = (
    WeightRule("model.layers.{i}.input_layernorm.weight", ("attention_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.self_attn.q_proj.weight", ("attention", "wq", "kernel"), "heads_out_pairs"),
    WeightRule("model.layers.{i}.self_attn.k_proj.weight", ("attention", "wk", "kernel"), "heads_out_pairs"),
    WeightRule("model.layers.{i}.self_attn.v_proj.weight", ("attention", "wv", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.o_proj.weight", ("attention", "wo", "kernel"), "heads_in"),
)
DENSE_WEIGHTS = (
    WeightRule("model.layers.{i}.feed_forward.gate_proj.weight", ("feed_forward", "w1", "kernel"), "linear"),
    WeightRule("model.layers.{i}.feed_forward.up_proj.weight", ("feed_forward", "w3", "kernel"), "linear"),
    WeightRule("model.layers.{i}.feed_forward.down_proj.weight", ("feed_forward", "w2", "kernel"), "linear"),
)
MOE_WEIGHTS = (
    WeightRule("model.layers.{i}.feed_forward.router.weight", ("feed_forward", "router", "kernel"), "linear"),
    WeightRule("model.layers.{i}.feed_forward.experts.gate_up_proj", ("feed_forward", "w1"), "gate_half"),
    WeightRule("model.layers.{i}.feed_forward.experts.gate_up_proj", ("feed_forward", "w3"), "up_half"),
    WeightRule("model.layers.{i}.feed_forward.experts.down_proj", ("feed_forward", "w2"), "copy"),
)
SHARED_EXPERT_WEIGHTS = tuple(
    WeightRule(rule.hf_name.replace("feed_forward.", "feed_forward.shared_expert."),
               ("feed_forward", "shared_expert") + rule.path[1:], rule.kind) for rule in DENSE_WEIGHTS)


def layer_slot(config: ModelConfig, i: int) -> tuple[tuple[str, ...], int]:
    """(the stacked subtree, the index in it) of decoder layer i in scan layout: layer i % period
    of block i // period, or the plain layer stack when the pattern is one layer."""
    period = config.layer_period
    return (("layers", f"layer_{i % period}") if period > 1 else ("layers",)), i // period


def llama4_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every tensor of a Llama4ForCausalLM checkpoint for this config, in HF's order."""
    out = []
    for rule in GLOBAL_WEIGHTS:
        if not (rule.path[0] == "output" and config.tie_embeddings):
            out.append(HFTensor(rule.hf_name, rule.path, None, rule.kind, config.head_dim))
    for i in range(config.n_layers):
        kind = config.layer_kind(i)
        rules = ATTENTION_WEIGHTS + (MOE_WEIGHTS + SHARED_EXPERT_WEIGHTS * config.moe.shared_expert
                                     if kind.moe else DENSE_WEIGHTS)
        stack, index = layer_slot(config, i)
        out += [HFTensor(rule.hf_name.format(i=i), stack + rule.path, index, rule.kind, config.head_dim)
                for rule in rules]
    return out


# ---------------------------------------------------------------- config.json

def is_llama4(config: ModelConfig) -> bool:
    """Whether a config needs Llama 4's checkpoint format (experts, NoPE or chunked layers)."""
    return config.moe is not None or config.nope_layer_interval is not None \
        or config.attention_chunk_size is not None or config.qk_norm


def config_from_llama4(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a Llama4TextConfig `config.json` dict (or a Llama4Config's text_config)."""
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 500000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ConfigError(f"config.json: rope type {scaling.get('rope_type')!r} is not supported (known: llama3)")
        rope_scaling = RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                                   high_freq_factor=float(scaling["high_freq_factor"]),
                                   original_context=int(scaling["original_max_position_embeddings"]))
    stored = hf.get("dtype") or hf.get("torch_dtype")
    dtypes = {"dtype": stored, "param_dtype": stored} if stored in ("bfloat16", "float32", "float16") else {}
    tuning = None
    if hf.get("attn_temperature_tuning", True):  # published files say 4 (truthy) or true
        tuning = TemperatureTuning(float(hf.get("floor_scale", 8192)), float(hf.get("attn_scale", 0.1)))
    try:
        n_layers = hf["num_hidden_layers"]
        moe = MoeConfig(n_experts=hf["num_local_experts"], ffn_dim_expert=hf["intermediate_size"],
                        top_k=hf.get("num_experts_per_tok", 1),
                        interleave_step=hf.get("interleave_moe_layer_step", 1))
        fields = dict(
            dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf.get("intermediate_size_mlp", 16384), vocab_size=hf["vocab_size"],
            head_dim=hf.get("head_dim"), rope_theta=float(theta), rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 131072), norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
            attention_chunk_size=hf.get("attention_chunk_size"),
            nope_layer_interval=_nope_interval(hf, n_layers), qk_norm=bool(hf.get("use_qk_norm", True)),
            attn_temperature_tuning=tuning, **dtypes)
    except KeyError as err:
        raise ConfigError(f"config.json: missing field {err.args[0]}") from None
    if hf.get("attention_bias"):
        raise ConfigError("config.json: attention_bias is not part of Llama 4")
    config = ModelConfig(**{**fields, **overrides})
    # Explicit per-layer lists must be the patterns our fields describe.
    for key, want in (("moe_layers", [i for i in range(n_layers) if config.layer_kind(i).moe]),
                      ("no_rope_layers", [int(config.layer_kind(i).rope) for i in range(n_layers)])):
        if hf.get(key) is not None and list(hf[key]) != want:
            raise ConfigError(f"config.json: {key} {list(hf[key])} is not a repeating pattern "
                              "(interleave_moe_layer_step, no_rope_layer_interval) this model supports")
    return config


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _nope_interval(hf: dict[str, Any], n_layers: int) -> int | None:
    """no_rope_layer_interval, or None where no layer is NoPE (no_rope_layers all 1)."""
    listed = hf.get("no_rope_layers")
    interval = hf.get("no_rope_layer_interval", 4)
    if (listed is not None and all(listed)) or interval is None or interval > n_layers:
        return None
    return interval


def config_to_llama4(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A Llama4TextConfig `config.json` dict (Llama4ForCausalLM) readable by transformers 4.51+ and 5.x."""
    if config.moe is None:
        raise ConfigError("moe: a Llama 4 checkpoint needs a moe section")
    n = config.n_layers
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
    tuning = config.attn_temperature_tuning
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "hidden_size": config.dim, "num_hidden_layers": n, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.moe.ffn_dim_expert, "intermediate_size_mlp": config.ffn_dim,
        "num_local_experts": config.moe.n_experts, "num_experts_per_tok": config.moe.top_k,
        "interleave_moe_layer_step": config.moe.interleave_step,
        "moe_layers": [i for i in range(n) if config.layer_kind(i).moe],
        "no_rope_layers": [int(config.layer_kind(i).rope) for i in range(n)],
        "no_rope_layer_interval": config.nope_layer_interval or n + 1,  # n + 1: none (no_rope_layers says so)
        "attention_chunk_size": config.attention_chunk_size, "use_qk_norm": config.qk_norm,
        "attn_temperature_tuning": tuning is not None,
        "floor_scale": _number(tuning.floor_scale) if tuning else 8192,  # transformers 5 wants an int "attn_scale": tuning.attn_scale if tuning else 0.1,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "rope_theta": config.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta},
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "bos_token_id": None, "eos_token_id": None,
    }
