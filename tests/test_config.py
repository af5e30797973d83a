"""config.json in both on-disk forms, presets, validation, and exact parameter counts of the official sizes."""

import json

import pytest
import torch

from gemma4 import Config, ConfigError, Model, TextConfig
from reference import text_config_dict

OFFICIAL_TEXT_PARAMS = {"E2B": 4_628_569_344, "E4B": 7_463_013_376, "26B-A4B": 25_233_141_760,
                        "31B": 30_697_345_280}


@pytest.mark.parametrize("preset", list(OFFICIAL_TEXT_PARAMS))
def test_preset_parameter_count_equals_reference(preset):
    config = Config.preset(preset)
    with torch.device("meta"):
        model = Model(config, with_towers=False)
    assert sum(p.numel() for p in model.text.parameters()) == OFFICIAL_TEXT_PARAMS[preset]


@pytest.mark.parametrize("preset", list(OFFICIAL_TEXT_PARAMS))
def test_both_config_forms_give_the_same_model(preset):
    """The released form (global_head_dim, ...) and the form transformers 5.24 writes (per_layer_config)."""
    import transformers

    released = Config.preset(preset)
    written = transformers.Gemma4TextConfig(**{k: v for k, v in released.text_config.to_dict().items()}).to_dict()
    assert "per_layer_config" in written and "global_head_dim" not in written
    from_written = TextConfig.from_dict(json.loads(json.dumps(written)))
    for attribute in ("layer_head_dims", "layer_num_kv_heads", "kv_sharing_modes", "layer_types"):
        assert getattr(from_written, attribute) == getattr(released.text_config, attribute)
    # and transformers reads what we write
    ours_written = released.text_config.to_dict()
    reference = transformers.Gemma4TextConfig(**ours_written)
    for i in range(released.text_config.num_hidden_layers):
        assert reference.per_layer_config[i].head_dim == released.text_config.layer_head_dims[i]
        assert reference.per_layer_config[i].num_key_value_heads == released.text_config.layer_num_kv_heads[i]


def test_kv_sharing_plan_matches_reference():
    import transformers

    for preset in ("E2B", "E4B"):
        ours = Config.preset(preset).text_config
        reference = transformers.Gemma4TextConfig(**ours.to_dict())
        assert ours.kv_sharing_modes == reference.kv_sharing_modes
    e2b = Config.preset("E2B").text_config
    assert e2b.kv_sharing_modes.count("reuse") == 20
    assert e2b.kv_source_layer[34] == 14 and e2b.kv_source_layer[33] == 13  # global reads global, sliding sliding
    assert e2b.mlp_width(34) == 2 * e2b.mlp_width(0)  # E2B's shared layers have double-wide MLPs


def test_layer_types_derived_when_absent():
    data = text_config_dict("31B")
    del data["layer_types"]
    data["num_hidden_layers"] = 8
    config = TextConfig.from_dict(data)
    assert config.layer_types[5] == "full_attention" and config.layer_types[-1] == "full_attention"
    assert config.layer_types.count("full_attention") == 2


def test_legacy_expert_key_and_unknown_keys():
    data = text_config_dict("26B-A4B")
    data["expert_intermediate_size"] = data.pop("moe_intermediate_size")
    data["some_future_key"] = {"x": 1}
    config = TextConfig.from_dict(data)
    assert config.moe_intermediate_size == 32
    assert config.extra == {"some_future_key": {"x": 1}}
    assert config.to_dict()["some_future_key"] == {"x": 1}


@pytest.mark.parametrize("change, message", [
    ({"num_kv_shared_layers": 99}, "num_kv_shared_layers"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"layer_types": ["weird"] * 6}, "unknown layer types"),
    ({"num_experts": None}, "enable_moe_block"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1.0}}}, "rope_type"),
    ({"per_layer_config": {"40": {"head_dim": 64}}}, "per_layer_config"),
])
def test_contradictory_configs_are_clear_errors(change, message):
    data = {**text_config_dict("26B-A4B"), **change}
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_dict(data)


def test_other_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        Config.from_file(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="E2B, E4B, 26B-A4B, 31B"):
        Config.preset("7B")
    assert Config.preset("gemma-4-e2b-it").text_config.hidden_size == 1536
