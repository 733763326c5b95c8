"""Batched encoding of an image-level dataset with a dual encoder and its processor."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.common import open_image
from ..data.pairs import caption_to_image, flat_captions


def _image_inputs(processor: Any, images: list) -> torch.Tensor:
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def _text_inputs(processor: Any, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs: dict[str, Any] = {"padding": True, "truncation": True, "return_tensors": "pt"}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return tokenizer(text=texts, **kwargs)


def encode_images(
    model: Any, processor: Any, dataset: datasets.Dataset, batch_size: int = 32, device: str | None = None
) -> torch.Tensor:
    """`(n_images, E)` float32 embeddings of the dataset's images via ``model.encode_image``.

    An image that cannot be decoded raises `temde_hf.data.DataError` naming the file.
    """
    device = device or str(next(model.parameters()).device)
    raw = dataset.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(raw), batch_size), desc="encode images", unit="batch"):
            images = [open_image(v) for v in raw[start : start + batch_size]["image"]]
            pixel_values = _image_inputs(processor, images).to(device)
            out.append(model.encode_image(pixel_values).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def encode_texts(
    model: Any,
    processor: Any,
    texts: list[str],
    batch_size: int = 128,
    device: str | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """`(n_texts, E)` float32 embeddings via ``model.encode_text``."""
    device = device or str(next(model.parameters()).device)
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="encode captions", unit="batch"):
            batch = _text_inputs(processor, texts[start : start + batch_size], max_length)
            out.append(
                model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                .float()
                .cpu()
            )
    return torch.cat(out) if out else torch.empty(0, 0)


def encode_dataset(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every image and caption of an image-level dataset.

    Args:
        model: Has ``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)``.
        processor: A `TemdeProcessor` (or anything with ``image_processor`` and ``tokenizer``).
        dataset: Columns ``image`` and ``captions`` (from a `temde_hf.data` loader).

    Returns:
        `(n_images, E)` image embeddings, `(n_captions, E)` caption embeddings and
        `(n_captions,)` `caption_to_image`.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        image_embeds = encode_images(model, processor, dataset, batch_size, device)
        text_embeds = encode_texts(
            model, processor, flat_captions(dataset), batch_size * 4, device, max_length
        )
    finally:
        if was_training:
            model.train()
    return image_embeds, text_embeds, caption_to_image(dataset)
