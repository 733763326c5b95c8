"""Choose the demo's training recipe by k-fold cross-validation, never on the test split.

Every recipe is a set of `temde-hf train` flags over `benchmarks/configs/recipe_search_base.yaml` (the
chosen one is written out as `examples/configs/flickr8k_demo.yaml`). Each runs on
every fold of a k-fold split of the images of the train *and* val splits (Flickr8k-800: 700 images; the
100 test images are never loaded) and for several seeds; fold `f` and seed `s` are the same data and the
same initial head for every recipe, so recipes compare pair by pair. The frozen towers' outputs are
computed once and shared by all runs (`--feature_cache_dir`). Results are appended to the JSON as runs
finish, so an interrupted search resumes where it stopped.

    python benchmarks/recipe_search.py --stage head            # frozen towers: head settings
    python benchmarks/recipe_search.py --stage text            # fine-tuning (part of) the text tower
    python benchmarks/recipe_search.py --report                # table + RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section

from temde_hf.convert.towers import offline_towers

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "flickr8k_demo.yaml"  # the chosen recipe (quality, holdout, rerank)
BASE_CONFIG = REPO / "benchmarks" / "configs" / "recipe_search_base.yaml"  # what this search's flags modify
RESULTS = REPO / "benchmarks" / "results" / "recipe_search.json"
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

# name -> flags over the base config. The first recipe of a stage is its reference for paired differences.
STAGES: dict[str, dict[str, list[str]]] = {
    "head": {
        "base (frozen towers, token LN, mean + concat N32 H6, lr 1e-3, 3 ep)": [],
        "no token LayerNorm": ["--token_layer_norm", "false"],
        "no sketch (mean only)": ["--sketch_fusion", "none"],
        "sketch N16 H4 (K16)": ["--n_sketches", "16", "--n_hyperplanes", "4"],
        "sketch N32 H4 (K16)": ["--n_hyperplanes", "4"],
        "sketch anchor coder": ["--sketch_coder", "anchor"],
        "sketch warm-up 1 ep": ["--sketch_warmup_epochs", "1"],
        "lr 3e-4": ["--learning_rate", "3e-4"],
        "lr 3e-3": ["--learning_rate", "3e-3"],
        "1.5 epochs": ["--num_train_epochs", "1.5"],
        "6 epochs": ["--num_train_epochs", "6"],
        "weight decay 0.1": ["--weight_decay", "0.1"],
        "batch 64": ["--per_device_train_batch_size", "64"],
        "one caption per image per epoch (15 ep)": ["--sampling", "images", "--num_train_epochs", "15"],
        "VSE++ hinge (max violation)": ["--loss_type", "vse_hinge"],
    },
    "text": {
        "text tower frozen (reference)": [],
        "text tower: last 2 of 6 layers, LR x0.1": [
            "--freeze_text_tower", "false", "--text_trainable_layers", "2", "--text_lr_multiplier", "0.1",
        ],
        "text tower: all layers, LR x0.1": ["--freeze_text_tower", "false", "--text_lr_multiplier", "0.1"],
        "text tower: all layers, LR x0.03": ["--freeze_text_tower", "false", "--text_lr_multiplier", "0.03"],
    },
    # The candidates of the first two stages, each with and without flip augmentation, on 3 seeds x 5 folds.
    "final": {
        "mean only (frozen towers)": ["--sketch_fusion", "none"],
        "mean only + flip": ["--sketch_fusion", "none", "--image_flip_augmentation", "true"],
        "mean only + flip, 4 epochs": ["--sketch_fusion", "none", "--image_flip_augmentation", "true",
                                       "--num_train_epochs", "4"],
        "concat N32 H6 + warm-up": ["--sketch_warmup_epochs", "1"],
        "concat N32 H6 + warm-up + flip": ["--sketch_warmup_epochs", "1", "--image_flip_augmentation", "true"],
        "concat N32 H6 + warm-up + flip, 4 epochs": ["--sketch_warmup_epochs", "1",
                                                     "--image_flip_augmentation", "true", "--num_train_epochs", "4"],
        "concat N16 H4 + warm-up": ["--n_sketches", "16", "--n_hyperplanes", "4", "--sketch_warmup_epochs", "1"],
        "concat N16 H4 + warm-up + flip": ["--n_sketches", "16", "--n_hyperplanes", "4",
                                           "--sketch_warmup_epochs", "1", "--image_flip_augmentation", "true"],
    },
}  # fmt: skip


def _key(fold: int, seed: int) -> str:
    """A run's key inside its recipe: the same (fold, seed) pairs runs across recipes."""
    return f"fold {fold} | seed {seed}"


def cv_flags(fold: int, folds: int) -> list[str]:
    """Train on all folds of the train+val images but `fold`, evaluate on `fold`."""
    return ["--train_split", "train,val", "--cv_folds", str(folds), "--cv_fold", str(fold)]


TEST_FLAGS = ["--train_split", "train,val", "--eval_split", "test"]  # reporting only, never for choices


