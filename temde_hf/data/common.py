"""Shared pieces of the loaders: one record per image, the checks, and the `datasets.Dataset` build.

Every loader reduces its format to a list of `ImageRecord` and calls `build_dataset`, so the caption
checks, image checks and the schema (`image`, `image_id`, `captions`, `split`) are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from .errors import SKIP_HINT, DataError, LoadReport, OnError, check_on_error, handle_bad_entry, logger
from .image_decoding import ImageDecodeError, ImageTooLargeError, decode_image
from .text import text_problem

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
        path: The image file, or ``None`` when the image is embedded in a source table (see `row`).
        image_id: A stable id (COCO id, Flickr file stem, ...), unique within the dataset; as read (a
            string or an integer, checked and made a string by `check_records`).
        captions: The captions in file order, as read (`check_records` refuses any that is not text).
        split: Karpathy split name (``train``, ``val``, ``test``, ...); as read, like `image_id`.
        entry: How to name this image in an error (``file.json: images[3] (x.jpg)``).
        row: The row of the source table holding an embedded image (its bytes are never copied).
    """

    path: Path | None
    image_id: Any
    captions: list[Any]
    split: Any
    entry: str
    row: int | None = None


def verify_image(path: Path, max_pixels: int | None = None) -> str | None:
    """Check that `path` is a usable image by decoding it fully, as `open_image` will.

    A full decode (not PIL's header-only ``verify``) is what catches a JPEG cut short: its header
    and structure are intact, only the pixel data is missing.

    Returns:
        ``None`` when fine, else the reason.
    """
    if not path.is_file():
        return "image file not found"
    try:
        decode_image(path, max_pixels)
    except (ImageDecodeError, OSError) as exc:
        return str(exc)
    return None


def open_image(value: Any, max_pixels: int | None = None) -> Image.Image:
    """Decode an image stored by the `datasets.Image` feature (``decode=False``), a path or a PIL image.

    The one image-opening function of the package (see `image_decoding.decode_image` for what it
    does: EXIF orientation, 16-bit scaling, transparency on white, a pixel limit).

    Args:
        value: ``{"path", "bytes"}`` as stored by `datasets.Image`, a file path, or a PIL image.
        max_pixels: Refuse larger images; default: Pillow's ``MAX_IMAGE_PIXELS``.

    Returns:
        A fully decoded, upright 8-bit RGB image.

    Raises:
        DataError: Naming the file when it is missing, too large, or cannot be decoded.
    """
    if isinstance(value, Image.Image | str | Path):
        path, source = (None, value) if isinstance(value, Image.Image) else (value, value)
    else:
        path, data = value.get("path"), value.get("bytes")
        source = data if data is not None else path
    name = path or "<image bytes>"
    try:
        return decode_image(source, max_pixels)
    except FileNotFoundError as exc:
        raise DataError(f"{name}: image file not found; check the image root / file names") from exc
    except ImageTooLargeError as exc:
        raise DataError(f"{name}: {exc} (or leave such images out: {SKIP_HINT})") from exc
    except (ImageDecodeError, OSError) as exc:
        raise DataError(f"{name}: {exc}; replace the file, or leave such images out: {SKIP_HINT}") from exc


def file_name_problem(name: object) -> str | None:
    """Why a file name read from a dataset file cannot name a file inside its folder (``None`` if it can).

    The names come from files a user downloaded: one that is not a string, is absolute or climbs out
    with ``..`` would read a file outside the dataset's folder (or fail with a raw ``TypeError``).
    """
    if not isinstance(name, str) or not name.strip():
        return f"file name {name!r} is not a non-empty string"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return f"file name {name!r} leaves the dataset's folder (absolute, or with '..')"
    if Path(name).name in ("", "."):
        return f"file name {name!r} names a folder, not a file"
    return None


def value_problem(value: object, what: str) -> str | None:
    """Why an id or split value is unusable: only strings and integers are (``None`` when fine).

    Written as ``str(value)``, a ``null`` or a list would silently become the id or split ``"None"`` /
    ``"['test']"``.
    """
    if (isinstance(value, str) and value.strip()) or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return f"{what} {value!r} is not a string or an integer"


def select_captions(
    captions: Sequence[Any], n_captions: int | None, entry: str, on_error: OnError, report: LoadReport
) -> list[str] | None:
    """Check the captions of one image (text, visible) and their count; keep the first `n_captions`.

    Args:
        captions: As read from the file: any value that is not visible text (``null``, a number, a
            list, ``""``, only spaces or zero-width characters) makes the image a bad entry.
        n_captions: Captions kept (``None`` keeps all).

    Returns:
        The captions to keep (stripped), or ``None`` when the image is skipped.
    """
    for index, caption in enumerate(captions):
        problem = text_problem(caption)
        if problem is not None:
            handle_bad_entry(
                entry,
                f"caption {index} is {problem}",
                "write the caption as text, or remove it",
                on_error,
                report,
            )
            return None
    captions = [c.strip() for c in captions]
    if n_captions is None:
        if not captions:
            handle_bad_entry(entry, "has no captions", "add captions or remove the image", on_error, report)
            return None
        return captions
    if len(captions) < n_captions:
        handle_bad_entry(
            entry,
            f"has {len(captions)} captions, fewer than the {n_captions} the protocol needs",
            f"add captions, or pass n_captions={len(captions)} / --n-captions {len(captions)} "
            "(or n_captions=None for variable counts)",
            on_error,
            report,
        )
        return None
    if len(captions) > n_captions:
        report.n_captions_truncated += 1
    return captions[:n_captions]


