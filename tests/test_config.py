"""Model configs: published sizes load, bad fields fail in one line naming the field."""

import pytest

from llama_jax.config import ConfigError, ModelConfig, load_model_config, published_models
from llama_jax.formats.hf import config_from_hf, config_to_hf
from tiny import SHAPES

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


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ConfigError, match="not found .*llama3_1_8b"):
        load_model_config("llama9")


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