def run_one(
    flags: list[str],
    split_flags: list[str],
    seed: int,
    work: Path,
    towers: tuple[Path, Path],
    config: Path = CONFIG,
) -> dict:
    """One training run (`split_flags` says what it trains and evaluates on); its final eval metrics,
    eval curve, the sketch parts' RSUM (concat models) and its time."""
    from temde_hf.training.train import main

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(config), "--vision_model_path", str(towers[0]), "--text_model_path", str(towers[1]),
        *split_flags, "--seed", str(seed),
        "--output_dir", str(out), "--feature_cache_dir", str(work / "cache"), "--report_to", "none",
        "--disable_tqdm", "true", "--save_steps", "0", "--eval_steps", "10", "--logging_steps", "10", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    metrics = main(argv)
    seconds = time.perf_counter() - start
    state = json.loads(next((out / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    curve = [(e["step"], e["eval_rsum"]) for e in state["log_history"] if "eval_rsum" in e]
    shutil.rmtree(out, ignore_errors=True)
    parts = {k[len("eval_") :]: v for k, v in metrics.items() if k.endswith("_part_rsum")}
    return {
        "final": {k: metrics[f"eval_{k}"] for k in KEYS},
        "parts": parts,
        "curve": curve,
        "seconds": seconds,
    }


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per recipe: mean ± std of every metric over (fold, seed) runs, and the paired RSUM difference
    against its stage's reference recipe."""
    rows = []
    for stage, recipes in results["stages"].items():
        reference = next(iter(recipes))
        for recipe, runs in recipes.items():
            if not runs:
                continue
            row = {"stage": stage, "recipe": recipe, "flags": results["flags"][recipe]}
            row.update({k: mean_std([r["final"][k] for r in runs.values()]) for k in KEYS})
            row["seconds"] = statistics.fmean(r["seconds"] for r in runs.values())
            shared = [k for k in runs if k in recipes[reference]]
            if recipe != reference and shared:
                deltas = [runs[k]["final"]["rsum"] - recipes[reference][k]["final"]["rsum"] for k in shared]
                row["paired_delta_rsum"] = mean_std(deltas)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], folds: int) -> str:
    lines = [
        f"| stage | recipe | runs | R@1 i2t | R@1 t2i | RSUM ({folds}-fold CV) | paired Δ vs stage reference | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r.get("paired_delta_rsum")
        delta_text = f"{delta['mean']:+.1f} ± {delta['std']:.1f}" if delta else "reference"
        lines.append(
            f"| {r['stage']} | {r['recipe']} | {r['rsum']['n']} | {r['i2t_r1']['mean']:.1f} | "
            f"{r['t2i_r1']['mean']:.1f} | {r['rsum']['mean']:.1f} ± {r['rsum']['std']:.1f} | {delta_text} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), action="append", default=[])
    parser.add_argument("--recipes", nargs="*", default=None, help="only these recipes of the stage(s)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work-dir", default="outputs/recipe_search")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--report", action="store_true", help="only print the table and write RESULTS.md")
    parser.add_argument("--list", action="store_true", help="print the recipes of the stage(s), one per line")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(recipe for stage in args.stage for recipe in STAGES[stage]))
        return {}
    output, results_md, _ = smoke_paths(args.work_dir, args.output, args.smoke, REPO)
    results = json.loads(output.read_text()) if output.is_file() else {"stages": {}, "flags": {}}
    for recipes in results["stages"].values():  # earlier files keyed runs "recipe | fold f | seed s"
        for recipe, runs in recipes.items():
            recipes[recipe] = {"fold" + key.split("| fold", 1)[1] if "| fold" in key else key: run
                               for key, run in runs.items()}  # fmt: skip
    results.update(folds=args.folds, config=str(BASE_CONFIG.relative_to(REPO)),
                   data="flickr8k-800 train+val (700 images); the 100 test images are never loaded")  # fmt: skip
    if not args.report:
        work = Path(args.work_dir)
        towers, smoke_flags = (
            smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
        )
        for stage in args.stage:
            for recipe, flags in STAGES[stage].items():
                if args.recipes is not None and recipe not in args.recipes:
                    continue
                results["flags"][recipe] = flags
                runs = results["stages"].setdefault(stage, {}).setdefault(recipe, {})
                for seed in args.seeds:
                    for fold in range(args.folds):
                        key = _key(fold, seed)
                        if key in runs:
                            continue  # done in an earlier (interrupted) search
                        runs[key] = run_one(
                            [*flags, *smoke_flags],
                            cv_flags(fold, args.folds),
                            seed,
                            work,
                            towers,
                            BASE_CONFIG,
                        )
                        output.parent.mkdir(parents=True, exist_ok=True)
                        output.write_text(json.dumps(results, indent=1))
                        print(f"{recipe} | {key}: RSUM {runs[key]['final']['rsum']:.1f} ({runs[key]['seconds']:.0f} s)",
                              file=sys.stderr, flush=True)  # fmt: skip
    rows = summarise(results)
    results["summary"] = rows
    output.write_text(json.dumps(results, indent=1))
    text = table(rows, args.folds)
    print(text)
    command = "python benchmarks/recipe_search.py " + " ".join(f"--stage {s}" for s in results["stages"])
    write_section(
        results_md,
        "recipe_search",
        f"    {command}\n\n{results['data']}; {args.folds} folds; runs = folds x seeds (0, 1, ...), paired by "
        "(fold, seed) with the stage's reference.\n\n" + text,
    )
    return results


if __name__ == "__main__":
    main()
