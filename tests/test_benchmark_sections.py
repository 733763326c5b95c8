"""The speed benchmarks write their own RESULTS.md sections, and ``--report`` re-renders one from the JSON.

Each measuring run (at its smallest size, into a temporary folder) must write a section that holds the
JSON's numbers and the command that measured it; ``--report`` on that JSON must write the same text
without measuring; a missing JSON is one clear line; verdicts follow the numbers; and a run whose JSON is
not in the repository's `benchmarks/results/` never touches the repository's RESULTS.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from temde_hf.testing import import_script

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _load(name: str) -> ModuleType:
    return import_script(BENCHMARKS / f"{name}.py", f"benchmarks_{name}")


def _section(doc: Path, name: str) -> str:
    text = doc.read_text()
    begin, end = f"<!-- BEGIN {name} (generated: do not edit) -->", f"<!-- END {name} -->"
    assert begin in text and end in text, f"no section {name} in {doc}"
    return text.split(begin, 1)[1].split(end, 1)[0]


def _numbers(key: str) -> Callable[[dict], list[str]]:
    num = _load("common").num
    return lambda payload: [num(row[key]) for row in payload["results"]]


POOLING = ["--device", "cpu", "--batch-size", "2", "--dim", "16", "--heads", "2", "--tokens", "5", "9",
           "--sketches", "4x3", "--warmup", "0", "--repeats", "1", "--no-plot"]  # fmt: skip
MODEL = ["--device", "cpu", "--quick", "--batch-size", "2", "--warmup", "0", "--repeats", "1"]
SEARCH = ["--synthetic-dim", "8", "--sizes", "600", "--queries", "20", "--repeats", "2", "--quick"]
# script -> (its smoke argv, the flags its rebuilt command must show, the JSON numbers its section must show)
RUNS = {
    "pooling_speed": (POOLING, "--batch-size 2 --dim 16 --heads 2 --tokens 5 9 --sketches 4x3 --warmup 0 --repeats 1",
                      _numbers("ms")),
    "encode_throughput": (MODEL, "--device cpu --batch-size 2 --warmup 0 --repeats 1 --quick", _numbers("images_per_s")),
    "train_step": (MODEL, "--device cpu --batch-size 2 --warmup 0 --repeats 1 --quick", _numbers("pairs_per_s")),
    "search_latency": (SEARCH, "--synthetic-dim 8 --sizes 600 --queries 20 --repeats 2 --quick", _numbers("ms")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_writes_its_section_and_report_rewrites_it_identically(name: str, tmp_path: Path) -> None:
    if name == "search_latency":
        pytest.importorskip("faiss")
    argv, flags, numbers = RUNS[name]
    repo_docs = (BENCHMARKS / "RESULTS.md").read_bytes()
    output = tmp_path / f"{name}_tiny.json"
    extra = ["--work-dir", str(tmp_path / "work")] if name == "search_latency" else []
    module = _load(name)
    module.main([*argv, *extra, "--output", str(output)])
    doc = tmp_path / "RESULTS.md"
    measured = doc.read_text()
    section = _section(doc, output.stem)
    payload = json.loads(output.read_text())
    assert f"python benchmarks/{name}.py" in section and flags in section
    assert f"python benchmarks/{name}.py --report --output {output}" in section
    assert all(number in section for number in numbers(payload)), section
    assert payload["env"]["cpu"] in section  # what it was measured on, from the JSON

    doc.unlink()
    assert module.main(["--report", "--output", str(output)]) == payload
    assert doc.read_text() == measured  # the same text, measuring nothing
    assert (
        BENCHMARKS / "RESULTS.md"
    ).read_bytes() == repo_docs  # a run outside results/ never writes the repo's


STORED = {  # the JSONs in benchmarks/results/ whose sections RESULTS.md shows, by the script that wrote them
    "search_latency": ("search_latency", "search_latency_1m_global_memory", "search_protocol"),
    "pooling_speed": ("pooling_speed_cpu",),
    "encode_throughput": ("encode_throughput_cpu_tiny", "encode_backends_cpu"),
    "train_step": ("train_step_cpu_tiny",),
}


@pytest.mark.parametrize("name", sorted(STORED))
def test_the_committed_sections_are_what_report_renders_from_the_stored_json(name: str) -> None:
    """A hand edit inside a generated section (or a JSON replaced without its section) fails here."""
    module = _load(name)
    for stem in STORED[name]:
        output = BENCHMARKS / "results" / f"{stem}.json"
        rendered = module.render(json.loads(output.read_text()), output)
        assert _section(BENCHMARKS / "RESULTS.md", stem).strip() == rendered.strip(), stem


@pytest.mark.parametrize("name", sorted(RUNS))
def test_report_without_a_stored_json_is_one_line(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit) as error:
        _load(name).main(["--report", "--output", str(missing)])
    message = str(error.value.code)
    assert "\n" not in message and "--output" in message and str(missing) in message
    assert not (tmp_path / "RESULTS.md").exists()


def test_sections_go_to_the_repository_only_from_its_results_folder(tmp_path: Path) -> None:
    common = _load("common")
    stored = BENCHMARKS / "results" / "search_latency.json"
    assert common.results_doc(stored) == BENCHMARKS / "RESULTS.md"
    assert common.results_doc(stored, trial=True) == stored.parent / "RESULTS.md"  # a --quick run
    assert common.results_doc(tmp_path / "x.json") == tmp_path / "RESULTS.md"
    assert common.num(9216.0) == "9,216" and common.num(0.70183) == "0.702" and common.num(None) == "–"


def _search_row(index: str, ms: float, recall: float, mib: float, gallery: int = 1_000_000) -> dict:
    return {"gallery": gallery, "index": index, "faiss": "IVF1024,SQfp16", "nprobe": 32, "k_factor": 30, "ms": ms,
            "recall_at_10": recall, "ram_bytes_per_image": 521.0, "store_bytes_per_image": 4608.0,
            "index_mib": mib, "build_s": 55.0}  # fmt: skip


def test_search_verdicts_follow_the_numbers() -> None:
    search = _load("search_latency")
    verdict = search.target_verdict(
        [_search_row("global", 2.31, 0.99, 497.0), _search_row("ivfpq", 9.9, 0.93, 385.0)]
    )
    assert "**met by `global`**" in verdict and "2.31 ms" in verdict and "not met by `ivfpq`" in verdict
    assert "not met by `global`" in search.target_verdict(
        [_search_row("global", 2.31, 0.94, 497.0)]
    )  # recall
    assert "not met by `global`" in search.target_verdict(
        [_search_row("global", 60.0, 0.99, 497.0)]
    )  # latency
    assert "not met by `global`" in search.target_verdict(
        [_search_row("global", 2.0, 0.99, 2048.0)]
    )  # memory
    assert search.target_verdict([_search_row("global", 2.0, 0.99, 497.0, gallery=100_000)]) is None
    protocol = [{"index": "exact", "rsum": 304.2, "i2t_r1": 30.0, "t2i_r1": 24.4},
                {"index": "fp16", "faiss": "SQfp16", "rsum": 304.2, "i2t_r1": 30.0, "t2i_r1": 24.4, "rsum_minus_exact": 0.0},
                {"index": "sq8", "faiss": "SQ8", "rsum": 306.4, "i2t_r1": 32.0, "t2i_r1": 24.4, "rsum_minus_exact": 2.2}]  # fmt: skip
    text = search.protocol_section(protocol)
    assert (
        "met by `fp16`; not met by sq8 (+2.2)" in text
        and "| sq8 (`SQ8`) | 32.0 | 24.4 | 306.4 | +2.2 |" in text
    )


def _backend(name: str, images: float, pipeline: float, diff: float, rsum: float) -> dict:
    return {"backend": name, "images_per_s": images, "captions_per_s": 100.0, "pipeline_images_per_s": pipeline,
            "max_abs_diff_vs_eager": diff, "test_rsum": rsum, "image_speedup": images / 20.0, "text_speedup": 1.0,
            "rsum_minus_eager": rsum - 300.0}  # fmt: skip


def test_backend_verdict_and_derived_hours_follow_the_numbers(tmp_path: Path) -> None:
    encode = _load("encode_throughput")
    payload = {
        "env": {"device": "cpu", "cpu": "x86_64", "cpu_threads": 2, "torch": "2", "python": "3", "loadavg": [2.0]},
        "settings": {"checkpoint": "ckpt", "batch_size": 32, "repeats": 5, "threads": 2, "captions_per_batch": 128,
                     "max_length": 40, "model": {"sketch_fusion": "concat"}},
        "results": [_backend("torch", 20.0, 16.0, 0.0, 300.0), _backend("onnx", 80.0, 60.0, 1e-6, 300.0),
                    _backend("onnx-int8", 12.0, 13.0, 0.2, 255.0)],
    }  # fmt: skip
    text = encode.render_backends(payload, tmp_path / "b.json")
    assert "**met by onnxruntime fp32**" in text and "not by onnxruntime int8 (dynamic)" in text
    assert "4.6 hours with onnxruntime fp32, 17 hours eager" in text  # 1e6 / 60 / 3600 and 1e6 / 16 / 3600
    assert "25% of its pipeline time" in text and "`sketch_fusion` concat" in text
    payload["results"][1] = _backend("onnx", 30.0, 25.0, 1e-6, 300.0)  # 1.5x eager: below the 2x target
    text = encode.render_backends(payload, tmp_path / "b.json")
    assert "**not met**" in text and "hours" not in text


def test_pooling_and_throughput_targets_follow_the_numbers(tmp_path: Path) -> None:
    pooling = _load("pooling_speed")
    ratio = {"median": {"temde_over_mean_matmul": 2.34}, "min": {"temde_over_mean_matmul": 2.31}}
    assert pooling._ratio_cell(ratio, "temde_over_mean_matmul") == "2.34 / 2.31: **not met**"
    ratio = {"median": {"temde_over_mean_matmul": 1.96}, "min": {"temde_over_mean_matmul": 1.94}}
    assert pooling._ratio_cell(ratio, "temde_over_mean_matmul") == "1.96 / 1.94: met"
    encode = _load("encode_throughput")
    row = {"embed_dim": 256, "images_per_s": 100.0, "captions_per_s": 100.0}
    payload = {
        "env": {"device": "cuda", "gpu": "GPU", "torch": "2", "python": "3"},
        "settings": {"towers": "base", "batch_size": 256, "projection_dim": 256, "sketch": "32x6", "dtype": "bf16",
                     "warmup": 5, "repeats": 20, "image_size": 224, "text_len": 32},
        "results": [{**row, "variant": "plain-mean", "image_ratio_vs_plain": 1.0, "text_ratio_vs_plain": 1.0},
                    {**row, "variant": "temde-concat", "image_ratio_vs_plain": 0.97, "text_ratio_vs_plain": 0.90}],
    }  # fmt: skip
    text = encode.render_variants(payload, tmp_path / "e.json")
    assert "**not met** (lowest ratio 0.90×)" in text and "--device cuda --towers base" in text
    payload["results"][1]["text_ratio_vs_plain"] = 0.96
    assert "**met** (lowest ratio 0.96×)" in encode.render_variants(payload, tmp_path / "e.json")


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_stored_results_name_no_absolute_path() -> None:
    """A stored run records paths relative to the repository, so its section reads the same in every clone."""
    for output in sorted((BENCHMARKS / "results").glob("*.json")):
        absolute = [s for s in _strings(json.loads(output.read_text())) if Path(s).is_absolute()]
        assert not absolute, f"{output.name} records {absolute[:3]}"


def test_stored_path_is_relative_to_the_repository() -> None:
    common = _load("common")
    shared = REPO.parent / "shared" / "data" / "x.json"
    assert common.stored_path(shared) == "../shared/data/x.json"
    assert common.stored_path(REPO / "outputs" / "demo") == "outputs/demo"
