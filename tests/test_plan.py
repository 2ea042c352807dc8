"""The memory plan agrees with arrays actually placed, and its command handles any pod size."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import pytest
from tiny import LLAMA3_LIKE

from llama_jax import count_params, init_params, load_model_config
from sharding.layout import LayoutError, load_layout
from sharding.place import Placement
from sharding.plan import plan

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _host_params():
    return jax.device_get(init_params(LLAMA3_LIKE, jax.random.key(0)))


def _bytes_on_device0(tree) -> int:
    device0 = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device0)


@pytest.mark.parametrize("name", ["fsdp", "fsdp_tp", "tp"])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_planned_parameter_bytes_equal_bytes_held_on_device_0(name, param_dtype):
    config = LLAMA3_LIKE.replace(param_dtype=param_dtype)
    placement = Placement.create(config, load_layout(name))
    host = jax.tree.map(lambda a: np.asarray(a, dtype=param_dtype), _host_params())
    held = _bytes_on_device0(placement.put(host, placement.param_shardings()))
    result = plan(config, load_layout(name), 8, seq_len=32)
    assert result["per_device_bytes"]["parameters"] == held
    assert result["mesh"] == dict(placement.mesh.shape)


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_planned_state_bytes_equal_a_real_train_state_under_fsdp(param_dtype):
    """Parameters, float32 Adam moments (for bfloat16 parameters too) and gradients, as
    training creates them on 8 devices, hold on device 0 what the plan says."""
    from train.config import OptimizerConfig
    from train.optimizer import make_optimizer
    from train.step import init_state, make_gradients
    from train_runs import random_batch

    config = LLAMA3_LIKE.replace(param_dtype=param_dtype)
    placement = Placement.create(config, load_layout("fsdp"))
    state, _ = init_state(placement, make_optimizer(OptimizerConfig(), 10), jax.random.key(0))
    moments = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    others = [x for x in jax.tree.leaves(state.opt_state) if not jnp.issubdtype(x.dtype, jnp.floating)]
    assert {str(x.dtype) for x in moments} == {"float32"}
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))
    assert all(x.shape == () for x in others)  # step counts
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {param_dtype}

    batch = placement.global_batch(random_batch(8, 32, config.vocab_size))
    with placement.activate():
        grads, _ = jax.jit(make_gradients(config, placement.param_shardings()))(state.params, batch)
    assert {str(x.dtype) for x in jax.tree.leaves(grads)} == {param_dtype}

    planned = plan(config, load_layout("fsdp"), 8, seq_len=32)["per_device_bytes"]
    assert planned["parameters"] == _bytes_on_device0(state.params)
    assert planned["gradients"] == _bytes_on_device0(grads)
    assert planned["optimizer"] == _bytes_on_device0(moments)


def test_full_remat_activations_follow_the_documented_formula():
    # fsdp on 8 devices, 2 rows per device of 32 tokens: each device holds 2 rows
    # of every layer's input [batch, length, embed] (embed cannot reuse fsdp).
    config = LLAMA3_LIKE
    result = plan(config, "fsdp", 8, batch_per_device=2, seq_len=32, remat="full")
    d, v, layers = config.dim, config.vocab_size, config.n_layers
    tokens = 2 * 32
    breakdown = result["activation_breakdown"]
    assert breakdown["saved_per_layer"] == tokens * d * 4
    assert breakdown["saved_by_layer_scan"] == layers * tokens * d * 4
    assert breakdown["logits"] == tokens * v * 4
    assert breakdown["final_hidden"] == tokens * d * 4
    assert result["activation_bytes_per_token"] == result["per_device_bytes"]["activations"] / tokens
    # remat none keeps more per layer than full, which keeps more than nothing
    none = plan(config, "fsdp", 8, batch_per_device=2, seq_len=32, remat="none")
    assert none["activation_breakdown"]["saved_per_layer"] > breakdown["saved_per_layer"]
    assert none["activation_breakdown"]["recomputed_layer"] == 0
    assert breakdown["recomputed_layer"] == none["activation_breakdown"]["saved_per_layer"]


def test_splash_keeps_a_log_sum_exp_per_head_instead_of_scores_and_probabilities():
    # remat none, float32, fsdp on 8 devices, 2 rows of 32 tokens per device: xla keeps
    # [heads, 32] scores (f32) and probabilities per token, splash one f32 per head.
    config = LLAMA3_LIKE
    per_layer = {attention: plan(config, "fsdp", 8, batch_per_device=2, seq_len=32, remat="none",
                                 attention=attention)["activation_breakdown"]["saved_per_layer"]
                 for attention in ("xla", "splash")}
    tokens, h = 2 * 32, config.n_heads
    assert per_layer["xla"] - per_layer["splash"] == tokens * h * (32 * 4 + 32 * 4 - 4)


def test_plan_replicates_kv_heads_like_placement():
    result = plan(LLAMA3_LIKE, "tp", 8, seq_len=32)
    assert result["kv_heads_replicated"]
    assert result["parameter_specs"]["['layers']['attention']['wk']['kernel']"] == \
        "P(None, 'fsdp', None, None)"


def test_plan_bad_input_raises_one_line_errors():
    with pytest.raises(LayoutError, match=r"needs 16 devices but 8 are available"):
        plan(LLAMA3_LIKE, "fsdp_tp", 8, mesh={"fsdp": 4, "tensor": 4})
    with pytest.raises(LayoutError, match=r"batch of size 4 does not divide by data x fsdp = 8"):
        plan(LLAMA3_LIKE, "fsdp", 8, batch_per_device=0.5)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sharding.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_plans_405b_on_2048_chips_without_allocating():
    run = _cli("--model", "llama3_1_405b", "--layout", "fsdp_tp", "--devices", "2048",
               "--mesh", "fsdp=256,tensor=8", "--remat", "full", "--dtype", "bfloat16", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    n_params = count_params(load_model_config("llama3_1_405b"))
    assert result["parameter_count"] == n_params
    assert f"{n_params / 1e9:.4g}" == "405.9"
    assert result["mesh"] == {"stage": 1, "data": 1, "fsdp": 256, "sequence": 1, "tensor": 8}
    per_device = result["per_device_bytes"]
    # norm scales are split over fsdp only (replicated over tensor); everything else 2048 ways
    config = load_model_config("llama3_1_405b")
    norms = (2 * config.n_layers + 1) * config.dim
    assert per_device["parameters"] == (n_params - norms) * 4 // 2048 + norms * 4 // 256
    assert per_device["optimizer"] == 2 * per_device["parameters"]
    assert per_device["activations"] > 0 and per_device["total"] == sum(
        v for k, v in per_device.items() if k != "total")

    table = _cli("--model", "llama3_1_405b", "--layout", "fsdp_tp", "--devices", "2048")
    assert table.returncode == 0, table.stderr
    assert "optimizer (AdamW, 2 x float32)" in table.stdout and "fsdp=1024 sequence=1 tensor=2" in table.stdout


@pytest.mark.parametrize("args, message", [
    (("--model", "llama9", "--layout", "fsdp", "--devices", "8"), "plan: model config 'llama9' not found"),
    (("--model", "tiny", "--layout", "zero3", "--devices", "8"), "plan: layout 'zero3' not found"),
    (("--model", "llama3_1_405b", "--layout", "fsdp_tp", "--devices", "2048", "--mesh", "fsdp=128,tensor=8"),
     "plan: layout fsdp_tp: mesh stage=1 x data=1 x fsdp=128 x sequence=1 x tensor=8 needs 1024 devices "
     "but 2048 are available"),
    (("--model", "llama3_1_405b", "--layout", "tp", "--devices", "256"),
     "plan: layout tp: heads (n_heads) of size 128 does not divide by tensor = 256"),
    (("--model", "llama3_1_405b", "--layout", "fsdp_tp", "--devices", "2048", "--mesh", "tensor=3"),
     "plan: layout fsdp_tp: 2048 devices do not divide into the fixed mesh sizes (product 3)"),
    (("--model", "tiny", "--layout", "fsdp", "--devices", "8", "--mesh", "fsdp:8"),
     "plan: --mesh: expected axis=size pairs like fsdp=256,tensor=8, got 'fsdp:8'"),
])
def test_cli_bad_input_prints_one_line_and_exits_2(args, message):
    run = _cli(*args)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.strip() == message or run.stderr.strip().startswith(message), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("quantize, kv_cache_dtype", [("int8", "int8"), ("fp8", None)])
def test_decode_plan_counts_what_quantised_weights_and_caches_hold_on_device_0(quantize, kv_cache_dtype):
    from llama_jax.formats.assemble import converted_params
    from llama_jax.model.kv_cache import cache_axes, init_cache
    from sharding.serve_plan import decode_plan

    stored = LLAMA3_LIKE.replace(n_layers=4)
    config = stored.replace(dtype="bfloat16", param_dtype="bfloat16", quantize=quantize,
                            kv_cache_dtype=kv_cache_dtype)
    placement = Placement.create(config, load_layout("fsdp_tp"))
    host = jax.device_get(init_params(stored, jax.random.key(0)))
    params = converted_params(host, stored, config, placement.param_shardings())
    cache = jax.jit(lambda: init_cache(config, 8, 64),
                    out_shardings=placement.tree_shardings(cache_axes(config)))()
    result = decode_plan(config, "fsdp_tp", 8, batch=8, cache_len=64)
    assert result["per_device_bytes"]["parameters"] == _bytes_on_device0(params)
    assert result["per_device_bytes"]["kv_cache"] == _bytes_on_device0(cache)
    plain = decode_plan(config.replace(quantize=None, kv_cache_dtype=None), "fsdp_tp", 8, batch=8, cache_len=64)
    assert result["per_device_bytes"]["parameters"] < plain["per_device_bytes"]["parameters"]
    if kv_cache_dtype == "int8":  # half of bfloat16's, plus a float32 scale per head_dim (8) values
        assert result["per_device_bytes"]["kv_cache"] == plain["per_device_bytes"]["kv_cache"] * (1 + 4 / 8) // 2


def test_decode_plan_verdicts_for_405b_fp8_and_70b_int8(capsys):
    from sharding.plan import main

    serve = ["--decode", "--layout", "tp", "--dtype", "bfloat16", "--kv-cache-dtype", "int8", "--cache-len", "8192"]
    assert main(["--model", "llama3_1_405b", "--devices", "4", "--quantize", "fp8", "--batch", "8",
                 "--json", *serve]) == 0
    on_v5p_host = json.loads(capsys.readouterr().out)
    # 405B in FP8 is ~113 GiB per chip on the 4 chips of one v5p host: more than a chip's HBM
    assert on_v5p_host["per_device_bytes"]["parameters"] > 110 * 2**30
    assert not on_v5p_host["fits_in_hbm"]["v5p"]["fits"] and on_v5p_host["fits_in_hbm"]["v5p"]["largest_batch"] == 0
    assert main(["--model", "llama3_1_70b", "--devices", "8", "--quantize", "int8", "--batch", "32",
                 "--json", *serve]) == 0
    on_v5e_8 = json.loads(capsys.readouterr().out)["fits_in_hbm"]["v5e"]
    assert on_v5e_8["fits"] and on_v5e_8["largest_batch"] >= 32
    assert main(["--model", "llama3_1_70b", "--devices", "8", "--quantize", "int4", "--decode", "--layout", "tp"]) == 2
    assert capsys.readouterr().err.strip() == "plan: quantize: 'int4' is not one of int8, fp8 (or null for none)"
