"""Model configs: published sizes load, bad fields fail in one line naming the field."""

import pytest

from llama_jax.config import ConfigError, ModelConfig, load_model_config, published_models
from llama_jax.formats.hf import config_from_hf, config_to_hf
from tiny import LLAMA4_SHAPES, SHAPES

GOOD = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256)


@pytest.mark.parametrize("changes, field", [
    ({"n_layers": -1}, "n_layers"),
    ({"n_heads": 5}, "n_heads"),          # does not divide dim 64
    ({"n_kv_heads": 3}, "n_kv_heads"),    # does not divide n_heads 4
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"dtype": "float8"}, "dtype"),
    ({"remat": "sometimes"}, "remat"),
    ({"attention": "magic"}, "attention"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"norm_eps": -1.0}, "norm_eps"),
    ({"moe": {"n_experts": 4}}, "moe.ffn_dim_expert"),            # required
    ({"moe": {"n_experts": 4, "ffn_dim_expert": 64, "top_k": 5}}, "moe.top_k"),
    ({"moe": {"n_experts": 4, "ffn_dim_expert": 64, "capacity": 1.0}}, "moe.capacity"),
    ({"nope_layer_interval": 0}, "nope_layer_interval"),
    ({"nope_layer_interval": 3}, "n_layers"),                      # 2 layers are not repeats of 3
    ({"attention_chunk_size": -8}, "attention_chunk_size"),
    ({"attn_temperature_tuning": {"floor_scale": 0}}, "attn_temperature_tuning.floor_scale"),
    ({"qk_norm": "yes"}, "qk_norm"),
])
def test_bad_field_fails_with_one_line_naming_it(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**GOOD, **changes})
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_unknown_and_missing_keys_are_named():
    with pytest.raises(ConfigError, match="^n_layer: unknown model config field"):
        ModelConfig.from_dict({**GOOD, "n_layer": 2})
    with pytest.raises(ConfigError, match="^ffn_dim: required"):
        ModelConfig.from_dict({k: v for k, v in GOOD.items() if k != "ffn_dim"})


def test_every_published_config_loads():
    names = published_models()
    for name in ("llama2_7b", "llama3_1_405b", "llama3_2_1b"):
        assert name in names
    assert load_model_config("llama3_2_1b").head_dim == 64
    assert load_model_config("llama3_2_1b").rope_scaling.factor == 32
    assert load_model_config("llama3_1_8b").rope_scaling.factor == 8


def test_unknown_model_name_lists_the_closest_known_ones_and_where_the_rest_are():
    with pytest.raises(ConfigError) as err:
        load_model_config("llama3_1_8")
    assert str(err.value) == (f"model config 'llama3_1_8' not found (closest: llama3_1_8b, llama3_8b, llama3_1_70b; "
                              f"{len(published_models())} known, see configs/models/)")
    with pytest.raises(ConfigError, match=r"^model config 'gpt2' not found \(\d+ known, see configs/models/\)$"):
        load_model_config("gpt2")


def test_unknown_model_field_names_the_closest_fields_in_a_short_line():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**GOOD, "dimm": 64})
    assert str(err.value).startswith("dimm: unknown model config field (closest: dim, ffn_dim, head_dim; ")
    assert str(err.value).endswith(" known, see ModelConfig in llama_jax/config.py)") and len(str(err.value)) < 200


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hf_config_round_trips_in_both_rope_forms(shape):
    config = SHAPES[shape]
    hf = config_to_hf(config)
    assert config_from_hf(hf) == config
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}   # transformers 4.x form
    v5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}  # 5.x form
    assert config_from_hf(v4) == config
    assert config_from_hf(v5) == config


def test_a_config_file_whose_top_level_is_not_a_mapping_is_one_line(tmp_path):
    listy = tmp_path / "listy.yaml"
    listy.write_text("- dim\n- 64\n")
    with pytest.raises(ConfigError, match=r"^.*listy\.yaml: the top level must be a mapping of keys, got a list$"):
        load_model_config(listy)


def test_a_run_config_applies_lora_and_model_overrides_to_a_model_config_object():
    """A notebook passes the ModelConfig it holds; `lora` and `model_overrides` still apply."""
    from train.config import run_config_from_dict

    tiny = load_model_config("tiny")
    run = run_config_from_dict({"model": tiny, "init_from": "ckpt", "model_overrides": {"remat": "full"},
                                "data": {"seq_len": 64, "vocab_size": 256},
                                "lora": {"rank": 4, "targets": ["wq"]}})
    assert run.model.lora.rank == 4 and run.model.lora.targets == ("wq",) and run.model.remat == "full"
    assert run.model.replace(lora=None, remat=tiny.remat) == tiny


@pytest.mark.parametrize("shape", sorted(LLAMA4_SHAPES))
def test_llama4_hf_config_round_trips(shape):
    config = LLAMA4_SHAPES[shape]
    hf = config_to_hf(config)
    assert hf["model_type"] == "llama4_text" and config_from_hf(hf) == config
    assert config_from_hf({k: v for k, v in hf.items() if k not in ("moe_layers", "no_rope_layers")}) == config


def test_published_llama4_configs_load_with_their_layer_patterns():
    scout, maverick = load_model_config("llama4_scout_17b_16e"), load_model_config("llama4_maverick_17b_128e")
    assert scout.layer_period == maverick.layer_period == 4
    assert [scout.layer_kind(i).moe for i in range(4)] == [True] * 4
    assert [maverick.layer_kind(i).moe for i in range(4)] == [False, True, False, True]
    assert [k.rope for k in map(scout.layer_kind, range(4))] == [True, True, True, False]
    assert scout.rope_scaling.low_freq_factor == scout.rope_scaling.high_freq_factor == 1.0
