"""LoRA adapters -> a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.

    write_peft(adapters, config, "out/", base_model="meta-llama/Llama-3.2-1B")

Writes `adapter_model.safetensors` and `adapter_config.json`. Names follow
the Hugging Face weight table (llama_jax/formats/hf.py): our `layers/attention/wq`
adapters become `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A`
and `.lora_B`. PEFT computes `W x + (alpha / r) B (A x)` with A [r, in] and
B [out, r] on HF's flattened [out, in] kernels, so our A [*in, r] and B
[r, *out] are flattened and transposed; HF's head order is ours.
"""

from __future__ import annotations

import json
import os

import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert import ConvertError, staged_output
from llama_jax.formats.hf_llama import HF_WEIGHTS

PEFT_PREFIX = "base_model.model."


def _module_names(config: ModelConfig) -> dict[str, str]:
    """Our projection name (wq, ..., w3) -> HF module name (q_proj, ..., up_proj)."""
    return {rule.path[1]: rule.hf_name.split(".")[-2] for rule in HF_WEIGHTS
            if len(rule.path) == 3 and rule.path[1] in config.lora.targets}


def peft_tensors(adapters, config: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensor names and float32 arrays for an adapter tree in scan layout."""
    if config.lora is None:
        raise ConvertError("the model config has no lora section: there are no adapters to export")
    names = _module_names(config)
    tensors = {}
    for rule in HF_WEIGHTS:
        if len(rule.path) != 3 or rule.path[1] not in names:
            continue
        block, weight = rule.path[0], rule.path[1]
        node = adapters.get("layers", {}).get(block, {}).get(weight)
        if node is None:
            raise ConvertError(f"adapters: no lora_a/lora_b for layers/{block}/{weight}")
        lora_a, lora_b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        r = config.lora.rank
        for i in range(config.n_layers):
            stem = PEFT_PREFIX + rule.hf_name.format(i=i).removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(lora_a[i].reshape(-1, r).T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(lora_b[i].reshape(r, -1).T)
    return tensors


def write_peft(adapters, config: ModelConfig, output: str | os.PathLike, base_model: str | None = None) -> None:
    """Write a new PEFT LoRA adapter directory `output` from an adapter tree (scan layout)."""
    from safetensors.numpy import save

    tensors = peft_tensors(adapters, config)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.lora.rank, "lora_alpha": config.lora.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(_module_names(config).values()), "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
    }
    with staged_output(output) as staging:
        (staging / "adapter_model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
