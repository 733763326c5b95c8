"""Heads that read the first token are refused for towers whose first token summarises nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    CLIPTextConfig,
    CLIPTextModel,
    ConvNextConfig,
    ResNetConfig,
    SiglipVisionConfig,
    ViTConfig,
)

from temde_hf import TemdeConfig
from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
from temde_hf.testing import tiny_tower_configs

SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _clip_text() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=99, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, **SMALL)


def _convnext() -> ConvNextConfig:
    return ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)


BAD = {
    "CLIP text + cls": (
        {"text_config": _clip_text()},
        "cls",
        r"text tower \(clip_text_model\).*end-of-text token",
    ),
    "ConvNeXt + cls": ({"vision_config": _convnext()}, "cls", r"vision tower \(convnext\).*top-left cell"),
    "ResNet + cls": (
        {"vision_config": ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)},
        "cls",
        r"\(resnet\)",
    ),
    "EfficientNet-Lite + cls": ({"vision_config": EfficientNetLiteConfig()}, "cls", r"\(efficientnet_lite\)"),
    "SigLIP vision + cls": ({"vision_config": SiglipVisionConfig(**SMALL)}, "cls", r"no \[CLS\]"),
    "headless SigLIP vision + pooler": (
        {"vision_config": SiglipVisionConfig(vision_use_head=False, **SMALL)},
        "pooler",
        r"pooling='pooler' .*use pooling='mean', 'attention'\.",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_first_token_heads_are_refused_where_it_summarises_nothing(case: str) -> None:
    towers, pooling, message = BAD[case]
    vision, text = tiny_tower_configs()
    towers = {"vision_config": vision, "text_config": text, **towers}
    with pytest.raises(ValueError, match=message):
        TemdeConfig(pooling=pooling, projection_dim=16, n_sketches=2, n_hyperplanes=2, **towers)


GOOD = {
    "ViT + BERT + cls": (ViTConfig(**SMALL, image_size=32, patch_size=8), BertConfig(**SMALL), "cls"),
    "CLIP text + pooler (its EOS)": (ViTConfig(**SMALL, image_size=32, patch_size=8), _clip_text(), "pooler"),
    "ConvNeXt + pooler (its global average)": (_convnext(), BertConfig(**SMALL), "pooler"),
    "ConvNeXt + mean": (_convnext(), BertConfig(**SMALL), "mean"),
    "SigLIP vision with its head + pooler": (SiglipVisionConfig(**SMALL), BertConfig(**SMALL), "pooler"),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_heads_with_a_real_summary_are_accepted(case: str) -> None:
    vision, text, pooling = GOOD[case]
    config = TemdeConfig(
        vision_config=vision, text_config=text, pooling=pooling, projection_dim=16, n_sketches=2
    )
    assert config.pooling == pooling


def test_why_clip_texts_first_token_is_no_summary() -> None:
    """Under causal attention the first (start-of-text) token sees only itself: the same for every caption."""
    torch.manual_seed(0)
    model = CLIPTextModel(_clip_text()).eval()
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 40, 41, 2, 0]])
    with torch.no_grad():
        out = model(input_ids=captions, attention_mask=(captions > 0).long())
    torch.testing.assert_close(out.last_hidden_state[0, 0], out.last_hidden_state[1, 0])
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1])
