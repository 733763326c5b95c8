"""The speed benchmarks run end to end at their smallest sizes and write the JSON they promise; every
benchmark and example imports, and every `temde_hf` name they import (inside functions too) exists.

These check that the scripts work (argument handling, every head/backend/variant, the JSON schema), not
how fast anything is: timings here are meaningless.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from temde_hf.testing import import_script

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted([*BENCHMARKS.glob("*.py"), *(REPO / "examples").rglob("*.py")])


def _load(name: str) -> ModuleType:
    return import_script(BENCHMARKS / f"{name}.py", f"benchmarks_{name}")


def temde_hf_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """Every ``import temde_hf...`` / ``from temde_hf... import name`` in `path`, at any depth (a
    function's lazy import too): `(line, module, name or None)`."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "temde_hf"]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "temde_hf"
        ):
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def _unresolved(module: str, name: str | None) -> str | None:
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        return f"{module}: {error}"
    if name is None or hasattr(imported, name):
        return None
    try:  # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return f"{module} has no {name!r}"
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_temde_hf_import_of_a_script_resolves(path: Path) -> None:
    """A lazy import of a deleted module (``from temde_hf.demo import ...`` inside a function) is caught
    here, not when someone runs the one command that reaches it."""
    imports = temde_hf_imports(path)
    problems = [f"{path.name}:{line}: {p}" for line, m, n in imports if (p := _unresolved(m, n))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path", [p for p in SCRIPTS if p.parent.name in {"benchmarks", "examples"}], ids=lambda p: p.name
)
def test_every_script_imports(path: Path) -> None:
    """Importing a benchmark or example runs its top-level imports (its ``__main__`` block does not run)."""
    import_script(path, f"script_{path.stem}")


def test_a_deleted_module_imported_inside_a_function_is_found(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        "def f():\n    from temde_hf.demo import DEFAULT_DATA\n    from temde_hf.data import nope\n"
    )
    imports = temde_hf_imports(script)
    assert [(m, n) for _, m, n in imports] == [("temde_hf.demo", "DEFAULT_DATA"), ("temde_hf.data", "nope")]
    assert "No module named 'temde_hf.demo'" in _unresolved("temde_hf.demo", "DEFAULT_DATA")
    assert _unresolved("temde_hf.data", "nope") == "temde_hf.data has no 'nope'"
    assert _unresolved("temde_hf.evaluation", "metrics") is None  # a submodule


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


