"""Where a gallery's images come from: a folder, a file list, or a `datasets` dataset.

Each source becomes an `ImageList`: the images (paths, or a dataset read batch by batch), one id and one
display path per row. Nothing is decoded here; `temde_hf.inference.encode` opens images as it streams.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PATH_BATCH = 4096
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageList:
    """The rows of a gallery.

    Attributes:
        images: Paths (or PIL images), or a `datasets.Dataset` with an image column.
        ids: One stable id per row.
        paths: A display path per row (None where the image has no file).
        image_column: The dataset's image column.
    """

    images: Any
    ids: list[str]
    paths: list[str | None]
    image_column: str = "image"

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """A hash of the ids in order: a resumed build must index the same list."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so ids are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return files


def from_folder(folder: str | Path) -> ImageList:
    """Every image under ``folder``; ids are paths relative to it."""
    folder = Path(folder)
    files = list_images(folder)
    ids = [p.relative_to(folder).as_posix() for p in files]
    return ImageList(files, ids, [str(p.resolve()) for p in files])


def from_file_list(list_file: str | Path, root: str | Path | None = None) -> ImageList:
    """One image path per line of ``list_file`` (blank lines and ``#`` comments skipped).

    Relative paths are taken from ``root`` (default: the list file's folder); ids are the lines as
    written. Missing files are not checked here: the build skips and lists them.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ValueError(f"image list {list_file} does not exist (expected one image path per line)")
    root = Path(root) if root is not None else list_file.parent
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"image list {list_file} is not UTF-8 text ({err.reason} at byte {err.start}); write one image "
            "path per line"
        ) from err
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"image list {list_file} has no paths")
    if len(set(lines)) != len(lines):
        raise ValueError(f"image list {list_file} names some images twice; ids must be unique")
    paths = [Path(line) if Path(line).is_absolute() else root / line for line in lines]
    return ImageList(paths, lines, [str(p) for p in paths])


def from_dataset(dataset: Any, *, image_column: str = "image", id_column: str | None = None) -> ImageList:
    """A `datasets.Dataset` whose ``image_column`` holds images or image paths (read lazily)."""
    if image_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {image_column!r} (columns: {dataset.column_names})")
    if id_column is not None and id_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {id_column!r} (columns: {dataset.column_names})")
    ids = [str(v) for v in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    paths = _dataset_paths(dataset, image_column)
    return ImageList(dataset, ids, paths, image_column)


def _dataset_paths(dataset: Any, image_column: str) -> list[str | None]:
    """The file path of each row when the column stores paths (strings or undecoded image dicts)."""
    import datasets

    column = dataset.select_columns([image_column])
    if isinstance(column.features[image_column], datasets.Image):
        column = column.cast_column(image_column, datasets.Image(decode=False))
    paths: list[str | None] = []
    for start in range(0, len(column), _PATH_BATCH):  # in batches: embedded image bytes stay on disk
        for value in column[start : start + _PATH_BATCH][image_column]:
            if isinstance(value, dict):
                paths.append(value.get("path"))
            else:
                paths.append(str(value) if isinstance(value, str | Path) else None)
    return paths
