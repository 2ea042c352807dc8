"""Llama 4 under layouts: expert parallelism (experts over `data`, with FSDP and with tensor
parallelism) and the usual layouts compute what one device computes, and the experts really are
split. 8 emulated CPU devices (conftest.py)."""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import Llama, init_params
from llama_jax.model.moe import routed_experts
from sharding.layout import load_layout
from sharding.place import Placement
from tiny import LLAMA4_MAVERICK_LIKE, LLAMA4_SCOUT_LIKE

CONFIG = LLAMA4_MAVERICK_LIKE  # 4 experts of width 64, dim 64: all divide by 4 x 2
BATCH, LENGTH = 8, 64          # two chunks of 32 positions
RTOL = 1e-5


def _loss(config, params, tokens_bt):
    logits_btv, _ = Llama(config).apply({"params": params}, tokens_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    return -jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1).mean()


@functools.cache
def _tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)


@functools.cache
def _reference(config=CONFIG):
    # Weights scaled up from the 0.02 init, so routing and attention are far from uniform.
    params = jax.tree.map(lambda x: x * 10.0 if x.ndim > 2 else x, init_params(config, jax.random.key(0)))
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, config)))(params, _tokens())
    return params, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("name", ["expert_fsdp", "fsdp", "fsdp_tp"])
def test_moe_layout_matches_single_device_loss_and_gradients(name):
    _assert_layout_matches_one_device(CONFIG, name, f"layout {name}")


def _assert_layout_matches_one_device(config, name, label):
    """`config`'s loss and gradients under layout `name` equal one device's to RTOL."""
    params, want_loss, want_grads = _reference(config)
    placement = Placement.create(config, load_layout(name))
    sharded = placement.put(params, placement.param_shardings())
    batch = placement.global_batch({"tokens": _tokens()})
    with placement.activate():
        loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, config)))(sharded, batch["tokens"])
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss), f"{label}: loss {loss} vs {want_loss}"
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(grads)),
                                 jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())
        assert err <= RTOL, f"{label}: gradient {jax.tree_util.keystr(path)} differs by {err:.2e}"


def test_expert_fsdp_splits_experts_four_ways_and_each_expert_two_ways():
    placement = Placement.create(CONFIG, load_layout("expert_fsdp"))
    assert dict(placement.mesh.shape) == {"stage": 1, "data": 4, "fsdp": 2, "sequence": 1, "tensor": 1}
    params = placement.put(_reference()[0], placement.param_shardings())
    moe = params["layers"]["layer_1"]["feed_forward"]
    # w1: [blocks 2, experts 4, embed 64, expert ffn 64]
    assert moe["w1"].sharding.spec == P(None, "data", "fsdp", "tensor")
    assert moe["w2"].sharding.spec == P(None, "data", "tensor", "fsdp")
    shard = next(s.data.shape for s in moe["w1"].addressable_shards if s.device == jax.devices()[0])
    assert shard == (2, 1, 32, 64)
    # Dense weights: FSDP over all eight devices.
    wq = params["layers"]["layer_0"]["attention"]["wq"]["kernel"]
    assert wq.sharding.spec == P(None, ("fsdp", "data"), "tensor", None)


@pytest.mark.parametrize("shape, name", [("scout", "expert_fsdp"), ("scout", "expert_fsdp_tp"),
                                         ("maverick", "expert_fsdp_tp")])
def test_expert_parallel_layouts_match_single_device_loss_and_gradients(shape, name):
    """Scout's top 2 over 4 experts in 4 devices (one expert each) and in 2 (two each: a device
    may send a peer two rows per token), Maverick's top 1 with experts over data x tensor."""
    config = {"scout": LLAMA4_SCOUT_LIKE, "maverick": LLAMA4_MAVERICK_LIKE}[shape]
    _assert_layout_matches_one_device(config, name, f"{shape} {name}")


def test_expert_fsdp_tp_splits_experts_over_data_and_their_width_over_tensor():
    placement = Placement.create(LLAMA4_SCOUT_LIKE, load_layout("expert_fsdp_tp"))
    assert dict(placement.mesh.shape) == {"stage": 1, "data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    params = placement.put(_reference(LLAMA4_SCOUT_LIKE)[0], placement.param_shardings())
    w1 = params["layers"]["layer_0"]["feed_forward"]["w1"]  # [blocks 2, experts 4, embed 64, expert ffn 64]
    assert w1.sharding.spec == P(None, "data", "fsdp", "tensor")
    assert next(s.data.shape for s in w1.addressable_shards if s.device == jax.devices()[0]) == (2, 2, 32, 32)


def _skew_layout(name):
    """A shipped layout, or expert_fsdp_tp with the experts over data x tensor or over tensor
    alone: axes that do not split the batch, along which devices hold the same tokens, compute
    their own experts' rows and sum."""
    if name in ("expert_fsdp", "expert_fsdp_tp"):
        return load_layout(name)
    axes = {"expert_data_tensor": ("data", "tensor"), "expert_tensor": "tensor"}[name]
    layout = load_layout("expert_fsdp_tp")
    return dataclasses.replace(layout, name=name, rules=tuple((logical, axes if logical == "expert" else mesh)
                                                              for logical, mesh in layout.rules))


@pytest.mark.parametrize("name", ["expert_fsdp", "expert_fsdp_tp", "expert_data_tensor", "expert_tensor"])
def test_all_to_all_dispatch_drops_nothing_when_every_token_picks_the_same_two_experts(name):
    """The worst case for the fixed slots: every token of every device routed to experts 0 and 1,
    so each device sends one peer all its rows (expert_fsdp_tp: both experts on one device, two
    rows per token). The output equals the mixture written out per token."""
    b, t, d, e, f = 8, 16, 64, 4, 64
    rng = np.random.default_rng(1)
    x_btd = rng.normal(size=(b, t, d)).astype(np.float32)
    score_btk = rng.uniform(0.1, 1.0, size=(b, t, 2)).astype(np.float32)
    w1_edf, w3_edf = (rng.normal(size=(e, d, f)).astype(np.float32) / 8 for _ in range(2))
    w2_efd = rng.normal(size=(e, f, d)).astype(np.float32) / 8
    expert_btk = np.broadcast_to(np.array([1, 0], np.int32), (b, t, 2))
    want_btd = sum(jax.nn.silu((x_btd * score_btk[..., i, None]) @ w1_edf[j]) * ((x_btd * score_btk[..., i, None])
                                                                                 @ w3_edf[j]) @ w2_efd[j]
                   for i, j in enumerate((1, 0)))
    placement = Placement.create(LLAMA4_SCOUT_LIKE, _skew_layout(name))
    # A fresh callable per layout: JAX caches traces by function and mesh shape, not by the
    # logical rules in scope, and three of these layouts share a mesh shape.
    run = jax.jit(functools.partial(routed_experts))
    with placement.activate():
        got_btd = run(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd)
        hlo = run.lower(x_btd, expert_btk, score_btk, w1_edf, w3_edf, w2_efd).as_text()
    assert ("all_to_all" in hlo) == (name != "expert_tensor")
    np.testing.assert_allclose(np.asarray(got_btd), np.asarray(want_btd), rtol=RTOL, atol=RTOL * np.abs(want_btd).max())


def test_expert_fsdp_dispatches_tokens_per_device():
    """Under the layout the experts run per device (shard_map) and the routed rows travel by
    all-to-all; no device gathers its data peers' tokens or reduce-scatters their sums."""
    placement = Placement.create(CONFIG, load_layout("expert_fsdp"))
    params = placement.put(_reference()[0], placement.param_shardings())
    tokens = placement.global_batch({"tokens": _tokens()})["tokens"]
    with placement.activate():
        jaxpr = str(jax.make_jaxpr(functools.partial(_loss, CONFIG))(params, tokens))
    assert "shard_map" in jaxpr and "all_to_all" in jaxpr and "reduce_scatter" not in jaxpr


def test_tiny_llama4_trains_with_python_m_train_and_its_loss_falls(tmp_path):
    """`python -m train` on the Scout-shaped tiny model under expert_fsdp, router losses on:
    4 synthetic documents memorised, loss from ln(512) = 6.2 to below 1."""
    from train_runs import metrics, start

    log = tmp_path / "train.log"
    process = start([sys.executable, "-m", "train", "--config", "llama4_tiny_cpu", "--quiet",
                     f"run_dir={tmp_path}", "chip=v4"], log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[0]["loss"] > 4.0 and rows[-1]["loss"] < 1.0, [r["loss"] for r in rows]
    assert 1.0 <= rows[-1]["router_load_balance"] < 8.0 and rows[-1]["router_z_loss"] > 0


def test_killed_tiny_llama4_run_resumes_bit_exactly(tmp_path):
    """SIGKILL `python -m train` on the Scout-shaped tiny model under expert_fsdp (8 devices) between
    saves; the same command again resumes from the last checkpoint, and every step's loss, gradient
    norm and router losses equal an uninterrupted run's, bit for bit."""
    from train_runs import cli, exact_metrics, finish, kill_at_step, metrics, start, wait_for_step

    cache = tmp_path / "compilation_cache"  # the killed and resumed runs load the reference's executables
    settings = ("steps=6", "log_every=1", "checkpoint_every=2", "data.global_batch=8", "optimizer.warmup_steps=2")
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    command = functools.partial(cli, config="llama4_tiny_cpu")
    reference = start(command(reference_dir, *settings), tmp_path / "reference.log", compilation_cache=cache)
    wait_for_step(reference_dir, 1, reference)
    killed = start(command(killed_dir, *settings), tmp_path / "killed.log", compilation_cache=cache)
    kill_at_step(killed_dir, 3, killed, saved=2)
    assert killed.returncode == -9 and metrics(killed_dir)[-1]["step"] < 6

    resumed = start(command(killed_dir, *settings), tmp_path / "resumed.log", compilation_cache=cache)
    output = finish(resumed, tmp_path / "resumed.log", 300)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming from {killed_dir / 'checkpoints'}" in output
    reference_output = finish(reference, tmp_path / "reference.log", 300)
    assert reference.returncode == 0, reference_output[-3000:]
    router = ("router_load_balance", "router_z_loss")
    expected = exact_metrics(metrics(reference_dir), router)
    assert [row["step"] for row in expected] == list(range(1, 7))
    assert exact_metrics(metrics(killed_dir), router) == expected
