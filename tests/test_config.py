import json

import pytest

import subtune
from subtune.cli import parse_overrides
from subtune.core.config import ConfigError


@pytest.mark.parametrize("method_id", subtune.available_methods())
def test_every_config_round_trips_through_json(method_id):
    config = subtune.get_method(method_id).config_class()
    again = subtune.config_from_dict(json.loads(config.to_json()))
    assert again == config and type(again) is type(config)


def test_cli_overrides_are_typed_by_the_config():
    overrides = parse_overrides(["--r", "8", "--lora_alpha=16", "--target-modules", "q_proj,v_proj"])
    config = subtune.LoraConfig().with_overrides(overrides)
    assert config.r == 8 and config.lora_alpha == 16.0 and config.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['rank'\].*'r'"):
        subtune.config_from_dict({"method": "lora", "rank": 8})


def test_bad_value_type_is_reported():
    with pytest.raises(ConfigError, match="r: expected int"):
        subtune.LoraConfig().with_overrides({"r": "eight"})
    with pytest.raises(ConfigError, match="r must be >= 1"):
        subtune.LoraConfig().with_overrides({"r": "0"})


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(KeyError, match="unknown method 'nope'.*lora"):
        subtune.get_method("nope")
