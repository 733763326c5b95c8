"""The gallery's Python API: load a checkpoint, build a small index in memory, query it.

Large galleries go through `temde_hf.hub.gallery.build` (sharded, resumable, streamed); this module is
the in-process path for galleries whose embeddings fit in memory. Both encode through
`temde_hf.evaluation.encode` and index through `GalleryIndex`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...evaluation.encode import (
    SkippedImage,
    encode_images,
    encode_texts,
    iter_image_embeddings,
    load_encoder,
)
from ...export.fingerprint import checkpoint_fingerprint
from .build import global_dim_of
from .index import GalleryIndex, SearchHit
from .sources import ImageList, from_dataset, from_folder

__all__ = [
    "SearchHit",
    "build_gallery",
    "build_gallery_from_dataset",
    "build_gallery_from_folder",
    "search",
]


def build_gallery(
    model_path: str | Path,
    images: Sequence[Image.Image | str | Path] | Any,
    ids: Sequence[str],
    *,
    paths: Sequence[str | None] | None = None,
    batch_size: int = 32,
    index_type: str = "flat",
    image_column: str = "image",
    progress: bool = True,
    model_and_processor: tuple[Any, Any] | None = None,
) -> GalleryIndex:
    """Encode ``images`` with the checkpoint at ``model_path`` and index them (unreadable ones skipped)."""
    model, processor = model_and_processor or load_encoder(model_path, backend="torch", device="cpu")
    skipped: list[SkippedImage] = []
    rows, parts = [], []
    for batch_rows, embeds in iter_image_embeddings(
        model,
        processor,
        images,
        batch_size=batch_size,
        on_error="skip",
        skipped=skipped,
        image_column=image_column,
        progress=progress,
    ):
        rows += batch_rows
        parts.append(embeds)
    if not parts:
        raise ValueError(f"none of the {len(ids)} images could be read: nothing to index")
    paths = list(paths) if paths is not None else [None] * len(ids)
    gallery = GalleryIndex(
        torch.cat(parts).numpy(),
        [ids[r] for r in rows],
        paths=[paths[r] for r in rows],
        model_path=str(Path(model_path).resolve()),
        model_fingerprint=checkpoint_fingerprint(model_path),
        index_type=index_type,
        global_dim=global_dim_of(model_path),
    )
    gallery.skipped = [vars(s) for s in skipped]
    return gallery


def _build_from(model_path: str | Path, source: ImageList, **kwargs: Any) -> GalleryIndex:
    return build_gallery(
        model_path, source.images, source.ids, paths=source.paths, image_column=source.image_column, **kwargs
    )


def build_gallery_from_folder(model_path: str | Path, folder: str | Path, **kwargs: Any) -> GalleryIndex:
    """Index every image under ``folder``; ids are paths relative to it."""
    return _build_from(model_path, from_folder(folder), **kwargs)


def build_gallery_from_dataset(
    model_path: str | Path,
    dataset: Any,
    *,
    image_column: str = "image",
    id_column: str | None = None,
    **kwargs: Any,
) -> GalleryIndex:
    """Index a `datasets.Dataset` whose ``image_column`` holds images or image paths."""
    return _build_from(
        model_path, from_dataset(dataset, image_column=image_column, id_column=id_column), **kwargs
    )


def search(
    gallery: GalleryIndex,
    model: Any,
    processor: Any,
    *,
    texts: Iterable[str] = (),
    images: Iterable[Image.Image | str | Path] = (),
    k: int = 5,
    **settings: Any,
) -> list[list[SearchHit]]:
    """Query the gallery by texts and/or images (text queries first), top-``k`` each.

    ``settings`` (``nprobe``, ``k_factor``) override the index's saved search settings.
    """
    texts, images = list(texts), list(images)
    if not texts and not images:
        raise ValueError("give at least one text or image query")
    hits: list[list[SearchHit]] = []
    if texts:
        hits += gallery.search(encode_texts(model, processor, texts, progress=False), k, **settings)
    if images:
        hits += gallery.search(encode_images(model, processor, images, progress=False), k, **settings)
    return hits
