"""Parameter settings resolve per tensor exactly as mergekit resolves them."""

from __future__ import annotations

import pytest

from mergelab.config import SettingScope, evaluate_setting, parse_config, resolve_tensor_params
from mergelab.errors import ConfigError
from mergelab.methods import Param, get_method

NUMBER = Param("x")
FLAG = Param("flag", type=bool, default=False)


def value(setting, name="model.layers.0.mlp.up_proj.weight", t=0.0, param=NUMBER):
    return evaluate_setting(setting, name, t, param, "test")


def test_scalar():
    assert value(0.3) == 0.3
    assert value("0.5") == 0.5  # YAML strings like 1e-3 become numbers for numeric parameters


@pytest.mark.parametrize(
    "t, expected",
    [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.25, 0.25), (1 / 3, 1 / 3)],
)
def test_two_point_gradient_is_linear(t, expected):
    assert value([0.0, 1.0], t=t) == pytest.approx(expected)


def test_multi_point_gradient_interpolates_piecewise():
    # [0, 1, 0.2] at t: scaled = t*2; t=0.75 -> between 1 and 0.2 at 0.5 -> 0.6
    assert value([0.0, 1.0, 0.2], t=0.75) == pytest.approx(0.6)
    assert value([0.0, 1.0, 0.2], t=0.5) == pytest.approx(1.0)
    assert value([0.0, 1.0, 0.2], t=1.0) == pytest.approx(0.2)


def test_boolean_gradient_picks_an_element():
    assert value([False, True], t=0.4, param=FLAG) is False
    assert value([False, True], t=1.0, param=FLAG) is True


def test_filter_list_first_match_wins():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": 0.2}, {"value": 0.3}]
    assert value(setting, "model.layers.0.self_attn.q_proj.weight") == 0.1
    assert value(setting, "model.layers.0.mlp.up_proj.weight") == 0.2
    assert value(setting, "model.norm.weight") == 0.3


def test_filter_value_may_be_a_gradient_and_pattern_is_an_alias():
    setting = [{"pattern": "mlp", "value": [0.0, 1.0]}, {"filter": "*", "value": 0.9}]
    assert value(setting, "model.layers.3.mlp.down_proj.weight", t=0.5) == pytest.approx(0.5)
    assert value(setting, "lm_head.weight") == 0.9


def test_unmatched_filter_falls_through_to_the_next_scope():
    method = get_method("ties")
    model_scope = SettingScope({"weight": 1.0, "density": [{"filter": "mlp", "value": 0.2}]}, "m")
    top_scope = SettingScope({"density": 0.7, "normalize": False}, "top")
    resolved = resolve_tensor_params(
        method,
        output_name="model.layers.0.self_attn.q_proj.weight",
        t=0.0,
        shared_scopes=[top_scope],
        models=[("ft", "model.layers.0.self_attn.q_proj.weight", [model_scope, top_scope])],
    )
    assert resolved["density"] == [0.7]  # the model's filter did not match; the top level did
    assert resolved["weight"] == [1.0]
    assert resolved["normalize"] is False
    assert resolved["lambda"] == 1.0 and resolved["rescale"] is False  # ties defaults


def test_out_of_range_and_malformed_values():
    density = get_method("ties").param("density")
    with pytest.raises(ConfigError, match="out of range"):
        evaluate_setting(1.2, "x", 0.0, density, "where")
    with pytest.raises(ConfigError, match="must be a number"):
        evaluate_setting("lots", "x", 0.0, density, "where")
    with pytest.raises(ConfigError, match="must be finite"):
        evaluate_setting(float("nan"), "x", 0.0, NUMBER, "where")


def test_config_schema_accepts_mergekit_spellings():
    config = parse_config(
        {
            "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1}}],
            "base_model": "a",
            "merge_method": "ties",
            "dtype": "bf16",
            "out_dtype": "torch.float16",
            "tokenizer_source": "base",
        }
    )
    assert config.dtype == "bfloat16" and config.out_dtype == "float16"
    assert config.referenced_models() == ["a", "b"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"models": [{"model": "a"}], "merge_method": "linear", "dtype": "int8"}, "not a floating-point dtype"),
        ({"models": [{"model": "a"}], "merge_method": "linear", "chat_template": "x"}, "chat_template"),
        ({"models": [{"model": "a"}], "merge_method": "linear", "tokenizer": {"tokens": {"x": {}}}}, "tokenizer.tokens"),
        ({"merge_method": "linear"}, "exactly one of 'models' or 'slices'"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}], "merge_method": "passthrough"},
         "0 <= start < end"),
    ],
)
def test_config_schema_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(data, "recipe.yml")
    assert str(error.value).startswith("recipe.yml: ")


def test_fields_mergekit_ignores_are_accepted_and_said(caplog):
    """A mergekit recipe runs unchanged: its stage name, models[].layer_range and slices[].residual_weight
    have no effect in mergekit 0.1.5, and none here (with a warning where a user may expect one)."""
    config = parse_config({"name": "stage-1", "models": [{"model": "a", "layer_range": [0, 2]}],
                           "merge_method": "linear"}, "recipe.yml")
    assert config.name == "stage-1"
    config = parse_config({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}],
                           "merge_method": "passthrough"}, "recipe.yml")
    warnings = [r.getMessage() for r in caplog.records]
    assert any("models[0].layer_range is ignored" in w for w in warnings)
    assert any("slices[0].residual_weight is ignored" in w for w in warnings)
