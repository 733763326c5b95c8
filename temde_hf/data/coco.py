"""The official COCO captions JSON (``captions_train2017.json``, ``captions_val2014.json``, ...).

Format: ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", "id"}]}``.
Captions are kept in annotation order; the whole file is one split (named after the file by default).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from .common import ImageRecord, build_dataset, file_name_problem, start_report
from .errors import DataError, LoadReport, OnError, handle_bad_entry
from .karpathy import read_json


def _image_problem(image: Any) -> str | None:
    """Why an ``images[]`` entry is unusable (``None`` when fine)."""
    if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
        return "lacks 'id' or 'file_name'"
    if not isinstance(image["id"], int | str) or isinstance(image["id"], bool):
        return f"id {image['id']!r} is not an integer or a string"
    return file_name_problem(image["file_name"])


def _captions_by_image(
    data: dict[str, Any], json_path: Path, image_ids: list[Any], some_skipped: bool
) -> dict[Any, list[Any]]:
    """The captions of every usable image id, as read (checked later), in annotation order.

    Args:
        image_ids: The ids of the usable images.
        some_skipped: Whether some image entries were left out as bad: annotations of an unknown id
            are then taken for theirs (the bad entries are listed), not for an inconsistent file.
    """
    by_image: dict[Any, list[Any]] = {image_id: [] for image_id in image_ids}
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise DataError(
                f"{json_path.name}: annotations[{index}] lacks 'image_id' or 'caption'; fix the entry"
            )
        image_id = annotation["image_id"]
        known = isinstance(image_id, int | str) and image_id in by_image
        if not known and not some_skipped:
            # A caption of an unknown image would be silently lost; treat the file as inconsistent.
            raise DataError(
                f"{json_path.name}: annotations[{index}] refers to image_id {image_id!r}, which is not in "
                "'images'; the file is inconsistent (use the matching captions and images files)"
            )
        if known:
            by_image[image_id].append(annotation["caption"])
    return by_image


def _records(
    data: dict[str, Any], json_path: Path, image_root: Path, split: str, on_error: OnError, report: LoadReport
) -> Iterator[ImageRecord]:
    usable = []
    for index, image in enumerate(data["images"]):  # bad entries first: they explain orphan captions
        problem = _image_problem(image)
        if problem is not None:
            handle_bad_entry(f"{json_path.name}: images[{index}]", problem, "fix the entry", on_error, report)
            continue
        usable.append((index, image))
    by_image = _captions_by_image(data, json_path, [image["id"] for _, image in usable], report.n_skipped > 0)
    for index, image in usable:
        yield ImageRecord(
            path=image_root / image["file_name"],
            image_id=image["id"],
            captions=by_image[image["id"]],
            split=split,
            entry=f"{json_path.name}: images[{index}] ({image['file_name']})",
        )


def load_coco_captions(
    json_path: str | Path,
    image_root: str | Path,
    split_name: str | None = None,
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Load an official COCO captions file and its image folder, one row per image.

    Args:
        json_path: E.g. ``annotations/captions_val2017.json``.
        image_root: The folder with the images named in ``images[].file_name`` (e.g. ``val2017/``).
        split_name: Value of the ``split`` column; default: the file name after ``captions_`` (``val2017``).
        split: Keep only this split (or these) by name; ``None`` keeps all.
        n_captions: Captions kept per image (first 5; fewer is bad data); ``None`` keeps all.
        verify_images: Check each image decodes now.
        on_error: ``"raise"`` or ``"skip"`` bad entries.
        report: A `LoadReport` to fill.

    Returns:
        Columns ``image``, ``image_id`` (the COCO id), ``captions``, ``split``.
    """
    json_path = Path(json_path)
    report = start_report(str(json_path), on_error, report)
    data = read_json(json_path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(
            f"{json_path}: expected 'images' and 'annotations' lists (a COCO captions_*.json); "
            "for a Karpathy split JSON use load_karpathy"
        )
    split_name = split_name if split_name is not None else json_path.stem.removeprefix("captions_")
    records = _records(data, json_path, Path(image_root), split_name, on_error, report)
    return build_dataset(
        records, str(json_path), split=split, n_captions=n_captions, verify_images=verify_images,
        on_error=on_error, report=report,
    )  # fmt: skip
