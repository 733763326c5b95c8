"""Caption pairs index the image rows without copies; export to an image folder keeps every link."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from temde_hf.data import (
    CaptionPairs,
    DataError,
    caption_to_image,
    export_imagefolder,
    flat_captions,
    load_imagefolder,
    load_karpathy,
    make_synthetic_karpathy,
)


def links(dataset: datasets.Dataset) -> set[tuple[str, str, str, int, str]]:
    """Every (image id, image bytes digest, split, caption position, caption) link."""
    import hashlib

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    out = set()
    for row in raw:
        data = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        out |= {(row["image_id"], digest, row["split"], k, c) for k, c in enumerate(row["captions"])}
    return out


@pytest.fixture
def dataset(tmp_path: Path) -> datasets.Dataset:
    return load_karpathy(make_synthetic_karpathy(tmp_path / "syn", n_images=9, seed=2))


def test_caption_pairs_map_every_caption_to_its_image(dataset: datasets.Dataset) -> None:
    variable = dataset.map(lambda row, i: {"captions": row["captions"][: 1 + i % 5]}, with_indices=True)
    pairs = CaptionPairs(variable)
    owner = caption_to_image(variable)
    assert len(pairs) == sum(1 + i % 5 for i in range(9)) == len(owner) == len(flat_captions(variable))
    for index in range(len(pairs)):
        item = pairs[index]
        row = variable[item["image_index"]]
        assert item["image_index"] == int(owner[index])
        assert item["caption"] == flat_captions(variable)[index]
        assert item["caption"] in row["captions"] and item["image_id"] == row["image_id"]
        assert item["image"].tobytes() == row["image"].convert("RGB").tobytes()
    # lazy: the pairs object holds an index per pair and the undecoded, memory-mapped table
    assert pairs.rows.dtype == torch.long and pairs.dataset.features["image"].decode is False
    assert pairs.dataset.cache_files == variable.cache_files or not variable.cache_files
    assert CaptionPairs(dataset, decode=False)[3]["image"]["path"].endswith("img_00000.png")


def test_round_trip_karpathy_dataset_imagefolder(dataset: datasets.Dataset, tmp_path: Path) -> None:
    metadata = export_imagefolder(dataset, tmp_path / "exported")
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(lines) == 9 and all(line["file_name"].startswith("images/") for line in lines)
    reloaded = load_imagefolder(tmp_path / "exported")
    assert links(reloaded) == links(dataset)
    assert len(links(dataset)) == 9 * 5
    # the standard `datasets` imagefolder builder reads the same folder
    builder = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "exported"), split="train")
    assert sorted(zip(builder["image_id"], map(tuple, builder["captions"]))) == sorted(
        zip(dataset["image_id"], map(tuple, dataset["captions"]))
    )


def test_export_of_in_memory_images_and_name_clash(dataset: datasets.Dataset, tmp_path: Path) -> None:
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    as_bytes = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": Path(r["image"]["path"]).read_bytes(), "path": None} for r in raw],
            "image_id": dataset["image_id"],
            "captions": dataset["captions"],
            "split": dataset["split"],
        }
    ).cast_column("image", datasets.Image())
    export_imagefolder(as_bytes, tmp_path / "bytes")
    assert (tmp_path / "bytes" / "images" / "img_00003.png").is_file()
    assert links(load_imagefolder(tmp_path / "bytes")) == links(dataset)
    clash = datasets.concatenate_datasets(
        [dataset.select([0]), dataset.select([0]).map(lambda r: {"image_id": "x"})]
    )
    with pytest.raises(DataError, match=r"share the file name 'img_00000.png'"):
        export_imagefolder(clash, tmp_path / "clash")


def test_export_never_replaces_an_export_silently_nor_writes_outside_its_folder(
    dataset: datasets.Dataset, tmp_path: Path
) -> None:
    metadata = export_imagefolder(dataset, tmp_path / "exported")
    metadata.write_text(metadata.read_text() + "\n")  # a mark of the first export
    with pytest.raises(DataError, match=r"exported/metadata\.jsonl: already exists.*overwrite=True"):
        export_imagefolder(dataset, tmp_path / "exported")
    assert metadata.read_text().endswith("\n\n")
    export_imagefolder(dataset, tmp_path / "exported", overwrite=True)
    assert not metadata.read_text().endswith("\n\n")
    # an image stored as bytes is named after its id, which comes from the data
    raw = dataset.select([0]).cast_column("image", datasets.Image(decode=False))
    escaping = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": Path(raw[0]["image"]["path"]).read_bytes(), "path": None}],
            "image_id": ["../../outside"],
            "captions": raw["captions"],
            "split": raw["split"],
        }
    ).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match=r"image id '\.\./\.\./outside' cannot be a file name"):
        export_imagefolder(escaping, tmp_path / "deep" / "export")
    assert not (tmp_path / "deep" / "outside.png").exists()
