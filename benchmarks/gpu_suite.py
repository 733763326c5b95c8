"""The Python half of `gpu_suite.sh`: what the shell steps need that is easier said in Python.

    python benchmarks/gpu_suite.py env --output ENV.json            # imports + versions (the `imports` step)
    python benchmarks/gpu_suite.py towers --towers base --output DIR   # model config + processor to train
    python benchmarks/gpu_suite.py train-record RUN_DIR --output J.json --seconds S --max-steps N
    python benchmarks/gpu_suite.py summary --steps STEPS.tsv --output OUT/gpu_suite.json ...
    python benchmarks/gpu_suite.py report OUT                       # OUT's JSON -> results/ + RESULTS.md

`report` is the step run here, after a GPU run: it copies the suite's JSON into `benchmarks/results/`
and writes the `gpu_suite` section of `benchmarks/RESULTS.md` through `common.write_section`, the
writer of every generated section. A dry run's JSON (CPU, tiny sizes) is never written there: with
``--results-md`` / ``--results-dir`` elsewhere it renders the same section as a preview.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import device_info, tower_configs, write_json, write_section

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION = "gpu_suite"
TARGET_TOKENS = 577  # the pooling targets' L (ViT-L/14 at 336 px)
# Modules the GPU steps import, and the distributions whose versions the summary records.
REQUIRED_MODULES = (
    "torch", "transformers", "accelerate", "datasets", "evaluate", "triton", "pytest", "matplotlib",
    "temde_hf", "temde_hf.training.train", "temde_hf.models.temde.triton_sketch_temde",
)  # fmt: skip
VERSIONS = (
    "torch", "transformers", "accelerate", "triton", "datasets", "evaluate", "faiss-cpu", "pyarrow",
    "fsspec", "dill", "multiprocess", "huggingface-hub", "numpy", "temde_hf",
)  # fmt: skip
# Step -> the JSON it writes under $OUT (the summary links them; `report` copies them).
STEP_JSON = {
    "pooling_speed": "pooling_speed.json",
    "encode_throughput": "encode_throughput.json",
    "train_step": "train_step.json",
    "train_bf16": "train_bf16.json",
}
# Step -> its name in benchmarks/results/ once reported (the CPU files keep their own names).
RESULT_NAMES = {
    "pooling_speed": "pooling_speed_cuda.json",
    "encode_throughput": "encode_throughput_cuda_base.json",
    "train_step": "train_step_cuda_base.json",
    "train_bf16": "train_bf16_cuda.json",
}


class SuiteError(Exception):
    """Bad input to a subcommand: reported as one line."""


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def env_info(require_cuda: bool) -> dict[str, Any]:
    """Import every module the GPU steps use; versions, the device and what failed to import."""
    failed = {}
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:  # any import failure is the finding, whatever its type
            failed[module] = f"{type(error).__name__}: {error}"
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in VERSIONS},
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_cuda": torch.version.cuda,
        "import_failures": failed,
    }
    if require_cuda and not info["cuda_available"]:
        failed["torch.cuda"] = "no CUDA device is visible"
    return info


def write_towers(towers: str, output: Path) -> None:
    """`output/config.json` (a random-init T-EMDE config on the preset's towers), `output/image` (its image
    processor) and `output/text` (the tiny word-piece tokenizer; its ids fit any BERT vocabulary)."""
    from transformers import ViTImageProcessor

    from temde_hf.models.temde import TemdeConfig
    from temde_hf.testing import tiny_processor

    vision, text, sizes = tower_configs(towers)
    head = {"tiny": (16, 4, 3), "base": (256, 32, 6)}[towers]  # D, N, H
    config = TemdeConfig(
        vision_config=vision,
        text_config=text,
        projection_dim=head[0],
        n_sketches=head[1],
        n_hyperplanes=head[2],
        pooling="mean",
        sketch_fusion="concat",
    )
    config.save_pretrained(output)
    side = sizes["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(output / "image")
    tiny_processor().tokenizer.save_pretrained(output / "text")


def train_record(run_dir: Path, seconds: float, max_steps: int, towers: str) -> dict[str, Any]:
    """The bf16 trainer run's JSON from its folder: settings, losses, final metrics, wall seconds.

    Raises:
        SuiteError: The run did not finish (no final metrics), stopped early or its loss is not finite.
    """
    import torch
    import yaml

    metrics_path = run_dir / "final_metrics.json"
    if not metrics_path.is_file():
        raise SuiteError(f"train-record: {metrics_path} is missing (the trainer did not finish)")
    metrics = json.loads(metrics_path.read_text())
    settings = yaml.safe_load((run_dir / "run_settings.yaml").read_text())
    states = sorted(run_dir.glob("checkpoints/*/trainer_state.json"))
    history = json.loads(states[-1].read_text()).get("log_history", []) if states else []
    losses = [row["loss"] for row in history if "loss" in row]
    results = {
        "wall_s": seconds,
        "global_step": int(metrics["global_step"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": metrics.get("train_loss"),
        "eval_rsum": metrics.get("eval_rsum"),
    }
    payload = {
        "benchmark": "train_bf16",
        "env": device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "settings": {
            "towers": towers,
            "mixed_precision": settings["training"]["mixed_precision"],
            "use_cpu": settings["training"]["use_cpu"],
            "max_steps": max_steps,
            "per_device_train_batch_size": settings["training"]["per_device_train_batch_size"],
            "synthetic_images": settings["data"]["synthetic_images"],
        },
        "results": results,
    }
    if results["global_step"] != max_steps:
        raise SuiteError(f"train-record: the run stopped at step {results['global_step']}, not {max_steps}")
    if not all(
        isinstance(v, float) and math.isfinite(v) for v in (results["first_loss"], results["last_loss"])
    ):
        raise SuiteError(
            f"train-record: the loss is not finite ({results['first_loss']} -> {results['last_loss']})"
        )
    return payload


def junit_counts(path: Path) -> dict[str, int] | None:
    """`{"tests", "failures", "errors", "skipped"}` of a pytest JUnit XML file (None if absent)."""
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def summarize(steps_tsv: Path, out: Path, mode: str, env_path: Path, junit: Path) -> dict[str, Any]:
    """Every step's status (ok / failed / skipped, with its reason) and where its JSON is."""
    with steps_tsv.open() as handle:
        steps = [dict(row) for row in csv.DictReader(handle, delimiter="\t")]
    tests = junit_counts(junit)
    for step in steps:
        step["seconds"] = float(step["seconds"])
        name = STEP_JSON.get(step["step"])
        step["json"] = name if name and (out / name).is_file() else None
        if step["status"] == "ok" and name and step["json"] is None:
            step["status"], step["detail"] = "failed", f"exited 0 but wrote no {name}"
        if step["step"] == "gpu_tests" and step["status"] == "ok":
            if tests is None:
                step["status"], step["detail"] = "failed", "pytest wrote no JUnit report"
            elif tests["tests"] == 0:
                step["status"], step["detail"] = "failed", "no gpu-marked test was collected"
            elif tests["skipped"] == tests["tests"]:
                step["status"] = "skipped"
                step["detail"] = f"no CUDA device: all {tests['tests']} gpu-marked tests skipped"
            else:
                step["detail"] = f"{tests['tests'] - tests['skipped']} passed, {tests['skipped']} skipped"
    env = json.loads(env_path.read_text()) if env_path.is_file() else None
    return {
        "benchmark": "gpu_suite",
        "mode": mode,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "gpu_tests": tests,
        "steps": steps,
        "failed": [s["step"] for s in steps if s["status"] == "failed"],
    }


