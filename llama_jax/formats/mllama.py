"""Hugging Face `MllamaForConditionalGeneration` checkpoints: the weight table and config.json.

Tensor names are the published checkpoints' (`language_model.model.*`,
`language_model.lm_head`, `vision_model.*`, `multi_modal_projector.*`), which
transformers 4.45+ and 5.x read and write. The text model's names come from
`llama_jax.formats.hf_llama.HF_WEIGHTS`; a cross-attention layer has the same MLP and norm
names and its attention under `cross_attn.` instead of `self_attn.`. HF
numbers the decoder layers with the cross-attention ones among them; layer i
is group i // group_size of our stack, at place i % group_size in it.

HF keeps one embedding of vocab_size + 8 rows; ours is the text model's
table plus `extra_embedding` (the rows past the vocabulary), so each is one
block of rows of that tensor.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from llama_jax.config import ConfigError, ModelConfig, VisionConfig
from llama_jax.formats.hf_llama import (HF_WEIGHTS, HFTensor, WeightRule, text_config_from_hf,
                                        text_config_to_hf, text_tensors)

CROSS_ATTENTION_EXTRAS = (
    WeightRule("model.layers.{i}.cross_attn.q_norm.weight", ("attention", "q_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.cross_attn.k_norm.weight", ("attention", "k_norm", "scale"), "copy"),
    WeightRule("model.layers.{i}.cross_attn_attn_gate", ("attention_gate",), "copy"),
    WeightRule("model.layers.{i}.cross_attn_mlp_gate", ("ffn_gate",), "copy"),
)

VISION_WEIGHTS = (  # below "vision_model."; paths below "encoder"
    WeightRule("patch_embedding.weight", ("patch_embedding",), "copy"),
    WeightRule("class_embedding", ("class_embedding",), "copy"),
    WeightRule("gated_positional_embedding.embedding", ("position_embedding",), "copy"),
    WeightRule("gated_positional_embedding.gate", ("position_gate",), "copy"),
    WeightRule("gated_positional_embedding.tile_embedding.weight", ("tile_position_embedding",), "flat"),
    WeightRule("pre_tile_positional_embedding.embedding.weight", ("pre_tile_embedding", "embedding"), "flat"),
    WeightRule("pre_tile_positional_embedding.gate", ("pre_tile_embedding", "gate"), "copy"),
    WeightRule("post_tile_positional_embedding.embedding.weight", ("post_tile_embedding", "embedding"), "flat"),
    WeightRule("post_tile_positional_embedding.gate", ("post_tile_embedding", "gate"), "copy"),
    WeightRule("layernorm_pre.weight", ("norm_pre", "scale"), "copy"),
    WeightRule("layernorm_pre.bias", ("norm_pre", "bias"), "copy"),
    WeightRule("layernorm_post.weight", ("norm_post", "scale"), "copy"),
    WeightRule("layernorm_post.bias", ("norm_post", "bias"), "copy"),
)

ENCODER_LAYER_WEIGHTS = (  # below "vision_model.transformer." (local) or ".global_transformer."
    WeightRule("layers.{i}.self_attn.q_proj.weight", ("wq", "kernel"), "heads_out"),
    WeightRule("layers.{i}.self_attn.k_proj.weight", ("wk", "kernel"), "heads_out"),
    WeightRule("layers.{i}.self_attn.v_proj.weight", ("wv", "kernel"), "heads_out"),
    WeightRule("layers.{i}.self_attn.o_proj.weight", ("wo", "kernel"), "heads_in"),
    WeightRule("layers.{i}.mlp.fc1.weight", ("feed_forward", "fc1", "kernel"), "linear"),
    WeightRule("layers.{i}.mlp.fc1.bias", ("feed_forward", "fc1_bias"), "copy"),
    WeightRule("layers.{i}.mlp.fc2.weight", ("feed_forward", "fc2", "kernel"), "linear"),
    WeightRule("layers.{i}.mlp.fc2.bias", ("feed_forward", "fc2_bias"), "copy"),
    WeightRule("layers.{i}.input_layernorm.weight", ("attention_norm", "scale"), "copy"),
    WeightRule("layers.{i}.input_layernorm.bias", ("attention_norm", "bias"), "copy"),
    WeightRule("layers.{i}.post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy"),
    WeightRule("layers.{i}.post_attention_layernorm.bias", ("ffn_norm", "bias"), "copy"),
)
GATED_LAYER_WEIGHTS = (
    WeightRule("layers.{i}.gate_attn", ("attention_gate",), "copy"),
    WeightRule("layers.{i}.gate_ffn", ("ffn_gate",), "copy"),
)

PROJECTOR_WEIGHTS = (
    WeightRule("multi_modal_projector.weight", ("projector", "kernel"), "linear"),
    WeightRule("multi_modal_projector.bias", ("projector", "bias"), "copy"),
)

TEXT_PREFIX = "language_model."


def mllama_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every tensor of a Mllama checkpoint for this config: text model, projector, image encoder."""
    vis = config.vision
    n_self, cross_at = vis.group(config.n_layers)
    size = n_self + 1
    total = config.n_layers + len(vis.cross_attention_layers)
    self_layers = [i for i in range(total) if i % size != cross_at]
    text = text_tensors(config, self_layers, lambda i: ("layers", f"self_{i % size - (i % size > cross_at)}"),
                        lambda i: i // size, TEXT_PREFIX, embedding_rows=(0, config.vocab_size))
    extra = HFTensor(text[0].name, ("extra_embedding",), None, "copy", 0,
                     (config.vocab_size, config.vocab_size + vis.extra_token_rows))
    cross_rules = [WeightRule(rule.hf_name.replace("self_attn.", "cross_attn."), rule.path, rule.kind)
                   for rule in HF_WEIGHTS if "{i}" in rule.hf_name] + list(CROSS_ATTENTION_EXTRAS)
    cross = [HFTensor(TEXT_PREFIX + rule.hf_name.format(i=i), ("layers", "cross") + rule.path, g, rule.kind,
                      config.head_dim)
             for g, i in enumerate(vis.cross_attention_layers) for rule in cross_rules]
    tensors = [text[0], extra] + text[1:] + cross
    tensors += [HFTensor(rule.hf_name, rule.path, None, rule.kind, 0) for rule in PROJECTOR_WEIGHTS]
    tensors += [HFTensor("vision_model." + rule.hf_name, ("encoder",) + rule.path, None, rule.kind, 0)
                for rule in VISION_WEIGHTS]
    for stack, hf_stack, n, gated in (("local", "transformer", vis.n_layers, False),
                                      ("global", "global_transformer", vis.n_global_layers, True)):
        rules = ENCODER_LAYER_WEIGHTS + (GATED_LAYER_WEIGHTS if gated else ())
        tensors += [HFTensor(f"vision_model.{hf_stack}." + rule.hf_name.format(i=i),
                             ("encoder", stack, "layers") + rule.path, i, rule.kind, vis.head_dim)
                    for i in range(n) for rule in rules]
    return tensors


# ---------------------------------------------------------------- config.json

def config_from_mllama(hf: dict[str, Any], directory: epath.Path | None = None, **overrides) -> ModelConfig:
    """Our ModelConfig from a Mllama `config.json` dict (and its directory's preprocessor_config.json,
    for the pixel mean and std)."""
    text, vision = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
    try:
        cross = list(text["cross_attention_layers"])
        image_size = vision.get("image_size", 448)
        fields = dict(
            dim=vision["hidden_size"], n_layers=vision["num_hidden_layers"],
            n_global_layers=vision["num_global_layers"], n_heads=vision["attention_heads"],
            ffn_dim=vision["intermediate_size"], image_size=image_size, patch_size=vision["patch_size"],
            max_tiles=vision["max_num_tiles"], feature_layers=vision["intermediate_layers_indices"],
            cross_attention_layers=cross, image_token_id=hf["image_token_index"],
            norm_eps=vision.get("norm_eps", 1e-5))
    except KeyError as err:
        raise ConfigError(f"config.json: missing field {err.args[0]}") from None
    if isinstance(image_size, (list, tuple)) or isinstance(fields["patch_size"], (list, tuple)):
        raise ConfigError("config.json: vision image_size and patch_size must be single numbers (square tiles)")
    fields.update(_pixel_statistics(directory))
    vis = VisionConfig(**fields)
    for name, got, expected in (
            ("vision_config.hidden_act", vision.get("hidden_act", "gelu"), "gelu"),
            ("vision_config.num_channels", vision.get("num_channels", 3), 3),
            ("vision_config.vision_output_dim", vision.get("vision_output_dim"), vis.output_dim),
            ("vision_config.supported_aspect_ratios",
             [list(ar) for ar in vision.get("supported_aspect_ratios") or vis.aspect_ratios],
             [list(ar) for ar in vis.aspect_ratios]),
            ("text_config.hidden_act", text.get("hidden_act", "silu"), "silu")):
        if got != expected:
            raise ConfigError(f"config.json: {name} is {got!r}; Llama 3.2 Vision has {expected!r}")
    text.update(model_type="llama", num_hidden_layers=text.get("num_hidden_layers", 0) - len(cross))
    text.setdefault("rope_theta", 500000.0)  # MllamaTextConfig's default theta
    return text_config_from_hf(text, vision=vis, **overrides)


def _pixel_statistics(directory: epath.Path | None) -> dict[str, list[float]]:
    """image_mean and image_std from `directory/preprocessor_config.json`, if there is one."""
    path = None if directory is None else directory / "preprocessor_config.json"
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg})") from None
    return {key: data[key] for key in ("image_mean", "image_std") if key in data}


