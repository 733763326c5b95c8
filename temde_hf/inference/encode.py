"""Batched encoding: the one place where images and captions become retrieval embeddings.

Every caller goes through these functions: ``temde-hf evaluate``, the trainer's in-loop evaluation,
``temde-hf index`` / ``search``, the Space demo and the benchmarks. The ``model`` is anything with
``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)`` returning `(batch, E)`:
a `TemdeModel` (eager PyTorch) or an `OnnxTemdeEncoder` (onnxruntime, `temde_hf.inference.onnx_runtime`);
`temde_hf.inference.encoder.load_encoder` picks one for a checkpoint folder.

Images are streamed batch by batch (a million-image gallery never sits in memory decoded) and opened
only through `temde_hf.data.common.open_image`; an unreadable image either raises `DataError` naming
the file, or, with ``on_error="skip"``, is left out and listed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.common import open_image
from ..data.errors import DataError, OnError, check_on_error
from ..data.pairs import caption_to_image, flat_captions
from .cpu_batching import images_per_forward, in_chunks

logger = logging.getLogger("temde_hf.inference")


@dataclass
class SkippedImage:
    """An image left out by ``on_error="skip"``: its row in the input, what it was, and why."""

    row: int
    source: str
    reason: str


def model_device(model: Any) -> str:
    """The device a model (or an onnxruntime encoder, always ``"cpu"``) takes its inputs on."""
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return str(device)


def _image_inputs(processor: Any, images: list) -> torch.Tensor:
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def _text_inputs(processor: Any, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs: dict[str, Any] = {"padding": True, "truncation": True, "return_tensors": "pt"}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return tokenizer(text=texts, **kwargs)


def _describe(value: Any) -> str:
    """How to name an image source in a skip list (its path when it has one)."""
    if isinstance(value, str | Path):
        return str(value)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"<{type(value).__name__}>"


def _raw_batches(
    images: Sequence[Any] | datasets.Dataset, batch_size: int, start: int, stop: int, image_column: str
) -> Iterator[tuple[int, list[Any]]]:
    """`(first_row, raw values)` per batch; a dataset's images are read undecoded, one batch at a time."""
    if isinstance(images, datasets.Dataset):
        if image_column not in images.column_names:
            raise ValueError(f"dataset has no column {image_column!r} (columns: {images.column_names})")
        column = images.select_columns([image_column])
        if isinstance(column.features[image_column], datasets.Image):
            column = column.cast_column(image_column, datasets.Image(decode=False))
        for first in range(start, stop, batch_size):
            yield first, column[first : min(first + batch_size, stop)][image_column]
        return
    for first in range(start, stop, batch_size):
        yield first, list(images[first : min(first + batch_size, stop)])


@dataclass
class EncodedBatch:
    """One encoded batch: retrieval embeddings and, when asked for, the joint-space tokens behind them.

    Attributes:
        rows: The input rows encoded (images skipped as unreadable are missing).
        embeds: `(len(rows), E)` float32 retrieval embeddings on the CPU.
        tokens: `(len(rows), L, D)` joint-space tokens (``token_embeds``) in the requested dtype, or None.
        token_mask: `(len(rows), L)` bool, True for real tokens, or None.
    """

    rows: list[int]
    embeds: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


def _check_token_model(model: Any) -> None:
    if not hasattr(model, "get_image_features"):
        raise ValueError(
            f"token embeddings come from the eager PyTorch model, not {type(model).__name__} (ONNX graphs "
            "return only the pooled embedding); load the checkpoint with backend='torch' (--backend torch)"
        )


def _encode_device(model: Any, device: str | None, token_dtype: torch.dtype | None) -> str:
    """The device an iterator encodes on, after checking that `model` returns tokens when asked for them."""
    if token_dtype is not None:
        _check_token_model(model)
    return device or model_device(model)


def _embeds(batches: Iterable[EncodedBatch]) -> torch.Tensor:
    """`(n, E)`: the batches' embeddings concatenated (`(0, 0)` when nothing was encoded)."""
    parts = [batch.embeds for batch in batches]
    return torch.cat(parts) if parts else torch.empty(0, 0)


def _encoded(rows: list[int], out: Any, token_dtype: torch.dtype | None) -> EncodedBatch:
    """`get_*_features` output -> an `EncodedBatch` on the CPU (tokens only when `token_dtype` is given)."""
    if token_dtype is None:
        return EncodedBatch(rows, out.float().cpu())
    return EncodedBatch(
        rows,
        out.pooler_output.float().cpu(),
        out.token_embeds.to("cpu", token_dtype),
        out.token_mask.bool().cpu(),
    )


