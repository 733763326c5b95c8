"""Tiny, offline building blocks for tests, examples and smoke benchmarks.

Everything here is built from configs in code: no download, a few thousand parameters, milliseconds.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor

from .models.temde import TemdeConfig, TemdeModel, TemdeProcessor

# A small English vocabulary so captions of the synthetic data tokenise into real word pieces.
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "this", "photo", "picture", "image",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange",
    "circle", "square", "triangle", "shape", "dog", "cat", "car", "man", "woman", "small", "big",
    "background", "left", "right", "top", "bottom", "center", "two", "one", ".", ",",
]  # fmt: skip

TINY_IMAGE_SIZE = 32


def tiny_tower_configs(hidden_size: int = 32) -> tuple[ViTConfig, BertConfig]:
    """A 1-layer ViT (16 patches of 8 px on 32-px images) and a 1-layer BERT over `TINY_VOCAB`."""
    vision = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    text = BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=len(TINY_VOCAB),
        max_position_embeddings=64,
    )
    return vision, text


def tiny_config(**overrides: Any) -> TemdeConfig:
    """A tiny [`TemdeConfig`]; keyword arguments override any T-EMDE field."""
    vision, text = tiny_tower_configs()
    settings: dict[str, Any] = {"projection_dim": 16, "n_sketches": 4, "n_hyperplanes": 3}
    settings.update(overrides)
    return TemdeConfig(vision_config=vision, text_config=text, **settings)


def tiny_model(**overrides: Any) -> TemdeModel:
    """A tiny randomly initialised [`TemdeModel`] in eval mode."""
    return TemdeModel(tiny_config(**overrides)).eval()


def tiny_processor() -> TemdeProcessor:
    """A processor for the tiny towers: a word-piece tokenizer over `TINY_VOCAB`, 32-px images."""
    vocab = {token: index for index, token in enumerate(TINY_VOCAB)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    image_processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return TemdeProcessor(image_processor, tokenizer)


def save_tiny_checkpoint(directory: str | Path, **overrides: Any) -> Path:
    """Save a tiny model and its processor to `directory` (a loadable checkpoint); returns the folder."""
    directory = Path(directory)
    tiny_model(**overrides).save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def save_tiny_towers(directory: str | Path) -> tuple[Path, Path]:
    """Save tiny pretrained-style ViT and BERT tower folders (with processor files) for composition tests."""
    from transformers import BertModel, ViTModel

    directory = Path(directory)
    vision_config, text_config = tiny_tower_configs()
    vision_dir, text_dir = directory / "vision", directory / "text"
    ViTModel(vision_config).save_pretrained(vision_dir)
    BertModel(text_config).save_pretrained(text_dir)
    processor = tiny_processor()
    processor.image_processor.save_pretrained(vision_dir)
    processor.tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


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
