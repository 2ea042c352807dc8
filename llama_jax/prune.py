"""Structured pruning, the first step of Llama 3.2 1B/3B's recipe (prune 3.1 8B, then distil).

    python -m llama_jax.prune --checkpoint SRC --output DST --calibration 'data/*.jsonl' \\
        [--tokenizer T] [--drop-layers 4] [--ffn-dim 8192] [--kv-heads 4] [--seq-len 512] [--batches 8]

Meta did not publish its pruning criteria, so the scores are the ones of the
published recipes it resembles (ShortGPT for depth, NVIDIA's Minitron for
width), measured on a calibration set of text (.txt files, one document each,
or .jsonl with a "text" field, every document BOS ... EOS, one a row; or .jsonl
chat records, {"messages": [...]}, in the tokenizer's chat format as for fine-tuning):

- layers: Block Influence, BI_i = 1 - mean over tokens of cos(x_in, x_out),
  how much layer i turns the residual stream (Men et al. 2024). The
  `--drop-layers` layers of lowest BI are removed.
- FFN width: the mean over tokens of |silu(x W1) * (x W3)| per hidden neuron
  (activation importance, Muralidharan et al. 2024); each layer keeps its
  `--ffn-dim` most important neurons (rows of w2, columns of w1 and w3).
- kv groups: per layer, the mean over tokens of the L2 norm of what a kv
  group's query heads add to the residual stream (their attention output
  through wo); each layer keeps its `--kv-heads` best groups and their query
  heads, so the GQA ratio stays.

Scores come from the unpruned model in one pass. DST is our checkpoint of the
smaller model (a train run's `init_from` takes it, typically with
`distill.teacher` set to SRC), plus `pruning.json` (scores and what was kept).
It is written under a temporary name and renamed when complete; bad input is
one line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.cli import run_cli
from llama_jax.config import ModelConfig
from llama_jax.model.layers import FeedForward, Linear
from llama_jax.model.llama import DecoderLayer, Llama
from llama_jax.model.trees import stack_layers
from llama_jax.params import stacked_layers
from llama_jax.formats.checkpoint import save_params
from llama_jax.formats.weights import load_params, resolve, stored_config
from llama_jax.text.chat import encode_conversation
from llama_jax.text.tokenizer import load_tokenizer

PRUNING_FILE = "pruning.json"


def calibration_batches(tokenizer, paths: list[str], seq_len: int, batch: int, batches: int):
    """Up to `batches` dicts of int32 [batch, seq_len] "tokens", "positions", "mask" (1 on real
    tokens): one document per row, truncated and padded. ValueError (one line, naming file and
    line) for a .jsonl line that is not a text or chat record."""
    import glob

    files = [Path(f) for p in paths for f in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])]

    def documents():  # token ids of each document, read only as far as needed
        for path in files:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".jsonl":
                yield from (_encode_record(tokenizer, line, f"{path}:{n}")
                            for n, line in enumerate(text.splitlines(), 1) if line.strip())
            elif text.strip():
                yield tokenizer.encode(text, bos=True, eos=True)

    docs = list(itertools.islice(filter(None, documents()), batch * batches))
    if not docs:
        raise ValueError(f"{', '.join(paths)}: no calibration text")
    out = []
    for start in range(0, len(docs), batch):
        tokens = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), np.float32)
        for row, ids in enumerate(docs[start:start + batch]):
            ids = ids[:seq_len]
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1.0
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
        out.append({"tokens": tokens, "positions": positions, "mask": mask})
    return out


def _encode_record(tokenizer, line: str, location: str) -> list[int]:
    """The ids of one .jsonl calibration line: {"text": ...} as BOS text EOS, or a chat record
    {"messages": [...]} in the tokenizer's chat format, as fine-tuning encodes it (every token
    scored: calibration measures activations, not a loss). [] for blank text."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{location}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return tokenizer.encode(record["text"], bos=True, eos=True) if record["text"].strip() else []
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        try:
            return encode_conversation(tokenizer, record["messages"])[0]
        except ValueError as err:
            raise ValueError(f"{location}: {err}") from None
    raise ValueError(f'{location}: expected a JSON object with a "text" string or a "messages" list')


def _module_path(module) -> tuple[str, ...]:
    return tuple(module.scope.path)


