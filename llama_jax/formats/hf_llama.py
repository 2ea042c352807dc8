"""Hugging Face `LlamaForCausalLM`: the weight-name table and config.json of the text model
(and of `LlamaForSequenceClassification` with one label, a reward model: `score.weight` in
place of `lm_head.weight`, our `head: score`).

One table, `HF_WEIGHTS`, maps every Hugging Face tensor name to a leaf of our
parameter tree and says how its layout differs. Reading and writing both go
through it, so a name is never spelled twice. llama_jax/formats/mllama.py
builds Llama 3.2 Vision's table on this one; llama_jax/formats/hf.py picks
between the two for a config and reads and writes the files.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from llama_jax.config import ConfigError, ModelConfig, RopeScaling


class WeightRule(NamedTuple):
    """Where one HF tensor lives in our tree and how it is laid out there."""

    hf_name: str          # with "{i}" for the layer index
    path: tuple[str, ...]  # our leaf, below the "layers" stack for per-layer weights
    kind: str             # how to turn HF [out, in] into ours; see to_ours


HF_WEIGHTS = (
    WeightRule("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    WeightRule("model.norm.weight", ("norm", "scale"), "copy"),
    WeightRule("lm_head.weight", ("output", "kernel"), "linear"),
    WeightRule("score.weight", ("score", "kernel"), "linear"),  # [1, dim]: the score head's only
    WeightRule("model.layers.{i}.input_layernorm.weight", ("attention_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.self_attn.q_proj.weight", ("attention", "wq", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.k_proj.weight", ("attention", "wk", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.v_proj.weight", ("attention", "wv", "kernel"), "heads_out"),
    WeightRule("model.layers.{i}.self_attn.o_proj.weight", ("attention", "wo", "kernel"), "heads_in"),
    WeightRule("model.layers.{i}.mlp.gate_proj.weight", ("feed_forward", "w1", "kernel"), "linear"),
    WeightRule("model.layers.{i}.mlp.up_proj.weight", ("feed_forward", "w3", "kernel"), "linear"),
    WeightRule("model.layers.{i}.mlp.down_proj.weight", ("feed_forward", "w2", "kernel"), "linear"),
)


def to_ours(kind: str, weight: np.ndarray, head_dim: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One HF tensor ([out, in] for linears) in our layout ([in, ...out]).

    `shape` is our leaf's shape, which the "flat" kind (HF flattens all axes
    after the first) needs.
    """
    if kind == "copy":
        return weight
    if kind == "flat":
        return weight.reshape(shape)
    if kind == "linear":
        return weight.T
    if kind == "heads_out":  # [heads*head_dim, dim] -> [dim, heads, head_dim]
        return weight.T.reshape(weight.shape[1], -1, head_dim)
    if kind == "heads_in":   # [dim, heads*head_dim] -> [heads, head_dim, dim]
        return weight.T.reshape(-1, head_dim, weight.shape[0])
    if kind == "heads_out_pairs":  # heads_out of rows in adjacent-pair rotary order (Llama 4)
        return to_ours("heads_out", pairs_to_halves(weight, head_dim), head_dim)
    if kind in ("gate_half", "up_half"):  # [experts, dim, 2 * ffn]: w1 then w3 along the last axis
        f = weight.shape[-1] // 2
        return weight[..., :f] if kind == "gate_half" else weight[..., f:]
    raise ValueError(f"unknown weight kind {kind!r}")


def to_hf(kind: str, leaf: np.ndarray) -> np.ndarray:
    """The inverse of `to_ours`: our leaf back to HF's [out, in] layout."""
    if kind == "copy":
        return leaf
    if kind == "flat":
        return leaf.reshape(leaf.shape[0], -1)
    if kind == "linear":
        return leaf.T
    if kind == "heads_out":
        return leaf.reshape(leaf.shape[0], -1).T
    if kind == "heads_in":
        return leaf.reshape(-1, leaf.shape[-1]).T
    if kind == "heads_out_pairs":
        return halves_to_pairs(to_hf("heads_out", leaf), leaf.shape[-1])
    if kind in ("gate_half", "up_half"):  # one half; the writer joins the two along the last axis
        return leaf
    raise ValueError(f"unknown weight kind {kind!r}")


