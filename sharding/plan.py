"""Per-device memory of a training step under a layout, from shapes alone.

    python -m sharding.plan --model llama3_1_405b --layout fsdp_tp --devices 2048 \\
        [--mesh fsdp=256,tensor=8] [--batch-per-device 1] [--seq-len 8192] \\
        [--remat full] [--dtype bfloat16] [--param-dtype bfloat16] [--json]
    python -m sharding.plan --decode --model llama3_1_70b --layout tp --devices 8 \\
        --dtype bfloat16 --quantize int8 --kv-cache-dtype int8 --batch 32 --cache-len 8192

(--decode plans serving instead: sharding/serve_plan.py.)

Nothing is allocated and no device is needed, so any pod size can be planned
on a laptop: the mesh is a `jax.sharding.AbstractMesh`, parameter shapes come
from `abstract_params`, and each array's per-device shard is its global shape
divided by the mesh axes its logical names map to under the layout's rules
(the rules `Placement` uses, kv-head replication included). Validation is the
same as `Placement.create`'s, so a plan that prints is a layout that places.

Counted per device (B = batch_per_device x n_devices rows, T = seq_len):
- parameters: every parameter's shard, in `param_dtype`;
- gradients: the same shards, in `param_dtype`;
- optimizer: AdamW's two moments, float32 for every param_dtype (the
  training optimizer runs in float32 on purpose: see train/optimizer.py),
  the same shards;
- activations, for one forward and backward pass:
      n_layers x (what the layer scan saves per layer for the backward pass)
    + one layer's full set while it is recomputed (remat other than none)
    + logits [B, T or loss chunk, vocab] float32 and the final hidden [B, T, dim];
- gathered layer weights: one layer's parameters as FSDP's all-gather
  materialises them (split over tensor only), in `param_dtype`.

Saved per layer and per token, by remat policy (D dim, H heads, N kv heads,
K head_dim, F ffn_dim, T seq_len; elements in `dtype` unless marked f32):

    full                D                         the layer input (scan carry)
    save_attention_out  D + H*K                   + attention output
    dots_no_batch       3D + (H+2N)*K + 2F        + q, k, v, w1 and w3 outputs,
                                                    wo and w2 outputs
    dots                dots_no_batch + H*K + H*T f32
                                                  + attention output, scores
    none                4D + (H+2N)*K + H*K + 3F + H*T f32 + H*T
                        (norm inputs and outputs, q, k, v, attention output,
                         scores and probabilities, gate, up and their product)

With `attention: blocked` the H*T score terms are replaced by what its
backward pass keeps, the float32 output and each row's log-sum-exp,
H*(K+1) f32; with `splash` (and `auto`, which is splash on TPU) by the
log-sum-exp alone, H f32. Each saved tensor is sharded by
the logical names the model gives it (e.g. [batch, length, embed]), so under
fsdp_tp the carry is split over batch but not over tensor.

The estimate leaves out XLA's temporaries, collective buffers and
fragmentation: keep a margin below a chip's HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import flax.linen as nn
import jax

from llama_jax.config import ConfigError, ModelConfig, load_model_config
from llama_jax.params import abstract_params, logical_axes
from sharding.layout import Layout, LayoutError, load_layout
from sharding.serve_plan import decode_plan, format_decode_table
from sharding.shards import format_bytes, placement_rules, shard_elements
from sharding.topology import CHIP_HBM_BYTES

ADAM_MOMENTS = 2
MOMENT_BYTES = 4  # float32 moments, whatever the parameters' dtype
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _saved_per_layer(config: ModelConfig, policy: str, seq_len: int):
    """(label, per-token shape, logical names, float32?) of what one layer keeps."""
    d, h, n, k, f = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim
    carry = ("carry", (d,), ("embed",), False)
    q = ("q", (h, k), ("heads", "head_dim"), False)
    kv = [(name, (n, k), ("kv_heads", "head_dim"), False) for name in ("k", "v")]
    attn_out = ("attention out", (h, k), ("heads", "head_dim"), False)
    embed_out = [(name, (d,), ("embed",), False) for name in ("wo out", "w2 out")]
    if config.attention == "blocked":
        scores = [("output and log-sum-exp", (h, k + 1), ("heads", None), True)]
    elif config.attention in ("splash", "auto"):
        scores = [("log-sum-exp", (h,), ("heads",), True)]
    else:
        scores = [("scores", (h, seq_len), ("heads", "kv_length"), True)]
    probs = [("probs", (h, seq_len), ("heads", "kv_length"), False)] if config.attention == "xla" else []
    ffn = [(name, (f,), ("mlp",), False) for name in ("gate", "up", "hidden")]
    if policy == "full":
        return [carry]
    if policy == "save_attention_out":
        return [carry, attn_out]
    no_batch = [carry, q, *kv, *embed_out, *ffn[:2]]
    if policy == "dots_no_batch":
        return no_batch
    if policy == "dots":
        return no_batch + [attn_out, *scores]
    norms = [(name, (d,), ("embed",), False) for name in ("normed x", "h", "normed h")]
    return [carry, *norms, q, *kv, *scores, *probs, attn_out, *ffn]


def plan(config: ModelConfig | str, layout: Layout | str, n_devices: int, *,
         batch_per_device: float = 1.0, seq_len: int | None = None, remat: str | None = None,
         dtype: str | None = None, param_dtype: str | None = None, attention: str | None = None,
         loss_chunk: int | None = None, mesh: dict[str, int] | None = None) -> dict:
    """Per-device bytes of parameters, gradients, AdamW state and activations.

    config / layout: objects or names (`configs/models`, `configs/layouts`).
    n_devices: the mesh size (any size: nothing is placed). `mesh` overrides
    ICI axis sizes like `load_layout(name, **mesh)`. `remat`, `dtype`,
    `param_dtype`, `attention` override the config's fields. The global batch is
    `batch_per_device x n_devices` rows of `seq_len` tokens (default: the
    config's max_seq_len, capped at 8192). `loss_chunk`: positions per chunk
    of a chunked loss (logits are then held `loss_chunk` positions at a time).
    Returns a JSON-ready dict; see the module docstring for what is counted.
    Raises LayoutError / ConfigError (one line) for bad input.
    """
    if isinstance(config, str):
        config = load_model_config(config)
    if isinstance(layout, str):
        layout = load_layout(layout)
    if mesh:
        layout = dataclasses.replace(layout, ici={**layout.ici, **mesh})  # validated again
    changes = {k: v for k, v in (("remat", remat), ("dtype", dtype), ("param_dtype", param_dtype),
                                 ("attention", attention)) if v is not None}
    config = config.replace(**changes) if changes else config
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise LayoutError(f"devices: must be a positive integer, got {n_devices!r}")
    seq_len = seq_len or min(config.max_seq_len, 8192)
    if seq_len < 1 or seq_len > config.max_seq_len:
        raise LayoutError(f"seq_len: {seq_len} is outside 1..max_seq_len {config.max_seq_len}")
    global_batch = batch_per_device * n_devices
    if batch_per_device <= 0 or global_batch != int(global_batch):
        raise LayoutError(f"batch_per_device: {batch_per_device} x {n_devices} devices is not a "
                          "positive whole number of rows")
    global_batch = int(global_batch)

    sizes, rules = placement_rules(config, layout, n_devices, batch=global_batch, seq_len=seq_len)

    shapes, names = abstract_params(config), logical_axes(config)
    is_names = lambda x: isinstance(x, tuple)  # noqa: E731
    leaves = list(zip(jax.tree.leaves(shapes), jax.tree.leaves(names, is_leaf=is_names)))
    param_elems = sum(shard_elements(s.shape, n, rules, sizes) for s, n in leaves)
    param_bytes = sum(shard_elements(s.shape, n, rules, sizes) * s.dtype.itemsize for s, n in leaves)
    p_bytes = _ITEMSIZE[config.param_dtype]
    tensor_only = {a: (s if a == "tensor" else 1) for a, s in sizes.items()}
    gathered_elems = sum(shard_elements(s.shape[1:], n[1:], rules, tensor_only)
                         for s, n in leaves if n and n[0] == "layers")

    a_bytes = _ITEMSIZE[config.dtype]

    def activation_bytes(items, length=seq_len):
        return sum(shard_elements((global_batch, length, *shape), ("batch", "length", *names_),
                                   rules, sizes) * (4 if f32 else a_bytes)
                   for _, shape, names_, f32 in items)

    per_layer = activation_bytes(_saved_per_layer(config, config.remat, seq_len))
    recomputed = 0 if config.remat == "none" else activation_bytes(
        _saved_per_layer(config, "none", seq_len))
    logits = activation_bytes([("logits", (config.vocab_size,), ("vocab",), True)],
                              length=min(loss_chunk or seq_len, seq_len))
    final_hidden = activation_bytes([("final hidden", (config.dim,), ("embed",), False)])
    activations = config.n_layers * per_layer + recomputed + logits + final_hidden

    per_device = {
        "parameters": param_bytes,
        "gradients": param_elems * p_bytes,
        "optimizer": param_elems * MOMENT_BYTES * ADAM_MOMENTS,
        "activations": activations,
        "gathered_layer_weights": gathered_elems * p_bytes,
    }
    per_device["total"] = sum(per_device.values())
    tokens_per_device = batch_per_device * seq_len
    return {
        "config": {k: v for k, v in config.to_dict().items() if k != "rope_scaling"},
        "parameter_count": sum(math.prod(s.shape) for s, _ in leaves),
        "layout": layout.name,
        "devices": n_devices,
        "mesh": sizes,
        "kv_heads_replicated": dict(rules).get("kv_heads") is None
        and dict(layout.rules).get("kv_heads") is not None,
        "parameter_specs": {jax.tree_util.keystr(path): str(nn.logical_to_mesh_axes(n, rules))
                            for (path, _), n in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                                    jax.tree.leaves(names, is_leaf=is_names))},
        "batch_per_device": batch_per_device,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "loss_chunk": loss_chunk,
        "per_device_bytes": per_device,
        "activation_bytes_per_token": activations / tokens_per_device,
        "activation_breakdown": {
            "saved_by_layer_scan": config.n_layers * per_layer,
            "saved_per_layer": per_layer,
            "recomputed_layer": recomputed,
            "logits": logits,
            "final_hidden": final_hidden,
        },
        "fits_in_hbm": {chip: per_device["total"] <= hbm for chip, hbm in CHIP_HBM_BYTES.items()},
    }


def parse_mesh(text: str) -> dict[str, int]:
    """`fsdp=256,tensor=8` -> {"fsdp": 256, "tensor": 8} (LayoutError if malformed)."""
    sizes = {}
    for part in filter(None, text.split(",")):
        axis, _, value = part.partition("=")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            raise LayoutError(f"--mesh: expected axis=size pairs like fsdp=256,tensor=8, got {part!r}") \
                from None
    return sizes


def format_table(result: dict) -> str:
    """A readable report of `plan`'s result."""
    cfg, b, a = result["config"], result["per_device_bytes"], result["activation_breakdown"]
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    kv = ("replicated (the tensor axis outnumbers them)" if result["kv_heads_replicated"]
          else "split as the rules say")
    wq = result["parameter_specs"].get("['layers']['attention']['wq']['kernel']")
    rows = [
        (f"parameters ({cfg['param_dtype']})", b["parameters"]),
        (f"gradients ({cfg['param_dtype']})", b["gradients"]),
        ("optimizer (AdamW, 2 x float32)", b["optimizer"]),
        (f"activations ({cfg['dtype']}, remat {cfg['remat']}, {cfg['attention']} attention)",
         b["activations"]),
        (f"  saved by the layer scan ({cfg['n_layers']} x {format_bytes(a['saved_per_layer'])})",
         a["saved_by_layer_scan"]),
        ("  one layer recomputed", a["recomputed_layer"]),
        ("  logits (float32) + final hidden", a["logits"] + a["final_hidden"]),
        ("gathered layer weights (transient)", b["gathered_layer_weights"]),
        ("total", b["total"]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"{result['parameter_count'] / 1e9:.2f}B parameters, layout {result['layout']} on "
        f"{result['devices']} devices",
        f"mesh: {mesh}; kv heads {kv}" + (f"; wq kernel {wq}" if wq else ""),
        f"batch: {result['batch_per_device']:g} per device = {result['global_batch']} rows x "
        f"{result['seq_len']} tokens" + (f", loss chunk {result['loss_chunk']}" if result["loss_chunk"] else ""),
        "",
        f"{'per device':<{width}}{'bytes':>20}  {'':>12}",
    ]
    lines += [f"{label:<{width}}{value:>20,}  {format_bytes(value):>12}" for label, value in rows]
    lines += [
        "",
        f"activations per token of batch: {format_bytes(result['activation_bytes_per_token'])} per device",
        "fits in HBM: " + ", ".join(
            f"{chip} ({format_bytes(CHIP_HBM_BYTES[chip])}) {'yes' if ok else 'no'}"
            for chip, ok in result["fits_in_hbm"].items()),
        "(estimate: excludes XLA temporaries and collective buffers; keep a margin)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="name in configs/models or a YAML path")
    parser.add_argument("--layout", required=True, help="name in configs/layouts or a YAML path")
    parser.add_argument("--devices", type=int, required=True, help="number of chips in the mesh")
    parser.add_argument("--mesh", default="", help="ICI axis sizes, e.g. fsdp=256,tensor=8")
    parser.add_argument("--batch-per-device", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--remat", default=None, help="none, full, dots, dots_no_batch, save_attention_out")
    parser.add_argument("--dtype", default=None, help="activation dtype (default: the config's)")
    parser.add_argument("--param-dtype", default=None, help="stored weights' dtype (default: the config's)")
    parser.add_argument("--attention", default=None,
                        help="auto, xla, blocked or splash (default: the config's)")
    parser.add_argument("--loss-chunk", type=int, default=None, help="positions per chunk of a chunked loss")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    serving = parser.add_argument_group("serving (--decode): weights, KV cache and the batch x context that fits")
    serving.add_argument("--decode", action="store_true", help="plan the decode loop instead of a training step")
    serving.add_argument("--batch", type=int, default=1, help="sequences decoded at once (default 1)")
    serving.add_argument("--cache-len", type=int, default=None, help="KV cache length (default: --seq-len)")
    serving.add_argument("--quantize", default=None, help="int8 or fp8 weights (llama_jax/model/quantize.py)")
    serving.add_argument("--kv-cache-dtype", default=None, help="int8 or fp8 KV cache")
    args = parser.parse_args(argv)
    if args.decode:
        return _main_decode(args)
    try:
        result = plan(load_model_config(args.model), load_layout(args.layout, **parse_mesh(args.mesh)),
                      args.devices, batch_per_device=args.batch_per_device, seq_len=args.seq_len,
                      remat=args.remat, dtype=args.dtype, param_dtype=args.param_dtype,
                      attention=args.attention, loss_chunk=args.loss_chunk)
    except (LayoutError, ConfigError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0



def _main_decode(args) -> int:

    try:
        config = load_model_config(args.model)
        changes = {"dtype": args.dtype, "param_dtype": args.param_dtype or args.dtype, "attention": args.attention,
                   "quantize": args.quantize, "kv_cache_dtype": args.kv_cache_dtype}
        config = config.replace(**{k: v for k, v in changes.items() if v is not None})
        cache_len = args.cache_len or args.seq_len or min(config.max_seq_len, 8192)
        result = decode_plan(config, load_layout(args.layout), args.devices, batch=args.batch,
                             cache_len=cache_len, mesh=parse_mesh(args.mesh))
    except (LayoutError, ConfigError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_decode_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
