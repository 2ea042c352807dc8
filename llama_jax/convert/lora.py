"""A LoRA run's adapters out: folded into the weights, or as a PEFT adapter directory.

    python -m llama_jax.convert.lora merge RUN_OR_CKPT OUT_DIR [--step N]   # our checkpoint, adapters folded in
    python -m llama_jax.convert.lora peft  RUN_OR_CKPT OUT_DIR [--step N] [--base-model NAME]

RUN_OR_CKPT is a LoRA training run directory (or its checkpoints/): its
checkpoints hold the adapters and name the weights they adapt. `merge`
writes W + (alpha / rank) A B into a plain checkpoint that `ours_to_hf`
exports and `python -m infer` serves; `peft` writes adapter_model.safetensors
and adapter_config.json for `peft.PeftModel.from_pretrained` on the
Hugging Face base.
"""

from __future__ import annotations

import argparse

from llama_jax.cli import run_cli
from llama_jax.convert import ConvertError
from llama_jax.convert.peft import write_peft
from llama_jax.formats import checkpoint, weights
from llama_jax.model import lora
from llama_jax.model.lora import is_adapter


def _lora_checkpoint(source, step: int | None):
    """(directory, step, config with lora) of a LoRA run's checkpoint; ConvertError otherwise."""
    kind, directory = weights.resolve(source)
    step = checkpoint.resolve_step(directory, step) if kind == "ours" else None
    config = weights.stored_config(source)
    if kind != "ours" or config.lora is None or weights.base_of(directory, step) is None:
        raise ConvertError(f"{source}: not a LoRA run's checkpoint (no adapters to export)")
    return directory, step, config


def merge_lora(source, output, step: int | None = None):
    """Write a new checkpoint `output` with the adapters of `source` folded into its weights."""
    directory, step, config = _lora_checkpoint(source, step)
    params = weights.load_params(directory, config, step=step)
    merged, plain = lora.merge(params, config)
    checkpoint.save_params(output, plain, merged, step=0)
    return plain


def export_peft(source, output, step: int | None = None, base_model: str | None = None):
    """Write the adapters of `source` as a new PEFT adapter directory `output`."""
    directory, step, config = _lora_checkpoint(source, step)
    _, adapters = checkpoint.restore_params(directory, step, config=config, only=is_adapter)
    write_peft(adapters, config, output, base_model=base_model or weights.base_of(directory, step))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert.lora", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("merge", "peft"), help="fold the adapters in, or export them for peft")
    parser.add_argument("source", help="a LoRA training run directory or its checkpoints/")
    parser.add_argument("output", help="new directory to create")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--base-model", help="peft: base_model_name_or_path to write (default: the run's base)")
    args = parser.parse_args(argv)
    if args.what == "merge":
        merge_lora(args.source, args.output, args.step)
    else:
        export_peft(args.source, args.output, args.step, args.base_model)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
