"""The ``image,caption`` CSV common for Flickr8k (``captions.txt``): one line per caption.

Captions may contain commas: quoted fields are read by the `csv` module, and an unquoted caption
split at its commas is joined back (image file names never contain commas). A quoted field never
spans lines: a quote left open is a damaged line, refused (or skipped) on its own.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

from .common import ImageRecord, build_dataset, file_name_problem, start_report
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


def _fields(line: str) -> list[str] | None:
    """The fields of one line, or ``None`` when a quote opened on it is not closed on it.

    Each line is parsed on its own: given the whole file, the `csv` module reads an unclosed quote
    to the next quote character (often the end of the file) as one field, so one stray ``"``
    silently turns the rest of the file into a single caption. On its own line such a field keeps
    the line break, which no caption has (one caption per line).
    """
    row = next(csv.reader([line if line.endswith(("\n", "\r")) else line + "\n"]), [])
    return None if any("\n" in field or "\r" in field for field in row) else row


def _group_rows(csv_path: Path, on_error: OnError, report: LoadReport) -> dict[str, list[str]]:
    by_image: dict[str, list[str]] = {}
    # utf-8-sig: the byte-order mark spreadsheet programs write is not part of the first column name.
    with csv_path.open(encoding="utf-8-sig", newline="") as handle:
        first = handle.readline()
        header = _fields(first) if first else None
        if not first:
            raise DataError(
                f"{csv_path}: the file is empty; a captions CSV has the header 'image,caption' and one "
                "'image,caption' line per caption"
            )
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            shown = repr(first.rstrip("\r\n"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(
                f"{csv_path}: the first line must be the header 'image,caption', got {shown}; "
                "add the header (or convert the file to that layout)"
            )
        for line_no, line in enumerate(handle, start=2):
            row = _fields(line)
            if row is None:
                handle_bad_entry(
                    f"{csv_path.name}: line {line_no}",
                    'a quote (") opens on this line and is not closed on it (a caption must fit on one line)',
                    'close the quote, or remove it (a quote inside a quoted caption is written "")',
                    on_error,
                    report,
                )
                continue
            if not row or all(not field.strip() for field in row):
                continue
            if len(row) < 2:
                handle_bad_entry(
                    f"{csv_path.name}: line {line_no}",
                    f"has no caption ({row!r}); the file may be truncated",
                    "fix or remove the line",
                    on_error,
                    report,
                )
                continue
            problem = file_name_problem(row[0].strip())
            if problem is not None:
                handle_bad_entry(
                    f"{csv_path.name}: line {line_no}",
                    problem,
                    "write the image's file name",
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
