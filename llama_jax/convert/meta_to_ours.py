"""Meta's `params.json` + `consolidated.NN.pth` -> our orbax checkpoint, layer by layer.

    python -m llama_jax.convert.meta_to_ours META_DIR OUT_DIR [--dtype bfloat16]
        [--vocab-size N] [--rope-scaling none|FACTOR|JSON] [--max-seq-len N]

Meta saves one file per model-parallel rank (REFERENCE.md, "Checkpoint
formats users bring"): column-parallel weights (wq, wk, wv, w1, w3, output)
split on dim 0, row-parallel (wo, w2) on dim 1, tok_embeddings on dim 1 in
Llama 2 and dim 0 in Llama 3 (told apart by shape), norms replicated, and kv
heads repeated across ranks when ranks outnumber them (405B MP16). Gathered
tensors are Meta's [out, in] layout; wq and wk then get Hugging Face's row
permutation (Meta rotates adjacent pairs, we rotate halves like HF), which
turns them into HF's layout, and `llama_jax.formats.hf.to_ours` finishes the job, so
the two converters share one layout table.

Llama 4 (params.json with `moe_args`: Scout, Maverick) has its own names,
fused tensors and splits: llama_jax/convert/meta_llama4.py.

Shards are opened with `torch.load(mmap=True, weights_only=True)`: tensors
are read lazily from disk. They are reopened for every layer (and for each
global tensor), which drops the previous pages from the process.

Memory bound: baseline + one layer's bytes across all shards (pages mapped
while that layer is read) + about 3x the largest tensor (the gathered copy,
the permuted/cast copy, tensorstore's encode buffer). For 405B in bf16: one
layer is 3.2 GB, the largest per-layer tensor 1.7 GB, the embedding 4.2 GB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama_jax.formats.checkpoint_io import ParamsWriter, as_contiguous
from llama_jax.cli import run_cli
from llama_jax.config import ConfigError, ModelConfig, RopeScaling, load_model_config, published_models
from llama_jax.convert import DTYPES, ConvertError, progress, staged_output
from llama_jax.convert.meta_llama4 import convert_meta_llama4, is_meta_llama4
from llama_jax.convert.pth import find_shards, load_shard, to_numpy
from llama_jax.formats.hf_llama import HF_WEIGHTS, to_ours


class MetaRule(NamedTuple):
    """One Meta tensor: its name, our leaf and how model-parallel ranks split it."""

    name: str              # with "{i}" for the layer index
    path: tuple[str, ...]  # our leaf, below the "layers" stack for per-layer weights
    split: str             # "rows" (dim 0), "cols" (dim 1), "kv" (rows, maybe repeated), "none", "embedding"
    rope_heads: str | None  # config field giving the head count for the q/k permutation


META_WEIGHTS = (
    MetaRule("tok_embeddings.weight", ("embed", "embedding"), "embedding", None),
    MetaRule("norm.weight", ("norm", "scale"), "none", None),
    MetaRule("output.weight", ("output", "kernel"), "rows", None),
    MetaRule("layers.{i}.attention_norm.weight", ("attention_norm", "scale"), "none", None),
    MetaRule("layers.{i}.ffn_norm.weight", ("ffn_norm", "scale"), "none", None),
    MetaRule("layers.{i}.attention.wq.weight", ("attention", "wq", "kernel"), "rows", "n_heads"),
    MetaRule("layers.{i}.attention.wk.weight", ("attention", "wk", "kernel"), "kv", "n_kv_heads"),
    MetaRule("layers.{i}.attention.wv.weight", ("attention", "wv", "kernel"), "kv", None),
    MetaRule("layers.{i}.attention.wo.weight", ("attention", "wo", "kernel"), "cols", None),
    MetaRule("layers.{i}.feed_forward.w1.weight", ("feed_forward", "w1", "kernel"), "rows", None),
    MetaRule("layers.{i}.feed_forward.w3.weight", ("feed_forward", "w3", "kernel"), "rows", None),
    MetaRule("layers.{i}.feed_forward.w2.weight", ("feed_forward", "w2", "kernel"), "cols", None),
)
HF_KIND = {rule.path: rule.kind for rule in HF_WEIGHTS}  # Meta's [out, in] after permutation is HF's


def convert_meta_to_ours(meta_dir: str | Path, output: str | Path, dtype: str = "bfloat16", step: int = 0,
                         vocab_size: int | None = None, rope_scaling: str | None = None,
                         max_seq_len: int | None = None, tokenizer: str | Path | None = None,
                         show_progress: bool = True) -> ModelConfig:
    """Convert a Meta checkpoint directory into a new checkpoint directory `output`.

    vocab_size: overrides params.json (needed when it says -1 and there is no
      SentencePiece `tokenizer.model` to count, as in Llama 2).
    rope_scaling: "none", a factor (e.g. "8" for 3.1, "32" for 3.2 1B/3B) or a
      JSON object of RopeScaling fields. Default: none unless params.json says
      `use_scaled_rope`; then its `rope_scaling_factor`, or the factor of the
      published Llama 3.1/3.2 size with these shapes (`published_rope_factor`);
      any other shape is refused, never guessed.
    Returns the stored config; raises a ValueError subclass on bad input.
    """
    meta_dir = Path(meta_dir)
    shards = find_shards(meta_dir)
    params = read_params(meta_dir / "params.json")
    if is_meta_llama4(params):
        if vocab_size is not None or rope_scaling is not None or tokenizer is not None:
            raise ConvertError("--vocab-size, --rope-scaling, --tokenizer: Llama 4's params.json states these")
        return convert_meta_llama4(meta_dir, params, shards, output, dtype, step, max_seq_len, show_progress)
    first = load_shard(shards[0])
    config = meta_config(meta_dir, params, first, len(shards), dtype, vocab_size, rope_scaling, max_seq_len,
                         Path(tokenizer) if tokenizer else meta_dir / "tokenizer.model")
    embedding_split = _embedding_split(first["tok_embeddings.weight"].shape, config, len(shards))
    del first
    groups = [[(rule, None)] for rule in META_WEIGHTS if "{i}" not in rule.name
              and not (rule.path[0] == "output" and config.tie_embeddings)]
    groups += [[(rule, i) for rule in META_WEIGHTS if "{i}" in rule.name] for i in range(config.n_layers)]
    with staged_output(output) as staging, ParamsWriter(staging, config, step) as writer:
        with progress(sum(map(len, groups)), "meta -> ours", show_progress) as bar:
            for group in groups:
                loaded = [load_shard(path) for path in shards]  # reopened per group: old pages go
                for rule, layer in group:
                    weight = _gather(rule, layer, loaded, shards, config, embedding_split)
                    weight = as_contiguous(to_ours(HF_KIND[rule.path], weight, config.head_dim), writer.dtype)
                    writer.write(rule.path if layer is None else ("layers",) + rule.path, layer, weight)
                    del weight
                    bar.update()
                del loaded
    return config


def read_params(path: Path) -> dict:
    """params.json (Meta's ModelArgs) as a dict."""
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(params, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return params


def meta_config(meta_dir: Path, params: dict, first: dict, n_shards: int, dtype: str, vocab_size: int | None,
                rope_scaling: str | None, max_seq_len: int | None, tokenizer: Path) -> ModelConfig:
    """Our ModelConfig from params.json, flags and (for vocab and tying) shard 0's tensors."""
    path = meta_dir / "params.json"
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
        multiple_of = int(params["multiple_of"])
        ffn_dim = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        n_layers, norm_eps = int(params["n_layers"]), float(params["norm_eps"])
    except KeyError as err:
        raise ConvertError(f"{path}: missing field {err.args[0]}") from None
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    if "tok_embeddings.weight" not in first:
        raise ConvertError(f"{meta_dir / 'consolidated.00.pth'}: missing tensor tok_embeddings.weight")
    _check_shard_count(meta_dir, first, n_shards, n_heads * (dim // n_heads))
    shape_vocab = _embedding_vocab(first["tok_embeddings.weight"].shape, dim, n_shards)
    vocab, source = _declared_vocab(vocab_size, params, tokenizer)
    if vocab is None:
        vocab = shape_vocab
    elif vocab != shape_vocab:
        raise ConvertError(f"{meta_dir}: vocab_size {vocab} (from {source}) does not match tok_embeddings, "
                           f"which holds {shape_vocab} rows across {n_shards} shards")
    scaling = _rope_scaling(rope_scaling, params, (dim, n_layers, n_heads, n_kv_heads, vocab), path)
    theta = float(params.get("rope_theta", 10000.0))
    if max_seq_len is None:  # Meta's published contexts; params.json does not say
        max_seq_len = int(params.get("max_seq_len") or (131072 if scaling else 8192 if theta >= 500000 else 4096))
    try:
        return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                           vocab_size=vocab, rope_theta=theta, rope_scaling=scaling, max_seq_len=max_seq_len,
                           norm_eps=norm_eps, tie_embeddings="output.weight" not in first, param_dtype=dtype)
    except ConfigError as err:
        raise ConvertError(f"{path}: {err}") from None


def _check_shard_count(meta_dir: Path, first: dict, n_shards: int, q_rows: int) -> None:
    """Meta splits wq's rows (n_heads * head_dim) evenly over the ranks, so shard 0 tells their number."""
    wq = first.get("layers.0.attention.wq.weight")
    if wq is None or wq.ndim != 2 or not 0 < wq.shape[0] <= q_rows or q_rows % wq.shape[0]:
        return  # no count to derive; the gathered shapes are checked tensor by tensor
    expected = q_rows // wq.shape[0]
    if expected != n_shards:
        names = "consolidated.00.pth" if expected == 1 else f"consolidated.00..{expected - 1:02d}.pth"
        raise ConvertError(f"{meta_dir}: expected {expected} shard{'s' * (expected > 1)} {names} "
                           f"(shard 0 holds {wq.shape[0]} of wq's {q_rows} rows), found {n_shards}")


def _rope_scaling(flag: str | None, params: dict, shape: tuple[int, int, int, int, int],
                  path: Path) -> RopeScaling | None:
    """The flag, else params.json's use_scaled_rope with its factor or the published one for `shape`."""
    if flag is not None:
        text = flag.strip()
        if text.lower() == "none":
            return None
        try:
            if not text.startswith("{"):
                return RopeScaling(factor=float(text))
            fields = json.loads(text)
            if fields.pop("rope_type", fields.pop("type", "llama3")) != "llama3":
                raise ValueError("only the llama3 rope type exists")
            if "original_max_position_embeddings" in fields:  # HF's name for it
                fields["original_context"] = fields.pop("original_max_position_embeddings")
            return RopeScaling(**fields)
        except (ValueError, TypeError, AttributeError) as err:
            raise ConvertError(f"--rope-scaling: expected none, a factor or a JSON object ({err})") from None
    if not params.get("use_scaled_rope"):
        return None
    factor = params.get("rope_scaling_factor")
    if factor is None:
        factor = published_rope_factor(*shape)
    if factor is None:
        dim, n_layers, n_heads, n_kv_heads, vocab = shape
        raise ConvertError(f"{path}: use_scaled_rope without rope_scaling_factor, and dim {dim}, {n_layers} layers, "
                           f"{n_heads} heads, {n_kv_heads} kv heads, vocab {vocab} is no published Llama 3.1/3.2 "
                           "size; pass --rope-scaling FACTOR (8 for Llama 3.1, 32 for Llama 3.2 1B/3B)")
    return RopeScaling(factor=float(factor))


def published_rope_factor(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int) -> float | None:
    """The llama3 RoPE factor of the published model with these shapes, or None if none (or two) fit.

    Meta's params.json says `use_scaled_rope: true` without a factor for Llama
    3.1 (factor 8) and 3.2 1B/3B (factor 32; REFERENCE.md). The published
    sizes are the configs in configs/models/ whose scaling has Meta's fixed
    parameters (low 1, high 4, original context 8192, the RopeScaling defaults).
    """
    meta = RopeScaling()
    factors = set()
    for name in published_models():
        config = load_model_config(name)
        scaling = config.rope_scaling
        if scaling is None or (scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_context) != (
                meta.low_freq_factor, meta.high_freq_factor, meta.original_context):
            continue
        if (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == (
                dim, n_layers, n_heads, n_kv_heads, vocab_size):
            factors.add(scaling.factor)
    return factors.pop() if len(factors) == 1 else None


def _declared_vocab(flag: int | None, params: dict, tokenizer: Path) -> tuple[int | None, str]:
    if flag is not None:
        return flag, "--vocab-size"
    if int(params.get("vocab_size", -1)) > 0:
        return int(params["vocab_size"]), "params.json"
    if tokenizer.is_file():
        import sentencepiece

        try:
            return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size(), str(tokenizer)
        except (RuntimeError, OSError):
            raise ConvertError(f"{tokenizer}: not a SentencePiece model; pass --vocab-size") from None
    return None, "tok_embeddings"


def _embedding_vocab(shape, dim: int, n_shards: int) -> int:
    rows, cols = shape
    if n_shards == 1 or cols * n_shards == dim:
        return rows  # Llama 2: split on dim 1 (the embedding dim)
    if cols == dim:
        return rows * n_shards  # Llama 3: split on dim 0 (the vocabulary)
    raise ConvertError(f"tok_embeddings.weight has shape {tuple(shape)} in shard 0, which fits neither "
                       f"split of dim {dim} over {n_shards} shards")


def _embedding_split(shape, config: ModelConfig, n_shards: int) -> str:
    return "cols" if n_shards > 1 and shape[1] * n_shards == config.dim else "rows"


def _gather(rule: MetaRule, layer: int | None, loaded: list[dict], shards: list[Path], config: ModelConfig,
            embedding_split: str) -> np.ndarray:
    """The whole tensor in Meta's [out, in] layout (q/k permuted to HF's), as numpy."""
    import torch

    name = rule.name.format(i=layer)
    pieces = []
    for state, path in zip(loaded, shards):
        if name not in state:
            raise ConvertError(f"{path}: missing tensor {name}")
        pieces.append(state[name])
    split = embedding_split if rule.split == "embedding" else rule.split
    if split == "kv" and len(pieces) > config.n_kv_heads:
        pieces = _unrepeat_kv(name, pieces, shards, config)
    if split == "none" or len(pieces) == 1:
        weight = pieces[0]
    else:
        try:
            weight = torch.cat(pieces, dim=1 if split == "cols" else 0)
        except RuntimeError:
            raise ConvertError(f"{shards[0].parent}: shards of {name} have shapes "
                               f"{[tuple(p.shape) for p in pieces]}, which do not join") from None
    del pieces
    expected = _meta_shape(rule, config)
    if tuple(weight.shape) != expected:
        raise ConvertError(f"{shards[0].parent}: tensor {name} gathers to shape {tuple(weight.shape)} from "
                           f"{len(shards)} shards, but params.json implies {expected} "
                           "(check params.json and that every consolidated.*.pth shard is present)")
    if rule.rope_heads:  # Meta pairs (2i, 2i+1); HF and we pair (i, i + head_dim/2)
        n = getattr(config, rule.rope_heads)
        rows, cols = weight.shape
        weight = weight.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return to_numpy(weight)


def _unrepeat_kv(name: str, pieces: list, shards: list[Path], config: ModelConfig) -> list:
    """With more ranks than kv heads, rank s holds kv head s // repeat: keep one copy of each."""
    import torch

    if len(pieces) % config.n_kv_heads:
        raise ConvertError(f"{shards[0].parent}: {len(pieces)} shards cannot share {config.n_kv_heads} kv heads")
    repeat = len(pieces) // config.n_kv_heads
    for s in range(len(pieces)):
        if pieces[s].shape != pieces[0].shape or (s % repeat and not torch.equal(pieces[s], pieces[s - s % repeat])):
            raise ConvertError(f"{shards[s]}: {name} should repeat the kv head of {shards[s - s % repeat].name}")
    return pieces[::repeat]


def _meta_shape(rule: MetaRule, config: ModelConfig) -> tuple[int, ...]:
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    d, f, v = config.dim, config.ffn_dim, config.vocab_size
    return {"embed": (v, d), "norm": (d,), "output": (v, d), "attention_norm": (d,), "ffn_norm": (d,),
            "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d), "w3": (f, d),
            "w2": (d, f)}[rule.path[1] if rule.path[0] in ("attention", "feed_forward") else rule.path[0]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert.meta_to_ours",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("meta_dir", help="directory with params.json and consolidated.*.pth")
    parser.add_argument("output", help="new checkpoint directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored parameter dtype")
    parser.add_argument("--step", type=int, default=0, help="step number to save under")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (Llama 2's params.json says -1)")
    parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model to count the vocabulary "
                        "(default: META_DIR/tokenizer.model)")
    parser.add_argument("--rope-scaling", help="none, a llama3 factor (8 for 3.1, 32 for 3.2 1B/3B) or a JSON "
                        "object; default from params.json use_scaled_rope and the published sizes' factors")
    parser.add_argument("--max-seq-len", type=int, help="context length (default: the generation's published one)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    config = convert_meta_to_ours(args.meta_dir, args.output, args.dtype, args.step, args.vocab_size,
                                  args.rope_scaling, args.max_seq_len, args.tokenizer, not args.no_progress)
    print(f"wrote {args.output} (step {args.step}, {config.n_layers} layers, vocab {config.vocab_size}, {args.dtype})")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
