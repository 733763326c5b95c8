"""Shared pieces of the loaders: one record per image, the checks, and the `datasets.Dataset` build.

Every loader reduces its format to a list of `ImageRecord` and calls `build_dataset`, so the caption
checks, image checks and the schema (`image`, `image_id`, `captions`, `split`) are the same everywhere.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from .errors import DataError, LoadReport, OnError, check_on_error, handle_bad_entry

logger = logging.getLogger("temde_hf.data")

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
    }
)


@dataclass
class ImageRecord:
    """One image and its captions before checks.

    Attributes:
        path: The image file.
        image_id: A stable id (COCO id, Flickr file stem, ...), unique within the dataset.
        captions: The captions in file order.
        split: Karpathy split name (``train``, ``val``, ``test``, ...).
        entry: How to name this image in an error (``file.json: images[3] (x.jpg)``).
    """

    path: Path
    image_id: str
    captions: list[str]
    split: str
    entry: str


def verify_image(path: Path) -> str | None:
    """Cheaply check that `path` is a readable image (header + structure, no full decode).

    Returns:
        ``None`` when fine, else the reason.
    """
    if not path.is_file():
        return "image file not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"image cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def open_image(value: Any) -> Image.Image:
    """Decode an image stored by the `datasets.Image` feature (``decode=False``) or given as a path.

    Raises:
        DataError: Naming the file when it is missing or cannot be decoded.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    path = value if isinstance(value, str | Path) else value.get("path")
    data = None if isinstance(value, str | Path) else value.get("bytes")
    try:
        source = io.BytesIO(data) if data is not None else Path(path)
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found; check the image root / file names") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"{path or '<image bytes>'}: image cannot be decoded ({type(exc).__name__}: {exc}); "
            "replace the file or load the dataset with verify_images=True, on_error='skip'"
        ) from exc


def select_captions(
    captions: list[str], n_captions: int | None, entry: str, on_error: OnError, report: LoadReport
) -> list[str] | None:
    """Check the caption count of one image; keep the first `n_captions` (``None`` keeps all).

    Returns:
        The captions to keep, or ``None`` when the image is skipped.
    """
    captions = [c.strip() for c in captions]
    if any(not c for c in captions):
        handle_bad_entry(entry, "has an empty caption", "remove or fill the empty caption", on_error, report)
        return None
    if n_captions is None:
        if not captions:
            handle_bad_entry(entry, "has no captions", "add captions or remove the image", on_error, report)
            return None
        return captions
    if len(captions) < n_captions:
        handle_bad_entry(
            entry,
            f"has {len(captions)} captions, fewer than the {n_captions} the protocol needs",
            f"add captions, or pass n_captions={len(captions)} (or n_captions=None for variable counts)",
            on_error,
            report,
        )
        return None
    if len(captions) > n_captions:
        report.n_captions_truncated += 1
    return captions[:n_captions]


def build_dataset(
    records: Iterable[ImageRecord],
    source: str,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Check records and build the image-level dataset (images stay files; decoded lazily).

    Args:
        records: One per image.
        source: The file or folder loaded, for the report.
        n_captions: Captions kept per image (the first ones); images with fewer are bad data.
            ``None`` keeps every caption (variable counts, at least one).
        verify_images: Also check every image is decodable (PIL ``verify``; cheap, no full decode).
            Missing files are always checked.
        on_error: ``"raise"`` a `DataError` on the first bad entry, or ``"skip"`` it and count it.
        report: Filled with what was kept and skipped (a fresh one is used when ``None``).

    Returns:
        A `datasets.Dataset` with columns ``image`` (`datasets.Image`), ``image_id``, ``captions``
        (list of str) and ``split``, one row per image.
    """
    check_on_error(on_error)
    report = report if report is not None else LoadReport()
    report.source = source
    columns: dict[str, list[Any]] = {name: [] for name in FEATURES}
    seen: dict[str, str] = {}
    for record in records:
        captions = select_captions(record.captions, n_captions, record.entry, on_error, report)
        if captions is None:
            continue
        reason = verify_image(record.path) if verify_images else None
        if reason is None and not verify_images and not record.path.is_file():
            reason = "image file not found"
        if reason is not None:
            fix = "check the image root and file name" if "not found" in reason else "replace the file"
            handle_bad_entry(f"{record.entry} -> {record.path}", reason, fix, on_error, report)
            continue
        if record.image_id in seen:
            raise DataError(
                f"{record.entry}: image id {record.image_id!r} already used by {seen[record.image_id]}; "
                "merge the two entries' captions or give them distinct ids"
            )
        seen[record.image_id] = record.entry
        columns["image"].append(str(record.path))
        columns["image_id"].append(record.image_id)
        columns["captions"].append(captions)
        columns["split"].append(record.split)
    report.n_loaded = len(columns["image_id"])
    if report.n_skipped or report.n_captions_truncated:
        logger.warning(report.summary())
    return datasets.Dataset.from_dict(columns, features=FEATURES)
