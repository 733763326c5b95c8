"""TemdeModel: outputs, fusion identity, heads x fusions x coders, save/load, composition, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForZeroShotImageClassification,
    BertConfig,
    BertModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from temde_hf import POOLING_HEADS, SKETCH_CODERS, TemdeConfig, TemdeModel
from temde_hf.models.temde.configuration_temde import FUSION_CHOICES
from temde_hf.testing import save_tiny_towers, tiny_batch, tiny_model, tiny_tower_configs

# Every head with every fusion and coder; `replace` ignores the head, so it is tested once per coder.
VARIANTS = [
    (pooling, fusion, coder)
    for pooling, fusion, coder in itertools.product(
        sorted(POOLING_HEADS), FUSION_CHOICES, sorted(SKETCH_CODERS)
    )
    if not (fusion == "replace" and pooling != "mean") and not (fusion == "none" and coder != "soft_dlsh")
]


def batch(n: int = 3, seq: int = 6) -> dict[str, torch.Tensor]:
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, 4:] = 0  # one padded caption
    return {
        "input_ids": torch.randint(5, 40, (n, seq)),
        "attention_mask": mask,
        "pixel_values": torch.randn(n, 3, 32, 32),
    }


def test_forward_shapes_and_logits() -> None:
    model = tiny_model()
    out = model(**batch(), return_loss=True)
    e = model.config.embed_dim
    assert out.image_embeds.shape == (3, e) and out.text_embeds.shape == (3, e)
    assert out.image_sketch.shape == (3, 4, 8) and out.text_sketch.shape == (3, 4, 8)
    expected = model.logit_scale.exp() * out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.T)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_features_follow_the_v5_convention() -> None:
    model = tiny_model(sketch_fusion="none")
    b = batch()
    image = model.get_image_features(pixel_values=b["pixel_values"])
    text = model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for features in (image, text):
        assert isinstance(features, BaseModelOutputWithPooling)
        torch.testing.assert_close(features.pooler_output.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.encode_image(b["pixel_values"]), image.pooler_output)
    torch.testing.assert_close(model.encode_text(b["input_ids"], b["attention_mask"]), text.pooler_output)
    out = model(**b)
    torch.testing.assert_close(out.image_embeds, image.pooler_output)


def test_concat_inner_product_is_global_plus_weighted_sketch_similarity() -> None:
    lam = 0.7
    model = tiny_model(sketch_fusion="concat", sketch_weight=lam)
    out = model(**batch())
    vision, text = out.vision_model_output, out.text_model_output
    n = model.config.n_sketches
    # s_sketch(I, T) = (1/N) Σ_n <Ŝ_n(I), Ŝ_n(T)>
    s_sketch = torch.einsum("ink,jnk->ij", vision.sketch, text.sketch) / n
    expected = vision.global_embeds @ text.global_embeds.T + lam * s_sketch
    torch.testing.assert_close(out.image_embeds @ out.text_embeds.T, expected)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.full((3,), math.sqrt(1 + lam)))


def test_single_modality_forward_and_paired_loss_check() -> None:
    model = tiny_model()
    b = batch()
    out = model(pixel_values=b["pixel_values"])
    assert out.logits_per_image is None and out.image_embeds.shape[0] == 3 and out.text_embeds is None
    with pytest.raises(ValueError, match="paired batches"):
        model(input_ids=b["input_ids"][:2], pixel_values=b["pixel_values"], return_loss=True)


@pytest.mark.parametrize(("pooling", "fusion", "coder"), VARIANTS)
def test_save_load_round_trip(tmp_path, pooling: str, fusion: str, coder: str) -> None:
    model = tiny_model(pooling=pooling, sketch_fusion=fusion, sketch_coder=coder)
    if model.sketch is not None:  # saved state must include the data-dependent initialisation
        model.initialize_sketch(torch.randn(64, model.config.projection_dim))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TemdeModel)
    b = batch()
    with torch.no_grad():
        expected, got = model(**b), loaded(**b)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.text_embeds, expected.text_embeds, atol=1e-5, rtol=0)
    if model.sketch is not None:
        assert bool(loaded.sketch.initialized)


def test_every_parameter_gets_a_gradient() -> None:
    model = tiny_model(pooling="attention").train()
    model(**batch(), return_loss=True).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    # The towers' own poolers are unused by the "attention" head; everything else must learn.
    assert all(".pooler." in name for name in missing), missing


def test_gradient_checkpointing_reaches_the_towers() -> None:
    model = tiny_model().train()
    b = batch()
    torch.manual_seed(1)  # same dropout masks in both passes
    model(**b, return_loss=True).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()  # v5's name for gradient_checkpointing_enable
    for tower in (model.vision_model, model.text_model):
        assert any(getattr(m, "gradient_checkpointing", False) for m in tower.modules())
    torch.manual_seed(1)
    model(**b, return_loss=True).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_zero_shot_auto_class_loads(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path)
    assert isinstance(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path), TemdeModel)


def test_from_vision_text_pretrained_keeps_tower_weights(tmp_path) -> None:
    vision_dir, text_dir = save_tiny_towers(tmp_path)
    model = TemdeModel.from_vision_text_pretrained(vision_dir, text_dir, projection_dim=8, n_sketches=2)
    reference = BertModel.from_pretrained(text_dir)
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight
    )
    assert model.config.projection_dim == 8 and model.config.text_config.hidden_size == 32


def test_composed_text_tower_masks_padding_like_its_saved_copy(tmp_path) -> None:
    """A caption embeds the same alone and padded in a batch, freshly composed and reloaded alike (the
    composed config once lost its attention implementation and attended to padding)."""
    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers")
    composed = TemdeModel.from_vision_text_pretrained(
        vision_dir, text_dir, projection_dim=8, n_sketches=2
    ).eval()
    composed.save_pretrained(tmp_path / "saved")
    reloaded = TemdeModel.from_pretrained(tmp_path / "saved").eval()
    b = tiny_batch(4, seed=3)
    n = int(b["attention_mask"][0].sum())
    assert n < b["attention_mask"].shape[1]  # the first caption is padded in the batch
    with torch.no_grad():
        for model in (composed, reloaded):
            batch = model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            alone = model.get_text_features(
                input_ids=b["input_ids"][:1, :n], attention_mask=b["attention_mask"][:1, :n]
            )
            torch.testing.assert_close(batch.token_embeds[0, :n], alone.token_embeds[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.pooler_output[0], alone.pooler_output[0], atol=1e-5, rtol=0)


def test_missing_tower_config_is_a_clear_error(tmp_path) -> None:
    vision, _ = tiny_tower_configs()
    with pytest.raises(ValueError, match=r"text_config is missing"):
        TemdeModel(TemdeConfig(vision_config=vision))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json"):
        TemdeModel.from_vision_text_pretrained(tmp_path / "empty", tmp_path / "empty")


def test_mismatched_tower_dims_are_a_clear_error() -> None:
    vision, text = tiny_tower_configs()
    config = TemdeConfig(vision_config=vision, text_config=BertConfig(hidden_size=64, num_attention_heads=2))
    with pytest.raises(
        ValueError, match=r"text tower outputs 32 features but TemdeConfig.text_config declares 64"
    ):
        TemdeModel(config, text_model=BertModel(text))


def test_precomputed_tower_outputs_skip_the_towers() -> None:
    """`vision_outputs` / `text_outputs` (a frozen tower's cached output) give the same embeddings."""
    model = tiny_model(token_layer_norm=True)
    b = batch()
    with torch.no_grad():
        direct = model(**b)
        vision = model.vision_model(pixel_values=b["pixel_values"])
        text = model.text_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        cached = model(
            vision_outputs=vision,
            text_outputs=(text.last_hidden_state, text.pooler_output),
            attention_mask=b["attention_mask"],
        )
    torch.testing.assert_close(cached.image_embeds, direct.image_embeds)
    torch.testing.assert_close(cached.text_embeds, direct.text_embeds)
    with pytest.raises(ValueError, match="vision_outputs"):
        model(vision_outputs="not an output")


def test_forward_returns_the_logit_scale_and_takes_lambda_per_call() -> None:
    model = tiny_model()
    b = batch()
    out = model(**b)
    assert out.logit_scale.shape == (1,) and out.logit_scale.requires_grad
    torch.testing.assert_close(out.logit_scale, model.logit_scale.exp())
    off = model(**b, sketch_weight=0.0)  # λ = 0 for this call only: the sketch part of the embedding is 0
    d = model.config.projection_dim
    assert torch.all(off.image_embeds[:, d:] == 0) and model.config.sketch_weight == 1.0
    torch.testing.assert_close(off.image_embeds[:, :d], out.image_embeds[:, :d])


def test_token_layer_norm_is_part_of_the_architecture(tmp_path) -> None:
    model = tiny_model(token_layer_norm=True)
    assert isinstance(model.visual_token_norm, torch.nn.LayerNorm)
    assert isinstance(model.text_token_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        model.visual_token_norm.weight.mul_(2.0)  # not the init: must survive the round trip
    model.save_pretrained(tmp_path)
    loaded = TemdeModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.visual_token_norm.weight, model.visual_token_norm.weight)
    assert tiny_model().visual_token_norm is None


def test_scalar_logit_scale_of_older_checkpoints_loads() -> None:
    model = tiny_model()
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(1.5)  # stored as 0-dim tensors by earlier versions
    state["sketch.log_temperature"] = torch.tensor(-0.5)
    model.load_state_dict(state)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 1.5
    assert model.sketch.log_temperature.shape == (1,) and model.sketch.log_temperature.item() == -0.5


def test_forward_rejects_unknown_arguments() -> None:
    with pytest.raises(TypeError, match="bogus_kwarg"):
        tiny_model()(**batch(), bogus_kwarg=123)
    out = tiny_model()(**batch(), return_dict=False)
    assert isinstance(out, tuple)
