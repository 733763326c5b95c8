"""The matching head (`TemdeForImageTextRetrieval`): padding-exact, a `TemdeModel` plus `itm_head.*`,
round trips through `save_pretrained`, the Auto classes and Hub remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining, AutoProcessor

import temde_hf  # noqa: F401  (registers the Auto classes)
from temde_hf import TemdeForImageTextRetrieval, TemdeModel
from temde_hf.testing import (
    run_without_temde_hf,
    tiny_batch,
    tiny_config,
    tiny_processed_batch,
    tiny_processor,
)


def _model(**overrides) -> TemdeForImageTextRetrieval:
    torch.manual_seed(0)
    return TemdeForImageTextRetrieval(tiny_config(**overrides)).eval()


def test_logits_ignore_padding_and_pair_rows() -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(3, 5, 16, generator=g), torch.randn(3, 6, 16, generator=g)
    image_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    text_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        logits = model.get_matching_logits(images, image_mask, texts, text_mask)
        # garbage in the padding and two more padded positions: the same logits
        noisy_images = torch.where(image_mask[..., None].bool(), images, 1e3 * torch.randn_like(images))
        noisy_texts = torch.cat(
            [torch.where(text_mask[..., None].bool(), texts, -50.0), torch.ones(3, 2, 16)], 1
        )
        noisy = model.get_matching_logits(
            noisy_images, image_mask, noisy_texts, torch.cat([text_mask, torch.zeros(3, 2)], 1)
        )
        # one pair alone gives its row of the batch
        alone = model.get_matching_logits(images[1:2, :3], image_mask[1:2, :3], texts[1:2], text_mask[1:2])
    assert logits.shape == (3,)
    torch.testing.assert_close(noisy, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, logits[1:2], atol=1e-5, rtol=0)
    assert logits.std() > 0  # the head does read its inputs


def test_forward_pairs_rows_and_keeps_the_dual_encoder_outputs() -> None:
    model = _model()
    batch = tiny_batch(3, seed=1)
    raw = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(**raw, use_itm_head=True)
        plain = model(**raw)  # default: the dual encoder only, like Blip2ForImageTextRetrieval
        vision, text = out.vision_model_output, out.text_model_output
        expected = model.get_matching_logits(
            vision.token_embeds, vision.token_mask, text.token_embeds, text.token_mask
        )
        precomputed = model(
            pair_image_tokens=vision.token_embeds, pair_image_mask=vision.token_mask,
            pair_text_tokens=text.token_embeds, pair_text_mask=text.token_mask,
        )  # fmt: skip
    torch.testing.assert_close(out.itm_logits, expected)
    torch.testing.assert_close(precomputed.itm_logits, expected)
    assert plain.itm_logits is None and precomputed.image_embeds is None
    torch.testing.assert_close(plain.logits_per_image, out.logits_per_image)
    with pytest.raises(ValueError, match="as many images as texts"):
        model(pixel_values=raw["pixel_values"][:2], input_ids=raw["input_ids"], attention_mask=raw["attention_mask"],
              use_itm_head=True)  # fmt: skip


def test_save_pretrained_round_trip_and_auto_classes(tmp_path: Path) -> None:
    model = _model(itm_layers=1, itm_heads=2, itm_hidden_size=8)
    batch = tiny_batch(2, seed=2)
    raw = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["TemdeForImageTextRetrieval"] and config["itm_layers"] == 1
    assert model.itm_head.classifier.in_features == 8
    assert config["auto_map"]["AutoModelForPreTraining"] == "matching_temde.TemdeForImageTextRetrieval"
    assert (tmp_path / "ckpt" / "matching_temde.py").is_file() and (
        tmp_path / "ckpt" / "alignment_temde.py"
    ).is_file()
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path / "ckpt").eval()
    dual = AutoModel.from_pretrained(tmp_path / "ckpt").eval()  # the dual encoder alone
    assert type(loaded) is TemdeForImageTextRetrieval and type(dual) is TemdeModel
    with torch.no_grad():
        expected = model(**raw, use_itm_head=True)
        again = loaded(**raw, use_itm_head=True)
        torch.testing.assert_close(again.itm_logits, expected.itm_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(dual(**raw).image_embeds, expected.image_embeds, atol=1e-5, rtol=0)


def test_dual_encoder_checkpoint_loads_with_a_fresh_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dual = TemdeModel(tiny_config()).eval()
    dual.save_pretrained(tmp_path / "dual")
    model = TemdeForImageTextRetrieval.from_pretrained(tmp_path / "dual").eval()
    batch = tiny_batch(2, seed=3)
    raw = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**raw).text_embeds, dual(**raw).text_embeds)
        logits = model(**raw, use_itm_head=True).itm_logits
    assert torch.isfinite(logits).all()
    attention = model.itm_head.layers[0].self_attn.in_proj_weight.detach()  # initialised, not left empty
    assert 0.01 < float(attention.std()) < 1.0


@pytest.mark.slow
def test_remote_code_round_trip_without_the_package(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "ckpt")
    tiny_processor().save_pretrained(tmp_path / "ckpt")
    processor = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    batch = tiny_processed_batch(processor)
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch, use_itm_head=True).itm_logits
    run_without_temde_hf(
        f"""
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "TemdeForImageTextRetrieval", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(**batch, use_itm_head=True).itm_logits, {str(tmp_path / "remote.pt")!r})
        """,
        cwd=tmp_path,
    )
    torch.testing.assert_close(
        torch.load(tmp_path / "remote.pt", weights_only=True), expected, atol=1e-5, rtol=0
    )


def test_config_checks_the_head_shape() -> None:
    with pytest.raises(ValueError, match="itm_heads=3"):
        tiny_config(itm_heads=3)
    with pytest.raises(ValueError, match="width 10"):
        tiny_config(itm_hidden_size=10)
    with pytest.raises(ValueError, match="itm_layers"):
        tiny_config(itm_layers=0)
    with pytest.raises(ValueError, match="alignment_aggregation"):
        tiny_config(alignment_aggregation="sum")
