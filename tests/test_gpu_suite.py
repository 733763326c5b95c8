"""`benchmarks/gpu_suite.sh`: the dry run (every step on CPU at tiny sizes, the CUDA ones skipped with a
reason), a failing step recorded without stopping the others, and the report into RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from temde_hf.testing import import_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = ["install", "imports", "gpu_tests", "pooling_speed", "encode_throughput", "train_step", "train_bf16"]
BENCHMARK_JSON = {
    "pooling_speed": "pooling_speed.json",
    "encode_throughput": "encode_throughput.json",
    "train_step": "train_step.json",
    "train_bf16": "train_bf16.json",
}


def run_suite(*args: str, out: Path, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    """`bash benchmarks/gpu_suite.sh ARGS` with OUT=`out` and this interpreter (unless `python` says otherwise)."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env={**os.environ, "OUT": str(out), "PYTHON": python, **env},  # the script puts its repo on the path
        capture_output=True,
        text=True,
        timeout=2000,  # the suite bounds itself (dry run: 1800 s)
    )


@pytest.fixture(scope="module")
def suite() -> Any:
    return import_script(REPO / "benchmarks" / "gpu_suite.py", "gpu_suite")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    return run_suite("--dry-run", out=out), out


@pytest.mark.slow
def test_dry_run_runs_every_step_or_says_why_not(dry_run) -> None:
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "gpu_suite.json").read_text())
    assert summary["mode"] == "dry-run" and summary["failed"] == [], summary["steps"]
    statuses = {step["step"]: step for step in summary["steps"]}
    assert list(statuses) == STEPS
    for step in summary["steps"]:
        assert step["status"] in ("ok", "skipped"), (step, result.stdout[-4000:])
        if step["status"] == "skipped":
            assert step["detail"], step  # every skip says why
    # Only the CUDA-only parts are skipped on CPU; pytest collected the gpu tests and skipped them all.
    assert statuses["install"]["status"] == "skipped" and "dry run" in statuses["install"]["detail"]
    assert statuses["gpu_tests"]["status"] == "skipped" and "no CUDA" in statuses["gpu_tests"]["detail"]
    assert (
        summary["gpu_tests"]["tests"] >= 3
        and summary["gpu_tests"]["skipped"] == summary["gpu_tests"]["tests"]
    )
    assert {s for s, step in statuses.items() if step["status"] == "ok"} == {"imports", *BENCHMARK_JSON}
    assert summary["env"]["import_failures"] == {} and summary["env"]["versions"]["datasets"]
    for step, name in BENCHMARK_JSON.items():
        payload = json.loads((out / name).read_text())
        assert payload["benchmark"] == step and statuses[step]["json"] == name
        assert payload["results"], step
    assert (out / "pooling_speed.png").is_file()
    train = json.loads((out / "train_bf16.json").read_text())
    assert train["settings"]["mixed_precision"] == "bf16" and train["results"]["global_step"] == 3
    # One summary table at the end, and the whole output in the log beside the JSON.
    tail = result.stdout[result.stdout.rindex("=== summary") :]
    assert "| step | status | seconds | detail | json |" in tail
    assert all(f"| {step} |" in tail for step in STEPS)
    assert (out / "gpu_suite.log").is_file()
    # A finished suite is never overwritten.
    again = run_suite("--dry-run", out=out)
    assert again.returncode == 2 and "already holds a finished suite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_report_writes_the_section_from_the_dry_run_json(dry_run, suite, tmp_path: Path) -> None:
    _, out = dry_run
    results_md = REPO / "benchmarks" / "RESULTS.md"
    before = results_md.read_text()
    # A dry run never lands in the real RESULTS.md / results/: one line, exit 2, nothing written.
    assert suite.main(["report", str(out)]) == 2
    assert results_md.read_text() == before
    assert not (REPO / "benchmarks" / "results" / "gpu_suite_dry_run.json").exists()

    preview = tmp_path / "RESULTS.md"
    preview.write_text("# Benchmark results\n\nkept\n")
    assert (
        suite.main(["report", str(out), "--results-md", str(preview), "--results-dir", str(tmp_path / "r")])
        == 0
    )
    text = preview.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n")
    section = text[text.index("<!-- BEGIN gpu_suite") : text.index("<!-- END gpu_suite -->")]
    assert "Dry run (CPU, tiny sizes)" in section
    encode = json.loads((out / "encode_throughput.json").read_text())
    images_per_s = encode["results"][1]["images_per_s"]
    assert f"| temde-concat | {images_per_s:.3g} |" in section  # the JSON's number, through format_table
    train = json.loads((out / "train_bf16.json").read_text())
    assert f"{train['results']['global_step']} steps" in section and "--mixed_precision bf16" in section
    copied = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert "gpu_suite_dry_run.json" in copied and "encode_throughput_dry_run_base.json" in copied
    # Written again: the section is replaced, not appended.
    suite.main(["report", str(out), "--results-md", str(preview), "--results-dir", str(tmp_path / "r")])
    assert preview.read_text().count("<!-- BEGIN gpu_suite") == 1