# --- report: the RESULTS.md section ------------------------------------------------------------------


def _load(folder: Path, step: str) -> dict[str, Any] | None:
    path = folder / STEP_JSON[step]
    return json.loads(path.read_text()) if path.is_file() else None


def _met(transformer_over_temde: float | None, temde_over_floor: float | None) -> str:
    if transformer_over_temde is None or temde_over_floor is None:
        return "not measured"
    return "yes" if transformer_over_temde >= 10 and temde_over_floor <= 2 else "no"


def pooling_rows(pooling: dict[str, Any], tokens: int | None = None) -> list[dict[str, Any]]:
    """The pooling targets per sketch and L (median rounds), with the fast head's time and peak memory."""
    by_head = {(r["head"], r["tokens"]): r for r in pooling["results"]}
    rows = []
    for ratio in pooling["ratios"]:
        if ratio["stat"] != "median" or (tokens is not None and ratio["tokens"] != tokens):
            continue
        fast = by_head.get((ratio["fast_head"], ratio["tokens"]), {})
        transformer, floor = ratio["transformer_over_temde"], ratio["temde_over_mean_matmul"]
        rows.append({
            "sketch": ratio["sketch"], "tokens": ratio["tokens"], "head": ratio["fast_head"],
            "ms": fast.get("ms"), "peak_mib": fast.get("peak_mib"),
            "transformer_over_temde": transformer, "temde_over_mean_matmul": floor,
            "met": _met(transformer, floor) if ratio["tokens"] == TARGET_TOKENS else None,
        })  # fmt: skip
    return rows


