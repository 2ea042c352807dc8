"""Meta's Llama 4 checkpoints (`params.json` + `consolidated.NN.pth`) -> ours, layer by layer.

Run through `python -m llama_jax.convert.meta_to_ours META_DIR OUT_DIR`, which
hands a directory whose params.json has `moe_args` to `convert_meta_llama4`.

The layout is the one Meta's reference code reads (llama_models/llama4 and
llama_models/checkpoint.py); nothing else documents it:

- Names. The modules' own names (`attention.wq.weight`, `feed_forward.experts.w1`,
  ...) or the fused names of the released files, which the modules' load hooks
  rename: `attention.wqkv.weight` (wq, wk, wv stacked on rows),
  `attention.wqkv.layer_norm_weight` (attention_norm), `feed_forward.mlp.fc1_weight`
  (w1 over w3) / `fc2_weight` / `layer_norm_weight` (ffn_norm) in dense layers,
  `feed_forward.norm.weight` (ffn_norm), `feed_forward.experts.moe_w_{in,swiglu}_eD_F`
  (w1, w3 as [experts * dim, ffn]) / `moe_w_out_eF_D` (w2) and
  `feed_forward.w_{in,swiglu}_shared_FD` / `w_out_shared_DF` (the shared expert)
  in MoE layers. `rope.freqs` and `*._extra_state` are not weights.
- Model-parallel ranks (`reshard_mp`): rows of wq/wk/wv (each part of wqkv
  separately), w1, w3, the shared expert's w1/w3, the embedding and the output;
  columns of wo, w2 and the shared w2; the experts' ffn axis (w1, w3 last,
  w2 middle); norms and the router replicated.
- Layouts: linears [out, in], the experts [experts, in, out], the router
  [dim, experts]; q and k rotate adjacent pairs, permuted to our halves order
  per head, as for Hugging Face's Llama 4 ("heads_out_pairs").
- Sizes (`ModelArgs`, `TransformerBlock`, `MoE`): head_dim = dim / n_heads,
  the dense width from ffn_dim_multiplier and multiple_of as Llama 3, the
  experts' from ffn_exp (halved by auto_scale_F for capacity_factor 1),
  Scout's rope scaling (use_scaled_rope: factor 16 and high frequency factor
  1 unless stated; low factor 1 and original context 8192 fixed).

The released checkpoints are multimodal: the image encoder's tensors
(`vision_embeddings.*`, `vision_projection.*`) are skipped (images are not
supported, docs/llama4.md), and counted in the message. Memory bound as the
Llama 3 converter (meta_to_ours.py): one layer's pages of every shard plus
about 3x its largest tensor (Scout: an expert tensor of 1.3 GB in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_jax.config import ConfigError, ModelConfig, MoeConfig, RopeScaling, TemperatureTuning
from llama_jax.config import load_model_config, published_models
from llama_jax.convert import ConvertError, progress, staged_output
from llama_jax.convert.pth import load_shard, to_numpy
from llama_jax.formats.checkpoint import CheckpointError
from llama_jax.formats.checkpoint_io import ParamsWriter, as_contiguous
from llama_jax.formats.hf_llama import to_ours
from llama_jax.formats.hf_llama4 import layer_slot

# Our leaf (below the layer) for each of the modules' names, and how its layout differs (hf_llama.to_ours).
GLOBAL = {"tok_embeddings.weight": (("embed", "embedding"), "copy"), "norm.weight": (("norm", "scale"), "copy"),
          "output.weight": (("output", "kernel"), "linear")}
ATTENTION = {
    "attention_norm.weight": (("attention_norm", "scale"), "copy"),
    "ffn_norm.weight": (("ffn_norm", "scale"), "copy"),
    "attention.wq.weight": (("attention", "wq", "kernel"), "heads_out_pairs"),
    "attention.wk.weight": (("attention", "wk", "kernel"), "heads_out_pairs"),
    "attention.wv.weight": (("attention", "wv", "kernel"), "heads_out"),
    "attention.wo.weight": (("attention", "wo", "kernel"), "heads_in"),
}
DENSE = {f"feed_forward.{w}.weight": (("feed_forward", w, "kernel"), "linear") for w in ("w1", "w3", "w2")}
MOE = {"feed_forward.router_DE": (("feed_forward", "router", "kernel"), "copy"),
       **{f"feed_forward.experts.{w}": (("feed_forward", w), "copy") for w in ("w1", "w3", "w2")},
       **{f"feed_forward.shared_expert.{w}.weight": (("feed_forward", "shared_expert", w, "kernel"), "linear")
          for w in ("w1", "w3", "w2")}}

# How model-parallel ranks split each stored tensor (either naming), see the module docstring.
SPLITS = {
    "tok_embeddings.weight": "rows", "output.weight": "rows", "norm.weight": "none",
    "attention.wqkv.weight": "qkv", "attention.wq.weight": "rows", "attention.wk.weight": "rows",
    "attention.wv.weight": "rows", "attention.wo.weight": "cols",
    "attention.wqkv.layer_norm_weight": "none", "attention_norm.weight": "none", "ffn_norm.weight": "none",
    "feed_forward.mlp.layer_norm_weight": "none", "feed_forward.norm.weight": "none",
    "feed_forward.mlp.fc1_weight": "two_row_blocks", "feed_forward.mlp.fc2_weight": "cols",
    "feed_forward.w1.weight": "rows", "feed_forward.w3.weight": "rows", "feed_forward.w2.weight": "cols",
    "feed_forward.router_DE": "none",
    "feed_forward.experts.moe_w_in_eD_F": "experts_in", "feed_forward.experts.moe_w_swiglu_eD_F": "experts_in",
    "feed_forward.experts.moe_w_out_eF_D": "experts_out", "feed_forward.experts.w1": "experts_in",
    "feed_forward.experts.w3": "experts_in", "feed_forward.experts.w2": "experts_out",
    "feed_forward.w_in_shared_FD.weight": "rows", "feed_forward.w_swiglu_FD.weight": "rows",
    "feed_forward.w_out_shared_DF.weight": "cols", "feed_forward.shared_expert.w1.weight": "rows",
    "feed_forward.shared_expert.w3.weight": "rows", "feed_forward.shared_expert.w2.weight": "cols",
}
# Released (fused) names the load hooks rename one to one.
RENAMES = {"attention.wqkv.layer_norm_weight": "attention_norm.weight",
           "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight", "feed_forward.norm.weight": "ffn_norm.weight",
           "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
           "feed_forward.experts.moe_w_in_eD_F": "feed_forward.experts.w1",
           "feed_forward.experts.moe_w_swiglu_eD_F": "feed_forward.experts.w3",
           "feed_forward.experts.moe_w_out_eF_D": "feed_forward.experts.w2",
           "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
           "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
           "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight"}
NOT_WEIGHTS = ("rope.freqs",)
VISION = ("vision_embeddings.", "vision_projection.")


def is_meta_llama4(params: dict) -> bool:
    """Whether a params.json describes Llama 4 (its ModelArgs have moe_args)."""
    return params.get("moe_args") is not None


def convert_meta_llama4(meta_dir: Path, params: dict, shards: list[Path], output, dtype: str, step: int,
                        max_seq_len: int | None, show_progress: bool) -> ModelConfig:
    """Write our checkpoint of a Meta Llama 4 directory (`params` its params.json, `shards` its
    consolidated.NN.pth files); returns the stored config."""
    first = load_shard(shards[0])
    config = meta_llama4_config(params, first, len(shards), dtype, max_seq_len, meta_dir / "params.json")
    names = [name for name in first if not name.endswith("._extra_state") and name not in NOT_WEIGHTS]
    skipped = [name for name in names if name.startswith(VISION)]
    unknown = [name for name in names if name not in skipped and _stored_suffix(name) not in SPLITS]
    if unknown:
        raise ConvertError(f"{shards[0]}: unknown tensor {unknown[0]} (not in Meta's Llama 4 text model)")
    extra = [name for name in names if name.startswith("layers.") and int(name.split(".")[1]) >= config.n_layers]
    if extra:
        raise ConvertError(f"{shards[0]}: tensor {extra[0]} beyond the {config.n_layers} layers of params.json")
    del first
    groups = [[name for name in GLOBAL if name != "output.weight" or not config.tie_embeddings]]
    groups += [[n for n in names if n.startswith(f"layers.{i}.")] for i in range(config.n_layers)]
    with staged_output(output) as staging, ParamsWriter(staging, config, step) as writer:
        with progress(len(groups), "meta -> ours", show_progress) as bar:
            for layer, group in enumerate(groups, start=-1):
                loaded = [load_shard(path) for path in shards]  # reopened per layer: old pages go
                _write_layer(writer, config, None if layer < 0 else layer, group, loaded, shards)
                del loaded
                bar.update()
    if skipped:
        print(f"skipped {len(skipped)} image encoder tensors (images are not supported)")
    return config


def meta_llama4_config(params: dict, first: dict, n_shards: int, dtype: str, max_seq_len: int | None,
                       path: Path) -> ModelConfig:
    """Our ModelConfig from a Llama 4 params.json (Meta's ModelArgs) and shard 0's tensors."""
    if params.get("quantization_args") or params.get("lora_args"):
        raise ConvertError(f"{path}: quantised or LoRA checkpoints are not read (convert the bfloat16 release)")
    try:
        dim, n_heads, moe_args = int(params["dim"]), int(params["n_heads"]), params["moe_args"]
        n_kv_heads = int(params.get("n_kv_heads") or n_heads)
        multiple_of, multiplier = int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
        dense = int(2 * 4 * dim / 3)
        expert = int(2 * int(float(params["ffn_exp"]) * dim) / 3)
        if multiplier is not None:
            dense, expert = int(float(multiplier) * dense), int(float(multiplier) * expert)
        if moe_args.get("auto_scale_F", True):
            expert = int(expert / (float(moe_args.get("capacity_factor", 1.0)) + 1))
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            vocab = first["tok_embeddings.weight"].shape[0] * n_shards
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 16),
                                  low_freq_factor=1.0, high_freq_factor=float(params.get("rope_high_freq_factor") or 1),
                                  original_context=8192)
        tuning = None
        if params.get("attn_temperature_tuning"):
            tuning = TemperatureTuning(float(params.get("floor_scale", 8192.0)), float(params.get("attn_scale", 0.1)))
        config = ModelConfig(
            dim=dim, n_layers=int(params["n_layers"]), n_heads=n_heads, n_kv_heads=n_kv_heads,
            ffn_dim=multiple_of * -(-dense // multiple_of), vocab_size=vocab,
            rope_theta=float(params.get("rope_theta", 500000.0)), rope_scaling=scaling, max_seq_len=131072,
            norm_eps=float(params.get("norm_eps", 1e-5)), param_dtype=dtype,
            moe=MoeConfig(n_experts=int(moe_args["num_experts"]), ffn_dim_expert=expert + -expert % multiple_of,
                          top_k=int(moe_args.get("top_k", 1)),
                          interleave_step=int(moe_args.get("interleave_moe_layer_step", 1))),
            attention_chunk_size=params.get("attention_chunk_size"),
            nope_layer_interval=params.get("nope_layer_interval"), qk_norm=bool(params.get("use_qk_norm")),
            attn_temperature_tuning=tuning)
    except KeyError as err:
        raise ConvertError(f"{path}: missing field {err.args[0]}") from None
    except (ConfigError, TypeError, ValueError) as err:
        raise ConvertError(f"{path}: {err}") from None
    if n_kv_heads % n_shards:
        raise ConvertError(f"{path.parent}: {n_shards} shards cannot split {n_kv_heads} kv heads "
                           "(Meta's Llama 4 code needs ranks to divide them)")
    return config.replace(max_seq_len=max_seq_len or _published_context(config))


def _published_context(config: ModelConfig) -> int:
    """The context of the published Llama 4 with this config's shapes (params.json does not say
    it); 131072, Hugging Face's default, for any other."""
    shape = lambda c: (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.moe)  # noqa: E731
    for name in published_models():
        published = load_model_config(name)
        if published.moe is not None and shape(published) == shape(config):
            return published.max_seq_len
    return 131072


