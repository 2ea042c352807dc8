"""Llama 4 against Meta's own reference, llama_models/llama4/model.py, on the same weights.

Meta's model is written for fairscale's model-parallel layers on CUDA. In one process those
layers are plain ones (a column- or row-parallel linear of world size 1 is `F.linear`, the
model-parallel reduction the identity), so when fairscale itself is not installed (it is not a
dependency of this project) a stand-in module with exactly those single-process meanings is put
in its place, and the attention's KV-cache buffers, allocated with `.cuda()`, stay on the CPU.
Everything the comparison is about (attention masks, rotary scaling, NoPE, temperature, QK norm,
router, experts) is Meta's code, run as shipped.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import Llama, init_params
from llama_jax.cli import run_cli
from llama_jax.config import ModelConfig, MoeConfig, RopeScaling, TemperatureTuning
from llama_jax.convert import meta_to_ours
from llama_jax.formats.checkpoint import restore_params
from llama_jax.formats.hf_llama import to_hf

TOLERANCE = 1e-4  # relative to the largest logit, float32


def _single_process_fairscale():
    """Modules `fairscale.nn.model_parallel.{initialize,layers,mappings}` for world size 1."""
    from torch import nn

    def linear(in_features, out_features, bias=False, **_):
        return nn.Linear(in_features, out_features, bias=bias)

    initialize = types.ModuleType("fairscale.nn.model_parallel.initialize")
    initialize.get_model_parallel_world_size = lambda: 1
    initialize.get_model_parallel_rank = lambda: 0
    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = layers.RowParallelLinear = linear
    layers.VocabParallelEmbedding = lambda n, dim, **_: nn.Embedding(n, dim)
    mappings = types.ModuleType("fairscale.nn.model_parallel.mappings")
    mappings.reduce_from_model_parallel_region = lambda x: x
    modules = {"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
               "fairscale.nn.model_parallel": types.ModuleType("fairscale.nn.model_parallel"),
               "fairscale.nn.model_parallel.initialize": initialize,
               "fairscale.nn.model_parallel.layers": layers, "fairscale.nn.model_parallel.mappings": mappings}
    modules["fairscale.nn.model_parallel"].initialize = initialize
    return modules


@pytest.fixture
def meta_model_module(monkeypatch):
    if importlib.util.find_spec("fairscale") is None:
        for name, module in _single_process_fairscale().items():
            monkeypatch.setitem(sys.modules, name, module)
    else:  # the real layers, in a one-process gloo group
        import fairscale.nn.model_parallel.initialize as fs_init
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0,
                                                 world_size=1)
        if not fs_init.model_parallel_is_initialized():
            fs_init.initialize_model_parallel(1)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    for name in [n for n in sys.modules if n.startswith("llama_models.llama4.")]:
        monkeypatch.delitem(sys.modules, name)
    from llama_models.llama4 import args, datatypes, model
    return args, datatypes, model


# Meta's sizes from its formulas for dim 64 (ffn_exp 4, multiplier 1.2, multiple of 32):
# experts int(int(1.2 * 170) / 2) = 102 -> 128; dense layers int(1.2 * 170) = 204 -> 224.
# Meta's rope scaling is fixed at original context 8192 and low factor 1 (Scout's), and it
# derives head_dim from dim / n_heads.
CONFIG = ModelConfig(
    dim=64, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=224, vocab_size=256, rope_theta=500000.0,
    max_seq_len=512, rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0),
    moe=MoeConfig(n_experts=4, ffn_dim_expert=128, interleave_step=2), attention_chunk_size=32,
    nope_layer_interval=4, qk_norm=True, attn_temperature_tuning=TemperatureTuning(floor_scale=16.0))


def _meta_args(args):
    return args.ModelArgs(
        dim=64, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.2,
        ffn_exp=4.0, norm_eps=1e-5, attention_chunk_size=32, rope_theta=500000.0, use_scaled_rope=True,
        rope_scaling_factor=16.0, rope_high_freq_factor=1.0, nope_layer_interval=4, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=16.0, attn_scale=0.1, max_batch_size=2, max_seq_len=256,
        moe_args=args.MoEArgs(num_experts=4, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                              interleave_moe_layer_step=2))


def _meta_state_dict(params, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters under Meta's names and layouts (rotary pairs interleaved, [out, in])."""
    t = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    out = {"tok_embeddings.weight": t(params["embed"]["embedding"]), "norm.weight": t(params["norm"]["scale"]),
           "output.weight": t(params["output"]["kernel"]).T}
    period = config.layer_period
    for i in range(config.n_layers):
        layer = jax.tree.map(lambda x: x[i // period], params["layers"][f"layer_{i % period}"])
        attn, ffn, p = layer["attention"], layer["feed_forward"], f"layers.{i}."
        out |= {p + "attention.wq.weight": t(to_hf("heads_out_pairs", attn["wq"]["kernel"])),
                p + "attention.wk.weight": t(to_hf("heads_out_pairs", attn["wk"]["kernel"])),
                p + "attention.wv.weight": t(to_hf("heads_out", attn["wv"]["kernel"])),
                p + "attention.wo.weight": t(to_hf("heads_in", attn["wo"]["kernel"])),
                p + "attention_norm.weight": t(layer["attention_norm"]["scale"]),
                p + "ffn_norm.weight": t(layer["ffn_norm"]["scale"])}
        if config.layer_kind(i).moe:
            out |= {p + "feed_forward.router_DE": t(ffn["router"]["kernel"]),
                    **{p + f"feed_forward.experts.{w}": t(ffn[w]) for w in ("w1", "w2", "w3")},
                    **{p + f"feed_forward.shared_expert.{w}.weight": t(ffn["shared_expert"][w]["kernel"]).T
                       for w in ("w1", "w2", "w3")}}
        else:
            out |= {p + f"feed_forward.{w}.weight": t(ffn[w]["kernel"]).T for w in ("w1", "w2", "w3")}
    return out


def test_logits_match_metas_reference_model(meta_model_module):
    args, datatypes, model = meta_model_module
    # Scaled-up random weights: routing and attention far from uniform, logits well above 1.
    params = jax.tree.map(lambda x: x * (1.0 if x.ndim == 1 else 12.0), init_params(CONFIG, jax.random.key(3)))
    reference = model.Transformer(_meta_args(args)).eval()
    reference.load_state_dict(_meta_state_dict(params, CONFIG), strict=True)

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 128))
    with torch.no_grad():
        expected = reference(datatypes.TransformerInput(tokens=torch.tensor(tokens), tokens_position=0))
    expected = expected.logits.numpy()
    logits, _ = jax.jit(Llama(CONFIG).apply)({"params": params}, jnp.asarray(tokens))
    scale = np.abs(expected).max()
    assert scale > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(np.asarray(logits) / scale, expected / scale, rtol=0, atol=TOLERANCE)