def iter_image_features(
    model: Any,
    processor: Any,
    images: Sequence[Any] | datasets.Dataset,
    *,
    token_dtype: torch.dtype | None = None,
    batch_size: int = 32,
    device: str | None = None,
    start: int = 0,
    stop: int | None = None,
    on_error: OnError = "raise",
    skipped: list[SkippedImage] | None = None,
    image_column: str = "image",
    progress: bool = True,
    desc: str = "encode images",
) -> Iterator[EncodedBatch]:
    """Stream the embeddings (and, with `token_dtype`, the tokens) of ``images[start:stop]`` by batch.

    Args:
        model: Has ``encode_image(pixel_values)`` (a `TemdeModel` or an `OnnxTemdeEncoder`); for tokens,
            ``get_image_features`` (eager PyTorch only).
        processor: A `TemdeProcessor` (or anything with an ``image_processor``).
        images: PIL images, paths, `datasets.Image` dicts, or a `datasets.Dataset` with ``image_column``.
        token_dtype: Also return the joint-space tokens, stored in this dtype (one forward pass gives
            both); None: embeddings only.
        start, stop: The rows to encode (default: all).
        on_error: ``"raise"`` a `DataError` naming an unreadable image, or ``"skip"`` it.
        skipped: Where skipped images are appended (with ``on_error="skip"``).

    Yields:
        `EncodedBatch` per batch of images.
    """
    check_on_error(on_error)
    device = _encode_device(model, device, token_dtype)
    stop = len(images) if stop is None else min(stop, len(images))
    per_forward = images_per_forward(device)  # a batch is read at once, run in chunks on a CPU
    n_batches = max(0, -(-(stop - start) // batch_size))
    batches = _raw_batches(images, batch_size, start, stop, image_column)
    with torch.inference_mode():
        for first, raw in tqdm(batches, total=n_batches, desc=desc, unit="batch", disable=not progress):
            rows, opened = [], []
            for offset, value in enumerate(raw):
                try:
                    opened.append(open_image(value))
                except DataError as err:
                    if on_error == "raise":
                        raise
                    if skipped is not None:
                        skipped.append(SkippedImage(first + offset, _describe(value), str(err)))
                    logger.warning("skipped image %d: %s", first + offset, err)
                    continue
                rows.append(first + offset)
            if not opened:
                continue
            pixel_values = _image_inputs(processor, opened).to(device)
            if token_dtype is None:
                out = in_chunks(model.encode_image, pixel_values, per_forward)
            else:
                out = in_chunks(lambda x: model.get_image_features(pixel_values=x), pixel_values, per_forward)
            yield _encoded(rows, out, token_dtype)


def encode_images(
    model: Any,
    processor: Any,
    images: Sequence[Any] | datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    *,
    image_column: str = "image",
    progress: bool = True,
) -> torch.Tensor:
    """`(n_images, E)` float32 embeddings of every image, in order.

    ``images`` is a dataset with an ``image`` column (a `temde_hf.data` loader's output) or a sequence
    of PIL images / paths. An image that cannot be decoded raises `temde_hf.data.DataError` naming the
    file; use `iter_image_features` with ``on_error="skip"`` to leave such images out instead.
    """
    return _embeds(
        iter_image_features(
            model,
            processor,
            images,
            batch_size=batch_size,
            device=device,
            image_column=image_column,
            progress=progress,
        )
    )


def iter_text_features(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    batch_size: int = 128,
    device: str | None = None,
    max_length: int | None = None,
    *,
    token_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Iterator[EncodedBatch]:
    """Stream the embeddings (and, with `token_dtype`, the tokens) of ``texts`` by batch.

    Args:
        model: Has ``encode_text(input_ids, attention_mask)``; for tokens, ``get_text_features``.
        token_dtype: Also return the joint-space tokens in this dtype (one forward pass gives both).
    """
    device = _encode_device(model, device, token_dtype)
    texts = list(texts)
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(texts), batch_size), desc="encode captions", unit="batch", disable=not progress
        ):
            batch = _text_inputs(processor, texts[start : start + batch_size], max_length)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            rows = list(range(start, start + len(ids)))
            if token_dtype is None:
                yield _encoded(rows, model.encode_text(ids, mask), None)
            else:
                out = model.get_text_features(input_ids=ids, attention_mask=mask)
                yield _encoded(rows, out, token_dtype)


def encode_texts(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    batch_size: int = 128,
    device: str | None = None,
    max_length: int | None = None,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """`(n_texts, E)` float32 embeddings via ``model.encode_text``."""
    return _embeds(
        iter_text_features(model, processor, texts, batch_size, device, max_length, progress=progress)
    )


def encode_dataset_batches(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    *,
    token_dtype: torch.dtype | None = None,
) -> tuple[list[EncodedBatch], list[EncodedBatch]]:
    """Every image and every caption of an image-level dataset, encoded in batches, in eval mode.

    Captions go `4 * batch_size` at a time (a caption costs far less than an image). The model is put
    in eval mode for the pass and given back in the mode it came in.

    Args:
        model: Has ``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)``; for
            tokens, ``get_*_features`` (eager PyTorch only).
        processor: A `TemdeProcessor` (or anything with ``image_processor`` and ``tokenizer``).
        dataset: Columns ``image`` and ``captions`` (from a `temde_hf.data` loader).
        token_dtype: Also keep the joint-space tokens, in this dtype; None: embeddings only.

    Returns:
        The images' and the captions' `EncodedBatch` lists, in dataset (``flat_captions``) order.
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        images = list(
            iter_image_features(
                model,
                processor,
                dataset,
                token_dtype=token_dtype,
                batch_size=batch_size,
                device=device,
                desc="encode images" if token_dtype is None else "image tokens",
            )
        )
        captions = list(
            iter_text_features(
                model,
                processor,
                flat_captions(dataset),
                4 * batch_size,
                device,
                max_length,
                token_dtype=token_dtype,
            )
        )
    finally:
        if was_training:
            model.train()
    return images, captions


def encode_dataset(
    model: Any,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every image and caption of an image-level dataset (arguments as `encode_dataset_batches`).

    Returns:
        `(n_images, E)` image embeddings, `(n_captions, E)` caption embeddings and
        `(n_captions,)` `caption_to_image`.
    """
    images, captions = encode_dataset_batches(model, processor, dataset, batch_size, device, max_length)
    return _embeds(images), _embeds(captions), caption_to_image(dataset)
