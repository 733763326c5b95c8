"""Hub dataset repos and local parquet / JSON files through `datasets.load_dataset`, any column names.

Handles the common layouts: one row per image with a list of captions (strings, or dicts such as
Karpathy ``sentences`` with a ``raw`` key), or one row per caption with an image id to group by; the
image column either holds images (`datasets.Image`) or file paths relative to ``image_root``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from .common import FEATURES, ImageRecord, build_dataset, check_records, start_report
from .errors import DataError, LoadReport, OnError, handle_bad_entry
from .image_decoding import ImageDecodeError, decode_image


def _as_captions(value: Any, caption_key: str) -> list[Any]:
    """The captions of one row, as read (checked later): a list of strings, or of dicts with `caption_key`."""
    if not isinstance(value, list):
        return [value]  # one caption per row (a null stays a null, and is refused as such)
    return [item.get(caption_key) if isinstance(item, dict) else item for item in value]


def _group(
    table: datasets.Dataset, captions_column: str, id_column: str | None, caption_key: str
) -> tuple[list[int], list[Any], list[list[Any]]]:
    """Rows per image: ``(first row index, image id, captions)``, grouping one-caption rows by id."""
    raw_captions = table[captions_column]
    one_per_row = isinstance(table.features[captions_column], datasets.Value)
    ids = table[id_column] if id_column else list(range(len(table)))
    first: dict[Any, int] = {}
    captions: dict[Any, list[Any]] = {}
    for index, (image_id, value) in enumerate(zip(ids, raw_captions)):
        if image_id not in first:
            first[image_id] = index
            captions[image_id] = []
        elif not one_per_row:
            raise DataError(
                f"{captions_column!r}: image id {image_id!r} appears in rows {first[image_id]} and {index} "
                "with caption lists; pass the right image_id_column (ids must be unique when captions are lists)"
            )
        captions[image_id].extend([value] if one_per_row else _as_captions(value or [], caption_key))
    return list(first.values()), list(first), list(captions.values())


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _unreadable(source: object, exc: BaseException) -> str:
    return (
        f"{source}: cannot be read as a dataset ({type(exc).__name__}: {_short(exc)}); check that the "
        "file is complete (download or write it again) and of the format given"
    )


def _check_columns(
    table: datasets.Dataset,
    source: object,
    image_column: str,
    captions_column: str,
    id_column: str | None,
    caption_key: str,
) -> None:
    """Refuse columns of the wrong kind up front, naming the column and the fix."""
    image_feature = table.features[image_column]
    if isinstance(image_feature, datasets.Value) and image_feature.dtype not in ("string", "large_string"):
        raise DataError(
            f"{source}: column {image_column!r} holds {image_feature.dtype} values, not images or image "
            "paths; pass the right image_column"
        )
    if id_column and not isinstance(table.features[id_column], datasets.Value):
        raise DataError(
            f"{source}: column {id_column!r} does not hold one id (string or integer) per row; pass the "
            "right image_id_column"
        )
    inner = getattr(table.features[captions_column], "feature", None)
    if isinstance(inner, dict) and caption_key not in inner:
        raise DataError(
            f"{source}: the captions in column {captions_column!r} are objects with keys {sorted(inner)}, "
            f"none named {caption_key!r}; pass caption_key (--caption-key) naming the caption text"
        )


def _path_ok(value: Any, entry: str, on_error: OnError, report: LoadReport) -> bool:
    """Whether a path-column value is a path (a null is a bad entry: raised, or skipped and counted)."""
    if isinstance(value, str) and value.strip():
        return True
    handle_bad_entry(
        entry, f"image path {value!r} is not a path", "fill in the image's path", on_error, report
    )
    return False


def _embedded_image_problem(value: Any, verify: bool) -> str | None:
    """Reason an embedded image value (`{"bytes", "path"}`) is unusable, or ``None``."""
    if value is None or (value.get("bytes") is None and not value.get("path")):
        return "has no image"
    if verify and value.get("bytes") is not None:
        try:
            decode_image(value["bytes"])
        except ImageDecodeError as exc:
            return str(exc)
    return None


def load_hub_dataset(
    path: str | Path,
    hf_split: str = "train",
    *,
    data_files: Any = None,
    image_column: str = "image",
    captions_column: str = "captions",
    image_id_column: str | None = None,
    split_column: str | None = None,
    split: str | Sequence[str] | None = None,
    caption_key: str = "raw",
    image_root: str | Path | None = None,
    n_captions: int | None = 5,
    verify_images: bool = False,
    on_error: OnError = "raise",
    report: LoadReport | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load a Hub repo / local files with `datasets.load_dataset` into the image-level schema.

    Args:
        path: A Hub repo id, a local folder, or a builder name (``"parquet"`` with `data_files`).
        hf_split: The `datasets` split to read (also the ``split`` value when `split_column` is None).
        data_files: Passed to `datasets.load_dataset`.
        image_column: Column with the images (`datasets.Image`) or with file paths.
        captions_column: Column with a caption list, a list of dicts (see `caption_key`), or one caption
            per row (rows then grouped by `image_id_column`).
        image_id_column: Column with the image id; default: the row number.
        split_column: Column with the Karpathy split (e.g. ``"split"``), if any.
        split: Keep only this split (or these), by the values of `split_column`; ``None`` keeps all.
        caption_key: Key of the caption text when captions are dicts.
        image_root: Folder the paths in `image_column` are relative to (path columns only).
        n_captions: Captions kept per image (first 5; fewer is bad data); ``None`` keeps all.
        verify_images: Check each image decodes now.
        on_error: ``"raise"`` or ``"skip"`` bad entries.
        report: A `LoadReport` to fill.
        **load_kwargs: More `datasets.load_dataset` arguments (``revision``, ``cache_dir``, ...).

    Returns:
        Columns ``image``, ``image_id``, ``captions``, ``split``, one row per image.
    """
    # A local parquet file is read through the "parquet" builder: name the file, not the builder.
    source = data_files if isinstance(data_files, str | Path) else str(path)
    report = start_report(str(source), on_error, report)
    try:
        table = datasets.load_dataset(str(path), data_files=data_files, split=hf_split, **load_kwargs)
    except (FileNotFoundError, ConnectionError) as exc:  # DatasetNotFoundError is a FileNotFoundError
        # A local path that does not exist is also tried as a Hub id: say both, not just "offline".
        raise DataError(
            f"{source}: no such local file or folder, and no Hub dataset of that name could be loaded "
            f"({type(exc).__name__}: {_short(exc)}); check the path or the dataset id"
        ) from exc
    except ValueError as exc:
        if "Unknown split" not in str(exc):
            raise DataError(_unreadable(source, exc)) from exc
        raise DataError(f"{source}: {_short(exc)}; pass one of those as hf_split (--hf-split NAME)") from exc
    except Exception as exc:  # a damaged file fails deep inside pyarrow / datasets with its own types
        raise DataError(_unreadable(source, exc)) from exc
    wanted = [c for c in (image_column, captions_column, image_id_column, split_column) if c]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: no column(s) {missing}; the dataset has {table.column_names}. Pass the right "
            "image_column / captions_column / image_id_column / split_column"
        )
    _check_columns(table, source, image_column, captions_column, image_id_column, caption_key)
    rows, ids, captions = _group(table, captions_column, image_id_column, caption_key)
    splits = table[split_column] if split_column else [hf_split] * len(table)
    checks = {"split": split, "n_captions": n_captions, "verify_images": verify_images, "on_error": on_error}
    if isinstance(table.features[image_column], datasets.Value):  # file paths
        root = Path(image_root) if image_root is not None else Path(".")
        paths = table[image_column]
        records = (
            ImageRecord(root / paths[r], i, c, splits[r], f"{source}: row {r} (id {i})")
            for r, i, c in zip(rows, ids, captions)
            if _path_ok(paths[r], f"{source}: row {r} (id {i})", on_error, report)
        )
        return build_dataset(records, str(source), report=report, **checks)
    # Embedded images stay in the table: checked one row at a time, then selected, never copied.
    raw_images = table.cast_column(image_column, datasets.Image(decode=False))
    records = (
        ImageRecord(None, i, c, splits[r], f"{source}: row {r} (id {i})", row=r)
        for r, i, c in zip(rows, ids, captions)
    )
    kept = check_records(
        records,
        report=report,
        image_problem=lambda record: _embedded_image_problem(
            raw_images[record.row][image_column], verify_images
        ),
        **checks,
    )
    images = table.select_columns([image_column]).select([r.row for r in kept])
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    images = images.cast_column("image", datasets.Image())
    others = datasets.Dataset.from_dict(
        {"image_id": [r.image_id for r in kept], "captions": [r.captions for r in kept],
         "split": [r.split for r in kept]},
        features=datasets.Features({k: FEATURES[k] for k in ("image_id", "captions", "split")}),
    )  # fmt: skip
    return datasets.concatenate_datasets([images, others], axis=1)
