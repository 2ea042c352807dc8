"""Tiny model configs shared by the tests, the HF twin of a config, and large random HF
directories for memory tests and bench/load.py."""

from __future__ import annotations

import json
import math

import numpy as np

from llama_jax.config import ModelConfig, MoeConfig, RopeScaling, TemperatureTuning, VisionConfig
from llama_jax.formats.hf import config_to_hf

# Each shape stands for one generation's distinguishing features.
LLAMA2_LIKE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160,
                          vocab_size=300, rope_theta=10000.0, max_seq_len=512)
LLAMA3_LIKE = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=192,
                          vocab_size=320, rope_theta=500000.0, max_seq_len=512)
# original_context 64 puts the high (< 16), blended (16..64) and low (> 64)
# wavelength bands all inside a 256-token input with head_dim 16.
LLAMA31_LIKE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                           vocab_size=256, rope_theta=500000.0, max_seq_len=512,
                           rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_context=64))
LLAMA32_LIKE = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256,
                           vocab_size=256, rope_theta=500000.0, max_seq_len=512, tie_embeddings=True,
                           rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_context=64))
SHAPES = {"llama2": LLAMA2_LIKE, "llama3": LLAMA3_LIKE, "llama3_1": LLAMA31_LIKE, "llama3_2": LLAMA32_LIKE}

# Llama 3.2 Vision's shape in small: 4 self-attention layers and 2 cross-attention
# layers (HF's 1 and 4, so groups of three with the cross-attention layer second),
# 28-pixel tiles of 4 x 4 patches (17 tokens, padded to 24), at most 2 tiles.
# Heads, kv heads, mlp and both widths divide by 8 and by fsdp 4 x tensor 2.
VISION_LIKE = ModelConfig(
    dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=128, vocab_size=320, rope_theta=500000.0,
    max_seq_len=512, vision=VisionConfig(
        dim=64, n_layers=4, n_global_layers=2, n_heads=8, ffn_dim=128, image_size=28, patch_size=7,
        max_tiles=2, feature_layers=(1, 3), cross_attention_layers=(1, 4), image_token_id=320))


# Llama 4 in small: 8 layers in 2 repeats of the 4-layer pattern (NoPE every 4th layer, chunked
# attention of 32 positions elsewhere), with temperature tuning from position 15 on.
# Maverick's shape: MoE in every second layer (dense between), no QK norm, no rope scaling.
# Scout's: MoE in every layer, QK norm, llama3 scaling with equal low and high factors (Scout's
# 1 and 1, original context 64 so the cut falls inside head_dim 16's frequencies), top 2 experts.
LLAMA4_MAVERICK_LIKE = ModelConfig(
    dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, rope_theta=500000.0,
    max_seq_len=512, moe=MoeConfig(n_experts=4, ffn_dim_expert=64, interleave_step=2),
    attention_chunk_size=32, nope_layer_interval=4, qk_norm=False,
    attn_temperature_tuning=TemperatureTuning(floor_scale=16.0, attn_scale=0.1))
LLAMA4_SCOUT_LIKE = LLAMA4_MAVERICK_LIKE.replace(
    moe=MoeConfig(n_experts=4, ffn_dim_expert=64, top_k=2, interleave_step=1), qk_norm=True,
    rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_context=64))
LLAMA4_SHAPES = {"maverick": LLAMA4_MAVERICK_LIKE, "scout": LLAMA4_SCOUT_LIKE}


def hf_llama4_model(config: ModelConfig, seed: int = 0):
    """A transformers Llama4ForCausalLM with random weights large enough to matter (as `hf_model`)."""
    import torch
    import transformers

    hf_config = transformers.Llama4TextConfig(**{k: v for k, v in config_to_hf(config).items()
                                                 if k not in ("architectures", "torch_dtype", "dtype")})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # experts' [experts, in, out] tensors have their fan-in second
                p.copy_(torch.randn_like(p) / p.shape[1 if p.ndim == 3 else -1] ** 0.5)
    return model


def hf_model(config: ModelConfig, seed: int = 0, pad_token_id: int | None = None):
    """A transformers LlamaForCausalLM with random weights large enough to matter
    (LlamaForSequenceClassification with one label for a config with the score head, which
    finds each row's last token by `pad_token_id`).

    Weights have std 1/sqrt(dim)-ish and norms are not all ones, so a wrong
    mapping or rotation shows up far above the parity tolerance.
    """
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                            if k not in ("architectures", "torch_dtype", "dtype")},
                                         **({} if pad_token_id is None else {"pad_token_id": pad_token_id}))
    torch.manual_seed(seed)
    cls = transformers.LlamaForSequenceClassification if config.head == "score" else transformers.LlamaForCausalLM
    model = cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def hf_vision_model(config: ModelConfig, seed: int = 0):
    """A transformers MllamaForConditionalGeneration with random weights large enough to matter.

    As `hf_model`, and every gate is opened (tanh far from 0 and from 1), so
    each gated path (tile and position embeddings, global layers,
    cross-attention layers) changes the logits.
    """
    import torch
    import transformers

    hf_config = transformers.MllamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                             if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(0.6 + 0.3 * torch.randn_like(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1 or "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p.numel() / p.shape[0]) ** 0.5)
    return model


def save_hf_vision_model(config: ModelConfig, directory, seed: int = 0):
    """`hf_vision_model` saved in `directory` with a preprocessor_config.json for the config; returns it."""
    from llama_jax.formats.mllama import preprocessor_config

    model = hf_vision_model(config, seed)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config.vision)))
    return model


def write_random_hf(directory, config, dtype="float32"):
    """A HF checkpoint of random weights that do not compress, like trained weights, one
    safetensors file per layer, written a block at a time: float32 random normal, or
    bfloat16 random bit patterns below 2 in magnitude (fast to make in bulk)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, dtype)))
    tag, size = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}[dtype]
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.dim), "model.norm.weight": (config.dim,),
              "lm_head.weight": (config.vocab_size, config.dim)}
    files = {"model-globals.safetensors": dict(shapes)}
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        files[f"model-layer{i}.safetensors"] = {
            p + "self_attn.q_proj.weight": (q, config.dim), p + "self_attn.k_proj.weight": (kv, config.dim),
            p + "self_attn.v_proj.weight": (kv, config.dim), p + "self_attn.o_proj.weight": (config.dim, q),
            p + "mlp.gate_proj.weight": (config.ffn_dim, config.dim),
            p + "mlp.up_proj.weight": (config.ffn_dim, config.dim),
            p + "mlp.down_proj.weight": (config.dim, config.ffn_dim),
            p + "input_layernorm.weight": (config.dim,), p + "post_attention_layernorm.weight": (config.dim,)}
    weight_map, total = {}, 0
    for filename, tensors in files.items():
        header, offset = {}, 0
        for name, shape in tensors.items():
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size * math.prod(shape)]}
            offset += size * math.prod(shape)
            weight_map[name] = filename
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / filename, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for name, shape in tensors.items():
                count = math.prod(shape)
                while count:
                    block = min(count, 4 << 20)
                    if dtype == "float32":
                        f.write(rng.standard_normal(block, dtype=np.float32).tobytes())
                    else:  # clearing the exponent's top bit keeps every value finite and below 2
                        f.write((np.frombuffer(rng.bytes(2 * block), np.uint16) & 0xBFFF).tobytes())
                    count -= min(count, 4 << 20)
        total += offset
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, size * max(math.prod(s) for t in files.values() for s in t.values())
