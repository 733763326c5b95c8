"""Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``).

Format: ``{"images": [{"filename", "filepath"? (COCO: ``val2014``...), "split", "cocoid"? | "imgid",
"sentences": [{"raw", "tokens", ...}]}], "dataset": name}``. COCO's ``restval`` images are folded
into ``train`` as the papers do (113,287 training images).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from .common import ImageRecord, build_dataset, file_name_problem, start_report
from .errors import DataError, LoadReport, OnError, handle_bad_entry, not_utf8


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing, truncated or malformed file into a `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass the path of the annotation JSON")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; download or extract it again")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the file is "
            "probably truncated or damaged: download or extract it again"
        ) from exc
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc


def _raw_captions(sentences: Any) -> list[Any] | None:
    """The ``raw`` value of every sentence, as read (checked later), or ``None`` when malformed."""
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
        return None
    return [sentence["raw"] for sentence in sentences]


def _records(
    entries: list[Any],
    json_path: Path,
    image_root: Path,
    fold_restval: bool,
    on_error: OnError,
    report: LoadReport,
) -> Iterator[ImageRecord]:
    for index, entry in enumerate(entries):
        name = f"{json_path.name}: images[{index}]"
        if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
            handle_bad_entry(
                name,
                "is not an object with 'filename' and 'sentences'",
                "fix the JSON entry",
                on_error,
                report,
            )
            continue
        split = entry.get("split", "train")
        if fold_restval and split == "restval":
            split = "train"
        filepath = entry.get("filepath") or ""  # COCO's split folder (val2014); absent elsewhere
        problem = file_name_problem(entry["filename"]) or (file_name_problem(filepath) if filepath else None)
        if problem is not None:
            handle_bad_entry(name, problem, "fix the entry's 'filename' / 'filepath'", on_error, report)
            continue
        name = f"{name} ({entry['filename']})"
        captions = _raw_captions(entry["sentences"])
        if captions is None:
            handle_bad_entry(
                name,
                "has no 'sentences' list of objects with a 'raw' caption",
                'write them as "sentences": [{"raw": "a caption"}, ...]',
                on_error,
                report,
            )
            continue
        # COCO keeps images in split folders (val2014/...); accept a flat folder too.
        path = image_root / filepath / entry["filename"]
        if not path.is_file() and (image_root / entry["filename"]).is_file():
            path = image_root / entry["filename"]
        image_id = entry["cocoid"] if "cocoid" in entry else Path(entry["filename"]).stem
        yield ImageRecord(path=path, image_id=image_id, captions=captions, split=split, entry=name)


def load_karpathy(
    json_path: str | Path,
    image_root: str | Path | None = None,
    split: str | Sequence[str] | None = None,
    n_captions: int | None = 5,
    fold_restval: bool = True,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
) -> datasets.Dataset:
    """Load a Karpathy split JSON and its images as a `datasets.Dataset`, one row per image.

    Args:
        json_path: ``dataset_coco.json`` / ``dataset_flickr30k.json`` / ``dataset_flickr8k.json``.
        image_root: Folder of the images (COCO: the folder holding ``train2014/`` and ``val2014/``).
            Defaults to ``images/`` beside the JSON.
        split: Keep only this split (or these splits), e.g. ``"test"``; ``None`` keeps all.
        n_captions: Captions kept per image, the first ones (the protocol uses 5; a few COCO images
            have 6-7). Images with fewer are bad data. ``None`` keeps all.
        fold_restval: Rename COCO's ``restval`` split to ``train``.
        verify_images: Decode each image now (a full decode) rather than at first use.
        on_error: ``"raise"`` on bad data, or ``"skip"`` it (counted in `report` and logged).
        report: A `LoadReport` to fill.

    Returns:
        Columns ``image``, ``image_id`` (``cocoid`` or the file stem), ``captions``, ``split``.

    Raises:
        DataError: Missing/truncated JSON, a bad entry, a missing or corrupt image, too few captions.
    """
    json_path = Path(json_path)
    report = start_report(str(json_path), on_error, report)
    image_root = Path(image_root) if image_root is not None else json_path.parent / "images"
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(
            f"{json_path}: no 'images' list at the top level; is this a Karpathy split JSON "
            "(dataset_coco.json / dataset_flickr30k.json)? For COCO's captions_*.json use load_coco_captions"
        )
    records = _records(data["images"], json_path, image_root, fold_restval, on_error, report)
    return build_dataset(
        records, str(json_path), split=split, n_captions=n_captions, verify_images=verify_images,
        on_error=on_error, report=report,
    )  # fmt: skip