def _stored_suffix(name: str) -> str:
    """A stored tensor's name without its `layers.N.` prefix."""
    if name.startswith("layers."):
        return name.split(".", 2)[2]
    return name


def _write_layer(writer: ParamsWriter, config: ModelConfig, layer: int | None, names: list[str],
                 loaded: list[dict], shards: list[Path]) -> None:
    """Gather, rename and write every tensor of one layer (None: the global ones)."""
    if layer is None:
        table, stack, index = GLOBAL, (), None
    else:
        table = {**ATTENTION, **(MOE if config.layer_kind(layer).moe else DENSE)}
        stack, index = layer_slot(config, layer)
    prefix = "" if layer is None else f"layers.{layer}."
    written = set()
    for name in names:  # one stored tensor at a time, so memory holds one (and its copies)
        for module_name, weight in _unfuse(_stored_suffix(name), _gather(name, loaded, shards, config), config):
            if module_name not in table:
                layer_kind = "MoE" if layer is not None and config.layer_kind(layer).moe else "dense"
                raise ConvertError(f"{shards[0].parent}: tensor {name} does not belong in a {layer_kind} layer")
            if module_name in written:
                raise ConvertError(f"{shards[0].parent}: {prefix}{module_name} is stored twice (one is {name})")
            path, kind = table[module_name]
            full_path = stack + path
            try:
                weight = as_contiguous(to_ours(kind, weight, config.head_dim), writer.leaf_dtype(full_path))
                writer.write(full_path, index, weight)
            except (CheckpointError, ValueError) as err:  # a shape params.json does not imply
                raise ConvertError(f"{shards[0].parent}: {name} of shape {tuple(weight.shape)} does not fit "
                                   f"params.json ({str(err).split(': ', 1)[-1]})") from None
            written.add(module_name)
            del weight
    missing = [module_name for module_name in table if module_name not in written]
    if missing:
        raise ConvertError(f"{shards[0].parent}: missing tensor {prefix}{missing[0]}")


