"""Frozen-tower head training (the demo's and the quality ablation's path) on tiny towers and shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from temde_hf.data import load_image_captions
from temde_hf.data.synthetic import make_synthetic_karpathy
from temde_hf.testing import tiny_model, tiny_processor
from temde_hf.training.frozen import (
    HeadTrainingArguments,
    TowerFeatures,
    embed_cached_images,
    embed_cached_texts,
    evaluate_cached,
    extract_tower_features,
    train_head,
)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TowerFeatures]:
    json_path = make_synthetic_karpathy(tmp_path_factory.mktemp("shapes"), n_images=40, seed=3)
    model, processor = tiny_model(), tiny_processor()
    return {
        split: extract_tower_features(
            model, processor, load_image_captions(json_path, split=split), max_length=16, batch_size=8
        )
        for split in ("train", "val")
    }


def test_cached_head_matches_features_from_raw_inputs(tmp_path: Path) -> None:
    """The cache holds exactly what `get_*_features` feeds the head: same embeddings either way."""
    dataset = load_image_captions(make_synthetic_karpathy(tmp_path, n_images=6, seed=1))
    model, processor = tiny_model(sketch_fusion="concat"), tiny_processor()
    feats = extract_tower_features(model, processor, dataset, max_length=16)
    images = [row["image"] for row in dataset]
    captions = [c for row in dataset["captions"] for c in row]
    with torch.no_grad():
        direct_images = model.get_image_features(**processor(images=images)).pooler_output
        batch = processor(text=captions, padding="max_length", max_length=16)
        direct_texts = model.get_text_features(**batch).pooler_output
        cached_images = embed_cached_images(model, feats, torch.arange(len(images)))
        cached_texts = embed_cached_texts(model, feats, torch.arange(len(captions)))
    # fp16 cache of the towers' hidden states: agreement to half precision.
    torch.testing.assert_close(cached_images, direct_images, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached_texts, direct_texts, atol=2e-3, rtol=2e-3)
    assert feats.caption_to_image.tolist() == [i for i, row in enumerate(dataset["captions"]) for _ in row]


def test_tower_features_save_load_roundtrip(features: dict[str, TowerFeatures], tmp_path: Path) -> None:
    path = tmp_path / "cache" / "train.safetensors"
    features["train"].save(path)
    loaded = TowerFeatures.load(path)
    assert not list(path.parent.glob("*.tmp"))
    for name, value in features["train"].__dict__.items():
        assert torch.equal(getattr(loaded, name), value), name


@pytest.mark.parametrize("fusion", ["none", "concat", "replace"])
def test_train_head_learns_and_keeps_best_val_epoch(features: dict[str, TowerFeatures], fusion: str) -> None:
    model = tiny_model(sketch_fusion=fusion)
    before = evaluate_cached(model, features["val"])["rsum"]
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    history = train_head(
        model, features["train"], features["val"], HeadTrainingArguments(epochs=6, eval_every=2, batch_size=16),
        progress=False,
    )  # fmt: skip
    assert history["epoch"] == [2, 4, 6]
    assert all(math.isfinite(x) for x in history["step_loss"])
    after = evaluate_cached(model, features["val"])["rsum"]
    assert after == pytest.approx(max(history["val_rsum"]))  # the best epoch's weights are restored
    assert after > before
    for name, value in model.vision_model.state_dict().items():  # towers stay frozen
        assert torch.equal(value, vision_before[name]), name
    if model.sketch is not None:
        assert bool(model.sketch.initialized)


def test_sketch_warmup_switches_the_branch_on_after_warmup(features: dict[str, TowerFeatures]) -> None:
    model = tiny_model(sketch_fusion="concat", sketch_weight=0.5)
    seen_weights = []
    original = model.compute_loss

    def spy(*args, **kwargs):  # records λ at every step
        seen_weights.append(model.config.sketch_weight)
        return original(*args, **kwargs)

    model.compute_loss = spy
    args = HeadTrainingArguments(epochs=4, eval_every=1, batch_size=30, sketch_warmup_epochs=2)
    history = train_head(model, features["train"], features["val"], args, progress=False)
    steps_per_epoch = math.ceil(len(features["train"].caption_to_image) / 30)
    assert seen_weights == [0.0] * (2 * steps_per_epoch) + [0.5] * (2 * steps_per_epoch)
    assert history["epoch"] == [3, 4]  # a λ = 0 model is never kept as the best
    assert model.config.sketch_weight == 0.5
    assert bool(model.sketch.initialized)


def test_sketch_warmup_needs_concat(features: dict[str, TowerFeatures]) -> None:
    with pytest.raises(ValueError, match="sketch_fusion='concat'"):
        train_head(tiny_model(sketch_fusion="replace"), features["train"], None,
                   HeadTrainingArguments(epochs=1, sketch_warmup_epochs=1), progress=False)  # fmt: skip


def test_non_finite_loss_stops_with_a_clear_error(features: dict[str, TowerFeatures]) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.visual_projection.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning_rate"):
        train_head(model, features["train"], None, HeadTrainingArguments(epochs=1), progress=False)
