"""A synthetic Karpathy-format dataset: small PNGs of coloured shapes with 5 captions each.

Used by tests, smoke runs and examples wherever real images are not wanted. Captions describe the
picture (colour, shape, size, background), so a model can actually learn the pairing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape} in front of {bg}",
    "there is a {size} {shape} coloured {colour}",
    "the picture shows a {colour} {shape}",
    "{bg} image with a {size} {colour} {shape} in it",
    "one {colour} {shape} , {size} , on {bg}",
)


def _draw(shape: str, colour: str, bg: str, big: bool, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(image)
    extent = int(size * (0.8 if big else 0.4))
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon(
            [(x0, y0 + extent), (x0 + extent, y0 + extent), (x0 + extent // 2, y0)], fill=COLOURS[colour]
        )
    return image


def make_synthetic_karpathy(
    root: str | Path,
    n_images: int = 20,
    seed: int = 0,
    image_size: int = 32,
    split_fractions: tuple[float, float] = (0.6, 0.2),
    n_captions: int = 5,
    dataset_name: str = "synthetic",
) -> Path:
    """Write `n_images` PNGs and a Karpathy-format JSON describing them.

    Layout: ``root/images/img_00000.png ...`` and ``root/dataset_synthetic.json`` with
    ``images[].filename`` (relative to ``root/images``), ``imgid``, ``split`` and ``sentences[].raw``.

    Args:
        root: Output folder (created).
        n_images: Number of images.
        seed: Seed of the shapes, colours, positions and caption order (same seed -> same files).
        image_size: Side of the square images in pixels.
        split_fractions: Fractions of train and val; the rest is test (every split gets at least one
            image when `n_images >= 3`).
        n_captions: Captions per image (5 is the protocol; fewer makes a deliberately bad file).
        dataset_name: Value of the top-level ``dataset`` field.

    Returns:
        The path of the JSON file; the image root is ``json_path.parent / "images"``.
    """
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_train = max(1, round(n_images * split_fractions[0])) if n_images >= 3 else n_images
    n_val = max(1, round(n_images * split_fractions[1])) if n_images >= 3 else 0
    n_train = min(n_train, n_images - n_val - (1 if n_images >= 3 else 0))
    entries = []
    sentid = 0
    for index in range(n_images):
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        bg = rng.choice(list(BACKGROUNDS))
        big = rng.random() < 0.5
        filename = f"img_{index:05d}.png"
        _draw(shape, colour, bg, big, image_size, rng).save(image_dir / filename)
        words = {"shape": shape, "colour": colour, "bg": bg, "size": "big" if big else "small"}
        templates = rng.sample(TEMPLATES, k=min(n_captions, len(TEMPLATES)))
        sentences = []
        for template in templates:
            raw = template.format(**words)
            sentences.append({"raw": raw, "tokens": raw.split(), "imgid": index, "sentid": sentid})
            sentid += 1
        split = "train" if index < n_train else "val" if index < n_train + n_val else "test"
        entries.append(
            {
                "filename": filename,
                "imgid": index,
                "split": split,
                "sentences": sentences,
                "sentids": [s["sentid"] for s in sentences],
            }
        )
    json_path = root / f"dataset_{dataset_name}.json"
    json_path.write_text(json.dumps({"images": entries, "dataset": dataset_name}))
    return json_path