def _released_shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's module state dict as its released files hold it: the fused names its modules'
    load hooks rename (llama_models/llama4/model.py, ffn.py, moe.py), split over `n`
    model-parallel ranks the way llama_models/checkpoint.py's `reshard_mp` joins them."""
    d, e = CONFIG.dim, CONFIG.moe.n_experts

    def part(dim, flat=None):  # the ranks' pieces along `dim`, maybe flattened to [-1, flat] / [flat, -1]
        def split(x):
            pieces = [c.clone() for c in x.chunk(n, dim=dim)]
            return pieces if flat is None else [p.reshape(flat) for p in pieces]
        return split

    whole = lambda x: [x] * n  # noqa: E731  (replicated)
    stored = {  # module name below the layer -> (stored name, the ranks' pieces)
        "attention.wo.weight": ("attention.wo.weight", part(1)),
        "attention_norm.weight": ("attention.wqkv.layer_norm_weight", whole),
        "feed_forward.w2.weight": ("feed_forward.mlp.fc2_weight", part(1)),
        "feed_forward.experts.w1": ("feed_forward.experts.moe_w_in_eD_F", part(2, (e * d, -1))),
        "feed_forward.experts.w3": ("feed_forward.experts.moe_w_swiglu_eD_F", part(2, (e * d, -1))),
        "feed_forward.experts.w2": ("feed_forward.experts.moe_w_out_eF_D", part(1, (-1, d))),
        "feed_forward.shared_expert.w1.weight": ("feed_forward.w_in_shared_FD.weight", part(0)),
        "feed_forward.shared_expert.w3.weight": ("feed_forward.w_swiglu_FD.weight", part(0)),
        "feed_forward.shared_expert.w2.weight": ("feed_forward.w_out_shared_DF.weight", part(1)),
        "feed_forward.router_DE": ("feed_forward.router_DE", whole),
        "norm.weight": ("norm.weight", whole),
    }
    fused_later = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight")
    shards = [{"rope.freqs": torch.ones(CONFIG.head_dim // 2)} for _ in range(n)]  # not a weight
    for name, x in state.items():
        layer, short = name.split(".", 2)[1:] if name.startswith("layers.") else (None, name)
        prefix = "" if layer is None else f"layers.{layer}."
        if short in fused_later:
            continue
        if short == "ffn_norm.weight":
            moe = CONFIG.layer_kind(int(layer)).moe
            target, pieces = ("feed_forward.norm.weight" if moe else "feed_forward.mlp.layer_norm_weight"), whole(x)
        else:
            target, split = stored.get(short, (short, part(0)))  # tok_embeddings, output: rows
            pieces = split(x)
        for shard, piece in zip(shards, pieces):
            shard[prefix + target] = piece
    for i in range(CONFIG.n_layers):
        p = f"layers.{i}."
        qkv = [part(0)(state[p + f"attention.{w}.weight"]) for w in ("wq", "wk", "wv")]
        for r, shard in enumerate(shards):
            shard[p + "attention.wqkv.weight"] = torch.cat([q[r] for q in qkv])
        if p + "feed_forward.w1.weight" in state:
            w1, w3 = (part(0)(state[p + f"feed_forward.{w}.weight"]) for w in ("w1", "w3"))
            for r, shard in enumerate(shards):
                shard[p + "feed_forward.mlp.fc1_weight"] = torch.cat([w1[r], w3[r]])
    return shards


@pytest.fixture
def meta_reference(meta_model_module):
    """Meta's Transformer with random weights (norms too), its module state dict and its logits."""
    args, datatypes, model = meta_model_module
    torch.manual_seed(0)
    reference = model.Transformer(_meta_args(args)).eval()
    with torch.no_grad():
        for name, weight in reference.named_parameters():
            weight.copy_(1.0 + 0.2 * torch.randn_like(weight) if weight.ndim == 1 else 0.2 * torch.randn_like(weight))
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 128))
    with torch.no_grad():
        logits = reference(datatypes.TransformerInput(tokens=torch.tensor(tokens), tokens_position=0)).logits
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    return args, model, state, tokens, logits.numpy()


def _write_meta_dir(directory, args, shards):
    directory.mkdir()
    # params.json holds ModelArgs less the two sizes Meta's loader passes itself (generation.py).
    params = _meta_args(args).model_dump(mode="json", exclude={"max_batch_size", "max_seq_len"})
    (directory / "params.json").write_text(json.dumps(params))
    for r, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{r:02d}.pth")


def _our_logits(meta_dir, out_dir, tokens):
    meta_to_ours.main([str(meta_dir), str(out_dir), "--dtype", "float32", "--max-seq-len", "512", "--no-progress"])
    config, params = restore_params(out_dir)
    assert config.replace(max_seq_len=CONFIG.max_seq_len) == CONFIG.replace(param_dtype="float32")
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens))
    return np.asarray(logits)


def test_released_layout_is_what_metas_loader_reads(meta_reference):
    """The test's writer of Meta's released files is checked by Meta's own reader: its resharding
    joins the two ranks and its load hooks rename the fused tensors back, weight for weight."""
    from llama_models.checkpoint import convert_moe_weights, reshard_mp

    args, model, state, _, _ = meta_reference
    shards = _released_shards(state, 2)
    assert "layers.0.attention.wqkv.weight" in shards[0] and "layers.1.feed_forward.experts.moe_w_in_eD_F" in shards[0]
    joined = reshard_mp([convert_moe_weights(dict(s), CONFIG.moe.n_experts) for s in shards], size=1, rank=0)
    loaded = model.Transformer(_meta_args(args))
    loaded.load_state_dict(joined, strict=True)
    for name, weight in loaded.state_dict().items():
        assert torch.equal(weight, state[name]), name


@pytest.mark.parametrize("layout", ["module names, one file", "released names, two ranks"])
def test_meta_llama4_checkpoint_converts_to_metas_logits(meta_reference, layout, tmp_path):
    """`python -m llama_jax.convert.meta_to_ours` on a Llama 4 directory (params.json from Meta's
    ModelArgs, consolidated.NN.pth): our logits equal Meta's reference model's on its weights."""
    args, _, state, tokens, expected = meta_reference
    shards = [state] if layout.startswith("module") else _released_shards(state, 2)
    for shard in shards:  # the released files hold the image encoder too: skipped
        shard["vision_projection.weight"] = torch.zeros(CONFIG.dim, 8)
    _write_meta_dir(tmp_path / "meta", args, shards)
    logits = _our_logits(tmp_path / "meta", tmp_path / "ours", tokens)
    scale = np.abs(expected).max()
    assert scale > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(logits / scale, expected / scale, rtol=0, atol=TOLERANCE)


