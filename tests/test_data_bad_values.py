"""Tables of bad values and malformed files: each is refused in one line naming the file and the fix.

Every loader reads captions, ids, splits and file names from files a user downloaded; a value of the
wrong type must never become the caption ``"None"`` / ``"42"`` / ``"['a', 'b']"``, a raw ``TypeError``
or ``KeyError``, or a file outside the dataset's folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest

from temde_hf.data import DataError, LoadReport, load_image_captions, make_synthetic_karpathy

N_IMAGES = 6
BAD_CAPTIONS = [None, 42, 4.5, True, ["a", "b"], {"raw": "x"}, "", "   ", "\u200b\u2060", "\ufeff \t"]
BAD_CAPTION_MESSAGE = r"caption 1 is (missing \(null / None\)|not a string|empty or invisible text)"


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return make_synthetic_karpathy(tmp_path / "syn", n_images=N_IMAGES, seed=1)


def _karpathy(synthetic: Path, change: Callable[[dict], Any]) -> Path:
    data = json.loads(synthetic.read_text())
    change(data)
    path = synthetic.parent / "changed.json"
    path.write_text(json.dumps(data))
    return path


def _coco(synthetic: Path, change: Callable[[dict], Any]) -> Path:
    entries = json.loads(synthetic.read_text())["images"]
    data = {
        "images": [{"id": i, "file_name": e["filename"]} for i, e in enumerate(entries)],
        "annotations": [
            {"id": 10 * i + j, "image_id": i, "caption": s["raw"]}
            for i, e in enumerate(entries)
            for j, s in enumerate(e["sentences"])
        ],
    }
    change(data)
    path = synthetic.parent / "captions_val.json"
    path.write_text(json.dumps(data))
    return path


def _metadata(synthetic: Path, change: Callable[[list], Any]) -> Path:
    """An image folder (the synthetic images folder) with a metadata.jsonl of one line per image."""
    entries = json.loads(synthetic.read_text())["images"]
    lines = [{"file_name": e["filename"], "captions": [s["raw"] for s in e["sentences"]]} for e in entries]
    change(lines)
    folder = synthetic.parent / "images"
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def _csv_lines(synthetic: Path) -> list[str]:
    entries = json.loads(synthetic.read_text())["images"]
    return [f"{e['filename']},{s['raw']}" for e in entries for s in e["sentences"]]


def _bad_caption_source(fmt: str, synthetic: Path, value: Any) -> Path:
    """The dataset of `fmt` whose image 2 has `value` as its caption 1."""
    if fmt == "karpathy":
        return _karpathy(synthetic, lambda d: d["images"][2]["sentences"][1].update(raw=value))
    if fmt == "coco":
        return _coco(synthetic, lambda d: d["annotations"][2 * 5 + 1].update(caption=value))
    if fmt == "imagefolder":
        return _metadata(synthetic, lambda lines: lines[2]["captions"].__setitem__(1, value))
    lines = _csv_lines(synthetic)
    lines[2 * 5 + 1] = lines[2 * 5 + 1].split(",")[0] + "," + value
    path = synthetic.parent / "captions.csv"
    path.write_text("image,caption\n" + "\n".join(lines) + "\n")
    return path


# a CSV field is always a string: only the blank values apply there
CAPTION_CASES = [
    (fmt, value)
    for fmt in ("karpathy", "coco", "imagefolder", "csv")
    for value in BAD_CAPTIONS
    if fmt != "csv" or isinstance(value, str)
]


@pytest.mark.parametrize(("fmt", "value"), CAPTION_CASES, ids=repr)
def test_a_caption_that_is_not_visible_text_is_refused_or_skipped(
    fmt: str, value: Any, synthetic: Path
) -> None:
    path = _bad_caption_source(fmt, synthetic, value)
    image_root = synthetic.parent / "images"
    with pytest.raises(
        DataError, match=rf"img_00002\.png\)?: {BAD_CAPTION_MESSAGE}.*Write the caption as text"
    ):
        load_image_captions(path, image_root=image_root)
    report = LoadReport()
    dataset = load_image_captions(path, image_root=image_root, on_error="skip", report=report)
    assert len(dataset) == N_IMAGES - 1 and "img_00002" not in dataset["image_id"]
    assert report.n_skipped == 1 and "img_00002.png" in report.skipped[0][0]
    assert all(isinstance(c, str) and c.strip() for captions in dataset["captions"] for c in captions)


def _parquet(synthetic: Path, captions: list[Any], name: str = "data.parquet", **columns: Any) -> Path:
    entries = json.loads(synthetic.read_text())["images"]
    images = [str(synthetic.parent / "images" / e["filename"]) for e in entries]
    table = {"image": images, "captions": captions, **columns}
    path = synthetic.parent / name
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    return path


@pytest.mark.parametrize("value", [None, "", "  ", "\u200b"], ids=repr)
def test_hub_and_parquet_captions_are_checked_like_every_loader(value: Any, synthetic: Path) -> None:
    entries = json.loads(synthetic.read_text())["images"]
    captions = [[s["raw"] for s in e["sentences"]] for e in entries]
    captions[2][1] = value
    path = _parquet(synthetic, captions)
    with pytest.raises(DataError, match=rf"data\.parquet: row 2 \(id 2\): {BAD_CAPTION_MESSAGE}"):
        load_image_captions(path)
    report = LoadReport()
    assert len(load_image_captions(path, on_error="skip", report=report)) == N_IMAGES - 1
    assert report.n_skipped == 1 and "row 2" in report.skipped[0][0]


def test_hub_one_caption_per_row_keeps_a_null_caption_a_null(synthetic: Path) -> None:
    entries = json.loads(synthetic.read_text())["images"]
    rows = [(i, s["raw"]) for i, e in enumerate(entries) for s in e["sentences"]]
    captions = [None if k == 3 else caption for k, (_, caption) in enumerate(rows)]
    path = synthetic.parent / "rows.parquet"
    images = [str(synthetic.parent / "images" / entries[i]["filename"]) for i, _ in rows]
    datasets.Dataset.from_dict(
        {"image": images, "captions": captions, "id": [i for i, _ in rows]}
    ).to_parquet(str(path))
    with pytest.raises(DataError, match=r"rows\.parquet: row 0 \(id 0\): caption 3 is missing \(null"):
        load_image_captions(path, image_id_column="id")


def _text(synthetic: Path, name: str, text: str | bytes) -> Path:
    path = synthetic.parent / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _image(index: int, **changes: Any) -> Callable[[dict], Any]:
    return lambda d: d["images"][index].update(changes)


# (id, build the bad source from the synthetic Karpathy JSON -> (path, loader kwargs), expected message)
BAD_SOURCES: list[tuple[str, Callable[[Path], tuple[Path, dict]], str]] = [
    ("json empty", lambda s: (_text(s, "e.json", ""), {}), r"e\.json: the file is empty; download"),
    ("json list", lambda s: (_text(s, "l.json", "[1, 2]"), {}), r"l\.json: no 'images' list .*Karpathy"),
    ("json no images", lambda s: (_karpathy(s, lambda d: d.update(images=[])), {}), r"changed\.json: contains no images"),
    ("filename int", lambda s: (_karpathy(s, _image(1, filename=42)), {}), r"images\[1\]: file name 42 is not a non-empty string. Fix"),
    ("filename null", lambda s: (_karpathy(s, _image(1, filename=None)), {}), r"images\[1\]: file name None is not"),
    ("filename escapes", lambda s: (_karpathy(s, _image(1, filename="../x.png")), {}), r"images\[1\]: file name '\.\./x\.png' leaves the dataset's folder"),
    ("filename absolute", lambda s: (_karpathy(s, _image(1, filename="/etc/hosts")), {}), r"images\[1\]: file name '/etc/hosts' leaves"),
    ("filename a folder", lambda s: (_karpathy(s, _image(1, filename=".")), {}), r"images\[1\]: file name '\.' names a folder, not a file"),
    ("filepath int", lambda s: (_karpathy(s, _image(1, filepath=3)), {}), r"images\[1\]: file name 3 is not"),
    ("split null", lambda s: (_karpathy(s, _image(1, split=None)), {}), r"images\[1\] \(img_00001\.png\): split None is not a string"),
    ("split list", lambda s: (_karpathy(s, _image(1, split=["test"])), {}), r"split \['test'\] is not a string or an integer. Fix"),
    ("cocoid list", lambda s: (_karpathy(s, _image(1, cocoid=[7])), {}), r"images\[1\] \(img_00001\.png\): image id \[7\] is not"),
    ("sentences string", lambda s: (_karpathy(s, _image(1, sentences="a dog")), {}), r"images\[1\] \(img_00001\.png\): has no 'sentences' list .*\"raw\""),
    ("sentences null", lambda s: (_karpathy(s, _image(1, sentences=None)), {}), r"images\[1\] \(img_00001\.png\): has no 'sentences' list"),
    ("coco image without id", lambda s: (_coco(s, lambda d: d["images"][1].pop("id")), {}), r"captions_val\.json: images\[1\]: lacks 'id' or 'file_name'"),
    ("coco id list", lambda s: (_coco(s, _image(1, id=[1])), {}), r"captions_val\.json: images\[1\]: id \[1\] is not an integer"),
    ("coco file_name int", lambda s: (_coco(s, _image(1, file_name=5)), {}), r"captions_val\.json: images\[1\]: file name 5 is not"),
    ("coco image not object", lambda s: (_coco(s, lambda d: d["images"].__setitem__(1, 7)), {}), r"images\[1\]: lacks 'id' or 'file_name'"),
    ("coco annotation id list", lambda s: (_coco(s, lambda d: d["annotations"][0].update(image_id=[0])), {}), r"annotations\[0\] refers to image_id \[0\], which is not in 'images'"),
    ("csv empty", lambda s: (_text(s, "e.csv", ""), {}), r"e\.csv: the file is empty; a captions CSV has the header"),
    ("csv header only", lambda s: (_text(s, "h.csv", "image,caption\n"), {}), r"h\.csv: contains no images .*header only"),
    ("csv tab separated", lambda s: (_text(s, "t.csv", "image\tcaption\na.png\tx\n"), {}), r"t\.csv: the first line must be the header 'image,caption', got 'image\\tcaption'"),
    ("csv file name escapes", lambda s: (_text(s, "p.csv", "image,caption\n../a.png,a dog\n"), {}), r"p\.csv: line 2: file name '\.\./a\.png' leaves"),
    ("folder file_name int", lambda s: (_metadata(s, lambda lines: lines[1].update(file_name=3)), {}), r"metadata\.jsonl: line 2: file name 3 is not"),
    ("folder file_name list", lambda s: (_metadata(s, lambda lines: lines[1].update(file_name=["a"])), {}), r"metadata\.jsonl: line 2: file name \['a'\] is not"),
    ("folder file_name escapes", lambda s: (_metadata(s, lambda lines: lines[1].update(file_name="../x.png")), {}), r"metadata\.jsonl: line 2: file name '\.\./x\.png' leaves"),
    ("folder image_id null", lambda s: (_metadata(s, lambda lines: lines[1].update(image_id=None)), {}), r"metadata\.jsonl: line 2 \(img_00001\.png\): image id None is not"),
    ("folder captions string", lambda s: (_metadata(s, lambda lines: lines[1].update(captions="a dog")), {}), r"metadata\.jsonl: line 2: has no 'captions' list"),
    ("folder empty", lambda s: (_metadata(s, lambda lines: lines.clear()), {}), r"images: contains no images"),
    ("parquet int captions", lambda s: (_parquet(s, [[1, 2, 3, 4, 5]] * N_IMAGES), {}), r"data\.parquet: row 0 \(id 0\): caption 0 is not a string \(int 1\)"),
    ("parquet captions without raw", lambda s: (_parquet(s, [[{"text": "a"}] * 5] * N_IMAGES), {}), r"data\.parquet: the captions in column 'captions' are objects with keys \['text'\], none named 'raw'; pass caption_key"),
    ("parquet column missing", lambda s: (_parquet(s, [["a"] * 5] * N_IMAGES), {"image_column": "n"}), r"data\.parquet: no column\(s\) \['n'\]; the dataset has \['image', 'captions'\]"),
    ("parquet unknown hf split", lambda s: (_parquet(s, [["a"] * 5] * N_IMAGES), {"hf_split": "test"}), r"data\.parquet: Unknown split \"test\".*\['train'\].*--hf-split NAME"),
    ("parquet empty file", lambda s: (_text(s, "z.parquet", b""), {}), r"z\.parquet: cannot be read as a dataset \(ArrowInvalid"),
    ("missing local dataset folder", lambda s: (s.parent / "no" / "such_dataset", {}), r"no/such_dataset: no such local file or folder, and no Hub dataset"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in BAD_SOURCES], ids=[c[0] for c in BAD_SOURCES])
def test_a_malformed_source_is_named_in_one_line_with_the_fix(
    build: Callable[[Path], tuple[Path, dict]], message: str, synthetic: Path
) -> None:
    path, kwargs = build(synthetic)
    with pytest.raises(DataError, match=message) as caught:
        load_image_captions(path, image_root=synthetic.parent / "images", **kwargs)
    assert "\n" not in str(caught.value)


def test_an_image_path_column_of_numbers_is_named(synthetic: Path) -> None:
    path = synthetic.parent / "n.parquet"
    datasets.Dataset.from_dict({"image": [7] * 3, "captions": [["a dog"] * 5] * 3}).to_parquet(str(path))
    with pytest.raises(
        DataError, match=r"n\.parquet: column 'image' holds int64 values, not images or image paths"
    ):
        load_image_captions(path)


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("bom.csv", lambda text: b"\xef\xbb\xbf" + text.encode()),
        ("crlf.csv", lambda t: t.replace("\n", "\r\n").encode()),
    ],
)
def test_a_csv_with_a_byte_order_mark_or_windows_line_ends_loads_the_same(
    name: str, encode: Callable[[str], bytes], synthetic: Path
) -> None:
    text = "image,caption\n" + "\n".join(_csv_lines(synthetic)) + "\n"
    plain = load_image_captions(_text(synthetic, "plain.csv", text), image_root=synthetic.parent / "images")
    other = load_image_captions(_text(synthetic, name, encode(text)), image_root=synthetic.parent / "images")
    assert other["captions"] == plain["captions"] and other["image_id"] == plain["image_id"]
    assert all(not c.endswith("\r") for captions in other["captions"] for c in captions)
