"""One entry point over every loader, choosing the format from the path (used by the commands).

A format is one loader under ``@DATA_FORMATS.register(name)`` taking ``(path, image_root, **options)``
(the options: ``split``, ``n_captions``, ``verify_images``, ``on_error``, ``report`` and the loader's own
keywords) and returning the image-level schema; ``--data_format`` / ``format=`` then accept its name.
`detect_format` guesses one of the built-in formats from the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from ..models.temde.registry_temde import Registry
from .coco import load_coco_captions
from .csv_captions import load_caption_csv
from .errors import DataError, LoadReport, OnError
from .hub import load_hub_dataset
from .imagefolder import METADATA, load_imagefolder
from .karpathy import load_karpathy, read_json

# Suffixes that make a path a local file, never a Hub dataset id.
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet")
# Name -> loader `(path, image_root, **options) -> datasets.Dataset`; "auto" is `detect_format`.
DATA_FORMATS = Registry("data_format", "DATA_FORMATS")


@DATA_FORMATS.register("karpathy")
def _karpathy(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    return load_karpathy(path, image_root, **options)


@DATA_FORMATS.register("coco")
def _coco(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    if image_root is None:
        raise DataError(f"{path}: a COCO captions file needs image_root (the folder of its images)")
    return load_coco_captions(path, image_root, **options)


@DATA_FORMATS.register("csv")
def _csv(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    return load_caption_csv(path, image_root, **options)


@DATA_FORMATS.register("imagefolder")
def _imagefolder(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    return load_imagefolder(path, **options)


@DATA_FORMATS.register("parquet")
def _parquet(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    return load_hub_dataset("parquet", data_files=str(path), image_root=image_root, **options)


@DATA_FORMATS.register("hub")
def _hub(path: str | Path, image_root: str | Path | None, **options: Any) -> datasets.Dataset:
    return load_hub_dataset(path, image_root=image_root, **options)


def detect_format(path: str | Path) -> str:
    """Guess the format: a Karpathy or COCO JSON, a captions CSV, an image folder, parquet or a Hub id."""
    path = Path(path)
    if path.is_dir():
        if (path / METADATA).is_file():
            return "imagefolder"
        if any(p.suffix in (".parquet", ".arrow") for p in path.rglob("*")):
            return "hub"  # a local copy of a dataset repo
        raise DataError(
            f"{path}: no {METADATA} in this folder, so it is not an image folder dataset. Write one line per "
            'image, {"file_name": ..., "captions": [...]} (temde_hf.data.export_imagefolder does), or pass '
            "the annotation file (Karpathy / COCO JSON, captions CSV) instead of the folder"
        )
    if path.suffix in DATA_SUFFIXES and not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".csv", ".txt"):
        return "csv"
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        return "karpathy"
    if not path.exists():
        return "hub"
    raise DataError(f"{path}: cannot tell the dataset format; pass format= one of {tuple(DATA_FORMATS)}")


def load_image_captions(
    path: str | Path,
    format: str = "auto",
    image_root: str | Path | None = None,
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load any supported format into the image-level schema, keeping only `split` if given.

    Args:
        path: A Karpathy JSON, a COCO captions JSON, an ``image,caption`` CSV, an image folder with
            ``metadata.jsonl``, a parquet file, or a Hub dataset id.
        format: ``"auto"`` (`detect_format`) or a name of `DATA_FORMATS`.
        image_root: Image folder for the JSON / CSV formats (and path columns of parquet / Hub data).
        split: Keep rows of this split (or these) only.
        **kwargs: More arguments of the chosen loader (e.g. ``splits`` for a CSV, column names for
            parquet / Hub data).

    Returns:
        Columns ``image``, ``image_id``, ``captions``, ``split``.
    """
    if format != "auto" and format not in DATA_FORMATS:
        raise ValueError(f"format must be one of {('auto', *DATA_FORMATS)}, got {format!r}")
    format = detect_format(path) if format == "auto" else format
    # every loader selects the split itself (counting other split values) through the one builder
    common = {
        "split": split,
        "n_captions": n_captions,
        "verify_images": verify_images,
        "on_error": on_error,
        "report": report,
    }
    return DATA_FORMATS[format](path, image_root, **common, **kwargs)
