"""Tests of QuaffConfig validation and option parsing."""

from __future__ import annotations

import dataclasses

import pytest

from quaff_compile.config import QuaffConfig


def test_defaults():
    config = QuaffConfig()
    assert config.momentum == 0.9
    assert config.outlier_threshold == 100.0
    assert config.outlier_max_ratio == 0.01
    assert config.skip_fqns == ("lm_head",)


def test_unknown_option_lists_known_ones():
    with pytest.raises(ValueError) as error:
        QuaffConfig.from_options({"momentun": 0.5})
    message = str(error.value)
    assert "momentun" in message
    assert "momentum" in message
    assert "outlier_threshold" in message


def test_frozen_and_keyword_only():
    config = QuaffConfig.from_options({"momentum": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.momentum = 0.1
    with pytest.raises(TypeError):
        QuaffConfig(0.5)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({"outlier_threshold": -1.0}, "outlier_threshold"),
        ({"outlier_max_ratio": 1.0}, "outlier_max_ratio"),
        ({"skip_fqns": "lm_head"}, "skip_fqns"),
        ({"matmul": "fast"}, "matmul"),
        ({"filter_fn": 3}, "filter_fn"),
    ],
)
def test_invalid_values_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        QuaffConfig.from_options(options)


def test_skip_fqns_match_components():
    config = QuaffConfig(skip_fqns=["lm_head", "model.layers.0.mlp.down_proj"])
    assert config.skip_fqns == ("lm_head", "model.layers.0.mlp.down_proj")
    assert not config.should_quantize(None, "base_model.model.lm_head")
    assert not config.should_quantize(None, "model.layers.0.mlp.down_proj")
    assert config.should_quantize(None, "model.layers.1.mlp.down_proj")
    assert config.should_quantize(None, "model.lm_head_norm")


def test_filter_fn_overrides_skip_fqns():
    config = QuaffConfig(filter_fn=lambda module, fqn: fqn.endswith("lm_head"))
    assert config.should_quantize(None, "lm_head")
    assert not config.should_quantize(None, "model.layers.0.mlp.up_proj")
