"""An image folder with ``metadata.jsonl`` (the `datasets` imagefolder layout, also a Hub repo layout).

Each line: ``{"file_name": "images/x.jpg", "image_id": "x", "captions": [...], "split": "test"}``.
``file_name`` is relative to the folder holding ``metadata.jsonl``. A line may instead carry one
``"caption"`` string; lines of the same ``file_name`` are then grouped in file order. ``image_id``
defaults to the file stem and ``split`` to ``default_split``. The folder written by
`temde_hf.data.export.export_imagefolder` is also loadable with
``datasets.load_dataset("imagefolder", data_dir=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from .common import ImageRecord, build_dataset, file_name_problem, start_report
from .errors import DataError, LoadReport, OnError, handle_bad_entry, not_utf8

METADATA = "metadata.jsonl"


def _read_metadata(path: Path, on_error: OnError, report: LoadReport) -> dict[str, dict[str, Any]]:
    """The lines of ``metadata.jsonl`` grouped by ``file_name``, in order of first appearance."""
    try:
        return _group_lines(path, on_error, report)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc


def _group_lines(path: Path, on_error: OnError, report: LoadReport) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            entry = f"{path.name}: line {line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{entry}: not valid JSON ({exc.msg}); the file may be truncated: write it again"
                ) from exc
            if not isinstance(item, dict) or "file_name" not in item:
                handle_bad_entry(
                    entry, "has no 'file_name'", "add the image's relative path", on_error, report
                )
                continue
            problem = file_name_problem(item["file_name"])
            if problem is not None:
                handle_bad_entry(
                    entry, problem, "write the image's path relative to the folder", on_error, report
                )
                continue
            captions = item.get("captions", [item["caption"]] if "caption" in item else None)
            if not isinstance(captions, list):
                handle_bad_entry(
                    entry,
                    "has no 'captions' list (or 'caption' string)",
                    'write the captions as "captions": ["a caption", ...]',
                    on_error,
                    report,
                )
                continue
            row = rows.setdefault(item["file_name"], {**item, "captions": [], "entry": entry})
            row["captions"].extend(captions)  # as read: checked with the other loaders' captions
    return rows


def load_imagefolder(
    folder: str | Path,
    split: str | Sequence[str] | None = None,
    default_split: str = "train",
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Load an image folder with ``metadata.jsonl``, one row per image.

    Args:
        folder: The folder holding ``metadata.jsonl``.
        split: Keep only this split (or these); ``None`` keeps all.
        default_split: Split of lines without a ``split`` field.
        n_captions: Captions kept per image (first 5; fewer is bad data); ``None`` keeps all.
        verify_images: Check each image decodes now.
        on_error: ``"raise"`` or ``"skip"`` bad entries.
        report: A `LoadReport` to fill.

    Returns:
        Columns ``image``, ``image_id``, ``captions``, ``split``.
    """
    folder = Path(folder)
    report = start_report(str(folder), on_error, report)
    metadata = folder / METADATA
    if folder.is_file():
        raise DataError(
            f"{folder}: a file, not a folder; an image folder dataset is a folder holding {METADATA} "
            "(for an annotation file, use its loader or format auto)"
        )
    if not metadata.is_file():
        raise DataError(f"{metadata}: file not found; an image folder needs a {METADATA} beside its images")
    rows = _read_metadata(metadata, on_error, report)
    records = (
        ImageRecord(
            path=folder / name,
            image_id=row.get("image_id", Path(name).stem),
            captions=row["captions"],
            split=row.get("split", default_split),
            entry=row["entry"] + f" ({name})",
        )
        for name, row in rows.items()
    )
    return build_dataset(
        records, str(folder), split=split, n_captions=n_captions, verify_images=verify_images,
        on_error=on_error, report=report,
    )  # fmt: skip