def config_to_mllama(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A Mllama `config.json` dict (MllamaForConditionalGeneration) readable by transformers 4.45+ and 5.x."""
    vis = config.vision
    text = text_config_to_hf(config.replace(vision=None), torch_dtype)
    for key in ("architectures", "torch_dtype", "dtype", "head_dim", "attention_bias", "mlp_bias"):
        text.pop(key)
    for key in ("bos_token_id", "eos_token_id"):  # MllamaTextConfig takes ints only (its defaults otherwise)
        if text[key] is None:
            del text[key]
    text.update(pad_token_id=None, model_type="mllama_text_model",
                num_hidden_layers=config.n_layers + len(vis.cross_attention_layers),
                cross_attention_layers=list(vis.cross_attention_layers))
    vision = {"model_type": "mllama_vision_model", "hidden_size": vis.dim, "num_hidden_layers": vis.n_layers,
              "num_global_layers": vis.n_global_layers, "attention_heads": vis.n_heads,
              "intermediate_size": vis.ffn_dim, "image_size": vis.image_size, "patch_size": vis.patch_size,
              "max_num_tiles": vis.max_tiles, "intermediate_layers_indices": list(vis.feature_layers),
              "vision_output_dim": vis.output_dim, "norm_eps": vis.norm_eps, "hidden_act": "gelu",
              "num_channels": 3, "supported_aspect_ratios": [list(ar) for ar in vis.aspect_ratios]}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": vis.image_token_id, "text_config": text, "vision_config": vision,
            "torch_dtype": torch_dtype, "dtype": torch_dtype}


def preprocessor_config(vision: VisionConfig) -> dict[str, Any]:
    """preprocessor_config.json for HF's MllamaImageProcessor, equal to llama_jax.vision.image."""
    return {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
            "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
            "do_resize": True, "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
            "max_image_tiles": vision.max_tiles, "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": vision.image_size, "width": vision.image_size}}