def test_quality_table_and_plot_show_every_head(tmp_path: Path) -> None:
    quality = _load("quality")
    metrics = lambda rsum: {"mean": rsum, "std": 1.0, "n": 2}  # noqa: E731
    head = lambda v, t: {"val": {"rsum": metrics(v), "i2t_r1": metrics(v / 6), "t2i_r1": metrics(v / 6)},  # noqa: E731
                         "test": {"rsum": metrics(t), "i2t_r1": metrics(t / 6), "t2i_r1": metrics(t / 6)}}  # fmt: skip
    gain = {"mean": 4.0, "std": 1.0, "per_seed": [3.0, 5.0]}
    summary = {
        "frozen": {
            "heads": {"mean": head(330, 300), "T-EMDE concat soft_dlsh": head(333, 304)},
            "verdict": {"best_plain_by_val": "mean", "best_temde_by_val": "T-EMDE concat soft_dlsh",
                        "test_paired_gain": gain, "met": True},
        }
    }  # fmt: skip
    text = quality.table(summary)
    assert "| frozen | T-EMDE concat soft_dlsh | 333.0 ± 1.0 | 304.0 ± 1.0 |" in text
    assert "+4.0 ± 1.0 per seed (+3.0, +5.0)" in text and "**met**" in text
    quality.plot(summary, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 1000


def _generated(doc: Path, name: str) -> str:
    text = doc.read_text()
    begin, end = f"<!-- BEGIN {name} (generated: do not edit) -->", f"<!-- END {name} -->"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_quality_sections_are_what_the_script_renders_from_the_stored_json() -> None:
    """The 800-photo ablation stays as measured (its JSON's numbers, its commands now naming ``--scale 800``,
    since 6k is the default), in RESULTS.md and README.md; the 6k section is its JSON's, or the command that
    will write it while none is stored."""
    quality = _load("quality")
    stored = json.loads((BENCHMARKS / "results" / "quality.json").read_text())
    rendered = quality.render(stored, "800")
    assert _generated(BENCHMARKS / "RESULTS.md", "quality") == rendered.strip()
    assert _generated(REPO / "README.md", "quality_summary") == rendered.strip()
    assert rendered.count("python benchmarks/quality.py --scale 800 --settings") == 2
    assert "| frozen | T-EMDE concat anchor | 333.2 ± 0.6 | 377.6 ± 2.3 |" in rendered
    results_6k = BENCHMARKS / "results" / "quality_6k.json"
    expected = (
        quality.render(json.loads(results_6k.read_text()), "6k")
        if results_6k.is_file()
        else quality.pending("6k")
    )
    assert _generated(BENCHMARKS / "RESULTS.md", "quality_6k") == expected.strip()
    assert _generated(REPO / "README.md", "quality_6k_summary") == expected.strip()
    text = (BENCHMARKS / "RESULTS.md").read_text()  # right after the 800-photo section
    assert (
        text.index("<!-- END quality -->")
        < text.index("## Quality ablation at 6,090 photos")
        < text.index("<!-- BEGIN quality_6k")
        < text.index("## Choosing the demo recipe at ten times the data")
    )


def test_quality_6k_cross_validates_on_the_6k_recipes_and_judges_on_the_unseen_gallery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 6k wiring, with the trainer replaced by recorders: each setting's 6k recipe file, recipe_search's
    6k folds (eval every 190 steps, the shared feature cache), only the folds asked for, N32 H6 sketches,
    and the judged runs through `train_and_judge` on the gallery, never a test split; reruns resume."""
    quality = _load("quality")
    search = _load("recipe_search")
    calls: list[tuple] = []

    def metrics(flags: list[str], seed: int) -> dict[str, float]:
        rsum = 300.0 + 10 * ("concat" in flags) + seed
        return {**dict.fromkeys(search.KEYS, rsum / 6), "rsum": rsum}

    def run_one(flags, split_flags, seed, work, towers, config, cache_dir=None, eval_steps=10):
        calls.append(("cv", Path(config).name, split_flags, seed, cache_dir, eval_steps, flags))
        return {"final": metrics(flags, seed)}

    def train_and_judge(config, flags, seed, work, towers, gallery, cache_dir):
        calls.append(("judge", Path(config).name, seed, Path(gallery).name, cache_dir, flags))
        return {"gallery": metrics(flags, seed), "images": 800, "captions": 4000, "train_seconds": 1.0}

    monkeypatch.setattr(quality, "run_one", run_one)
    monkeypatch.setattr(quality, "train_and_judge", train_and_judge)
    monkeypatch.setattr(quality, "smoke_setup", lambda work: ((tmp_path / "v", tmp_path / "t"), []))
    monkeypatch.setattr(quality, "offline_towers", lambda d: (tmp_path / "v", tmp_path / "t"))
    gallery = tmp_path / "gallery.json"
    output = tmp_path / "quality_6k.json"
    argv = ["--settings", "frozen", "text", "--heads", "mean", "T-EMDE concat anchor", "--run-folds", "0", "2",
            "--work-dir", str(tmp_path / "work"), "--feature-cache-dir", str(tmp_path / "cache"),
            "--gallery", str(gallery), "--output", str(output)]  # fmt: skip
    monkeypatch.setattr(
        quality, "smoke_paths", lambda w, o, s, r: (Path(o), tmp_path / "RESULTS.md", tmp_path / "README.md")
    )
    stored = quality.main(argv)

    cv = [c for c in calls if c[0] == "cv"]
    judged = [c for c in calls if c[0] == "judge"]
    assert len(cv) == 2 * 2 * 2 and len(judged) == 2 * 2  # settings x heads x (folds 0, 2 | seed 0)
    assert {c[2][-1] for c in cv} == {"0", "2"} and all(c[2][:4] == search.cv_flags(0, 5)[:4] for c in cv)
    assert all(c[3] == 0 and c[4] == tmp_path / "cache" and c[5] == 190 for c in cv)
    assert {c[1] for c in cv if "true" in c[6]} == {"flickr8k_6k_frozen_demo.yaml"}
    assert {c[1] for c in cv if "false" in c[6]} == {"flickr8k_6k_text2_demo.yaml"}
    anchor = next(c[6] for c in cv if "anchor" in c[6])
    assert (
        anchor[anchor.index("--n_sketches") + 1] == "32"
        and anchor[anchor.index("--n_hyperplanes") + 1] == "6"
    )
    assert all(c[3] == "gallery.json" and c[4] == tmp_path / "cache" for c in judged)
    runs = stored["runs"]["frozen | mean"]
    assert set(runs) == {"fingerprint", "cv fold 0 seed 0", "cv fold 2 seed 0", "gallery seed 0"}
    verdict = stored["summary"]["frozen"]["verdict"]
    assert verdict["best_temde_by_val"] == "T-EMDE concat anchor" and verdict["gallery_paired_gain"][
        "per_seed"
    ] == [10.0]
    assert "test_paired_gain" not in verdict and verdict["met"]
    section = _generated(tmp_path / "RESULTS.md", "quality_6k")
    assert "--run-folds 0 2 --seeds 0" in section and "--scale" not in section
    assert "| frozen | T-EMDE concat anchor | 310.0 ± 0.0 | 310.0 ± 0.0 |" in section
    assert "all 800 Flickr8k-800 photos (4,000 captions)" in section and "unseen gallery RSUM" in section
    assert "## Quality ablation at 6,090 photos" in (tmp_path / "RESULTS.md").read_text()
    assert _generated(tmp_path / "README.md", "quality_6k_summary") == section  # and its README summary
    assert output.with_suffix(".png").stat().st_size > 1000

    calls.clear()
    assert quality.main(argv)["summary"] == stored["summary"] and not calls  # resumed: nothing retrained
    quality.main([*argv[:-6], "--run-folds", "0", "1", "2", *argv[-6:]])
    assert sorted(c[2][-1] for c in calls) == ["1"] * 4  # only the new fold: 2 settings x 2 heads


def test_quality_run_folds_outside_the_split_is_one_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _load("quality").main(["--folds", "5", "--run-folds", "5"])
    assert "--run-folds must be in 0 .. 4" in capsys.readouterr().err


def test_holdout_estimate_table_has_every_seed_and_the_mean_of_each_gallery_and_stage() -> None:
    estimate = _load("holdout_estimate")
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    key, weight = estimate.RERANKED

    def run(stage1: float, reranked: float, blocks: tuple[float, ...]) -> dict:
        metrics = lambda rsum: {**dict.fromkeys(keys, 40.0), "rsum": rsum}  # noqa: E731
        other = {"0": metrics(1.0)}  # stage 2 alone: not the defaults, never shown
        return {"stage1": metrics(stage1), "rerank": {key: {"metrics": {weight: metrics(reranked), **other}}},
                "stage1_sub_galleries": [metrics(b) for b in blocks]}  # fmt: skip

    runs = {"0": run(280.0, 281.0, (300.0, 310.0)), "1": run(290.0, 289.0, (320.0, 330.0))}
    lines = estimate.table(runs, "1,000").splitlines()
    assert lines[2].startswith("| 0 | 1,000 photos, stage 1 |") and lines[2].endswith("| 280.0 |")
    assert lines[3].endswith("| 290.0 |") and lines[4].endswith("| 285.0 ± 7.1 |")
    assert "alignment rerank" in lines[5] and lines[5].endswith("| 281.0 |")
    assert lines[7].startswith("| mean ± std | 1,000 photos, + alignment rerank") and lines[7].endswith(
        "| 285.0 ± 5.7 |"
    )
    # the 200-photo blocks: each seed's mean over its blocks, then mean ± std over seeds
    assert lines[8].startswith("| 0 | 200 photos (mean of the 2 blocks), stage 1 |") and lines[8].endswith(
        "| 305.0 |"
    )
    assert lines[10].endswith("| 315.0 ± 14.1 |")


def _holdout_run(estimate: ModuleType, rsum: float = 280.0) -> dict:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
    key, weight = estimate.RERANKED
    metrics = {**dict.fromkeys(keys, 40.0), "rsum": rsum}
    return {"stage1": metrics, "rerank": {key: {"metrics": {weight: metrics}}},
            "stage1_sub_galleries": [metrics], "eval_images": 1000}  # fmt: skip


def test_holdout_estimate_keeps_each_recipes_runs_and_starts_a_changed_recipe_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    estimate = _load("holdout_estimate")
    stored = _holdout_run(estimate)
    trained: list[tuple[int, Path]] = []

    def train_and_score(
        flags: list[str], split_flags: list[str], seed: int, work: Path, towers: object, rerankers: object,
        latency: int, config: Path, **kwargs: object,
    ) -> dict:  # fmt: skip
        trained.append((seed, config))
        return stored

    output, readme = tmp_path / "holdout.json", tmp_path / "README.md"
    monkeypatch.setattr(estimate, "train_and_score", train_and_score)
    monkeypatch.setattr(estimate, "offline_towers", lambda towers_dir: (Path("v"), Path("t")))
    monkeypatch.setattr(estimate, "smoke_paths", lambda *a: (output, tmp_path / "R.md", readme))
    text2, demo = estimate.TEXT2_6K_CONFIG, estimate.CONFIG
    # the first format: one recipe (text2-mean), its runs at the top level
    output.write_text(json.dumps({"config": text2.read_text(), "split_flags": estimate.SPLIT_FLAGS,
                                  "runs": {"0": stored}}))  # fmt: skip
    estimate.main(["--recipe", "text2-mean", "--seeds", "0", "1"])
    assert trained == [(1, text2)]  # seed 0 came from the old-format JSON
    saved = json.loads(output.read_text())
    assert set(saved["recipes"]) == {"text2-mean"} and set(saved["recipes"]["text2-mean"]["runs"]) == {
        "0",
        "1",
    }
    assert "python benchmarks/holdout_estimate.py --recipe text2-mean --seeds 0 1\n" in readme.read_text()
    assert "No stored runs yet" in readme.read_text()  # the demo recipe, with the command that measures it

    estimate.main(["--seeds", "2"])  # the default recipe: the shipped demo, trained from its own config
    assert trained[1:] == [(2, demo)]
    saved = json.loads(output.read_text())
    assert set(saved["recipes"]["text2-mean"]["runs"]) == {"0", "1"}  # the other recipe's runs are kept
    assert saved["recipes"]["demo"] == {"config": demo.read_text(), "runs": {"2": stored}}
    section = readme.read_text()
    assert "No stored runs yet" not in section
    assert section.index("--recipe demo --seeds 2\n") < section.index("--recipe text2-mean --seeds 0 1\n")
    assert section.count("| mean ± std | 1,000 photos, stage 1 |") == 2  # one table per recipe

    saved["recipes"]["text2-mean"]["config"] = "another recipe"
    output.write_text(json.dumps(saved))
    estimate.main(["--recipe", "text2-mean", "--seeds", "0"])
    assert trained[2:] == [(0, text2)]  # the stored runs measured another config
    saved = json.loads(output.read_text())
    assert set(saved["recipes"]["text2-mean"]["runs"]) == {"0"} and set(saved["recipes"]["demo"]["runs"]) == {
        "2"
    }


def test_holdout_estimate_reads_the_old_format_as_the_text2_recipe_and_reports_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    estimate = _load("holdout_estimate")
    runs = {"0": _holdout_run(estimate, 280.0), "1": _holdout_run(estimate, 290.0)}
    old = {"config": "model: {pooling: mean}\n", "split_flags": estimate.SPLIT_FLAGS, "runs": runs}
    assert estimate.migrate(old) == {
        "split_flags": estimate.SPLIT_FLAGS, "sub_gallery": 200,
        "recipes": {"text2-mean": {"config": old["config"], "runs": runs}},
    }  # fmt: skip
    assert estimate.migrate(estimate.migrate(old)) == estimate.migrate(
        old
    )  # the current format stays as it is

    def train_and_score(*args: object, **kwargs: object) -> dict:
        raise AssertionError("--report trains nothing")

    output = tmp_path / "holdout.json"
    output.write_text(json.dumps(old))
    monkeypatch.setattr(estimate, "train_and_score", train_and_score)
    monkeypatch.setattr(
        estimate, "smoke_paths", lambda *a: (output, tmp_path / "R.md", tmp_path / "README.md")
    )
    assert estimate.main(["--report"]) == estimate.migrate(old)
    section = (tmp_path / "R.md").read_text()
    assert (
        "--recipe text2-mean --seeds 0 1\n" in section and "| mean ± std | 1,000 photos, stage 1 |" in section
    )
    assert "head: pooling mean" not in section and "head: mean pooling." in section  # words from its config
    assert json.loads(output.read_text()) == old  # --report rewrites no JSON


def test_holdout_estimate_report_without_runs_is_one_line(tmp_path: Path) -> None:
    estimate = _load("holdout_estimate")
    argv = ["--report", "--smoke", "--work-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as missing:  # no JSON at all
        estimate.main(argv)
    (tmp_path / "smoke" / "holdout_estimate.json").write_text(json.dumps({"split_flags": [], "recipes": {}}))
    with pytest.raises(SystemExit) as empty:  # a JSON without runs
        estimate.main(argv)
    for error in (missing, empty):
        message = str(error.value.code)
        assert "\n" not in message and "--output" in message and "holdout_estimate.json" in message
    assert not (tmp_path / "smoke" / "README.md").exists()


def test_holdout_estimate_sections_are_what_it_renders_from_the_committed_json() -> None:
    """The committed README/RESULTS sections are `--report`'s text; the migrated JSON kept the first
    format's text2-mean runs; each recipe's head words come from its own config."""
    estimate = _load("holdout_estimate")
    stored = json.loads(estimate.RESULTS.read_text())
    assert stored["recipes"]["text2-mean"]["config"] == estimate.TEXT2_6K_CONFIG.read_text()
    rendered = estimate.render(stored).strip()
    for doc in (REPO / "README.md", BENCHMARKS / "RESULTS.md"):
        text = doc.read_text()
        section = text.split("<!-- BEGIN holdout_estimate (generated: do not edit) -->\n", 1)[1]
        assert section.split("<!-- END holdout_estimate -->", 1)[0].strip() == rendered, doc
    demo, text2 = (estimate.head_words(c.read_text()) for c in (estimate.CONFIG, estimate.TEXT2_6K_CONFIG))
    assert "T-EMDE sketch (concat" in demo and "[11]" in demo and "T-EMDE" not in text2


def _record(stage1: float, reranked: dict[str, float]) -> dict:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    metrics = lambda rsum: {**dict.fromkeys(keys, rsum / 6), "rsum": rsum}  # noqa: E731
    return {
        "stage1": metrics(stage1),
        "rerank": {
            key: {"metrics": {"0": metrics(v), "1": metrics(v - 50)}, "latency_ms": None}
            for key, v in reranked.items()
        },
    }


def test_rerank_benchmark_chooses_on_cv_and_pairs_test_seeds() -> None:
    rerank = _load("rerank")
    rerank.WEIGHTS = (0.0, 1.0)
    folds, cv_seeds, seeds = 2, [0], [0, 1]

    def runs(cv: tuple[float, dict], test: list[tuple[float, dict]]) -> dict:
        out = {f"cv fold {f} seed 0": _record(*cv) for f in range(folds)}
        out.update({f"test seed {s}": _record(*t) for s, t in zip(seeds, test)})
        return out

    a20, a100 = "alignment K=20", "alignment K=100"
    i20, i100 = "itm K=20", "itm K=100"
    stored = {
        "base": runs((300, {a20: 290, a100: 280}), [(350, {a20: 340, a100: 330}), (352, {a20: 341, a100: 331})]),
        "alignment loss 0.5": runs((301, {a20: 310, a100: 305}), [(349, {a20: 360, a100: 400}), (350, {a20: 362, a100: 401})]),
        "matching head on top": runs((300, {i20: 320, i100: 315}), [(350, {i20: 365, i100: 380}), (351, {i20: 366, i100: 381})]),
        "matching head joint": runs((299, {i20: 318, i100: 319}), [(349, {i20: 390, i100: 395}), (349, {i20: 391, i100: 396})]),
        "distill from alignment": runs((305, {a20: 300, a100: 300}), [(351, {a20: 1, a100: 1}), (354, {a20: 1, a100: 1})]),
        "distill from matching head": runs((302, {i20: 300, i100: 300}), [(360, {i20: 1, i100: 1}), (362, {i20: 1, i100: 1})]),
    }  # fmt: skip
    summary = rerank.summarise(stored, cv_seeds, seeds, folds, rerank.WEIGHTS)
    choices = summary["choices"]
    # the test split never chooses: alignment K=100 and the joint head win on test but lose on CV
    assert choices["stage 1 + alignment rerank"] == "alignment loss 0.5 | +alignment K=20 w=0"
    assert choices["stage 1 + matching-head rerank"] == "matching head on top | +itm K=20 w=0"
    assert choices["stage 1 after distillation"] == "distill from alignment | stage 1"
    row = summary["rows"][choices["stage 1 + matching-head rerank"]]
    assert row["test_paired_delta"]["mean"] == pytest.approx(14.5)  # (365 - 350, 366 - 352): paired by seed
    assert summary["rows"]["base | stage 1"]["cv"]["mean"] == 300


def test_rerank_benchmark_report_writes_its_sections(tmp_path: Path) -> None:
    """``--report`` summarises the JSON's runs (with the seeds and folds they used) and writes the
    RESULTS.md section and the README summary itself."""
    rerank = _load("rerank")
    rerank.REPO, rerank.WEIGHTS = tmp_path, (0.0, 1.0)  # the report's Markdown targets; `_record`'s weights
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text(
        "# x\n<!-- BEGIN rerank_summary (generated: do not edit) -->\n<!-- END rerank_summary -->\n"
    )
    ms = {"stage1_i2t": 0.1, "stage1_t2i": 0.2, "stage2_i2t": 1.5, "stage2_t2i": 2.5}
    runs = {}
    for i, (variant, spec) in enumerate(rerank.VARIANTS.items()):
        keys = [f"{name} K={k}" for name in spec["rerankers"] for k in rerank.KS]
        runs[variant] = {f"cv fold {f} seed 0": _record(300 + i, dict.fromkeys(keys, 310)) for f in range(2)}
        for seed in (0, 1):
            record = _record(350 + i + seed, dict.fromkeys(keys, 360 + seed))
            for key in keys:
                record["rerank"][key]["latency_ms"] = ms
            runs[variant][f"test seed {seed}"] = {**record, "loadavg": 2.0}
    output = tmp_path / "rerank.json"
    output.write_text(json.dumps({"runs": runs, "folds": 2, "cv_seeds": [0], "seeds": [0, 1]}))
    stored = rerank.main(["--report", "--output", str(output)])
    assert set(stored["summary"]["choices"]) >= {"stage 1 alone", "stage 1 + alignment rerank",
                                                 "stage 1 + matching-head rerank", "stage 1 after distillation"}  # fmt: skip
    readme = (tmp_path / "README.md").read_text()
    assert "--folds 2 --cv-seeds 0 --seeds 0 1" in readme and "| stage 1 + matching-head rerank |" in readme
    assert "| 1.5 / 2.5 |" in readme  # stage-2 latency at K = 20 (i2t / t2i)
    results = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert (
        "<!-- BEGIN rerank (generated: do not edit) -->" in results and "Every variant and stage" in results
    )


@pytest.mark.slow
def test_rerank_benchmark_trains_and_scores_one_run(tmp_path: Path) -> None:
    """One run of the benchmark's harness on tiny towers and synthetic data: stage 1, every reranker at
    every K and fusion weight, from the saved checkpoint."""
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.testing import save_tiny_towers

    rerank = _load("rerank")
    towers = save_tiny_towers(tmp_path / "towers")
    data = make_synthetic_karpathy(tmp_path / "data", n_images=30, seed=0)
    tiny = ["--data", str(data), "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3",
            "--per_device_train_batch_size", "8", "--max_steps", "2", "--itm_hidden_size", "8", "--itm_heads", "2"]  # fmt: skip
    flags = [*rerank.VARIANTS["distill from matching head"]["flags"], *tiny]
    record = rerank.train_and_score(
        flags, rerank.cv_flags(0, 3), 0, tmp_path / "work", towers, ["alignment", "itm"], 2
    )
    assert record["stage1"]["rsum"] == pytest.approx(
        record["trainer_eval_rsum"], abs=1e-6
    )  # pixels = trainer
    assert set(record["rerank"]) == {f"{n} K={k}" for n in ("alignment", "itm") for k in rerank.KS}
    for scored in record["rerank"].values():
        assert set(scored["metrics"]) == {f"{w:g}" for w in rerank.WEIGHTS}
        assert set(scored["latency_ms"]) == {"stage1_i2t", "stage2_i2t", "stage1_t2i", "stage2_t2i"}


def _demo6k_runs(rerank: ModuleType, folds: dict[str, tuple[int, ...]]) -> dict:
    """Runs of ``--recipe demo6k``'s default variants: CV runs on `folds[variant]` (fold f of variant i has
    stage-1 RSUM 300 + 10 f + i), judge runs (seeds 0, 1) on an 800-photo gallery."""
    ms = {"stage1_i2t": 0.1, "stage1_t2i": 0.2, "stage2_i2t": 1.5, "stage2_t2i": 2.5}
    runs = {}
    for i, variant in enumerate(rerank.RECIPES["demo6k"]["variants"]):
        keys = [f"{name} K={k}" for name in rerank.VARIANTS[variant]["rerankers"] for k in rerank.KS]
        runs[variant] = {
            f"cv fold {f} seed 0": _record(300 + 10 * f + i, dict.fromkeys(keys, 310)) for f in folds[variant]
        }
        for seed in (0, 1):
            record = _record(350 + i + seed, dict.fromkeys(keys, 360 + seed))
            for key in keys:
                record["rerank"][key]["latency_ms"] = ms
            runs[variant][f"judge seed {seed}"] = {
                **record,
                "loadavg": 2.0,
                "eval_images": 800,
                "eval_captions": 4000,
            }
    return runs  # fmt: skip


def test_rerank_benchmark_summary_averages_over_the_folds_every_variant_has() -> None:
    """Folds 0-2 of a 5-fold split ran for every variant, fold 3 for one: the CV values average over folds
    0-2 only (the runs every variant has, so the variants stay paired), and the summary names them."""
    rerank = _load("rerank")
    rerank.WEIGHTS = (0.0, 1.0)
    variants = rerank.RECIPES["demo6k"]["variants"]
    runs = _demo6k_runs(rerank, {v: (0, 1, 2, 3) if v == "base" else (0, 1, 2) for v in variants})
    summary = rerank.summarise(runs, [0], [0, 1], 5, rerank.WEIGHTS, final="judge")
    assert summary["cv_folds"] == [0, 1, 2]
    assert summary["rows"]["base | stage 1"]["cv"]["mean"] == pytest.approx(310)  # (300 + 310 + 320) / 3
    assert summary["rows"]["base | stage 1"]["test"]["mean"] == pytest.approx(350.5)  # the judge runs
    assert rerank.cv_label(5, summary["cv_folds"]) == "folds 0, 1, 2 of a 5-fold CV"
    assert rerank.cv_label(5, range(5)) == "5-fold CV"
    # a variant still running (fold 0 done, no judge run yet) does not narrow the folds, and is left out
    for key in ("cv fold 1 seed 0", "cv fold 2 seed 0", "judge seed 0", "judge seed 1"):
        del runs["matching head joint"][key]
    assert rerank.shared_folds(runs, [0], [0, 1], 5, "judge") == [0, 1, 2]
    rows = rerank.summarise(runs, [0], [0, 1], 5, rerank.WEIGHTS, "judge")["rows"]
    assert "matching head joint | stage 1" not in rows and rows["base | stage 1"]["cv"][
        "mean"
    ] == pytest.approx(310)
    assert (
        rerank.summarise(runs, [0], [0, 1], 5, rerank.WEIGHTS, "test")["rows"] == {}
    )  # no "test seed s" runs


def test_rerank_benchmark_demo6k_report_names_its_data_and_folds(tmp_path: Path) -> None:
    """``--recipe demo6k --report`` writes its own sections, saying what was measured: CV over the 6,090
    Flickr8k-6k photos (the folds run), judged on the gallery's photos, the command with ``--run-folds``."""
    rerank = _load("rerank")
    rerank.REPO, rerank.WEIGHTS = tmp_path, (0.0, 1.0)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text("# x\n")
    runs = _demo6k_runs(rerank, dict.fromkeys(rerank.RECIPES["demo6k"]["variants"], (0, 1, 2)))
    output = tmp_path / "rerank_6k.json"
    output.write_text(json.dumps({"runs": runs, "folds": 5, "cv_seeds": [0], "seeds": [0, 1]}))
    stored = rerank.main(["--recipe", "demo6k", "--report", "--output", str(output)])
    assert set(stored["summary"]["choices"]) >= {
        "stage 1 + matching-head rerank",
        "stage 1 after distillation",
    }
    readme = (tmp_path / "README.md").read_text()
    command = (
        "python benchmarks/rerank.py --recipe demo6k --folds 5 --run-folds 0 1 2 --cv-seeds 0 --seeds 0 1"
    )
    assert "<!-- BEGIN rerank_6k_summary" in readme and f"`{command}`" in readme
    assert "folds 0, 1, 2 of a 5-fold CV over the 6,090 Flickr8k-6k photos" in readme
    assert "all 800 Flickr8k-800 photos (4,000 captions), never in training" in readme
    assert "| gallery RSUM |" in readme and "700 train+val" not in readme and "100 images" not in readme
    results = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert "<!-- BEGIN rerank_6k (generated" in results and f"    {command}\n" in results
    assert "the lower of the gallery runs'" in results


@pytest.mark.slow
def test_rerank_benchmark_judges_on_another_gallery(tmp_path: Path) -> None:
    """`train_and_score(eval_data=...)`: trained on train+val with no evaluation split (as make demo
    trains), scored from pixels on every image of another data file."""
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.testing import save_tiny_towers

    rerank = _load("rerank")
    towers = save_tiny_towers(tmp_path / "towers")
    data = make_synthetic_karpathy(tmp_path / "data", n_images=30, seed=0)
    gallery = make_synthetic_karpathy(tmp_path / "gallery", n_images=11, seed=1)
    tiny = ["--data", str(data), "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3",
            "--per_device_train_batch_size", "8", "--max_steps", "2"]  # fmt: skip
    record = rerank.train_and_score(
        tiny, rerank.TRAIN_FLAGS, 0, tmp_path / "work", towers, ["alignment"], 0, eval_data=gallery
    )
    assert (record["eval_images"], record["eval_captions"]) == (11, 55)
    assert record["trainer_eval_rsum"] is None  # nothing was held out of training
    assert set(record["rerank"]) == {f"alignment K={k}" for k in rerank.KS}
