"""Low-rank adapters: exact at step 0, mergeable, sharded like their base weights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import LLAMA3_LIKE

from llama_jax import ConfigError, Llama, init_params
from llama_jax.config import LoraConfig
from llama_jax.model.lora import count_adapter_params, merge, split_adapters
from llama_jax.model.trees import join
from sharding.layout import load_layout
from sharding.place import Placement

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
CONFIG = LLAMA3_LIKE.replace(lora=LoraConfig(rank=4, alpha=8.0, targets=ALL))


def _tokens(shape=(2, 24), seed=0):
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape).astype(np.int32)
    return tokens, np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)


def _logits(config, params, tokens, positions):
    return Llama(config).apply({"params": params}, tokens, positions)[0]


def _with_trained_b(params, seed=1):
    """Adapters as after training: B no longer zero."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        if path[-1].key == "lora_b" else x, params)


def test_adapters_sit_beside_each_targeted_kernel_with_its_logical_axes():
    from llama_jax import logical_axes
    axes = logical_axes(CONFIG)["layers"]
    assert axes["attention"]["wq"]["lora_a"] == ("layers", "embed", None)
    assert axes["attention"]["wq"]["lora_b"] == ("layers", None, "heads", "head_dim")
    assert axes["attention"]["wo"]["lora_a"] == ("layers", "heads", "head_dim", None)
    assert axes["attention"]["wo"]["lora_b"] == ("layers", None, "embed")
    assert axes["feed_forward"]["w2"]["lora_a"] == ("layers", "mlp", None)
    params = init_params(CONFIG, jax.random.key(0))
    d, h, n, k, f, r, L = 64, 8, 2, 8, 192, 4, 2
    per_layer = (d + h * k) * r * 2 + (d + n * k) * r * 2 + 3 * (d + f) * r  # wq, wo; wk, wv; w1, w3, w2
    assert count_adapter_params(params) == L * per_layer
    assert params["layers"]["attention"]["wq"]["lora_a"].dtype == jnp.float32


def test_at_step_zero_an_adapted_model_computes_its_base_exactly():
    params = init_params(CONFIG, jax.random.key(0))
    _, base = split_adapters(params)
    tokens, positions = _tokens()
    np.testing.assert_array_equal(_logits(CONFIG, params, tokens, positions),
                                  _logits(LLAMA3_LIKE, base, tokens, positions))


def test_merged_weights_give_the_base_plus_adapter_logits():
    params = _with_trained_b(init_params(CONFIG, jax.random.key(0)))
    tokens, positions = _tokens()
    adapted = _logits(CONFIG, params, tokens, positions)
    merged, plain = merge(params, CONFIG)
    assert plain.lora is None and not split_adapters(merged)[0]
    _, base = split_adapters(params)
    assert np.abs(np.asarray(adapted - _logits(LLAMA3_LIKE, base, tokens, positions))).max() > 1e-2
    np.testing.assert_allclose(_logits(plain, merged, tokens, positions), adapted, atol=1e-5, rtol=0)


def test_split_and_join_round_trip():
    params = init_params(CONFIG, jax.random.key(0))
    adapters, base = split_adapters(params)
    assert set(adapters["layers"]["attention"]["wq"]) == {"lora_a", "lora_b"}
    assert set(base["layers"]["attention"]["wq"]) == {"kernel"}
    jax.tree.map(np.testing.assert_array_equal, join(base, adapters), params)


@pytest.mark.parametrize("bad, message", [
    ({"targets": ["wz"]}, r"lora.targets: 'wz' names no weight"),
    ({"rank": 0}, r"lora.rank: must be a positive integer"),
    ({"ranks": 4}, r"lora.ranks: unknown field"),
    # LLAMA3_LIKE: wk and wv are 64 x 16 (2 kv heads of 8), the smallest default target
    ({"rank": 1000}, r"^lora.rank: 1000 is not below the smaller side of wk \(64 x 16\); use a rank below 16$"),
    ({"rank": 16}, r"^lora.rank: 16 is not below the smaller side of wk \(64 x 16\)"),
    ({"rank": 64, "targets": ["w2"]}, r"^lora.rank: 64 is not below the smaller side of w2 \(192 x 64\)"
     r"; use a rank below 64$"),
])
def test_bad_lora_settings_are_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        LLAMA3_LIKE.replace(lora=bad)


def test_a_rank_just_below_the_smallest_target_side_is_accepted():
    assert LLAMA3_LIKE.replace(lora={"rank": 15}).lora.rank == 15
    assert LLAMA3_LIKE.replace(lora={"rank": 63, "targets": ["w2"]}).lora.rank == 63


@functools.cache
def _reference():
    params = _with_trained_b(init_params(CONFIG, jax.random.key(0)))
    adapters, base = split_adapters(params)
    tokens, positions = _tokens((8, 16))
    loss, grads = jax.jit(jax.value_and_grad(_adapter_loss))(adapters, base, tokens, positions)
    return adapters, base, float(loss), jax.device_get(grads)


def _adapter_loss(adapters, base, tokens, positions):
    logits = _logits(CONFIG, join(base, adapters), tokens, positions)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("name", ["dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp", "multislice"])
def test_adapter_loss_and_gradients_on_every_layout_equal_one_device(name):
    adapters, base, want_loss, want_grads = _reference()
    placement = Placement.create(CONFIG, load_layout(name))
    shardings = placement.param_shardings()
    adapter_shardings, base_shardings = split_adapters(shardings)
    tokens, positions = _tokens((8, 16))
    batch = placement.global_batch({"tokens": tokens, "positions": positions})
    with placement.activate():
        loss, grads = jax.jit(jax.value_and_grad(_adapter_loss))(
            placement.put(adapters, adapter_shardings), placement.put(base, base_shardings),
            batch["tokens"], batch["positions"])
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(grads)),
                            jax.tree.leaves(want_grads)):
        err = np.abs(np.asarray(g) - w).max() / np.abs(w).max()
        assert err <= 1e-5, f"{name}: {jax.tree_util.keystr(path)} differs by {err:.1e}"


def test_peft_export_loads_in_peft_with_our_logits(tmp_path):
    import peft
    import torch

    from llama_jax.convert.peft import write_peft
    from llama_jax.formats.hf import load_hf_params
    from tiny import hf_model

    hf = hf_model(LLAMA3_LIKE, seed=2)
    hf.save_pretrained(tmp_path / "base")
    _, base = load_hf_params(tmp_path / "base", LLAMA3_LIKE)
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    fresh = init_params(CONFIG, jax.random.key(0))
    adapters, _ = split_adapters(_with_trained_b(fresh))
    write_peft(adapters, CONFIG.replace(lora=lora), tmp_path / "adapter", base_model=str(tmp_path / "base"))
    tokens, positions = _tokens((2, 20))
    ours = np.asarray(_logits(CONFIG, join(base, adapters), tokens, positions))
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(ours - np.asarray(_logits(LLAMA3_LIKE, base, tokens, positions))).max() > 1e-2
