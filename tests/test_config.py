"""TemdeConfig: defaults, sketch shape resolution, serialisation and clear errors."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, BertConfig, ViTConfig

from temde_hf import TemdeConfig
from temde_hf.testing import tiny_config


def test_sketch_width_follows_hyperplanes() -> None:
    assert tiny_config(n_hyperplanes=5).sketch_width == 32
    assert tiny_config(n_hyperplanes=None, sketch_width=64).n_hyperplanes == 6
    assert tiny_config(sketch_coder="anchor", n_hyperplanes=None, sketch_width=48).sketch_width == 48


@pytest.mark.parametrize(("fusion", "expected"), [("concat", 16 + 4 * 8), ("replace", 16), ("none", 16)])
def test_embed_dim(fusion: str, expected: int) -> None:
    assert tiny_config(sketch_fusion=fusion).embed_dim == expected


def test_round_trip_through_json(tmp_path) -> None:
    config = tiny_config(pooling="attention", sketch_coder="anchor", sketch_weight=0.5, token_layer_norm=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TemdeConfig)
    assert isinstance(loaded.vision_config, ViTConfig) and isinstance(loaded.text_config, BertConfig)
    for field in (
        "pooling",
        "sketch_coder",
        "sketch_weight",
        "token_layer_norm",
        "n_sketches",
        "sketch_width",
    ):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.vision_config.hidden_size == config.vision_config.hidden_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": "max"}, r"pooling='max'.*pooler, cls, mean, attention"),
        ({"sketch_fusion": "sum"}, r"sketch_fusion='sum'.*concat, replace, none"),
        ({"sketch_coder": "kmeans"}, r"sketch_coder='kmeans'.*soft_dlsh, anchor"),
        ({"n_sketches": 0}, r"n_sketches=0 must be an integer > 0"),
        ({"sketch_temperature": -1.0}, r"sketch_temperature=-1.0 must be a number > 0"),
        ({"n_hyperplanes": 3, "sketch_width": 16}, r"sketch_width=16 does not match n_hyperplanes=3"),
        ({"n_hyperplanes": None, "sketch_width": 48}, r"power of two"),
        ({"pooling": "attention", "attention_pooling_heads": 3}, r"divisible by attention_pooling_heads=3"),
    ],
)
def test_bad_values_raise_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_tower_config_without_model_type_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"vision_config has no 'model_type'"):
        TemdeConfig(vision_config={"hidden_size": 8}, text_config=BertConfig())


def test_unknown_tower_type_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model_type='not-a-model'.*AutoConfig.register"):
        TemdeConfig(vision_config={"model_type": "not-a-model"}, text_config=BertConfig())
