"""Export an image-level dataset to an image folder with ``metadata.jsonl`` (push-able to the Hub)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import datasets
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError
from .imagefolder import METADATA


def _target_name(value: dict, stem: str) -> str:
    """The exported file name: the source file's name, or the id plus the format's suffix."""
    path, data = value.get("path"), value.get("bytes")
    if path:
        return Path(path).name
    if Path(stem).name != stem or stem in ("", ".", ".."):
        # the id comes from the dataset: as a path it must not leave the export folder
        raise DataError(
            f"image id {stem!r} cannot be a file name (it has a folder part); give the image a plain id "
            "before exporting"
        )
    with Image.open(io.BytesIO(data)) as image:
        return stem + "." + (image.format or "png").lower().replace("jpeg", "jpg")


def _write_image(value: dict, target: Path) -> None:
    """Hard-link (same file system: no copy of the pixels) or copy the source, or write stored bytes."""
    if value.get("bytes") is not None:
        target.write_bytes(value["bytes"])
        return
    target.unlink(missing_ok=True)
    try:
        os.link(value["path"], target)
    except OSError:
        shutil.copyfile(value["path"], target)


def export_imagefolder(
    dataset: datasets.Dataset, output_dir: str | Path, image_subdir: str = "images", overwrite: bool = False
) -> Path:
    """Write `dataset` (columns ``image``, ``image_id``, ``captions``, ``split``) as an image folder.

    Layout: ``output_dir/images/<file>`` and ``output_dir/metadata.jsonl`` with one line per image
    (``file_name``, ``image_id``, ``captions``, ``split``). Load it back with
    `temde_hf.data.load_imagefolder` or ``datasets.load_dataset("imagefolder", data_dir=output_dir)``.

    Args:
        dataset: An image-level dataset from one of the loaders.
        output_dir: Created if needed.
        image_subdir: Folder of the images inside `output_dir`.
        overwrite: Replace an existing export (its ``metadata.jsonl``); refused by default.

    Returns:
        The path of ``metadata.jsonl``.

    Raises:
        DataError: Two images would get the same file name, an id is not a plain file name, or the
            folder holds an export already (without `overwrite`).
    """
    output_dir = Path(output_dir)
    if (output_dir / METADATA).exists() and not overwrite:
        raise DataError(
            f"{output_dir / METADATA}: already exists (an exported dataset); export into a new folder, "
            "or pass overwrite=True to replace it"
        )
    image_dir = output_dir / image_subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    used: dict[str, str] = {}
    metadata = output_dir / METADATA
    with metadata.open("w", encoding="utf-8") as handle:
        for row in tqdm(raw, desc="export", unit="img", disable=len(raw) < 1000):
            name = _target_name(row["image"], row["image_id"])
            if name in used:
                raise DataError(
                    f"images {used[name]!r} and {row['image_id']!r} share the file name {name!r}; "
                    "export them into separate folders or rename one"
                )
            used[name] = row["image_id"]
            _write_image(row["image"], image_dir / name)
            line = {
                "file_name": f"{image_subdir}/{name}",
                "image_id": row["image_id"],
                "captions": list(row["captions"]),
                "split": row["split"],
            }
            handle.write(json.dumps(line) + "\n")
    return metadata
