"""Every loader gives the same image-level schema, and the formats agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from temde_hf.data import (
    DATA_FORMATS,
    FEATURES,
    LoadReport,
    detect_format,
    load_caption_csv,
    load_coco_captions,
    load_hub_dataset,
    load_image_captions,
    load_imagefolder,
    load_karpathy,
    make_synthetic_karpathy,
)


def links(dataset: datasets.Dataset) -> dict[str, tuple[tuple[str, ...], str, str]]:
    """image_id -> (captions, split, image file name): every image–caption link of a dataset."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    return {r["image_id"]: (tuple(r["captions"]), r["split"], Path(r["image"]["path"]).name) for r in raw}


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return make_synthetic_karpathy(tmp_path / "syn", n_images=12, seed=3)


def test_synthetic_generator_is_deterministic_and_complete(tmp_path: Path) -> None:
    a = json.loads(make_synthetic_karpathy(tmp_path / "a", n_images=10, seed=5).read_text())
    b = json.loads(make_synthetic_karpathy(tmp_path / "b", n_images=10, seed=5).read_text())
    assert a == b
    assert {e["split"] for e in a["images"]} == {"train", "val", "test"}
    assert all(len(e["sentences"]) == 5 for e in a["images"])
    assert (tmp_path / "a" / "images" / a["images"][9]["filename"]).read_bytes() == (
        tmp_path / "b" / "images" / b["images"][9]["filename"]
    ).read_bytes()


def test_karpathy_loader_schema_and_splits(synthetic: Path) -> None:
    dataset = load_karpathy(synthetic, verify_images=True)
    assert dataset.features == FEATURES
    assert len(dataset) == 12
    data = json.loads(synthetic.read_text())
    assert dataset["captions"] == [[s["raw"] for s in e["sentences"]] for e in data["images"]]
    assert dataset[0]["image"].size == (32, 32)
    test = load_karpathy(synthetic, split="test")
    assert set(test["split"]) == {"test"} and len(test) == sum(e["split"] == "test" for e in data["images"])


def test_coco_karpathy_restval_filepath_and_first_five(tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path, n_images=4, seed=0)
    data = json.loads(json_path.read_text())
    (tmp_path / "images" / "val2014").mkdir()
    for i, entry in enumerate(data["images"]):
        entry["filepath"] = "val2014"
        entry["cocoid"] = 1000 + i
        (tmp_path / "images" / entry["filename"]).rename(tmp_path / "images" / "val2014" / entry["filename"])
    data["images"][0]["split"] = "restval"
    data["images"][1]["sentences"].append({"raw": "a sixth caption"})
    json_path.write_text(json.dumps(data))
    report = LoadReport()
    dataset = load_karpathy(json_path, report=report)
    assert dataset["image_id"] == ["1000", "1001", "1002", "1003"]
    assert dataset["split"][0] == "train"
    assert dataset["captions"][1] == [s["raw"] for s in data["images"][1]["sentences"][:5]]
    assert report.n_captions_truncated == 1 and report.n_loaded == 4
    assert load_karpathy(json_path, fold_restval=False)["split"][0] == "restval"
    assert len(load_karpathy(json_path, n_captions=None)["captions"][1]) == 6


def test_official_coco_captions_json(tmp_path: Path, synthetic: Path) -> None:
    data = json.loads(synthetic.read_text())
    images = [{"id": 70 + i, "file_name": e["filename"]} for i, e in enumerate(data["images"])]
    # interleaved annotations, as in the real files
    annotations = [
        {"id": k, "image_id": 70 + i, "caption": e["sentences"][j]["raw"]}
        for j in range(5)
        for i, e in enumerate(data["images"])
        for k in [len(data["images"]) * j + i]
    ]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    dataset = load_coco_captions(path, synthetic.parent / "images")
    assert set(dataset["split"]) == {"val2017"}
    assert dataset["image_id"][3] == "73"
    assert dataset["captions"][3] == [s["raw"] for s in data["images"][3]["sentences"]]
    assert detect_format(path) == "coco" and detect_format(synthetic) == "karpathy"


