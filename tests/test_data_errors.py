"""Bad data raises a `DataError` naming the file / entry and the fix, or is skipped and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from temde_hf.data import (
    CaptionPairs,
    DataError,
    LoadReport,
    load_caption_csv,
    load_coco_captions,
    load_image_captions,
    load_imagefolder,
    load_karpathy,
    make_synthetic_karpathy,
)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    return make_synthetic_karpathy(tmp_path / "syn", n_images=6, seed=1)


def _entries(path: Path) -> dict:
    return json.loads(path.read_text())


def test_missing_image_raises_naming_file_or_is_skipped(
    synthetic: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (synthetic.parent / "images" / "img_00002.png").unlink()
    with pytest.raises(DataError, match=r"images\[2\] \(img_00002.png\).*image file not found.*image root"):
        load_karpathy(synthetic)
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="temde_hf.data"):
        dataset = load_karpathy(synthetic, on_error="skip", report=report)
    assert len(dataset) == 5 and report.n_skipped == 1 and report.n_loaded == 5
    assert "img_00002" in report.skipped[0][0]
    assert "img_00002" not in dataset["image_id"]
    assert "skipped 1" in caplog.text
    # the remaining rows keep their own captions (no shift after the gap)
    data = _entries(synthetic)
    kept = [e for e in data["images"] if e["filename"] != "img_00002.png"]
    assert dataset["captions"] == [[s["raw"] for s in e["sentences"]] for e in kept]


def test_corrupt_image_found_by_verify_and_at_decode_time(synthetic: Path) -> None:
    bad = synthetic.parent / "images" / "img_00004.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match=r"img_00004.png.*cannot be decoded.*Replace the file"):
        load_karpathy(synthetic, verify_images=True)
    assert len(load_karpathy(synthetic, verify_images=True, on_error="skip")) == 5
    # without verification the load succeeds, and decoding later names the file
    pairs = CaptionPairs(load_karpathy(synthetic))
    with pytest.raises(DataError, match=r"img_00004.png: image cannot be decoded"):
        pairs[4 * 5 + 1]
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"img_00004\.png"):
        load_karpathy(synthetic, verify_images=True)


def test_malformed_and_truncated_json(synthetic: Path, tmp_path: Path) -> None:
    text = synthetic.read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(
        DataError, match=r"truncated.json: not valid JSON .*line 1.*download or extract it again"
    ):
        load_karpathy(truncated, synthetic.parent / "images")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match=r"wrong.json: no 'images' list.*load_coco_captions"):
        load_karpathy(wrong)
    with pytest.raises(DataError, match=r"missing.json: file not found"):
        load_karpathy(tmp_path / "missing.json")
    data = _entries(synthetic)
    del data["images"][1]["sentences"]
    synthetic.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\]: is not an object with 'filename' and 'sentences'"):
        load_karpathy(synthetic)
    assert len(load_karpathy(synthetic, on_error="skip")) == 5


def test_fewer_than_five_captions(synthetic: Path) -> None:
    data = _entries(synthetic)
    data["images"][3]["sentences"] = data["images"][3]["sentences"][:3]
    synthetic.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"images\[3\] \(img_00003.png\): has 3 captions, fewer than the 5.*n_captions=3"
    ):
        load_karpathy(synthetic)
    report = LoadReport()
    assert len(load_karpathy(synthetic, on_error="skip", report=report)) == 5
    assert "fewer than the 5" in report.summary()
    variable = load_karpathy(synthetic, n_captions=None)
    assert [len(c) for c in variable["captions"]] == [5, 5, 5, 3, 5, 5]


def test_csv_errors(tmp_path: Path, synthetic: Path) -> None:
    no_header = tmp_path / "a.csv"
    no_header.write_text("img_00000.png,a caption\n")
    with pytest.raises(DataError, match=r"a.csv: the first line must be the header 'image,caption'"):
        load_caption_csv(no_header, synthetic.parent / "images")
    truncated = tmp_path / "b.csv"
    truncated.write_text("image,caption\n" + "img_00000.png,a red thing\n" * 5 + "img_00001.png\n")
    with pytest.raises(DataError, match=r"b.csv: line 7: has no caption.*truncated"):
        load_caption_csv(truncated, synthetic.parent / "images")
    assert load_caption_csv(truncated, synthetic.parent / "images", on_error="skip")["image_id"] == [
        "img_00000"
    ]


@pytest.mark.parametrize("last_line", [False, True], ids=["middle", "last line, no newline"])
def test_an_unclosed_quote_in_a_captions_csv_loses_nothing_but_its_line(
    tmp_path: Path, synthetic: Path, last_line: bool
) -> None:
    # Read as one CSV, the quote opened on the damaged line runs to the end of the file: the
    # following images vanished into one caption and the report said "skipped 0".
    data = _entries(synthetic)
    lines = [f"{e['filename']},{s['raw']}" for e in data["images"] for s in e["sentences"]]
    damaged = len(lines) - 1 if last_line else 3  # image 0's 4th caption, or image 5's 5th
    name, caption = lines[damaged].split(",", 1)
    lines[damaged] = f'{name},"{caption}'
    path = tmp_path / "captions.txt"
    path.write_text("image,caption\n" + "\n".join(lines) + ("" if last_line else "\n"))
    line_no = damaged + 2  # after the header, counted from 1
    images = synthetic.parent / "images"
    with pytest.raises(
        DataError,
        match=rf"captions\.txt: line {line_no}: a quote \(\"\) opens on this line and is not closed.*Close",
    ):
        load_caption_csv(path, images)
    report = LoadReport()
    loaded = load_caption_csv(path, images, n_captions=None, on_error="skip", report=report)
    assert report.skipped == [(f"captions.txt: line {line_no}", report.skipped[0][1])]
    expected = [[s["raw"] for s in e["sentences"]] for e in data["images"]]
    del expected[damaged // 5][damaged % 5]
    assert loaded["captions"] == expected  # every other line kept, each caption its own
    report = LoadReport()
    assert len(load_caption_csv(path, images, on_error="skip", report=report)) == 5  # its image now has 4
    assert report.n_skipped == 2 and f"line {line_no}" in report.summary()


def test_a_quoted_csv_caption_with_commas_and_quotes_still_loads(tmp_path: Path, synthetic: Path) -> None:
    path = tmp_path / "captions.csv"
    captions = ["a dog, brown", 'a "big" dog', "one", "two", "three"]
    rows = [
        'img_00000.png,"a dog, brown"',
        'img_00000.png,"a ""big"" dog"',
        *(f"img_00000.png,{c}" for c in captions[2:]),
    ]
    path.write_text("image,caption\n" + "\n".join(rows) + "\n")
    assert load_caption_csv(path, synthetic.parent / "images")["captions"] == [captions]


def test_coco_annotation_of_unknown_image(tmp_path: Path, synthetic: Path) -> None:
    path = tmp_path / "captions_val2014.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "img_00000.png"}],
                "annotations": [{"id": 5, "image_id": 2, "caption": "x"}],
            }
        )
    )
    with pytest.raises(DataError, match=r"annotations\[0\] refers to image_id 2, which is not in 'images'"):
        load_coco_captions(path, synthetic.parent / "images")


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metadata.jsonl: file not found"):
        load_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "captions": ["x"]}\n{"file_na')
    with pytest.raises(DataError, match=r"metadata.jsonl: line 2: not valid JSON"):
        load_imagefolder(tmp_path)


def test_duplicate_image_ids_are_an_error_or_skipped_and_counted(synthetic: Path) -> None:
    data = _entries(synthetic)
    data["images"][2]["filename"] = data["images"][1]["filename"]
    synthetic.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image id 'img_00001' already used by .*images\[1\]"):
        load_karpathy(synthetic)
    report = LoadReport()
    dataset = load_karpathy(synthetic, on_error="skip", report=report)
    assert dataset["image_id"] == ["img_00000", "img_00001", "img_00003", "img_00004", "img_00005"]
    assert dataset["captions"][1] == [s["raw"] for s in data["images"][1]["sentences"]]  # the first kept
    assert report.n_skipped == 1 and "images[2]" in report.skipped[0][0]
    assert "already used" in report.skipped[0][1]


def test_non_utf8_text_files_are_named(tmp_path: Path, synthetic: Path, space_app) -> None:
    latin1 = "image,caption\nimg_00000.png,a caf\u00e9 on a street\n".encode("latin-1")
    (tmp_path / "captions.csv").write_bytes(latin1)
    with pytest.raises(
        DataError, match=r"captions\.csv: not UTF-8 text \(byte 0xe9 .*re-save the file as UTF-8"
    ):
        load_caption_csv(tmp_path / "captions.csv", synthetic.parent / "images")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "captions": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl: not UTF-8 text.*re-save"):
        load_imagefolder(folder)
    (tmp_path / "captions.txt").write_bytes(latin1)
    with pytest.raises(DataError, match=r"captions\.txt: not UTF-8 text"):
        space_app.read_captions(tmp_path / "captions.txt")  # the Space demo's caption list


def test_folder_without_metadata_is_named(tmp_path: Path, synthetic: Path) -> None:
    images = synthetic.parent / "images"  # a folder of images, without metadata.jsonl
    with pytest.raises(DataError, match=r"images: no metadata\.jsonl in this folder.*file_name"):
        load_image_captions(images)
    with pytest.raises(DataError, match=r"missing\.parquet: no such file"):
        load_image_captions(tmp_path / "missing.parquet")


def test_images_of_an_unknown_split_are_counted(
    synthetic: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _entries(synthetic)
    data["images"][0]["split"] = "tset"  # a typo: this image is in no split the user can ask for
    synthetic.write_text(json.dumps(data))
    n_test = sum(entry["split"] == "test" for entry in data["images"])
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="temde_hf.data"):
        dataset = load_karpathy(synthetic, split="test", report=report)
    assert len(dataset) == n_test and report.unknown_splits == {"tset": 1}
    assert sum(report.other_splits.values()) == 6 - n_test
    assert "left out 1 images whose split is not one of" in caplog.text and "tset" in caplog.text
    # the same through the CSV loader, whose splits are filtered after loading
    csv_path = tmp_path / "captions.csv"
    lines = [f"{e['filename']},{s['raw']}" for e in data["images"] for s in e["sentences"]]
    csv_path.write_text("image,caption\n" + "\n".join(lines) + "\n")
    splits = {entry["filename"]: entry["split"] for entry in data["images"]}
    report = LoadReport()
    loaded = load_image_captions(
        csv_path, image_root=synthetic.parent / "images", split="test", splits=splits, report=report
    )
    assert len(loaded) == n_test and report.unknown_splits == {"tset": 1}


def test_unknown_on_error_mode(synthetic: Path) -> None:
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_karpathy(synthetic, on_error="ignore")
