"""The gallery's Python API: load a checkpoint, build a small index in memory, query it.

Large galleries go through `temde_hf.gallery.build` (sharded, resumable, streamed); this module is
the in-process path for galleries whose embeddings fit in memory. Both encode through
`temde_hf.inference.encode` and index through `GalleryIndex`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..inference.encode import (
    SkippedImage,
    encode_images,
    encode_texts,
    iter_image_features,
    iter_text_features,
)
from ..inference.encoder import load_encoder
from ..inference.fingerprint import checkpoint_fingerprint
from ..inference.rerank import DEFAULT_RERANK_K, DEFAULT_STAGE1_WEIGHT
from ..inference.tokens import gather_encoded, token_set_of
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
    store_tokens: bool = False,
) -> GalleryIndex:
    """Encode ``images`` with the checkpoint at ``model_path`` and index them (unreadable ones skipped).

    With ``store_tokens`` the index also keeps the images' joint-space tokens (float16), which
    ``search(..., rerank=...)`` re-scores each query's candidates from.
    """
    model, processor = model_and_processor or load_encoder(model_path, backend="torch", device="cpu")
    skipped: list[SkippedImage] = []
    batches = list(
        iter_image_features(
            model,
            processor,
            images,
            token_dtype=torch.float16 if store_tokens else None,
            batch_size=batch_size,
            on_error="skip",
            skipped=skipped,
            image_column=image_column,
            progress=progress,
        )
    )
    if not batches:
        raise ValueError(f"none of the {len(ids)} images could be read: nothing to index")
    rows, embeds, tokens = gather_encoded(batches, store_tokens)
    paths = list(paths) if paths is not None else [None] * len(ids)
    gallery = GalleryIndex(
        embeds.numpy(),
        [ids[r] for r in rows],
        paths=[paths[r] for r in rows],
        model_path=str(Path(model_path).resolve()),
        model_fingerprint=checkpoint_fingerprint(model_path),
        index_type=index_type,
        global_dim=global_dim_of(model_path),
        tokens=tokens,
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
    rerank: str | None = None,
    rerank_k: int = DEFAULT_RERANK_K,
    rerank_fusion: float = DEFAULT_STAGE1_WEIGHT,
    **settings: Any,
) -> list[list[SearchHit]]:
    """Query the gallery by texts and/or images (text queries first), top-``k`` each.

    Args:
        gallery: A `GalleryIndex` built by ``model``'s checkpoint.
        model: The checkpoint's model (eager PyTorch when reranking; with ``rerank="itm"`` a
            `TemdeForImageTextRetrieval`, e.g. ``load_checkpoint(path, with_matching_head=True)``).
        processor: Its processor.
        texts: Caption queries; images: image queries (never reranked: the rerankers score captions
            against images).
        k: Results per query.
        rerank: Re-score each text query's stage-1 top-``rerank_k`` with this reranker
            (``"alignment"`` or ``"itm"``) from the gallery's stored tokens (`GalleryIndex.search`).
        rerank_k: Candidates per text query re-scored.
        rerank_fusion: Order the candidates by the reranker's score fused with stage 1 (`fuse_scores`);
            0: stage 2 alone.
        settings: ``nprobe`` / ``k_factor``, overriding the index's saved search settings.
    """
    texts, images = list(texts), list(images)
    if not texts and not images:
        raise ValueError("give at least one text or image query")
    if rerank is not None and images:
        raise ValueError(
            f"rerank={rerank!r} re-scores caption -> image matches; image queries are searched by stage 1 "
            "alone: query the images without rerank"
        )
    hits: list[list[SearchHit]] = []
    if texts and rerank is not None:
        # one forward pass gives each query's stage-1 embedding and the tokens stage 2 reads
        embeds, tokens = token_set_of(
            iter_text_features(model, processor, texts, token_dtype=torch.float32, progress=False)
        )
        hits += gallery.search(
            embeds, k, rerank=rerank, rerank_k=rerank_k, text_tokens=tokens, model=model,
            rerank_fusion=rerank_fusion, **settings,
        )  # fmt: skip
    elif texts:
        hits += gallery.search(encode_texts(model, processor, texts, progress=False), k, **settings)
    if images:
        hits += gallery.search(encode_images(model, processor, images, progress=False), k, **settings)
    return hits