def importance(params, config: ModelConfig, batches) -> dict[str, np.ndarray]:
    """Importance scores (see the module docstring) of an unpruned, unquantised model.

    params: unrolled parameters (`config.scan_layers` False). Returns float64
    "layers" [L] (Block Influence), "ffn" [L, ffn_dim], "kv_groups" [L, n_kv_heads],
    each a mean over the calibration tokens.
    """
    config = config.replace(scan_layers=False, remat="none")
    model = Llama(config)

    def sums(params, batch):
        mask = batch["mask"]
        found = {}

        def layer_of(module):
            return int(next(p for p in _module_path(module) if p.startswith("layers_")).removeprefix("layers_"))

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            if isinstance(module, DecoderLayer):
                x_in, x_out = args[0][0].astype(jnp.float32), out[0][0].astype(jnp.float32)
                cos = jnp.sum(x_in * x_out, -1) / (jnp.linalg.norm(x_in, axis=-1) * jnp.linalg.norm(x_out, axis=-1)
                                                   + 1e-12)
                found[("layers", layer_of(module))] = jnp.sum(mask * (1 - cos))
            elif isinstance(module, FeedForward):
                weights = module.variables["params"]
                x = args[0].astype(jnp.float32)
                hidden = jax.nn.silu(x @ weights["w1"]["kernel"]) * (x @ weights["w3"]["kernel"])
                found[("ffn", layer_of(module))] = jnp.sum(mask[..., None] * jnp.abs(hidden), (0, 1))
            elif isinstance(module, Linear) and _module_path(module)[-1] == "wo":
                out_bthk = args[0].astype(jnp.float32)
                b, t, h, k = out_bthk.shape
                n = config.n_kv_heads
                kernel = module.variables["params"]["kernel"].astype(jnp.float32).reshape(n, h // n, k, -1)
                added_btnd = jnp.einsum("btngk,ngkd->btnd", out_bthk.reshape(b, t, n, h // n, k), kernel)
                found[("kv_groups", layer_of(module))] = jnp.sum(mask[..., None] * jnp.linalg.norm(added_btnd, axis=-1),
                                                                 (0, 1))
            return out

        with nn.intercept_methods(record):
            model.apply({"params": params}, batch["tokens"], batch["positions"])
        return found, jnp.sum(mask)

    step = jax.jit(sums)
    totals, count = {}, 0.0
    for batch in batches:
        found, tokens = jax.device_get(step(params, batch))
        totals = {key: totals.get(key, 0.0) + np.asarray(value, np.float64) for key, value in found.items()}
        count += float(tokens)
    layers = range(config.n_layers)
    return {kind: np.stack([totals[(kind, i)] for i in layers]) / count for kind in ("layers", "ffn", "kv_groups")}


def choose(scores: dict[str, np.ndarray], config: ModelConfig, drop_layers: int = 0, ffn_dim: int | None = None,
           kv_heads: int | None = None) -> dict[str, list]:
    """What to keep: "layers" (ascending), and per kept layer the "ffn" neurons and
    "kv_groups" (ascending indices of the most important). ValueError (one line) for
    sizes the model cannot shrink to."""
    ffn_dim = config.ffn_dim if ffn_dim is None else ffn_dim
    kv_heads = config.n_kv_heads if kv_heads is None else kv_heads
    if not 0 <= drop_layers < config.n_layers:
        raise ValueError(f"--drop-layers {drop_layers}: must be in [0, {config.n_layers}) for {config.n_layers} layers")
    if not 0 < ffn_dim <= config.ffn_dim:
        raise ValueError(f"--ffn-dim {ffn_dim}: must be in [1, {config.ffn_dim}]")
    if not 0 < kv_heads <= config.n_kv_heads:
        raise ValueError(f"--kv-heads {kv_heads}: must be in [1, {config.n_kv_heads}]")
    order = np.argsort(scores["layers"], kind="stable")  # least influential first
    layers = sorted(int(i) for i in order[drop_layers:])

    def top(values, count):
        return sorted(int(i) for i in np.argsort(-values, kind="stable")[:count])

    return {"layers": layers, "ffn": [top(scores["ffn"][i], ffn_dim) for i in layers],
            "kv_groups": [top(scores["kv_groups"][i], kv_heads) for i in layers]}


def prune(params, config: ModelConfig, keep: dict[str, list]) -> tuple[dict, ModelConfig]:
    """(unrolled params, config) of the model keeping only `keep` (from `choose`)."""
    group = config.n_heads // config.n_kv_heads
    new = {k: v for k, v in params.items() if not k.startswith("layers_")}
    for j, (i, neurons, groups) in enumerate(zip(keep["layers"], keep["ffn"], keep["kv_groups"])):
        layer = params[f"layers_{i}"]
        heads = [g * group + r for g in groups for r in range(group)]
        attention, ffn = layer["attention"], layer["feed_forward"]
        new[f"layers_{j}"] = {
            **layer,
            "attention": {"wq": {"kernel": attention["wq"]["kernel"][:, heads]},
                          "wk": {"kernel": attention["wk"]["kernel"][:, groups]},
                          "wv": {"kernel": attention["wv"]["kernel"][:, groups]},
                          "wo": {"kernel": attention["wo"]["kernel"][heads]}},
            "feed_forward": {"w1": {"kernel": ffn["w1"]["kernel"][:, neurons]},
                             "w3": {"kernel": ffn["w3"]["kernel"][:, neurons]},
                             "w2": {"kernel": ffn["w2"]["kernel"][neurons]}},
        }
    kv = len(keep["kv_groups"][0])
    pruned = config.replace(n_layers=len(keep["layers"]), ffn_dim=len(keep["ffn"][0]), n_kv_heads=kv,
                            n_heads=kv * group, head_dim=config.head_dim)
    return new, pruned


def prune_checkpoint(source, output, calibration: list[str], tokenizer=None, *, drop_layers: int = 0,
                     ffn_dim: int | None = None, kv_heads: int | None = None, seq_len: int = 512,
                     batch: int = 8, batches: int = 8) -> dict:
    """Score `source` (ours, a run or Hugging Face) on the calibration files, prune it, and
    write our checkpoint of the smaller model to `output` with pruning.json; returns
    that record."""
    output = Path(output)
    if output.exists():
        raise ValueError(f"{output}: already exists; choose another --output")
    stored = stored_config(source)
    if stored.lora is not None or stored.quantize is not None or stored.vision is not None:
        raise ValueError(f"{source}: prune a plain text model (merge LoRA adapters, use the unquantised weights)")
    config = stored.replace(scan_layers=False)
    if tokenizer is None:
        directory = resolve(source)[1]
        tokenizer = next((d for d in (directory, directory.parent, directory.parent.parent)
                          if (d / "tokenizer.model").exists() or (d / "tokenizer.json").exists()), None)
        if tokenizer is None:
            raise ValueError(f"{source}: no tokenizer beside it (pass --tokenizer)")
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    data = calibration_batches(tokenizer, calibration, min(seq_len, config.max_seq_len), batch, batches)
    params = load_params(source, config)
    scores = importance(params, config, data)
    keep = choose(scores, config, drop_layers, ffn_dim, kv_heads)
    params, pruned = prune(params, config, keep)
    pruned = pruned.replace(scan_layers=True)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_params(tmp, pruned, stack_layers(params, stacked_layers(pruned)))
        record = {"source": str(source), "scores": {k: v.tolist() for k, v in scores.items()}, "kept": keep,
                  "calibration_tokens": int(sum(b["mask"].sum() for b in data)),
                  "config": {k: getattr(pruned, k) for k in ("n_layers", "ffn_dim", "n_heads", "n_kv_heads")}}
        (tmp / PRUNING_FILE).write_text(json.dumps(record, indent=1) + "\n")
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="llama_jax.prune")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m llama_jax.prune", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the model to prune: ours, a run or Hugging Face")
    parser.add_argument("--output", required=True, help="directory to write the pruned checkpoint to")
    parser.add_argument("--calibration", required=True, nargs="+", help=".txt/.jsonl files or globs")
    parser.add_argument("--tokenizer", help="tokenizer file or directory (default: beside the checkpoint)")
    parser.add_argument("--drop-layers", type=int, default=0, help="layers to remove (lowest Block Influence)")
    parser.add_argument("--ffn-dim", type=int, help="FFN hidden width to keep (default: all)")
    parser.add_argument("--kv-heads", type=int, help="kv groups to keep per layer, with their query heads")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens per document (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="documents per calibration batch")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches (default 8)")
    args = parser.parse_args(argv)
    record = prune_checkpoint(args.checkpoint, args.output, args.calibration, args.tokenizer,
                              drop_layers=args.drop_layers, ffn_dim=args.ffn_dim, kv_heads=args.kv_heads,
                              seq_len=args.seq_len, batch=args.batch, batches=args.batches)
    print(f"wrote {args.output}: {json.dumps(record['config'])} (kept layers {record['kept']['layers']})")


if __name__ == "__main__":
    sys.exit(main())