def render_section(folder: Path, suite: dict[str, Any]) -> str:
    """The Markdown of the `gpu_suite` section from a suite's output folder."""
    from temde_hf.evaluation.tables import format_table

    env = suite.get("env") or {}
    versions = env.get("versions", {})
    device = env.get("gpu") or "CPU (dry run)"
    lines = [
        *(
            ["**Dry run (CPU, tiny sizes): these are not GPU numbers.**", ""]
            if suite["mode"] != "gpu"
            else []
        ),
        "    bash benchmarks/gpu_suite.sh          # on the GPU machine (see benchmarks/README.md)",
        "    bash benchmarks/gpu_suite.sh --report OUT   # here: this section and results/*_cuda*.json",
        "",
        f"**{device}**, Python {env.get('python')}, torch {versions.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"triton {versions.get('triton')}, transformers {versions.get('transformers')}, "
        f"accelerate {versions.get('accelerate')}. Suite mode: `{suite['mode']}`, finished {suite.get('finished_at')}.",
        "",
        format_table(suite["steps"], ["step", "status", "seconds", "detail"], float_format=".0f"),
    ]
    pooling = _load(folder, "pooling_speed")
    if pooling:
        settings = pooling["settings"]
        lines += [
            "",
            f"Pooling heads (batch {settings['batch_size']}, dim {settings['dim']}, {settings['dtype']}, "
            f"median of {settings['repeats']} rounds). Target at L = 577: the fused sketch ≥ 10× faster than "
            "transformer layer + mean, and within 2× of mean + one D×(N·H) matmul (fwd+bwd):",
            "",
            format_table(
                pooling_rows(pooling),
                [
                    "sketch",
                    "tokens",
                    "head",
                    "ms",
                    "peak_mib",
                    "transformer_over_temde",
                    "temde_over_mean_matmul",
                    "met",
                ],
                [
                    "sketch",
                    "L",
                    "T-EMDE head",
                    "fwd+bwd ms",
                    "peak MiB",
                    "transformer ÷ T-EMDE (≥ 10)",
                    "T-EMDE ÷ (mean + matmul) (≤ 2)",
                    f"both met (L = {TARGET_TOKENS})",
                ],
            ),
        ]
    encode = _load(folder, "encode_throughput")
    if encode:
        s = encode["settings"]
        lines += [
            "",
            f"Encode throughput ({s['towers']} towers, batch {s['batch_size']}, {s['dtype']}). "
            "Target: T-EMDE ≥ 0.95× plain pooling:",
            "",
            format_table(
                encode["results"],
                ["variant", "images_per_s", "captions_per_s", "image_ratio_vs_plain", "text_ratio_vs_plain"],
                ["variant", "images/s", "captions/s", "images vs plain", "captions vs plain"],
            ),
        ]
    step = _load(folder, "train_step")
    if step:
        s = step["settings"]
        lines += [
            "",
            f"One training step ({s['towers']} towers, batch {s['batch_size']}, {s['dtype']}, AdamW):",
            "",
            format_table(
                step["results"],
                ["variant", "step_ms", "pairs_per_s", "ratio_vs_plain", "peak_mib"],
                ["variant", "step ms", "pairs/s", "vs plain", "peak MiB"],
            ),
        ]
    train = _load(folder, "train_bf16")
    if train:
        s, r = train["settings"], train["results"]
        lines += [
            "",
            f"The trainer under `accelerate launch` (`--mixed_precision {s['mixed_precision']}`, {s['towers']} "
            f"towers, random init, {s['synthetic_images']} synthetic images, batch "
            f"{s['per_device_train_batch_size']}): {r['global_step']} steps in {r['wall_s']:.0f} s wall "
            f"(start-up, evaluation and saving included), loss {r['first_loss']:.3g} → {r['last_loss']:.3g}.",
        ]
    return "\n".join(lines)


