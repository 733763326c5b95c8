"""Tiny offline T-EMDE checkpoints and synthetic galleries for the hub / gallery / demo tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import BertConfig, BertTokenizerFast, ViTConfig, ViTImageProcessor

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "is",
    "this",
    "photo",
    "picture",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "square",
    "circle",
    "stripe",
    "dog",
    "cat",
    "bird",
    "car",
    "on",
    "in",
    "with",
    "and",
    "runs",
    "sits",
    "man",
    "woman",
    "child",
    "beach",
    "grass",
    "water",
    ".",
]
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


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer from a small vocabulary file (no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase]
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True, model_max_length=16)


def make_tiny_checkpoint(folder: Path, *, seed: int = 0, sketch_fusion: str = "concat") -> Path:
    """Save a randomly initialised tiny ViT + BERT T-EMDE model and its processor into ``folder``."""
    from temde_hf import TemdeConfig, TemdeModel, TemdeProcessor

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder.parent / f"{folder.name}_vocab")
    vision = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    config = TemdeConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        projection_dim=16,
        pooling="mean",
        sketch_fusion=sketch_fusion,
        n_sketches=4,
        n_hyperplanes=3,
    )
    model = TemdeModel(config).eval()
    processor = TemdeProcessor(ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_colour_gallery(folder: Path) -> dict[str, Path]:
    """Solid-colour 48x48 PNGs with a small white-bordered square, distinct per colour; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (48, 48), rgb)
        draw = ImageDraw.Draw(image)
        offset = 4 + 4 * i  # a square in a different place per image: the images differ in layout too
        draw.rectangle(
            [offset, offset, offset + 10, offset + 10], fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2])
        )
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths
