"""Every shipped layout computes what one device computes, and really splits the arrays.

Runs on 8 emulated CPU devices (tests/conftest.py). The model is LLAMA3_LIKE
from tests/tiny.py: dim 64, 8 heads, 2 kv heads, ffn 192, vocab 320, so every
split dimension divides 8 and `tp` (tensor = 8) must replicate the kv heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import LLAMA3_LIKE

from llama_jax import Llama, ModelConfig, init_params
from sharding.layout import LayoutError, available_layouts, layout_from_dict, load_layout
from sharding.mesh import make_mesh
from sharding.place import Placement

CONFIG = LLAMA3_LIKE
SHIPPED = ("dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp", "multislice")
BATCH, LENGTH = 8, 32
RTOL = 1e-5


def _loss(config, params, tokens_bt, positions_bt):
    logits_btv, _ = Llama(config).apply({"params": params}, tokens_bt, positions_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    picked_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return -picked_bt.mean()


@functools.cache
def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy()
    return tokens, positions


@functools.cache
def _reference(config: ModelConfig = CONFIG):
    """Parameters, loss and gradients computed on one device without any mesh."""
    params = init_params(config, jax.random.key(0))
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, config)))(params, *_batch())
    return params, float(loss), jax.device_get(grads)


def _sharded_loss_and_grads(placement: Placement, params):
    tokens, positions = _batch()
    batch = placement.global_batch({"tokens": tokens, "positions": positions})
    with placement.activate():
        step = jax.jit(jax.value_and_grad(functools.partial(_loss, placement.config)))
        loss, grads = step(params, batch["tokens"], batch["positions"])
    return float(loss), jax.device_get(grads)


def _assert_trees_close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        err = float(np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max())
        assert err <= RTOL, f"{what}: {jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"


def _wq(params):
    return params["layers"]["attention"]["wq"]["kernel"]


def _wk(params):
    return params["layers"]["attention"]["wk"]["kernel"]


def _shard_shape_on_device0(array):
    device0 = jax.devices()[0]
    return next(s.data.shape for s in array.addressable_shards if s.device == device0)


def test_every_required_layout_is_shipped():
    assert set(SHIPPED) <= set(available_layouts())


@pytest.mark.parametrize("name", available_layouts())
def test_layout_matches_single_device_loss_and_gradients(name):
    params, want_loss, want_grads = _reference()
    placement = Placement.create(CONFIG, load_layout(name))
    sharded = placement.put(params, placement.param_shardings())
    loss, grads = _sharded_loss_and_grads(placement, sharded)
    assert abs(loss - want_loss) <= RTOL * abs(want_loss), f"{name}: loss {loss} vs {want_loss}"
    _assert_trees_close(grads, want_grads, f"layout {name} gradients")


# Expected mesh sizes, wq / wk kernel specs, and the wq kernel shard held by
# device 0 (wq is [layers 2, embed 64, heads 8, head_dim 8]).
EXPECTED = {
    "dp": ({"stage": 1, "data": 8, "fsdp": 1, "sequence": 1, "tensor": 1},
           P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor", None), (2, 64, 8, 8)),
    "fsdp": ({"stage": 1, "data": 1, "fsdp": 8, "sequence": 1, "tensor": 1},
             P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor", None), (2, 8, 8, 8)),
    # tensor 8 outnumbers the 2 kv heads: kv heads are replicated.
    "tp": ({"stage": 1, "data": 1, "fsdp": 1, "sequence": 1, "tensor": 8},
           P(None, "fsdp", "tensor", None), P(None, "fsdp", None, None), (2, 64, 1, 8)),
    "fsdp_tp": ({"stage": 1, "data": 1, "fsdp": 4, "sequence": 1, "tensor": 2},
                P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor", None), (2, 16, 4, 8)),
    "fsdp_sp": ({"stage": 1, "data": 1, "fsdp": 4, "sequence": 2, "tensor": 1},
                P(None, ("fsdp", "sequence"), "tensor", None),
                P(None, ("fsdp", "sequence"), "tensor", None), (2, 8, 8, 8)),
    "multislice": ({"stage": 1, "data": 2, "fsdp": 4, "sequence": 1, "tensor": 1},
                   P(None, "fsdp", "tensor", None), P(None, "fsdp", "tensor", None), (2, 16, 8, 8)),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_parameters_carry_the_expected_partition_specs(name):
    mesh_sizes, wq_spec, wk_spec, wq_shard = EXPECTED[name]
    placement = Placement.create(CONFIG, load_layout(name))
    assert dict(placement.mesh.shape) == mesh_sizes
    params = placement.put(_reference()[0], placement.param_shardings())
    assert _wq(params).sharding.spec == wq_spec
    assert _wk(params).sharding.spec == wk_spec
    assert _shard_shape_on_device0(_wq(params)) == wq_shard
    embed_axes = ("fsdp", "sequence") if name == "fsdp_sp" else "fsdp"
    assert params["embed"]["embedding"].sharding.spec == P("tensor", embed_axes)
    assert params["output"]["kernel"].sharding.spec == P(embed_axes, "tensor")
    assert params["layers"]["feed_forward"]["w2"]["kernel"].sharding.spec == P(None, "tensor", embed_axes)


def test_fsdp_gives_each_device_one_eighth_of_the_parameter_bytes():
    placement = Placement.create(CONFIG, load_layout("fsdp"))
    params = placement.put(_reference()[0], placement.param_shardings())
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    held = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    assert set(held.values()) == {total // 8}, f"bytes per device {held}, total {total}"
    assert total % 8 == 0


@functools.cache
def _jitted_init():
    return jax.device_get(jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0)))


@pytest.mark.parametrize("name", ["fsdp_tp", "fsdp_sp"])
def test_born_sharded_init_equals_unsharded_init(name):
    placement = Placement.create(CONFIG, load_layout(name))
    born = placement.init_params(jax.random.key(0))
    assert jax.tree.map(lambda a: a.sharding.spec, born) == \
        jax.tree.map(lambda s: s.spec, placement.param_shardings())
    # Bit for bit against the same jitted init on one device; eager init may
    # differ in the last bit (different fusion of the scaling), so to 1 ulp.
    jitted = _jitted_init()
    eager = _reference()[0]
    assert jax.tree.structure(born) == jax.tree.structure(eager)
    for (path, got), exact, ref in zip(jax.tree_util.tree_leaves_with_path(born),
                                       jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        where = f"{name}: {jax.tree_util.keystr(path)}"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exact), err_msg=where)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-7, atol=0, err_msg=where)


def test_tp_replicates_kv_heads_when_tensor_outnumbers_them():
    placement = Placement.create(CONFIG, load_layout("tp"))
    rules = dict(placement.rules)
    assert rules["kv_heads"] is None and rules["heads"] == "tensor"
    params = placement.put(_reference()[0], placement.param_shardings())
    # every device holds both kv heads, and one of the 8 query heads
    assert _shard_shape_on_device0(_wk(params)) == (2, 64, 2, 8)
    assert _shard_shape_on_device0(_wq(params)) == (2, 64, 1, 8)


def test_kv_head_replication_is_said_in_one_line(caplog):
    with caplog.at_level("WARNING"):
        Placement.create(CONFIG, load_layout("tp"))
    lines = [r.getMessage() for r in caplog.records if "kv head" in r.getMessage()]
    assert lines == ["layout tp: tensor = 8 outnumbers n_kv_heads 2, so each kv head is replicated "
                     "on 4 shards"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        Placement.create(CONFIG.replace(n_kv_heads=8), load_layout("tp"))
    assert not [r for r in caplog.records if "kv head" in r.getMessage()]


def test_a_fixed_layout_smaller_than_the_machine_runs_on_the_first_devices(caplog):
    params, want_loss, want_grads = _reference()
    with caplog.at_level("WARNING"):
        placement = Placement.create(CONFIG, load_layout("dp", data=1))
    assert placement.mesh.devices.tolist() == [[[[[jax.devices()[0]]]]]]
    assert "layout dp: the mesh uses 1 of the 8 devices" in caplog.text
    loss, grads = _sharded_loss_and_grads(placement, placement.put(params, placement.param_shardings()))
    assert abs(loss - want_loss) <= RTOL * abs(want_loss)
    _assert_trees_close(grads, want_grads, "dp on 1 of 8 devices")
    assert Placement.create(CONFIG, load_layout("fsdp_tp", tensor=2)).mesh.size == 8  # -1 takes them all


def test_tp_splits_kv_heads_when_they_match_the_tensor_axis():
    config = CONFIG.replace(n_kv_heads=8)
    params, want_loss, want_grads = _reference(config)
    placement = Placement.create(config, load_layout("tp"))
    assert dict(placement.rules)["kv_heads"] == "tensor"
    sharded = placement.put(params, placement.param_shardings())
    assert _shard_shape_on_device0(_wk(sharded)) == (2, 64, 1, 8)
    loss, grads = _sharded_loss_and_grads(placement, sharded)
    assert abs(loss - want_loss) <= RTOL * abs(want_loss)
    _assert_trees_close(grads, want_grads, "tp with 8 kv heads")


def test_fsdp_tp_with_tensor_4_replicates_2_kv_heads_and_matches_one_device():
    params, want_loss, want_grads = _reference()
    placement = Placement.create(CONFIG, load_layout("fsdp_tp", tensor=4))
    assert dict(placement.mesh.shape) == {"stage": 1, "data": 1, "fsdp": 2, "sequence": 1, "tensor": 4}
    assert dict(placement.rules)["kv_heads"] is None
    loss, grads = _sharded_loss_and_grads(placement, placement.put(params, placement.param_shardings()))
    assert abs(loss - want_loss) <= RTOL * abs(want_loss)
    _assert_trees_close(grads, want_grads, "fsdp_tp tensor=4")


def test_fsdp_sp_splits_the_sequence_and_matches_unsplit_logits():
    params = _reference()[0]
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 64)).astype(np.int32)
    positions = np.broadcast_to(np.arange(64, dtype=np.int32), tokens.shape).copy()
    apply = jax.jit(lambda p, t, pos, hidden: Llama(CONFIG).apply(
        {"params": p}, t, pos, return_hidden=hidden)[0], static_argnums=3)
    want_logits = np.asarray(apply(params, tokens, positions, False))

    placement = Placement.create(CONFIG, load_layout("fsdp_sp"))
    assert placement.mesh.shape["sequence"] == 2
    sharded = placement.put(params, placement.param_shardings())
    batch = placement.global_batch({"tokens": tokens, "positions": positions})
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), "sequence")
    with placement.activate():
        logits = apply(sharded, batch["tokens"], batch["positions"], False)
        hidden = apply(sharded, batch["tokens"], batch["positions"], True)
    # batch 4 over fsdp 4, length 64 over sequence 2: each device holds 1 row of 32 positions
    assert logits.sharding.spec[1] == "sequence"
    assert _shard_shape_on_device0(logits) == (1, 32, CONFIG.vocab_size)
    assert hidden.sharding.spec[1] == "sequence"
    assert _shard_shape_on_device0(hidden) == (1, 32, CONFIG.dim)
    starts = sorted({s.index[1].start or 0 for s in logits.addressable_shards})
    assert starts == [0, 32]
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=RTOL,
                               atol=RTOL * np.abs(want_logits).max())


SPLASH = CONFIG.replace(attention="splash", attention_block=128)
PACKED_LENGTH = 256  # the splash kernel works in blocks of 128 tokens


def _packed_loss(config, params, tokens_bt, positions_bt, segments_bt):
    logits_btv, _ = Llama(config).apply({"params": params}, tokens_bt, positions_bt, segments_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    picked_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return -picked_bt.mean()


@functools.cache
def _packed_batch():
    """4 rows of 256 tokens, each packing 3 documents (positions restart per document)."""
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, PACKED_LENGTH)).astype(np.int32)
    segments = np.sort(rng.integers(1, 4, (4, PACKED_LENGTH)), axis=1).astype(np.int32)
    starts = np.maximum.accumulate(np.where(np.diff(segments, prepend=0, axis=1) != 0,
                                            np.arange(PACKED_LENGTH), 0), axis=1)
    positions = (np.arange(PACKED_LENGTH) - starts).astype(np.int32)
    return tokens, positions, segments


@functools.cache
def _packed_reference():
    """Loss and gradients of the packed batch with xla attention on one device."""
    params = _reference()[0]
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_packed_loss, CONFIG)))(
        params, *_packed_batch())
    return float(loss), jax.device_get(grads)


def _packed_loss_and_grads(config, layout_name):
    params = _reference()[0]
    if layout_name is None:
        return jax.jit(jax.value_and_grad(functools.partial(_packed_loss, config)))(
            params, *_packed_batch())
    placement = Placement.create(config, load_layout(layout_name))
    sharded = placement.put(params, placement.param_shardings())
    tokens, positions, segments = _packed_batch()
    batch = placement.global_batch({"tokens": tokens, "positions": positions, "segments": segments})
    with placement.activate():
        return jax.jit(jax.value_and_grad(functools.partial(_packed_loss, config)))(
            sharded, batch["tokens"], batch["positions"], batch["segments"])


@pytest.mark.parametrize("layout", [None, "fsdp_tp", "tp"])
def test_splash_gives_xla_loss_and_gradients_on_one_device_and_layouts(layout):
    """One device; fsdp 4 x tensor 2 (kv heads split); tensor 8 (kv heads replicated)."""
    want_loss, want_grads = _packed_reference()
    loss, grads = _packed_loss_and_grads(SPLASH, layout)
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss), f"{layout}: {loss} vs {want_loss}"
    _assert_trees_close(jax.device_get(grads), want_grads, f"splash under {layout}")


def test_context_parallelism_with_packing_matches_one_device_and_splits_the_length():
    """fsdp_sp (fsdp 4 x sequence 2): each device holds half of every row's tokens;
    splash all-gathers keys and values over sequence and keeps its own queries."""
    want_loss, want_grads = _packed_reference()
    loss, grads = _packed_loss_and_grads(SPLASH, "fsdp_sp")
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss)
    _assert_trees_close(jax.device_get(grads), want_grads, "context parallelism")

    placement = Placement.create(SPLASH, load_layout("fsdp_sp"))
    tokens, positions, segments = _packed_batch()
    batch = placement.global_batch({"tokens": tokens, "positions": positions, "segments": segments})
    apply = jax.jit(lambda p, t, pos, seg: Llama(SPLASH).apply({"params": p}, t, pos, seg,
                                                               return_hidden=True)[0])
    params = placement.put(_reference()[0], placement.param_shardings())
    with placement.activate():
        hidden = apply(params, batch["tokens"], batch["positions"], batch["segments"])
        hlo = apply.lower(params, batch["tokens"], batch["positions"], batch["segments"]).as_text()
    assert hidden.sharding.spec[1] == "sequence"
    assert _shard_shape_on_device0(hidden) == (1, PACKED_LENGTH // 2, CONFIG.dim)
    # Inside the kernel's shard_map each device has 128 query rows and gathers
    # all 256 key rows of its kv heads: [rows 1, 256 keys, 2 kv heads, head_dim 8].
    assert "all_gather" in hlo and "tensor<1x256x2x8xf32>" in hlo


def test_multislice_data_axis_spans_the_emulated_slices():
    placement = Placement.create(CONFIG, load_layout("multislice"))
    grid = placement.mesh.devices[0]  # [stage 1, data, fsdp, sequence, tensor] -> [data, ...]
    assert grid.shape == (2, 4, 1, 1)
    devices = jax.devices()
    for slice_index in range(2):
        assert list(grid[slice_index].flat) == devices[4 * slice_index: 4 * slice_index + 4], \
            f"data index {slice_index} should be exactly slice {slice_index}'s devices"
    # the fsdp axis stays inside a slice; only data crosses between slices
    for j in range(4):
        assert grid[0, j, 0, 0] in devices[:4] and grid[1, j, 0, 0] in devices[4:]
    # rows of the batch: first half on slice 0, second half on slice 1
    tokens, positions = _batch()
    batch = placement.global_batch({"tokens": tokens})
    for shard in batch["tokens"].addressable_shards:
        first_row = shard.index[0].start
        assert (first_row < BATCH // 2) == (shard.device in devices[:4])
        np.testing.assert_array_equal(np.asarray(shard.data), tokens[shard.index])


def test_multislice_with_tensor_axis_keeps_tensor_inside_a_slice():
    layout = layout_from_dict("ms_tp", {
        "mesh": {"ici": {"fsdp": 2, "tensor": 2}, "dcn": {"data": 2}},
        "rules": load_layout("fsdp_tp").rules})
    mesh = make_mesh(layout)
    assert dict(mesh.shape) == {"stage": 1, "data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    devices = jax.devices()
    assert set(mesh.devices[0, 0].flat) == set(devices[:4])
    assert set(mesh.devices[0, 1].flat) == set(devices[4:])


# ---- validation errors: one clear line, raised before anything compiles ----

def _rules_without(name):
    return [[logical, list(axes) if isinstance(axes, tuple) else axes]
            for logical, axes in load_layout("fsdp").rules if logical != name]


def test_mesh_needing_more_devices_than_available_is_an_error():
    layout = layout_from_dict("big", {"mesh": {"ici": {"fsdp": 4, "tensor": 4}},
                                      "rules": _rules_without(None)})
    with pytest.raises(LayoutError, match=r"layout big: mesh stage=1 x data=1 x fsdp=4 x sequence=1 x "
                                          r"tensor=4 needs 16 devices but 8 are available"):
        Placement.create(CONFIG, layout)


def test_fixed_sizes_not_dividing_the_device_count_is_an_error():
    with pytest.raises(LayoutError, match=r"layout fsdp_tp: 8 devices do not divide into the fixed "
                                          r"mesh sizes \(product 3\)"):
        Placement.create(CONFIG, load_layout("fsdp_tp", tensor=3))


def test_dimension_not_divisible_by_its_axes_is_an_error():
    config = CONFIG.replace(vocab_size=300)
    with pytest.raises(LayoutError, match=r"layout tp: vocab \(vocab_size\) of size 300 does not "
                                          r"divide by tensor = 8"):
        Placement.create(config, load_layout("tp"))
    with pytest.raises(LayoutError, match=r"layout fsdp: embed \(dim\) of size 36 does not divide "
                                          r"by fsdp = 8"):
        Placement.create(CONFIG.replace(dim=36, n_heads=6, n_kv_heads=2), load_layout("fsdp"))


def test_sequence_length_without_two_halves_per_sequence_shard_is_an_error():
    from sharding.place import validate
    placement = Placement.create(CONFIG, load_layout("fsdp_sp"))
    validate(CONFIG, placement.layout, placement.mesh, seq_len=68)
    with pytest.raises(LayoutError, match=r"layout fsdp_sp: sequence length 66 does not split into "
                                          r"2 sequence shards of two halves each .* use a multiple of 4\)$"):
        validate(CONFIG, placement.layout, placement.mesh, seq_len=66)


def test_kv_heads_neither_dividing_nor_a_multiple_of_tensor_is_an_error():
    config = ModelConfig(dim=48, n_layers=1, n_heads=6, n_kv_heads=3, ffn_dim=64, vocab_size=64)
    with pytest.raises(LayoutError, match=r"layout fsdp_tp: tensor = 2 neither divides nor is a "
                                          r"multiple of n_kv_heads 3"):
        Placement.create(config, load_layout("fsdp_tp"))


def test_batch_not_divisible_by_the_batch_axes_is_an_error():
    placement = Placement.create(CONFIG, load_layout("fsdp"))
    with pytest.raises(LayoutError, match=r"batch\['tokens'\]: batch of size 6 does not divide by "
                                          r"data x fsdp = 8"):
        placement.global_batch({"tokens": np.zeros((6, 4), np.int32)})


def test_logical_name_with_no_rule_is_an_error():
    with pytest.raises(LayoutError, match=r"layout partial: logical axis 'vocab' has no rule "
                                          r"\(add one, with null to replicate\)"):
        layout_from_dict("partial", {"mesh": {}, "rules": _rules_without("vocab")})


def test_model_logical_name_unknown_to_layouts_is_an_error(monkeypatch):
    import sharding.place as place

    real = place.logical_axes
    monkeypatch.setattr(place, "logical_axes", lambda config: {**real(config), "extra": ("experts",)})
    with pytest.raises(LayoutError, match=r"layout fsdp: the model names logical axis 'experts', "
                                          r"which no rule covers"):
        Placement.create(CONFIG, load_layout("fsdp"))


def test_unknown_logical_name_in_a_rule_is_an_error():
    rules = _rules_without(None) + [["experts", "tensor"]]  # a typo of `expert`
    with pytest.raises(LayoutError, match=r"layout typo: rule for unknown logical axis 'experts'"):
        layout_from_dict("typo", {"mesh": {}, "rules": rules})


def test_unknown_mesh_axis_is_an_error():
    rules = [["heads", "model"] if r[0] == "heads" else r for r in _rules_without(None)]
    with pytest.raises(LayoutError, match=r"layout bad: rule heads -> 'model' names no mesh axis "
                                          r"\(known: stage, data, fsdp, sequence, tensor\)"):
        layout_from_dict("bad", {"mesh": {}, "rules": rules})
    with pytest.raises(LayoutError, match=r"layout bad: mesh.ici.model is not a mesh axis"):
        layout_from_dict("bad", {"mesh": {"ici": {"model": 2}}, "rules": _rules_without(None)})
    with pytest.raises(LayoutError, match=r"layout fsdp: mesh.ici.model is not a mesh axis"):
        load_layout("fsdp", model=2)


def test_bad_mesh_sizes_are_errors():
    with pytest.raises(LayoutError, match=r"layout bad: mesh.ici.fsdp must be a positive integer "
                                          r"or -1, got 0"):
        layout_from_dict("bad", {"mesh": {"ici": {"fsdp": 0}}, "rules": _rules_without(None)})
    with pytest.raises(LayoutError, match=r"layout bad: at most one mesh size may be -1"):
        layout_from_dict("bad", {"mesh": {"ici": {"fsdp": -1, "tensor": -1}},
                                 "rules": _rules_without(None)})


def test_bad_yaml_is_an_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("mesh: {ici: {fsdp: -1\nrules: [\n")
    with pytest.raises(LayoutError, match=r"broken.yaml: not valid YAML"):
        load_layout(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("mesh: {}\nrules: []\nextra: 1\n")
    with pytest.raises(LayoutError, match=r"layout wrong: expected keys mesh, rules and \(optionally\) "
                                          r"pipeline, got \{'extra'\}"):
        load_layout(wrong)
    listy = tmp_path / "listy.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(LayoutError, match=r"listy.yaml: the top level must be a mapping of keys, got a list"):
        load_layout(listy)
    mesh_list = tmp_path / "meshlist.yaml"
    mesh_list.write_text("mesh: [1, 2]\nrules: []\n")
    with pytest.raises(LayoutError, match=r"layout meshlist: mesh must be a mapping"):
        load_layout(mesh_list)


def test_unknown_layout_name_is_an_error():
    with pytest.raises(LayoutError, match=r"layout 'fsdq' not found \(known: dp, expert_fsdp, expert_fsdp_tp, fsdp, fsdp_sp"):
        load_layout("fsdq")



def test_tpu_chips_are_detected_from_device_files(tmp_path):
    from sharding.topology import tpu_chips_attached

    assert not tpu_chips_attached(str(tmp_path))
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the VFIO control node alone is no chip
    assert not tpu_chips_attached(str(tmp_path))
    (tmp_path / "vfio" / "0").touch()
    assert tpu_chips_attached(str(tmp_path))
    other = tmp_path / "v4host"
    other.mkdir()
    (other / "accel0").touch()
    assert tpu_chips_attached(str(other))