def pairs_to_halves(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows [heads * head_dim, cols] from adjacent-pair rotary order (dims 2i, 2i+1: Meta's and
    Llama 4's) to halves order (i, i + head_dim/2: ours), per head."""
    rows, cols = weight.shape
    return weight.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def halves_to_pairs(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """The inverse of `pairs_to_halves`."""
    rows, cols = weight.shape
    return weight.reshape(rows // head_dim, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class HFTensor(NamedTuple):
    """One HF tensor (or a block of its rows) and the leaf of ours it is."""

    name: str                     # the HF tensor's name
    path: tuple[str, ...]         # our leaf, in scan layout
    index: int | None             # the slice of a stacked leaf, None for the whole leaf
    kind: str                     # how its layout differs, see to_ours
    head_dim: int                 # for the heads_out / heads_in kinds
    rows: tuple[int, int] | None = None   # [start, stop) of the HF tensor's rows, None for all


def text_tensors(config: ModelConfig, hf_layers, stack, index, prefix: str = "",
                 embedding_rows: tuple[int, int] | None = None) -> list[HFTensor]:
    """The text model's tensors from `HF_WEIGHTS`, their names prefixed with `prefix`.

    `hf_layers` are HF's indices of the decoder layers; layer i goes to our
    stacked leaf under `stack(i)`, slice `index(i)` (Llama: ("layers",), i).
    `embedding_rows` keeps part of HF's embedding (its first vocab_size rows).
    """
    out = []
    for rule in HF_WEIGHTS:
        if rule.path[0] == "output" and (config.tie_embeddings or config.head == "score"):
            continue
        if rule.path[0] == "score" and config.head != "score":
            continue
        if "{i}" in rule.hf_name:
            out += [HFTensor(prefix + rule.hf_name.format(i=i), stack(i) + rule.path, index(i), rule.kind,
                             config.head_dim) for i in hf_layers]
        else:
            rows = embedding_rows if rule.path[0] == "embed" else None
            out.append(HFTensor(prefix + rule.hf_name, rule.path, None, rule.kind, config.head_dim, rows))
    return out


# ---------------------------------------------------------------- config.json

ARCHITECTURES = {"lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"}


def _head_from_hf(hf: dict[str, Any]) -> str:
    """Our `head` for a config.json: "score" for LlamaForSequenceClassification (one label only)."""
    if ARCHITECTURES["score"] not in (hf.get("architectures") or ()):
        return "lm"
    labels = hf.get("num_labels", len(hf.get("id2label") or {0: None}))
    if labels != 1:
        raise ConfigError(f"config.json: LlamaForSequenceClassification with {labels} labels; only one (a reward "
                          "model's scalar score) is read")
    return "score"


def text_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Our ModelConfig from a Llama `config.json` dict (transformers 4.x or 5.x form)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not llama "
                          "(read here: llama, llama4_text, mllama)")
    # transformers 5.x keeps theta and scaling in rope_parameters; 4.x at top level.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (known: llama3)")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_context=int(scaling["original_max_position_embeddings"]))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("config.json: attention_bias/mlp_bias are not part of Llama")
    # The stored dtype (transformers 5.x: "dtype", 4.x: "torch_dtype") is the default
    # compute and parameter dtype, as transformers itself loads the files.
    stored = hf.get("dtype") or hf.get("torch_dtype")
    dtypes = {"dtype": stored, "param_dtype": stored} if stored in ("bfloat16", "float32", "float16") else {}
    try:
        fields = dict(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            rope_theta=float(theta), rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=hf.get("head_dim"),
            head=_head_from_hf(hf), **dtypes)
    except KeyError as err:
        raise ConfigError(f"config.json: missing field {err.args[0]}") from None
    return ModelConfig(**{**fields, **overrides})


def text_config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A HF `config.json` dict readable by transformers 4.x and 5.x.

    Rope settings are written in both forms: 4.x ignores `rope_parameters`
    and would silently fall back to theta 10000 without `rope_theta`. A score
    model is a LlamaForSequenceClassification with one label (its writer sets
    `pad_token_id`, by which transformers finds each row's last token).
    """
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if scaling:
        rope_parameters = {**scaling, "rope_theta": config.rope_theta}
    labels = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if config.head == "score" else {}
    return {
        "architectures": [ARCHITECTURES[config.head]], "model_type": "llama", **labels,
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_dim, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "rope_theta": config.rope_theta,
        "rope_scaling": scaling, "rope_parameters": rope_parameters, "torch_dtype": torch_dtype,
        "dtype": torch_dtype, "bos_token_id": None, "eos_token_id": None,
    }