def _gather(name: str, loaded: list[dict], shards: list[Path], config: ModelConfig) -> np.ndarray:
    """One stored tensor, its model-parallel shards joined (Meta's layout, before renaming)."""
    import torch

    pieces = []
    for state, path in zip(loaded, shards):
        if name not in state:
            raise ConvertError(f"{path}: missing tensor {name}")
        pieces.append(state[name])
    split, n = SPLITS[_stored_suffix(name)], len(pieces)
    try:
        if split == "none" or (n == 1 and split not in ("experts_in", "experts_out")):
            weight = pieces[0]
        elif split in ("rows", "cols"):
            weight = torch.cat(pieces, dim=0 if split == "rows" else 1)
        elif split == "qkv":  # each rank: its q rows, then its k rows, then its v rows
            q, kv = config.n_heads * config.head_dim // n, config.n_kv_heads * config.head_dim // n
            parts = [p.split((q, kv, kv)) for p in pieces]
            weight = torch.cat([torch.cat(part) for part in zip(*parts)])
        elif split == "two_row_blocks":  # each rank: its w1 rows over its w3 rows
            weight = torch.cat([p.reshape(2, -1, p.shape[-1]) for p in pieces], dim=1).flatten(0, 1)
        elif split == "experts_in":  # [experts * dim, ffn / n] or [experts, dim, ffn / n]
            e = config.moe.n_experts
            weight = torch.cat([p.reshape(e, config.dim, -1) for p in pieces], dim=2)
        else:  # experts_out: [experts * ffn / n, dim] or [experts, ffn / n, dim]
            e = config.moe.n_experts
            weight = torch.cat([p.reshape(e, -1, config.dim) for p in pieces], dim=1)
    except RuntimeError:
        raise ConvertError(f"{shards[0].parent}: shards of {name} have shapes "
                           f"{[tuple(p.shape) for p in pieces]}, which do not join") from None
    return to_numpy(weight)


def _unfuse(suffix: str, weight: np.ndarray, config: ModelConfig):
    """(module name, tensor) pairs of one gathered tensor, as Meta's load hooks rename it."""
    if suffix == "attention.wqkv.weight":
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        if weight.shape[0] != q + 2 * kv:
            raise ConvertError(f"attention.wqkv.weight: {weight.shape[0]} rows, params.json implies {q + 2 * kv}")
        yield from (("attention.wq.weight", weight[:q]), ("attention.wk.weight", weight[q:q + kv]),
                    ("attention.wv.weight", weight[q + kv:]))
    elif suffix == "feed_forward.mlp.fc1_weight":
        w1, w3 = np.split(weight, 2)
        yield from (("feed_forward.w1.weight", w1), ("feed_forward.w3.weight", w3))
    else:
        yield RENAMES.get(suffix, suffix), weight