def test_csv_with_commas_and_splits(tmp_path: Path, synthetic: Path) -> None:
    data = json.loads(synthetic.read_text())
    lines = ["image,caption"]
    for entry in data["images"][:3]:
        for s in entry["sentences"]:
            lines.append(f'{entry["filename"]},"{s["raw"]}, with a comma"')
    lines.append(f"{data['images'][0]['filename']},unquoted, commas, survive")
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    dataset = load_caption_csv(csv_path, synthetic.parent / "images", splits=synthetic, n_captions=None)
    assert dataset["captions"][0][-1] == "unquoted, commas, survive"
    assert dataset["captions"][1] == [s["raw"] + ", with a comma" for s in data["images"][1]["sentences"]]
    assert dataset["split"] == [e["split"] for e in data["images"][:3]]
    assert len(load_caption_csv(csv_path, synthetic.parent / "images")["captions"][0]) == 5


def test_imagefolder_with_one_caption_per_line(tmp_path: Path, synthetic: Path) -> None:
    data = json.loads(synthetic.read_text())
    folder = synthetic.parent
    with (folder / "metadata.jsonl").open("w") as handle:
        for entry in data["images"]:
            for s in entry["sentences"]:
                row = {
                    "file_name": f"images/{entry['filename']}",
                    "caption": s["raw"],
                    "split": entry["split"],
                }
                handle.write(json.dumps(row) + "\n")
    dataset = load_imagefolder(folder)
    assert links(dataset) == links(load_karpathy(synthetic))
    assert set(load_imagefolder(folder, split="val")["split"]) == {"val"}


def test_parquet_with_embedded_images_and_custom_columns(tmp_path: Path, synthetic: Path) -> None:
    reference = load_karpathy(synthetic)
    data = json.loads(synthetic.read_text())
    # a Hub-like layout: Karpathy "sentences" dicts, bytes images, different column names
    images = [(synthetic.parent / "images" / e["filename"]).read_bytes() for e in data["images"]]
    table = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": b, "path": None} for b in images],
            "sentences": [e["sentences"] for e in data["images"]],
            "filename": [Path(e["filename"]).stem for e in data["images"]],
            "karpathy_split": [e["split"] for e in data["images"]],
        }
    ).cast_column("img", datasets.Image())
    parquet = tmp_path / "test.parquet"
    table.to_parquet(parquet)
    dataset = load_hub_dataset(
        "parquet",
        data_files=str(parquet),
        image_column="img",
        captions_column="sentences",
        image_id_column="filename",
        split_column="karpathy_split",
    )
    assert dataset.column_names == ["image", "image_id", "captions", "split"]
    assert dataset["image_id"] == reference["image_id"]
    assert dataset["captions"] == reference["captions"]
    assert dataset["split"] == reference["split"]
    assert dataset[4]["image"].tobytes() == reference[4]["image"].tobytes()
    via_auto = load_image_captions(
        parquet,
        image_column="img",
        captions_column="sentences",
        image_id_column="filename",
        split_column="karpathy_split",
        split="test",
    )
    assert via_auto["image_id"] == [
        i for i, s in zip(reference["image_id"], reference["split"]) if s == "test"
    ]


def test_parquet_one_caption_per_row_with_paths(tmp_path: Path, synthetic: Path) -> None:
    data = json.loads(synthetic.read_text())
    rows = [(e["filename"], s["raw"]) for e in data["images"] for s in e["sentences"]]
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict({"file": [f for f, _ in rows], "text": [t for _, t in rows]}).to_parquet(
        parquet
    )
    dataset = load_hub_dataset(
        "parquet",
        data_files=str(parquet),
        image_column="file",
        captions_column="text",
        image_id_column="file",
        image_root=synthetic.parent / "images",
        hf_split="train",
    )
    assert dataset["captions"] == load_karpathy(synthetic)["captions"]


def test_real_flickr8k_json_and_csv_agree(flickr8k_dir: Path) -> None:
    from_json = load_karpathy(flickr8k_dir / "dataset_flickr8k.json")
    from_csv = load_caption_csv(flickr8k_dir / "captions.txt", splits=flickr8k_dir / "dataset_flickr8k.json")
    assert len(from_json) == len(from_csv) == 800
    assert links(from_json) == links(from_csv)
    assert sorted(from_json["split"]).count("test") == 100
    assert all(len(c) == 5 for c in from_csv["captions"])


