"""Tiny offline T-EMDE checkpoints and synthetic galleries for the hub / gallery / demo tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from temde_hf.testing import save_tiny_checkpoint

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (140, 40, 170),
}
CAPTIONS = [
    f"a {colour} square on a {background} background"
    for colour in COLOURS
    for background in ("black", "white")
]


def make_tiny_checkpoint(folder: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised tiny ViT + BERT T-EMDE checkpoint (model + processor) into ``folder``."""
    torch.manual_seed(seed)
    return save_tiny_checkpoint(folder, **overrides)


def make_colour_gallery(folder: Path) -> dict[str, Path]:
    """Solid-colour 48x48 PNGs, each with an inverse-colour square in its own place; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (48, 48), rgb)
        offset = 4 + 4 * i  # a different layout per image, not only a different colour
        inverse = (255 - rgb[0], 255 - rgb[1], 255 - rgb[2])
        ImageDraw.Draw(image).rectangle([offset, offset, offset + 10, offset + 10], fill=inverse)
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths
