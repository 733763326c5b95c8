"""The ``image,caption`` CSV common for Flickr8k (``captions.txt``): one line per caption.

Captions may contain commas: quoted fields are read by the `csv` module, and an unquoted caption
split at its commas is joined back (image file names never contain commas).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

from .common import ImageRecord, build_dataset, start_report
from .errors import DataError, LoadReport, OnError, handle_bad_entry, not_utf8
from .karpathy import read_json


def karpathy_split_map(json_path: str | Path) -> dict[str, str]:
    """``filename -> split`` from a Karpathy JSON, to give a captions CSV the standard splits."""
    data = read_json(json_path)
    try:
        return {entry["filename"]: entry["split"] for entry in data["images"]}
    except (TypeError, KeyError) as exc:
        raise DataError(f"{json_path}: not a Karpathy split JSON (images[].filename / split)") from exc


def _read_rows(csv_path: Path, on_error: OnError, report: LoadReport) -> dict[str, list[str]]:
    """Group the caption lines by image, in order of first appearance."""
    try:
        return _group_rows(csv_path, on_error, report)
    except UnicodeDecodeError as exc:
        raise not_utf8(csv_path, exc) from exc


def _group_rows(csv_path: Path, on_error: OnError, report: LoadReport) -> dict[str, list[str]]:
    by_image: dict[str, list[str]] = {}
    with csv_path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DataError(
                f"{csv_path}: the first line must be the header 'image,caption', got {header!r}; "
                "add the header (or convert the file to that layout)"
            )
        for row in reader:
            if not row or all(not field.strip() for field in row):
                continue
            if len(row) < 2:
                handle_bad_entry(
                    f"{csv_path.name}: line {reader.line_num}",
                    f"has no caption ({row!r}); the file may be truncated",
                    "fix or remove the line",
                    on_error,
                    report,
                )
                continue
            by_image.setdefault(row[0].strip(), []).append(",".join(row[1:]))
    return by_image


def load_caption_csv(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    splits: Mapping[str, str] | str | Path | None = None,
    default_split: str = "train",
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Load an ``image,caption`` CSV and its image folder, one row per image.

    Args:
        csv_path: The CSV with header ``image,caption``.
        image_root: Folder of the images; defaults to ``images/`` beside the CSV.
        splits: ``filename -> split``, or the path of a Karpathy JSON to take the splits from.
        default_split: Split of images not in `splits`.
        split: Keep only this split (or these); ``None`` keeps all.
        n_captions: Captions kept per image (first 5; fewer is bad data); ``None`` keeps all.
        verify_images: Check each image decodes now.
        on_error: ``"raise"`` or ``"skip"`` bad entries.
        report: A `LoadReport` to fill.

    Returns:
        Columns ``image``, ``image_id`` (the file stem), ``captions``, ``split``.
    """
    csv_path = Path(csv_path)
    report = start_report(str(csv_path), on_error, report)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: file not found; pass the path of the captions CSV")
    image_root = Path(image_root) if image_root is not None else csv_path.parent / "images"
    if isinstance(splits, str | Path):
        splits = karpathy_split_map(splits)
    splits = splits or {}
    by_image = _read_rows(csv_path, on_error, report)
    records = (
        ImageRecord(
            path=image_root / name,
            image_id=Path(name).stem,
            captions=captions,
            split=splits.get(name, default_split),
            entry=f"{csv_path.name}: image {name}",
        )
        for name, captions in by_image.items()
    )
    return build_dataset(
        records, str(csv_path), split=split, n_captions=n_captions, verify_images=verify_images,
        on_error=on_error, report=report,
    )  # fmt: skip