def test_meta_llama4_missing_tensor_fails_in_one_line(meta_reference, tmp_path, capsys):
    args, _, state, _, _ = meta_reference
    shards = _released_shards(state, 2)
    del shards[1]["layers.1.feed_forward.router_DE"]
    _write_meta_dir(tmp_path / "meta", args, shards)
    capsys.readouterr()
    code = run_cli(meta_to_ours.main, [str(tmp_path / "meta"), str(tmp_path / "ours"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {tmp_path / 'meta' / 'consolidated.01.pth'}: missing tensor "
                                 "layers.1.feed_forward.router_DE"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"], "output or staging left behind"


@pytest.mark.parametrize("name,experts,step,scaled,qk_norm", [("llama4_scout_17b_16e", 16, 1, True, True),
                                                              ("llama4_maverick_17b_128e", 128, 2, False, False)])
def test_published_params_json_gives_the_shipped_config(name, experts, step, scaled, qk_norm, tmp_path):
    """params.json of the published shapes (Meta's ModelArgs fields; sizes from its formulas) reads as
    our shipped config, context included (params.json does not state it)."""
    from llama_models.llama4.args import ModelArgs, MoEArgs

    from llama_jax.config import load_model_config
    from llama_jax.convert.meta_llama4 import meta_llama4_config

    args = ModelArgs(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
                     ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-5, attention_chunk_size=8192,
                     rope_theta=500000.0, use_scaled_rope=scaled, nope_layer_interval=4, use_qk_norm=qk_norm,
                     attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1,
                     moe_args=MoEArgs(num_experts=experts, interleave_moe_layer_step=step))
    params = args.model_dump(mode="json", exclude={"max_batch_size", "max_seq_len"})
    config = meta_llama4_config(params, {}, 8, "bfloat16", None, tmp_path / "params.json")
    assert config == load_model_config(name, param_dtype="bfloat16")
