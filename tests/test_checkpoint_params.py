"""Our checkpoint format: saved params come back equal, onto any sharding, or fail in one line."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import init_params
from llama_jax.formats.checkpoint import CheckpointError, latest_step, read_config, restore_params, save_params
from llama_jax.formats.checkpoint_io import ParamsReader, ParamsWriter
from tiny import SHAPES

CONFIG = SHAPES["llama3"]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def assert_trees_equal(expected, got):
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for path, a in jax.tree_util.tree_flatten_with_path(expected)[0]:
        b = got
        for key in path:
            b = b[key.key]
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def write_streaming(directory, config, params, step=0):
    """Write params the converters' way: every stacked leaf layer by layer."""
    with ParamsWriter(directory, config, step) as writer:
        for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = tuple(k.key for k in keys)
            if path[0] == "layers":
                for i in range(leaf.shape[0]):
                    writer.write(path, i, np.asarray(leaf[i]))
            else:
                writer.write(path, None, np.asarray(leaf))


def test_save_restore_round_trip_every_leaf_equal(tmp_path, params):
    save_params(tmp_path / "ckpt", CONFIG, params, step=3)
    assert latest_step(tmp_path / "ckpt") == 3
    assert read_config(tmp_path / "ckpt") == CONFIG
    config, restored = restore_params(tmp_path / "ckpt")
    assert config == CONFIG
    assert_trees_equal(params, restored)


def test_restore_picks_latest_step_or_the_one_asked(tmp_path, params):
    save_params(tmp_path, CONFIG, params, step=1)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    save_params(tmp_path, CONFIG, doubled, step=5)
    assert latest_step(tmp_path) == 5
    assert_trees_equal(doubled, restore_params(tmp_path)[1])
    assert_trees_equal(params, restore_params(tmp_path, step=1)[1])


def test_restore_onto_a_sharded_target(tmp_path, params):
    save_params(tmp_path, CONFIG, params)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    # Split every leaf's last dim over "tensor" (4 divides all of them) and the stacked layers over "data".
    def spec(leaf):
        axes = [None] * leaf.ndim
        axes[-1] = "tensor"
        if leaf.ndim == 4:
            axes[0] = "data"
        return NamedSharding(mesh, PartitionSpec(*axes))
    shardings = jax.tree.map(spec, params)
    _, restored = restore_params(tmp_path, shardings=shardings)
    assert_trees_equal(params, restored)
    wq = restored["layers"]["attention"]["wq"]["kernel"]
    assert wq.sharding == shardings["layers"]["attention"]["wq"]["kernel"]
    assert len(wq.addressable_shards) == 8
    assert wq.addressable_shards[0].data.shape == (1, 64, 8, 2)


def test_restore_casts_to_the_given_param_dtype(tmp_path, params):
    save_params(tmp_path, CONFIG, params)
    config, restored = restore_params(tmp_path, config=CONFIG.replace(param_dtype="bfloat16", remat="full"))
    assert config.remat == "full"
    assert restored["norm"]["scale"].dtype == jax.numpy.bfloat16


def test_unrolled_layers_round_trip(tmp_path, params):
    unrolled_config = CONFIG.replace(scan_layers=False)
    unrolled = init_params(unrolled_config, jax.random.key(1))
    save_params(tmp_path, unrolled_config, unrolled)
    _, restored = restore_params(tmp_path)
    assert_trees_equal(unrolled, restored)
    _, stacked = restore_params(tmp_path, config=CONFIG)
    assert stacked["layers"]["ffn_norm"]["scale"].shape == (2, 64)


def test_streamed_checkpoint_restores_like_a_saved_one(tmp_path, params):
    save_params(tmp_path / "saved", CONFIG, params)
    write_streaming(tmp_path / "streamed", CONFIG, params)
    assert latest_step(tmp_path / "streamed") == 0
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(*[None, "fsdp"][:x.ndim])), params)
    _, restored = restore_params(tmp_path / "streamed", shardings=shardings)
    assert_trees_equal(params, restored)
    # The metadata files are exactly those orbax writes for the same tree.
    for name in ("_METADATA", "array_metadatas/process_0"):
        saved = json.loads((tmp_path / "saved/0/params" / name).read_text())
        streamed = json.loads((tmp_path / "streamed/0/params" / name).read_text())
        if "array_metadatas" in saved:
            saved, streamed = (sorted(x["array_metadatas"], key=str) for x in (saved, streamed))
        assert saved == streamed, name
    for directory in ("saved", "streamed"):
        reader = ParamsReader(tmp_path / directory)
        assert reader.layers_per_chunk(("layers", "feed_forward", "w1", "kernel")) == 1
        np.testing.assert_array_equal(reader.read(("layers", "feed_forward", "w1", "kernel"), 1),
                                      params["layers"]["feed_forward"]["w1"]["kernel"][1])


def test_streaming_writer_refuses_an_incomplete_step(tmp_path, params):
    with pytest.raises(CheckpointError, match="layer 1: never written"):
        with ParamsWriter(tmp_path, CONFIG) as writer:
            for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
                path = tuple(k.key for k in keys)
                writer.write(path, 0 if path[0] == "layers" else None, np.asarray(leaf[0] if path[0] == "layers" else leaf))
    assert latest_step(tmp_path) is None
    with pytest.raises(CheckpointError, match="got shape"):
        ParamsWriter(tmp_path / "other", CONFIG).write(("norm", "scale"), None, np.zeros(3))


def test_bad_checkpoints_fail_in_one_line(tmp_path, params):
    def error(**kwargs):
        with pytest.raises(CheckpointError) as info:
            restore_params(**kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "not found" in error(directory=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint step" in error(directory=tmp_path / "empty")
    assert latest_step(tmp_path / "empty") is None and latest_step(tmp_path / "missing") is None

    save_params(tmp_path / "ok", CONFIG, params)
    assert "no complete step 7" in error(directory=tmp_path / "ok", step=7)
    assert "n_kv_heads is 4 but the checkpoint has 2" in error(directory=tmp_path / "ok",
                                                               config=CONFIG.replace(n_kv_heads=4))
    wrong = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), {"embed": params["embed"]})
    assert "shardings: missing leaf" in error(directory=tmp_path / "ok", shardings=wrong)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    too_deep = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(None, "fsdp")), params)
    assert "shardings: norm/scale of shape (64,)" in error(directory=tmp_path / "ok", shardings=too_deep)

    save_params(tmp_path / "no_params", CONFIG, params)
    import shutil
    shutil.rmtree(tmp_path / "no_params/0/params")
    assert "no 'params' item" in error(directory=tmp_path / "no_params")
    shutil.rmtree(tmp_path / "no_params/0/config")
    assert "no 'config' item" in error(directory=tmp_path / "no_params")

    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "ok", CONFIG, params)
    with pytest.raises(CheckpointError, match="leaf .* has shape"):
        save_params(tmp_path / "bad", CONFIG, {**params, "norm": {"scale": np.zeros(3)}})
