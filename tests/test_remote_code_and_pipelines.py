"""Checkpoints load as Hub remote code without temde_hf, and transformers' pipelines run on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

from temde_hf.testing import run_without_temde_hf, save_tiny_checkpoint, tiny_processed_batch, tiny_processor


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "ckpt", pooling="attention", sketch_coder="anchor")


@pytest.mark.slow
def test_remote_code_loads_without_the_package(checkpoint: Path, tmp_path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForZeroShotImageClassification",
        "AutoModelForPreTraining",
    }
    processor = AutoProcessor.from_pretrained(checkpoint)
    batch = tiny_processed_batch(processor)
    torch.save(dict(batch), tmp_path / "batch.pt")
    from transformers import AutoModel

    with torch.no_grad():
        expected = AutoModel.from_pretrained(checkpoint).eval()(**batch)
    out = run_without_temde_hf(
        f"""
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(**batch)
        torch.save({{"image": out.image_embeds, "text": out.text_embeds}}, {str(tmp_path / "remote.pt")!r})
        print(type(processor).__name__)
        """,
        cwd=tmp_path,
    )
    assert "TemdeProcessor" in out
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    torch.testing.assert_close(remote["image"], expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote["text"], expected.text_embeds, atol=1e-5, rtol=0)


def test_processor_round_trip(checkpoint: Path) -> None:
    processor = AutoProcessor.from_pretrained(checkpoint)
    batch = tiny_processed_batch(processor)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    reference = tiny_processor()(text=["a red circle"])
    assert processor(text=["a red circle"])["input_ids"].tolist() == reference["input_ids"].tolist()
    with pytest.raises(ValueError, match="needs `images=`, `text=` or both"):
        processor()


def test_zero_shot_pipeline_orders_scores_like_the_model(tmp_path) -> None:
    # A large logit scale so the tiny random model's scores are clearly apart.
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", logit_scale_init_value=6.0)
    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    labels = ["dog", "cat", "car", "red circle", "woman"]
    result = classifier(image, candidate_labels=labels)
    # Reference: the model's own logits on the pipeline's prompts.
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = classifier.model.eval()
    prompts = [f"This is a photo of {label}." for label in labels]
    with torch.no_grad():
        logits = model(**processor(images=[image], text=prompts)).logits_per_image[0]
    expected = [labels[i] for i in logits.argsort(descending=True).tolist()]
    assert [r["label"] for r in result] == expected
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    assert scores[0] > scores[-1] + 1e-3


def test_feature_extraction_pipelines(checkpoint: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8))
    image_features = pipeline("image-feature-extraction", model=str(checkpoint))(image)
    text_features = pipeline("feature-extraction", model=str(checkpoint))("a red circle")
    with torch.no_grad():
        batch = processor(images=[image], text=["a red circle"])
        expected_image = model.encode_image(batch["pixel_values"])
        expected_text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(torch.tensor(image_features), expected_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(text_features), expected_text, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_composed_model_saves_a_processor_that_auto_classes_and_pipelines_load(tmp_path) -> None:
    from temde_hf import TemdeModel, TemdeProcessor
    from temde_hf.testing import save_tiny_towers

    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers")
    model = TemdeModel.from_vision_text_pretrained(vision_dir, text_dir, projection_dim=8, n_sketches=2)
    processor = TemdeProcessor.from_vision_text_pretrained(vision_dir, text_dir)
    assert type(processor.image_processor).__name__.startswith("ViTImageProcessor")
    assert (
        processor(text=["a red circle"])["input_ids"].tolist()
        == tiny_processor()(text=["a red circle"])["input_ids"].tolist()
    )
    folder = tmp_path / "composed"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # A user without temde_hf: AutoProcessor gives the image + text processor, and the pipeline runs.
    out = run_without_temde_hf(
        f"""
        from PIL import Image
        from transformers import AutoProcessor, pipeline
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        classifier = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        result = classifier(Image.new("RGB", (40, 40), "red"), candidate_labels=["red", "blue"])
        print(type(processor).__name__, sorted(r["label"] for r in result))
        """,
        cwd=tmp_path,
    )
    assert "TemdeProcessor ['blue', 'red']" in out


def test_composed_processor_names_a_tower_without_processor_files(tmp_path) -> None:
    from temde_hf import TemdeProcessor
    from temde_hf.testing import save_tiny_towers

    vision_dir, text_dir = save_tiny_towers(tmp_path / "towers")
    (vision_dir / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"vision tower .*vision: no image processor could be loaded"):
        TemdeProcessor.from_vision_text_pretrained(vision_dir, text_dir)
    with pytest.raises(
        TypeError, match=r"unknown arguments \['use_fast'\]: prefix each with vision_ or text_"
    ):
        TemdeProcessor.from_vision_text_pretrained(vision_dir, text_dir, use_fast=True)


def test_sentence_transformers_embeds_texts_and_images_like_the_model(checkpoint: Path) -> None:
    """`SentenceTransformer(folder)` finds the model's feature methods: the same embeddings, both modalities."""
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="the dev extra installs it")
    from transformers import AutoModel

    encoder = sentence_transformers.SentenceTransformer(str(checkpoint), device="cpu", trust_remote_code=True)
    model = AutoModel.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    texts = ["a red circle", "a dog on the grass"]
    images = [Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)) for value in (30, 200)]
    with torch.no_grad():
        batch = processor(images=images, text=texts)
        expected_text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        expected_image = model.encode_image(batch["pixel_values"])
    text_embeds = torch.from_numpy(encoder.encode(texts))
    image_embeds = torch.from_numpy(encoder.encode(images))
    assert text_embeds.shape == (2, model.config.embed_dim)
    torch.testing.assert_close(text_embeds, expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_embeds, expected_image, atol=1e-5, rtol=1e-5)


def test_image_feature_extraction_is_pooled_without_pool_true(checkpoint: Path) -> None:
    """The README's claim: the pipeline's default answer is already the pooled embedding; `pool=True` is
    transformers' request for a `pooler_output` field, which this model's output does not have."""
    extractor = pipeline("image-feature-extraction", model=str(checkpoint))
    image = Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8))
    features = torch.tensor(extractor(image))
    assert features.shape == (1, extractor.model.config.embed_dim)
    with pytest.raises(ValueError, match="No pooled output was returned"):
        extractor(image, pool=True)
