"""`temde-hf evaluate` on bad input: skips what it says it skips, never replaces a result silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from temde_hf import cli
from temde_hf.data import DataError, make_synthetic_karpathy
from temde_hf.evaluation.cli import main
from temde_hf.testing import save_tiny_checkpoint, truncated_jpeg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval-bad") / "ckpt")


def test_on_error_skip_leaves_undecodable_images_out_and_lists_them(checkpoint: Path, tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=8, seed=3)
    truncated_jpeg(tmp_path / "syn" / "images" / "img_00005.png")  # the file exists; its pixels do not
    args = [str(checkpoint), "--data", str(json_path), "--split", "all", "--batch-size", "4"]
    with pytest.raises(DataError, match=r"img_00005\.png: image cannot be decoded.*--on-error skip"):
        main([*args, "--output-dir", str(tmp_path / "raise")])
    result = main([*args, "--output-dir", str(tmp_path / "skip"), "--on-error", "skip"])
    written = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert result["n_images"] == written["n_images"] == 7 and written["n_captions"] == 35
    assert written["n_skipped"] == 1 and len(written["skipped"]) == 1
    assert "img_00005.png" in written["skipped"][0] and "truncated" in written["skipped"][0]


def test_a_finished_evaluation_is_not_replaced_silently(checkpoint: Path, tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=6, seed=1)
    args = [str(checkpoint), "--data", str(json_path), "--split", "all"]
    main(args)  # default output: CHECKPOINT/eval-all
    metrics = checkpoint / "eval-all" / "metrics.json"
    first = metrics.read_text()
    metrics.write_text(first.replace('"split": "all"', '"split": "all", "marker": 1'))
    with pytest.raises(
        ValueError, match=r"eval-all/metrics\.json: already exists.*--output-dir.*--overwrite"
    ):
        main(args)
    assert '"marker": 1' in metrics.read_text()  # untouched
    main([*args, "--overwrite"])
    assert '"marker"' not in metrics.read_text()


def test_missing_checkpoint_folder_is_named_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=1)
    with pytest.raises(
        ValueError, match=r"runs/none: no such folder; pass the folder written by save_pretrained"
    ):
        main([str(tmp_path / "runs" / "none"), "--data", str(json_path)])


# (flag, bad value, expected message): every number `evaluate` takes, refused before any work
BAD_FLAGS = [
    ("--n-captions", "-1", r"--n-captions -1: must be >= 1 \(captions per image"),  # scored 4 of 5
    ("--n-captions", "0", r"--n-captions 0: must be >= 1"),
    ("--batch-size", "0", r"--batch-size 0: must be >= 1"),  # was a raw ZeroDivisionError
    ("--batch-size", "-3", r"--batch-size -3: must be >= 1"),
    ("--fold-size", "-1", r"--fold-size -1: must be >= 0 .*0 for no folds"),
    ("--fold-size", "1", r"--fold-size 1: a fold of one image ranks it first .*pass --fold-size 0"),
    ("--max-images", "0", r"--max-images 0: must be >= 2"),
    ("--max-images", "1", r"--max-images 1: must be >= 2 .*at least 2 candidates"),
    ("--max-length", "0", r"--max-length 0: must be >= 3"),
    ("--max-length", "2", r"--max-length 2: must be >= 3 .*\[CLS\] and \[SEP\]"),
    # beyond the tiny text tower's 64 positions: was a raw tensor-size error once a caption was long
    ("--max-length", "65", r"--max-length 65: the checkpoint's text tower reads at most 64 tokens"),
    ("--chunk-size", "0", r"--chunk-size 0: must be >= 1"),
    ("--latency-queries", "-1", r"--latency-queries -1: must be >= 0"),
    ("--rerank-k", "0", r"--rerank-k 0: must be >= 1"),
    ("--rerank-fusion", "nan", r"--rerank-fusion nan: must be a finite number"),
    ("--device", "banana", r"--device banana: not a device name; pass cpu, cuda or cuda:N"),
    ("--device", "cuda:99", r"--device cuda:99: no such CUDA device on this machine"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_FLAGS, ids=[f"{f} {v}" for f, v, _ in BAD_FLAGS])
def test_every_bad_number_is_one_line_naming_the_flag(
    flag: str,
    value: str,
    message: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEMDE_HF_DEBUG", raising=False)
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=1)
    args = ["evaluate", str(checkpoint), "--data", str(json_path), "--split", "all"]
    args += ["--output-dir", str(tmp_path / "out"), flag, value]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("temde-hf evaluate: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_too_few_images_say_why(checkpoint: Path, tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=1)
    data = json.loads(json_path.read_text())
    one = tmp_path / "syn" / "one.json"
    one.write_text(json.dumps({**data, "images": data["images"][:1]}))
    out = ["--output-dir", str(tmp_path / "out")]
    # one image: every query ranks it first, a perfect score from any model
    with pytest.raises(SystemExit, match=r"only 1 image of split 'all' in .*one\.json: .*at least 2"):
        main([str(checkpoint), "--data", str(one), "--split", "all", *out])
    with pytest.raises(SystemExit, match=r"no images of split 'tset' .*\(it has other splits: \{.*'train'"):
        main([str(checkpoint), "--data", str(json_path), "--split", "tset", *out])
    with pytest.raises(SystemExit, match=r"all 4 entries were left out as bad \(e\.g\. .*file not found"):
        main([str(checkpoint), "--data", str(json_path), "--image-root", str(tmp_path), "--split", "all",
              "--on-error", "skip", *out])  # fmt: skip
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_captions_csv_without_splits_says_how_to_give_them(checkpoint: Path, tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=10, seed=1)
    data = json.loads(json_path.read_text())
    csv_path = tmp_path / "syn" / "captions.txt"
    lines = [f"{e['filename']},{s['raw']}" for e in data["images"] for s in e["sentences"]]
    csv_path.write_text("image,caption\n" + "\n".join(lines) + "\n")
    args = [str(checkpoint), "--data", str(csv_path), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"no images of split 'test' .*--splits-from dataset_NAME\.json"):
        main(args)  # the default --split test: every CSV image is in the default split, train
    assert main([*args, "--splits-from", str(json_path)])["n_images"] == sum(
        e["split"] == "test" for e in data["images"]
    )