def _file_problem(path: Path, verify: bool) -> str | None:
    if verify:
        return verify_image(path)
    return None if path.is_file() else "image file not found"


def check_records(
    records: Iterable[ImageRecord],
    *,
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport,
    image_problem: Callable[[ImageRecord], str | None] | None = None,
) -> list[ImageRecord]:
    """The records to keep: the selected splits, with valid captions, a usable image and a unique id.

    Every loader goes through here, so split selection (other split values counted in `report`), the
    caption checks, the image checks and the duplicate-id check are the same for every format.

    Args:
        records: One per image.
        split: Keep only this split (or these); ``None`` keeps all.
        n_captions: Captions kept per image (the first ones); images with fewer are bad data.
            ``None`` keeps every caption (variable counts, at least one).
        verify_images: Also decode every image now (`verify_image`), so a bad one is found here
            (and skipped, with ``on_error="skip"``) rather than when it is used. Missing files are
            always checked.
        on_error: ``"raise"`` a `DataError` on the first bad entry, or ``"skip"`` it and count it.
        report: Filled with what was kept and skipped.
        image_problem: For records whose image is embedded (``path is None``): the reason it is unusable.

    Returns:
        The kept records, their captions trimmed to `n_captions`.
    """
    wanted = None if split is None else {split} if isinstance(split, str) else set(split)
    kept: list[ImageRecord] = []
    seen: dict[str, str] = {}
    n_records = 0
    for record in records:
        n_records += 1
        problem = value_problem(record.split, "split") or value_problem(record.image_id, "image id")
        if problem is not None:
            handle_bad_entry(record.entry, problem, "fix the value in the file", on_error, report)
            continue
        record = replace(record, image_id=str(record.image_id), split=str(record.split))
        if not report.select_split(record.split, wanted):
            continue
        captions = select_captions(record.captions, n_captions, record.entry, on_error, report)
        if captions is None:
            continue
        if record.path is None:
            reason = image_problem(record) if image_problem is not None else None
            where, fix = record.entry, "fix or remove the row"
        else:
            reason = _file_problem(record.path, verify_images)
            where = f"{record.entry} -> {record.path}"
            fix = (
                "check the image root and file name"
                if reason and "not found" in reason
                else "replace the file"
            )
        if reason is not None:
            handle_bad_entry(where, reason, fix, on_error, report)
            continue
        if record.image_id in seen:
            handle_bad_entry(
                record.entry,
                f"image id {record.image_id!r} already used by {seen[record.image_id]}",
                "merge the two entries' captions or give them distinct ids",
                on_error,
                report,
            )
            continue
        seen[record.image_id] = record.entry
        kept.append(replace(record, captions=captions))
    if n_records == 0 and not report.n_skipped:
        # Otherwise an empty or header-only file ends far away as "no images of split 'test'".
        raise DataError(
            f"{report.source}: contains no images (no entries at all: an empty list or a header only); "
            "check that this is the dataset file you meant, or add its entries"
        )
    report.n_loaded = len(kept)
    if report.needs_warning:
        logger.warning(report.summary())
    return kept


def build_dataset(
    records: Iterable[ImageRecord],
    source: str,
    *,
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Check records (`check_records`) and build the image-level dataset (images stay files, decoded lazily).

    Args:
        records: One per image, each with a `path`.
        source: The file or folder loaded, for the report.
        split, n_captions, verify_images, on_error: See `check_records`.
        report: Filled with what was kept and skipped (a fresh one is used when ``None``).

    Returns:
        A `datasets.Dataset` with columns ``image`` (`datasets.Image`), ``image_id``, ``captions``
        (list of str) and ``split``, one row per image.
    """
    report = start_report(source, on_error, report)
    kept = check_records(
        records,
        split=split,
        n_captions=n_captions,
        verify_images=verify_images,
        on_error=on_error,
        report=report,
    )
    columns = {
        "image": [str(r.path) for r in kept],
        "image_id": [r.image_id for r in kept],
        "captions": [r.captions for r in kept],
        "split": [r.split for r in kept],
    }
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def start_report(source: str, on_error: str, report: LoadReport | None) -> LoadReport:
    """Check the ``on_error`` mode and return the report to fill (a fresh one when ``None``)."""
    check_on_error(on_error)
    report = report if report is not None else LoadReport()
    report.source = source
    return report
