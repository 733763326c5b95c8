"""`temde-hf evaluate` on bad input: skips what it says it skips, never replaces a result silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
