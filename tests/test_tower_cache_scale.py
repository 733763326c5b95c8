"""`benchmarks/scale.py` end to end at a tiny size: synthetic caches with the real token shapes, a training
worker process reading them, the JSON it promises, and no synthetic files left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from temde_hf.testing import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.mark.slow
def test_scale_benchmark_smoke(tmp_path: Path) -> None:
    scale = import_script(SCRIPT, "benchmarks_scale")
    output, work = tmp_path / "scale.json", tmp_path / "work"
    scale.main(["--photos", "0", "--sizes", "16,32", "--steps", "2", "--batch-size", "8", "--threads", "1",
                "--work-dir", str(work), "--output", str(output), "--no-docs"])  # fmt: skip
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == "scale" and [r["n_images"] for r in payload["scale"]] == [16, 32]
    per_image = (49 * 1280 + 1280) * 2 + 5 * (
        (40 * 384 + 384) * 2 + 40
    )  # float16 tokens + pooled, uint8 mask
    for row in payload["scale"]:
        assert row["n_captions"] == 5 * row["n_images"] and row["steps"] == 2
        assert row["bytes_per_image"] == pytest.approx(per_image, rel=0.01)
        assert row["peak_rss_anon"] > 0 and row["steps_per_s"] > 0
    assert not list(work.glob("synthetic-*"))  # the caches are deleted after each size