def _as_formats(root: Path, synthetic: Path) -> dict[str, tuple[Path, dict]]:
    """The same images and captions as a Karpathy JSON, a CSV (+ splits), an image folder and a parquet
    file with embedded images; a typo'd split value ("tset") on the first image in every format."""
    data = json.loads(synthetic.read_text())
    data["images"][0]["split"] = "tset"
    karpathy = root / "dataset_x.json"
    karpathy.write_text(json.dumps(data))
    images = synthetic.parent / "images"
    csv = root / "captions.csv"
    csv.write_text("image,caption\n" + "".join(
        f"{e['filename']},{s['raw']}\n" for e in data["images"] for s in e["sentences"]))  # fmt: skip
    folder = root / "folder"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as handle:
        for e in data["images"]:
            (folder / e["filename"]).write_bytes((images / e["filename"]).read_bytes())
            handle.write(json.dumps({"file_name": e["filename"], "split": e["split"],
                                     "captions": [s["raw"] for s in e["sentences"]]}) + "\n")  # fmt: skip
    parquet = root / "x.parquet"
    datasets.Dataset.from_dict({
        "image": [{"bytes": (images / e["filename"]).read_bytes(), "path": None} for e in data["images"]],
        "captions": [[s["raw"] for s in e["sentences"]] for e in data["images"]],
        "image_id": [Path(e["filename"]).stem for e in data["images"]],
        "split": [e["split"] for e in data["images"]],
    }).cast_column("image", datasets.Image()).to_parquet(parquet)  # fmt: skip
    return {
        "karpathy": (karpathy, {"image_root": images}),
        "csv": (csv, {"image_root": images, "splits": karpathy}),
        "imagefolder": (folder, {}),
        "parquet": (parquet, {"image_id_column": "image_id", "split_column": "split"}),
    }


@pytest.mark.parametrize("format_name", ["karpathy", "csv", "imagefolder", "parquet"])
def test_every_loader_selects_splits_and_counts_the_others_the_same_way(
    tmp_path: Path, synthetic: Path, format_name: str
) -> None:
    """One builder behind every format: the same test images, the same count of left-out split values."""
    path, kwargs = _as_formats(tmp_path, synthetic)[format_name]
    reference = load_karpathy(synthetic, split="test")
    report = LoadReport()
    dataset = load_image_captions(path, split="test", report=report, **kwargs)
    assert sorted(dataset["image_id"]) == sorted(reference["image_id"])
    assert report.n_loaded == len(reference)
    assert report.unknown_splits == {"tset": 1}  # the typo is counted, not silently dropped
    assert sum(report.other_splits.values()) == 12 - len(reference)


def test_a_registered_format_is_one_loader(synthetic: Path, tmp_path: Path) -> None:
    """A new format is one decorated loader; `format=` (and the commands' --data_format) then accept it."""

    @DATA_FORMATS.register("karpathy_lines_test")
    def load_lines(path, image_root, **options):  # "file name<TAB>caption" lines, one split
        entries: dict[str, list[str]] = {}
        for line in Path(path).read_text().splitlines():
            name, caption = line.split("\t")
            entries.setdefault(name, []).append(caption)
        karpathy = {"images": [
            {"filename": n, "split": "train", "sentences": [{"raw": c} for c in cs]} for n, cs in entries.items()
        ]}  # fmt: skip
        converted = tmp_path / "converted.json"
        converted.write_text(json.dumps(karpathy))
        return load_karpathy(converted, image_root, **options)

    try:
        reference = load_karpathy(synthetic, split="train")
        lines = [f"{Path(r['image']['path']).name}\t{c}" for r in reference.cast_column(
            "image", datasets.Image(decode=False)) for c in r["captions"]]  # fmt: skip
        (tmp_path / "pairs.tsv").write_text("\n".join(lines))
        loaded = load_image_captions(
            tmp_path / "pairs.tsv", format="karpathy_lines_test", image_root=synthetic.parent / "images"
        )
        assert sorted(v[:2] for v in links(loaded).values()) == sorted(
            v[:2] for v in links(reference).values()
        )
    finally:
        del DATA_FORMATS["karpathy_lines_test"]
    with pytest.raises(ValueError, match=r"format must be one of.*karpathy.*hub"):
        load_image_captions(tmp_path / "pairs.tsv", format="karpathy_lines_test")