def report(folder: Path, results_dir: Path, results_md: Path) -> Path:
    """Copy the suite's JSON (and the pooling plot) into `results_dir`, write the section into `results_md`.

    Raises:
        SuiteError: `folder` holds no suite summary, or a dry run would be written into the real RESULTS.md.
    """
    summary_path = folder / "gpu_suite.json"
    if not summary_path.is_file():
        raise SuiteError(f"report: {summary_path} is missing; pass the OUT folder of a gpu_suite.sh run")
    suite = json.loads(summary_path.read_text())
    dry = suite["mode"] != "gpu"
    if dry and (results_md.resolve() == RESULTS_MD or results_dir.resolve() == RESULTS_DIR):
        raise SuiteError(
            f"report: {folder} holds a dry run (CPU, tiny sizes), not GPU numbers; it is not written into "
            "benchmarks/RESULTS.md or benchmarks/results/ (pass --results-md and --results-dir elsewhere to preview)"
        )
    results_dir.mkdir(parents=True, exist_ok=True)
    for step, name in RESULT_NAMES.items():
        name = name.replace("cuda", "dry_run") if dry else name
        source = folder / STEP_JSON[step]
        if source.is_file():
            shutil.copyfile(source, results_dir / name)
            if source.with_suffix(".png").is_file():
                shutil.copyfile(source.with_suffix(".png"), (results_dir / name).with_suffix(".png"))
    shutil.copyfile(summary_path, results_dir / ("gpu_suite_dry_run.json" if dry else "gpu_suite_cuda.json"))
    heading = (
        "GPU suite: one H200 call (dry run preview)" if dry else "GPU suite: everything measured on one GPU"
    )
    write_section(results_md, SECTION, render_section(folder, suite), heading=heading)
    return results_md


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="import what the GPU steps need; write versions")
    env.add_argument("--output", type=Path, required=True)
    env.add_argument("--require-cuda", action="store_true")
    towers = sub.add_parser("towers", help="write a random-init model config and a processor to train")
    towers.add_argument("--towers", choices=["tiny", "base"], required=True)
    towers.add_argument("--output", type=Path, required=True)
    record = sub.add_parser("train-record", help="the trainer run's JSON")
    record.add_argument("run_dir", type=Path)
    record.add_argument("--output", type=Path, required=True)
    record.add_argument("--seconds", type=float, required=True)
    record.add_argument("--max-steps", type=int, required=True)
    record.add_argument("--towers", choices=["tiny", "base"], required=True)
    summary = sub.add_parser("summary", help="the suite's summary JSON and table")
    summary.add_argument("--steps", type=Path, required=True)
    summary.add_argument("--output", type=Path, required=True)
    summary.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    summary.add_argument("--env", type=Path, required=True)
    summary.add_argument("--junit", type=Path, required=True)
    rep = sub.add_parser("report", help="OUT's JSON -> benchmarks/results/ and the RESULTS.md section")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    rep.add_argument("--results-md", type=Path, default=RESULTS_MD)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "env":
            info = env_info(args.require_cuda)
            write_json(info, args.output)
            print(json.dumps(info["versions"]), f"gpu={info['gpu']}")
            for module, error in info["import_failures"].items():
                print(f"gpu_suite: cannot import {module}: {error}")
            return 1 if info["import_failures"] else 0
        if args.command == "towers":
            write_towers(args.towers, args.output)
            return 0
        if args.command == "train-record":
            payload = train_record(args.run_dir, args.seconds, args.max_steps, args.towers)
            print(f"wrote {write_json(payload, args.output)}")
            return 0
        if args.command == "summary":
            suite = summarize(args.steps, args.output.parent, args.mode, args.env, args.junit)
            write_json(suite, args.output)
            from temde_hf.evaluation.tables import format_table

            print(
                format_table(
                    suite["steps"], ["step", "status", "seconds", "detail", "json"], float_format=".1f"
                )
            )
            print(f"wrote {args.output}")
            return 1 if suite["failed"] else 0
        print(f"wrote the {SECTION} section of {report(args.folder, args.results_dir, args.results_md)}")
        return 0
    except SuiteError as error:
        print(f"gpu_suite: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
