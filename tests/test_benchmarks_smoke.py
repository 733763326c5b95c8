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
import torch

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
    out = _run(
        "search_latency", ["--sizes", "300", "--dims", "8", "--warmup", "0", "--repeats", "1"], tmp_path
    )
    by_backend = {row["backend"]: row for row in out["results"]}
    assert set(by_backend) == {"faiss-flat-ip", "torch-cpu"}
    # The query sits next to gallery row 123: exact search must return it first.
    assert all(row["top1_ok"] and row["ms"] > 0 and row["threads"] == 2 for row in by_backend.values())


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


def test_sketch_contribution_scores_each_part_of_a_concat_embedding(tmp_path: Path) -> None:
    from temde_hf.data import load_image_captions
    from temde_hf.data.synthetic import make_synthetic_karpathy
    from temde_hf.testing import tiny_model, tiny_processor
    from temde_hf.training.frozen import evaluate_cached, extract_tower_features

    model, processor = tiny_model(sketch_fusion="concat"), tiny_processor()
    dataset = load_image_captions(make_synthetic_karpathy(tmp_path, n_images=8, seed=2))
    feats = extract_tower_features(model, processor, dataset, max_length=16)
    model.initialize_sketch(torch.randn(64, model.config.projection_dim))
    rsums = _load("sketch_contribution").part_rsums(model, feats)
    assert set(rsums) == {"fused", "pooled part", "sketch part"}
    assert rsums["fused"] == pytest.approx(evaluate_cached(model, feats)["rsum"])
    model.config.sketch_weight = 0.0  # λ = 0: the fused embedding ranks exactly like its pooled part
    assert evaluate_cached(model, feats)["rsum"] == pytest.approx(rsums["pooled part"])