@pytest.mark.slow
def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    """pooling_speed fails (an interpreter wrapper makes it exit 3), encode_throughput after it still runs,
    the unselected steps are skipped with the reason, and the suite exits 1 with the summary written."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f'#!/usr/bin/env bash\ncase "$*" in *pooling_speed.py*) echo "boom" >&2; exit 3;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    result = run_suite(
        "--dry-run", out=out, python=str(wrapper), GPU_SUITE_ONLY="encode_throughput,pooling_speed"
    )
    assert result.returncode == 1, result.stdout[-3000:]
    summary = json.loads((out / "gpu_suite.json").read_text())
    statuses = {step["step"]: step for step in summary["steps"]}
    assert summary["failed"] == ["pooling_speed"]
    assert statuses["pooling_speed"]["detail"] == "exit status 3 (see gpu_suite.log)"
    assert statuses["encode_throughput"]["status"] == "ok" and (out / "encode_throughput.json").is_file()
    assert (
        statuses["train_step"]["status"] == "skipped" and "GPU_SUITE_ONLY" in statuses["train_step"]["detail"]
    )
    assert "| pooling_speed | failed |" in result.stdout


def test_gpu_mode_without_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    result = run_suite(out=tmp_path / "out", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"gpu_suite.sh: no CUDA device is visible to {sys.executable}; "
        "run 'bash benchmarks/gpu_suite.sh --dry-run' for the CPU check"
    )
    assert not (tmp_path / "out").exists()


def test_bad_argument_is_one_line(tmp_path: Path) -> None:
    result = run_suite("--gpu", out=tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown argument '--gpu'" in result.stderr


def test_summary_fails_a_step_that_wrote_no_json(suite, tmp_path: Path) -> None:
    steps = tmp_path / "steps.tsv"
    steps.write_text(
        "step\tstatus\tseconds\tdetail\n"
        "pooling_speed\tok\t1.5\t\n"
        "train_step\tok\t2.0\t\n"
        "gpu_tests\tok\t3.0\t\n"
    )
    (tmp_path / "train_step.json").write_text("{}")
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>')
    summary = suite.summarize(steps, tmp_path, "gpu", tmp_path / "absent.json", junit)
    by_step = {s["step"]: s for s in summary["steps"]}
    assert by_step["pooling_speed"]["status"] == "failed"
    assert by_step["pooling_speed"]["detail"] == "exited 0 but wrote no pooling_speed.json"
    assert by_step["train_step"]["status"] == "ok" and by_step["train_step"]["json"] == "train_step.json"
    assert by_step["gpu_tests"]["detail"] == "2 passed, 1 skipped"
    assert summary["failed"] == ["pooling_speed"]


def _pooling_row(head: str, tokens: int, ms: float) -> dict[str, Any]:
    return {
        "head": head,
        "tokens": tokens,
        "ms": ms,
        "min_ms": ms,
        "infer_ms": ms / 3,
        "min_infer_ms": ms / 3,
    }


def test_pooling_targets_use_the_fused_kernel_where_it_ran(suite) -> None:
    """On CUDA the targets are the Triton head's (the factored torch head is slower there); the L = 577
    row says whether both are met, other L carry no verdict."""
    pooling = import_script(REPO / "benchmarks" / "pooling_speed.py", "pooling_speed_for_gpu_suite")
    rows = []
    for tokens, triton_ms in ((197, 1.0), (577, 2.0)):
        rows += [
            _pooling_row("transformer+mean", tokens, 30.0),
            _pooling_row("mean+matmul N64H8", tokens, 1.5),
            _pooling_row("matmul N64H8", tokens, 1.2),
            _pooling_row("temde-reference N64H8", tokens, 40.0),
            _pooling_row("temde-torch N64H8", tokens, 10.0),
            _pooling_row("temde-triton N64H8", tokens, triton_ms),
        ]
    ratios = pooling.ratios(rows, [(64, 8)])
    at_577 = next(r for r in ratios if r["stat"] == "median" and r["tokens"] == 577)
    assert at_577["fast_head"] == "temde-triton N64H8"
    assert at_577["transformer_over_temde"] == pytest.approx(15.0)
    assert at_577["temde_over_mean_matmul"] == pytest.approx(2.0 / 1.5)
    table = suite.pooling_rows({"results": rows, "ratios": ratios})
    assert [(r["tokens"], r["met"]) for r in table] == [(197, None), (577, "yes")]
    # Without the triton head (CPU), the factored torch head is the one compared.
    cpu_rows = [r for r in rows if "triton" not in r["head"]]
    assert {r["fast_head"] for r in pooling.ratios(cpu_rows, [(64, 8)])} == {"temde-torch N64H8"}
    assert [
        r["met"]
        for r in suite.pooling_rows({"results": cpu_rows, "ratios": pooling.ratios(cpu_rows, [(64, 8)])})
    ] == [None, "no"]


def test_the_wheel_folder_is_ignored_and_documented() -> None:
    """--prepare's folder is never committed, and the README gives the one `run` call that carries it."""
    assert ".gpu_suite_wheels/" in (REPO / ".gitignore").read_text().splitlines()
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert "bash benchmarks/gpu_suite.sh --prepare" in readme
    assert 'carry: [".gpu_suite_wheels"]' in readme


def test_steps_past_the_budget_are_failures_not_silent_skips(tmp_path: Path) -> None:
    result = run_suite("--dry-run", out=tmp_path / "out", GPU_SUITE_BUDGET_S="16")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert summary["failed"] == STEPS[1:]  # install is the dry run's own skip
    assert all(s["detail"] == "not run: the suite's 16 s budget is spent" for s in summary["steps"][1:])
