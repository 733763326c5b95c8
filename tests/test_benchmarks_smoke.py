"""The speed benchmarks run end to end at their smallest sizes and write the JSON they promise.

These check that the scripts work (argument handling, every head/backend/variant, the JSON schema), not
how fast anything is: timings here are meaningless.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, argv: list[str], tmp_path: Path) -> dict:
    output = tmp_path / f"{name}.json"
    payload = _load(name).main(["--device", "cpu", "--output", str(output), *argv])
    on_disk = json.loads(output.read_text())
    assert on_disk["benchmark"] == name == payload["benchmark"]
    assert {"env", "settings", "results"} <= set(on_disk)
    assert on_disk["env"]["device"] == "cpu"
    return on_disk


def test_pooling_speed_smoke(tmp_path: Path) -> None:
    argv = ["--batch-size", "2", "--dim", "16", "--heads", "2", "--tokens", "5", "9", "--sketches", "4x3"]
    out = _run("pooling_speed", [*argv, "--warmup", "0", "--repeats", "1"], tmp_path)
    heads = {row["head"] for row in out["results"]}
    sketch_heads = {"matmul N4H3", "mean+matmul N4H3", "temde-reference N4H3", "temde-torch N4H3"}
    assert heads == {"mean", "attention", "transformer+mean", *sketch_heads}
    assert len(out["results"]) == 2 * len(heads)
    assert all(row["status"] == "ok" and row["ms"] > 0 and row["infer_ms"] > 0 for row in out["results"])
    assert {(row["stat"], row["tokens"]) for row in out["ratios"]} == {
        (s, t) for s in ("median", "min") for t in (5, 9)
    }
    assert (tmp_path / "pooling_speed.png").stat().st_size > 0


def test_search_latency_smoke(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    argv = ["--synthetic-dim", "8", "--sizes", "600", "--queries", "20", "--repeats", "2", "--quick"]
    out = _run("search_latency", [*argv, "--work-dir", str(tmp_path / "work")], tmp_path)
    by_index = {row["index"]: row for row in out["results"]}
    assert set(by_index) == {"flat", "fp16", "sq8", "ivfpq"}
    # Recall is measured against the exact float32 top-10: the exact scan must reach it.
    assert by_index["flat"]["recall_at_10"] == 1.0
    assert all(row["ms"] > 0 and 0 <= row["recall_at_10"] <= 1 for row in out["results"])
    assert by_index["ivfpq"]["ram_bytes_per_image"] < by_index["flat"]["ram_bytes_per_image"]


@pytest.mark.parametrize("name", ["encode_throughput", "train_step"])
def test_model_benchmarks_smoke(name: str, tmp_path: Path) -> None:
    out = _run(name, ["--quick", "--batch-size", "2", "--warmup", "0", "--repeats", "1"], tmp_path)
    rows = {row["variant"]: row for row in out["results"]}
    assert set(rows) == {"plain-mean", "temde-concat"}
    assert out["settings"]["towers"] == "tiny"
    ratio = "image_ratio_vs_plain" if name == "encode_throughput" else "ratio_vs_plain"
    assert rows["plain-mean"][ratio] == 1.0 and rows["temde-concat"][ratio] > 0
    if name == "encode_throughput":
        assert rows["temde-concat"]["embed_dim"] > rows["plain-mean"]["embed_dim"]  # concat adds N*K


def test_benchmarks_need_cuda_when_asked(tmp_path: Path) -> None:
    module = _load("search_latency")
    if "cuda" in sys.argv or module.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        module.main(["--device", "cuda", "--output", str(tmp_path / "x.json")])


def _runs(val: list[float], test: list[float]) -> dict:
    return {
        "runs": [{"val": {"rsum": v}, "test": {"rsum": t}} for v, t in zip(val, test)],
        "val": {"rsum": {"mean": sum(val) / len(val)}},
    }


def test_quality_verdict_chooses_on_val_and_compares_paired_seeds() -> None:
    quality = _load("quality")
    results = {
        "mean": _runs([390, 380, 385], [360, 350, 355]),
        "pooler": _runs([370, 360, 365], [380, 380, 380]),  # best on test, but val decides
        "T-EMDE a": _runs([395, 385, 390], [364, 353, 359]),  # gains +4 / +3 / +4
        "T-EMDE b": _runs([300, 300, 300], [400, 400, 400]),
    }
    out = quality.verdict(results, ["mean", "pooler"], ["T-EMDE a", "T-EMDE b"])
    assert (out["best_plain_by_val"], out["best_temde_by_val"]) == ("mean", "T-EMDE a")
    assert out["test_paired_gain"]["per_seed"] == [4, 3, 4]
    assert out["met"]
    noisy = {**results, "T-EMDE a": _runs([395, 385, 390], [372, 340, 367])}  # +12 / −10 / +12
    assert not quality.verdict(noisy, ["mean", "pooler"], ["T-EMDE a", "T-EMDE b"])["met"]
    small = {**results, "T-EMDE a": _runs([395, 385, 390], [361, 351, 356])}  # +1 each: below the target
    assert not quality.verdict(small, ["mean", "pooler"], ["T-EMDE a", "T-EMDE b"])["met"]
