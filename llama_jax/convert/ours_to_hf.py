"""Our orbax checkpoint -> a Hugging Face directory `LlamaForCausalLM.from_pretrained` loads
(`MllamaForConditionalGeneration` for a Llama 3.2 Vision model, with preprocessor_config.json;
`LlamaForSequenceClassification` with one label and a pad id for a reward model).

    python -m llama_jax.convert.ours_to_hf CKPT_OR_RUN_DIR OUT_DIR [--dtype bfloat16] [--step N]
        [--tokenizer DIR] [--max-shard-gb 5] [--bos-token-id N] [--eos-token-id N ...] [--pad-token-id N]

Writes model-0000K-of-0000N.safetensors files with model.safetensors.index.json,
config.json (rope settings in both the transformers 4.x and 5.x forms, from
`llama_jax.formats.hf.config_to_hf`), generation_config.json, and every file of
the tokenizer (`TOKENIZER_FILES`: tokenizer.json or tokenizer.model, its config,
special tokens map, and the chat template, chat_template.jinja, that
transformers' `apply_chat_template` reads). No code of ours is needed to load
the result.

The tokenizer is --tokenizer, else the one saved with the checkpoint: in its
directory or the parent (a run's), as `load_model` and `infer.serve` find it.

Special ids: config.json gets the BOS and EOS ids, generation_config.json
BOS and every id that ends generation (Llama 3: end_of_text, eom_id, eot_id),
so transformers' `generate` stops where our `generate` does. They come from
the flags, else the tokenizer (`llama_jax.text.tokenizer.load_tokenizer`), else
the published vocabulary sizes of Llama 2 and 3; with none of these the export
is refused (one line asking for --tokenizer) rather than written without them.

Streaming: tensor names, shapes and byte offsets are all known from the
config, so each file's safetensors header is written first and the tensors
are then read one at a time from the checkpoint (one layer slice of a stacked
leaf) and appended. Memory bound: baseline + about 3x the largest tensor (the
decoded chunk, the transposed copy in the output dtype) for checkpoints
chunked one layer per chunk, as `save_params` and the converters write them.
Reading a layer of a checkpoint whose chunks span k layers decodes the whole
chunk: k layers of that leaf in memory, and k times the work.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import ml_dtypes
import numpy as np
from etils import epath

from llama_jax.formats.checkpoint_io import ParamsReader, as_contiguous
from llama_jax.cli import run_cli
from llama_jax.convert import DTYPES, ConvertError, progress, staged_output
from llama_jax.formats.hf import config_to_hf, hf_tensors
from llama_jax.formats.hf_llama import to_hf
from llama_jax.formats.weights import resolve
from llama_jax.paths import user_path
from llama_jax.text.tokenizer import load_tokenizer, tokenizer_beside
from llama_jax.formats.mllama import preprocessor_config

HALVES = ("gate_half", "up_half")  # kinds of two leaves HF keeps side by side in one tensor
SAFETENSORS_DTYPES = {"bfloat16": ("BF16", ml_dtypes.bfloat16), "float32": ("F32", np.float32)}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
# BOS and the ids that end generation (EOS first) of the two tokenizer families
# (REFERENCE.md), by vocabulary size, for exports without a tokenizer or flags.
KNOWN_SPECIAL_IDS = {32000: (1, (2,)), 128256: (128000, (128001, 128008, 128009)),
                     202048: (200000, (200001, 200007, 200008))}


def export_hf(checkpoint_dir: str | os.PathLike, output: str | os.PathLike, dtype: str = "bfloat16",
              step: int | None = None, tokenizer: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 10**9,
              bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
              show_progress: bool = True, pad_token_id: int | None = None) -> None:
    """Write checkpoint step `step` (latest by default) as a new HF directory `output` in `dtype`.

    checkpoint_dir: our checkpoint directory, or a training run directory (its checkpoints/).
    tokenizer: a directory whose tokenizer files are copied; BOS, EOS and the
      stop ids are read from them. None: the tokenizer saved with the checkpoint
      (its directory or the parent), if any. bos_token_id / eos_token_id (one id
      or a list, EOS first) override them. ConvertError (one line) when no stop
      ids are known.
    pad_token_id: a reward model's (score head: LlamaForSequenceClassification)
      pad id in config.json, by which transformers finds each row's last token;
      default the tokenizer's pad id, else 0 (`_pad_id`).
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ConvertError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    kind, directory = resolve(checkpoint_dir)  # a run directory stands for its checkpoints/, as in infer
    if kind == "hf":
        raise ConvertError(f"{checkpoint_dir}: already a Hugging Face directory (config.json); "
                           "export one of our checkpoints or a run directory")
    tokenizer = user_path(tokenizer) if tokenizer else tokenizer_beside(directory)
    tokenizer_files = _tokenizer_files(tokenizer) if tokenizer is not None else []
    reader = ParamsReader(directory, step)
    config = reader.config
    if config.quantize is not None:
        raise ConvertError(f"{checkpoint_dir}: its weights are stored quantised ({config.quantize}); "
                           "export the unquantised checkpoint it was made from")
    tag, np_dtype = SAFETENSORS_DTYPES[dtype]
    tensors = _tensor_plan(config, reader)
    files = _split_into_files(tensors, np.dtype(np_dtype).itemsize, max_shard_bytes)
    token_rows = config.vocab_size + (config.vision.extra_token_rows if config.vision is not None else 0)
    bos, stops = _special_ids(token_rows, tokenizer, bos_token_id, eos_token_id)
    if not stops:
        raise ConvertError(f"{checkpoint_dir}: no tokenizer here or in the parent directory, and a vocabulary of "
                           f"{token_rows} ids is neither Llama 2's nor Llama 3's: the ids that end generation are "
                           "unknown; pass --tokenizer DIR (or --eos-token-id)")
    pad = _pad_id(tokenizer, pad_token_id, bos, stops) if config.head == "score" else None
    with staged_output(output) as staging:
        weight_map = {}
        with progress(sum(len(t[2]) for t in tensors), "ours -> hf", show_progress) as bar:
            for k, group in enumerate(files):
                name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                _write_safetensors(staging / name, group, tag, np_dtype, reader, bar)
                weight_map.update({t[0]: name for t in group})
        total = sum(math.prod(t[1]) for t in tensors) * np.dtype(np_dtype).itemsize
        _write_json(staging / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        hf_config = config_to_hf(config, torch_dtype=dtype)
        ids = {"bos_token_id": bos, "eos_token_id": stops[0] if stops else None}
        if config.head == "score":
            ids["pad_token_id"] = pad
        if "text_config" in hf_config:  # Mllama: ids in the text config, ints only
            hf_config["text_config"].update({key: i for key, i in ids.items() if i is not None})
        else:
            hf_config.update(ids)
        _write_json(staging / "config.json", hf_config)
        if config.vision is not None:
            _write_json(staging / "preprocessor_config.json", preprocessor_config(config.vision))
        generation = {"_from_model_config": True}
        if bos is not None:
            generation["bos_token_id"] = bos
        if stops:
            generation["eos_token_id"] = stops[0] if len(stops) == 1 else list(stops)
        _write_json(staging / "generation_config.json", generation)
        for path in tokenizer_files:
            (staging / path.name).write_bytes(path.read_bytes())


def _tensor_plan(config, reader):
    """(hf name, hf shape, pieces) in HF's usual order (embedding, layer by layer, norm, head, then
    any others); pieces are (our path, layer, kind), one per block of rows (several only where HF
    keeps two of our leaves as one tensor)."""
    order = {"embed": 0, "extra_embedding": 0, "layers": 1, "norm": 2, "output": 3, "score": 3}
    plan = []
    by_place = lambda t: (order.get(t.path[0], 4), -1 if t.index is None else t.index)  # noqa: E731
    for t in sorted(hf_tensors(config), key=by_place):
        shape = _hf_shape(t.kind, tuple(reader.leaves[t.path].shape[0 if t.index is None else 1:]))
        if plan and plan[-1][0] == t.name:  # the next block of rows (or half, HALVES) of the same tensor
            name, first, pieces = plan.pop()
            shape = first[:-1] + (2 * first[-1],) if t.kind in HALVES else (first[0] + shape[0],) + first[1:]
            plan.append((name, shape, pieces + [(t.path, t.index, t.kind)]))
        else:
            plan.append((t.name, shape, [(t.path, t.index, t.kind)]))
    return plan


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind in ("copy",) + HALVES:
        return shape
    if kind == "linear":
        return shape[::-1]
    if kind == "flat":
        return (shape[0], math.prod(shape[1:]))
    if kind in ("heads_out", "heads_out_pairs"):   # [dim, heads, head_dim] -> [heads*head_dim, dim]
        return (shape[1] * shape[2], shape[0])
    return (shape[2], shape[0] * shape[1])  # heads_in: [heads, head_dim, dim] -> [dim, heads*head_dim]


def _split_into_files(tensors, itemsize: int, max_bytes: int):
    files, current, size = [], [], 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * itemsize
        if current and size + nbytes > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    return files + [current] if current else files


def _write_safetensors(path: epath.Path, tensors, tag: str, np_dtype, reader: ParamsReader, bar) -> None:
    """Header first (all offsets are known), then each tensor as it is read, block by block."""
    header, offset, itemsize = {"__metadata__": {"format": "pt"}}, 0, np.dtype(np_dtype).itemsize
    for name, shape, _ in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the tensor data 8-byte aligned
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape, pieces in tensors:
            rows = 0
            if pieces[0][2] in HALVES:  # Llama 4's experts.gate_up_proj: w1 and w3 side by side
                halves = [to_hf(kind, reader.read(our_path, layer)) for our_path, layer, kind in pieces]
                weight = as_contiguous(np.concatenate(halves, axis=-1), np_dtype)
                if weight.shape != tuple(shape):
                    raise ConvertError(f"{name}: checkpoint gives shape {weight.shape}, expected {tuple(shape)}")
                f.write(weight.reshape(-1).view(np.uint8).data)
                del weight, halves
                bar.update(len(pieces))
                continue
            for our_path, layer, kind in pieces:
                weight = as_contiguous(to_hf(kind, reader.read(our_path, layer)), np_dtype)
                rows += weight.shape[0]
                if weight.shape[1:] != tuple(shape[1:]) or rows > shape[0]:
                    raise ConvertError(f"{name}: checkpoint gives shape {weight.shape}, expected {tuple(shape)}")
                f.write(weight.reshape(-1).view(np.uint8).data)
                del weight
                bar.update()


def _special_ids(vocab_size: int, tokenizer: epath.Path | None, bos_token_id: int | None,
                 eos_token_id: int | list[int] | None) -> tuple[int | None, tuple[int, ...]]:
    """BOS and the ids that end generation, EOS first: flags, else the tokenizer, else the vocabulary size."""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok.vocab_size > vocab_size:
            raise ConvertError(f"{tokenizer}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary "
                               f"is {vocab_size}; pass the model's own tokenizer")
        bos, stops = tok.bos_id, (tok.eos_id, *sorted(tok.stop_ids - {tok.eos_id}))
    else:
        bos, stops = KNOWN_SPECIAL_IDS.get(vocab_size, (None, ()))
    if bos_token_id is not None:
        bos = bos_token_id
    if eos_token_id is not None:
        stops = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
    return bos, stops


def _pad_id(tokenizer: epath.Path | None, pad_token_id: int | None, bos: int | None, stops) -> int:
    """A score model's pad id: the flag, else the tokenizer's, else 0 (Llama 2's <unk>). transformers'
    LlamaForSequenceClassification scores each row at its last id that is not this one, so an id
    that may end a conversation (BOS, EOS, a stop id) would move the score off the last token."""
    pad = pad_token_id
    if pad is None and tokenizer is not None:
        pad = load_tokenizer(tokenizer).pad_id
    pad = 0 if pad is None else pad
    if pad == bos or pad in stops:
        raise ConvertError(f"--pad-token-id: {pad} is BOS or an id that ends a conversation; transformers would "
                           "score a reward model before it, not at the last token: pass an id no conversation "
                           "ends with")
    return pad


def _tokenizer_files(directory: epath.Path) -> list[epath.Path]:
    if not directory.is_dir():
        raise ConvertError(f"{directory}: tokenizer directory not found")
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ConvertError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return files


def _write_json(path: epath.Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert.ours_to_hf",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="our checkpoint directory (numbered step directories) or a run directory")
    parser.add_argument("output", help="new Hugging Face directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the written tensors")
    parser.add_argument("--step", type=int, help="step to export (default: the latest)")
    parser.add_argument("--tokenizer", help="directory whose tokenizer files (the chat template too) are copied "
                        "alongside (default: the one in the checkpoint's directory or its parent)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GB")
    parser.add_argument("--bos-token-id", type=int,
                        help="default: from the tokenizer, else from the vocabulary size (Llama 2 or 3)")
    parser.add_argument("--eos-token-id", type=int, action="append",
                        help="repeatable, EOS first (config.json takes the first, generation_config.json all); "
                        "default: EOS and the stop ids, as for BOS")
    parser.add_argument("--pad-token-id", type=int,
                        help="a reward model's pad id (transformers finds each row's last token by it); default: "
                        "the tokenizer's, else 0")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    export_hf(args.checkpoint, args.output, args.dtype, args.step, args.tokenizer,
              int(args.max_shard_gb * 10**9), args.bos_token_id, args.eos_token_id, not args.no_progress,
              args.pad_token_id)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
