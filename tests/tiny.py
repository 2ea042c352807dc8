"""Tiny model configs shared by the tests, and the HF twin of a config."""

from __future__ import annotations

from llama_jax.config import ModelConfig, RopeScaling

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


def hf_model(config: ModelConfig, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights large enough to matter.

    Weights have std 1/sqrt(dim)-ish and norms are not all ones, so a wrong
    mapping or rotation shows up far above the parity tolerance.
    """
    import torch
    import transformers

    from llama_jax.hf import config_to_hf

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                            if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model
