"""Tiny, offline building blocks for tests, examples and smoke benchmarks.

Everything here is built from configs in code: no download, a few thousand parameters, milliseconds.
"""

from __future__ import annotations

import io
import string
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor

from .models.temde import TemdeConfig, TemdeForImageTextRetrieval, TemdeModel, TemdeProcessor

# A small English vocabulary so captions of the synthetic data tokenise into real word pieces.
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "this", "photo", "picture", "image",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    "circle", "square", "triangle", "shape", "dog", "cat", "car", "man", "woman", "small", "big",
    "background", "left", "right", "top", "bottom", "center", "two", "one", ".", ",",
]  # fmt: skip

TINY_IMAGE_SIZE = 32


def tiny_vocab() -> list[str]:
    """`TINY_VOCAB`, every word of the synthetic captions, and letters (so any word has word pieces)."""
    from .data.synthetic import BACKGROUNDS, COLOURS, SHAPES, TEMPLATES

    words = {w for t in TEMPLATES for w in t.replace("{", " ").replace("}", " ").split()}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(SHAPES)
    letters = list(string.ascii_lowercase)
    return list(dict.fromkeys([*TINY_VOCAB, *sorted(words), *letters, *(f"##{c}" for c in letters)]))


def tiny_tower_configs(hidden_size: int = 32, dropout: float = 0.0) -> tuple[ViTConfig, BertConfig]:
    """A 1-layer ViT (16 patches of 8 px on 32-px images) and a 1-layer BERT over `tiny_vocab()`."""
    vision = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    text = BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=len(tiny_vocab()),
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return vision, text


def tiny_config(dropout: float = 0.0, **overrides: Any) -> TemdeConfig:
    """A tiny [`TemdeConfig`] (towers with `dropout`); keyword arguments override any T-EMDE field."""
    vision, text = tiny_tower_configs(dropout=dropout)
    settings: dict[str, Any] = {"projection_dim": 16, "n_sketches": 4, "n_hyperplanes": 3}
    settings.update(overrides)
    return TemdeConfig(vision_config=vision, text_config=text, **settings)


def tiny_model(dropout: float = 0.0, **overrides: Any) -> TemdeModel:
    """A tiny randomly initialised [`TemdeModel`] in eval mode (seed with `torch.manual_seed` first)."""
    return TemdeModel(tiny_config(dropout, **overrides)).eval()


def tiny_processor() -> TemdeProcessor:
    """A processor for the tiny towers: a word-piece tokenizer over `tiny_vocab()`, 32-px images."""
    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    image_processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return TemdeProcessor(image_processor, tokenizer)


def save_tiny_checkpoint(directory: str | Path, matching_head: bool = False, **overrides: Any) -> Path:
    """Save a tiny model and its processor to `directory` (a loadable checkpoint); returns the folder.

    With `matching_head` the model is a `TemdeForImageTextRetrieval` (the dual encoder + its matching head).
    """
    directory = Path(directory)
    model = TemdeForImageTextRetrieval(tiny_config(**overrides)) if matching_head else tiny_model(**overrides)
    model.save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def save_tiny_towers(directory: str | Path, dropout: float = 0.0) -> tuple[Path, Path]:
    """Save tiny pretrained-style ViT and BERT tower folders (with processor files) for composition tests."""
    from transformers import BertModel, ViTModel

    directory = Path(directory)
    vision_config, text_config = tiny_tower_configs(dropout=dropout)
    vision_dir, text_dir = directory / "vision", directory / "text"
    ViTModel(vision_config, add_pooling_layer=False).save_pretrained(vision_dir)
    BertModel(text_config, add_pooling_layer=False).save_pretrained(text_dir)
    processor = tiny_processor()
    processor.image_processor.save_pretrained(vision_dir)
    processor.tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


def tiny_batch(n: int, seed: int = 0, n_images: int | None = None) -> dict[str, torch.Tensor]:
    """Random training inputs for `n` pairs of the tiny towers.

    ``n_images`` distinct images; pair ``i`` shows image ``i % n_images`` (``pair_ids``), so some images
    have several captions in the batch. Captions have random lengths (padding in play).
    """
    g = torch.Generator().manual_seed(seed)
    n_images = n_images or n
    pair_ids = torch.arange(n) % n_images
    images = torch.randn(n_images, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    input_ids = torch.randint(5, len(tiny_vocab()), (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    attention_mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {
        "pixel_values": images[pair_ids],
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "pair_ids": pair_ids,
    }


def png_declaring_size(width: int, height: int) -> bytes:
    """A 1-pixel PNG whose header claims `width` x `height` (a decompression bomb as far as the header
    goes; decoding it would fail, so a test passes only if the size is refused before decoding)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # After the 8-byte signature comes IHDR: length (8:12), type (12:16), width and height (16:24),
    # four more fields (24:29), then the CRC of type + data (29:33).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_jpeg(path: str | Path, size: int = 64) -> Path:
    """Write a noisy JPEG cut in half: its header is intact (PIL's ``verify`` accepts it), its pixels
    are not."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path = Path(path)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path
