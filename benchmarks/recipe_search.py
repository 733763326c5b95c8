"""Choose the demo's training recipe by k-fold cross-validation, never on the photos it is judged on.

Every recipe is a set of `temde-hf train` flags over a base config. Each runs on folds of a k-fold split of
the images of the train *and* val splits, for several seeds; fold `f` and seed `s` are the same data and
the same initial head for every recipe, so recipes compare pair by pair. The frozen towers' outputs are
computed once and shared by all runs (`--feature-cache-dir`, shared with `make demo`). Results are appended
to the JSON as runs finish, so an interrupted search resumes where it stopped (rerun the same command).

Two data sets, each with its own base config, stages, JSON and RESULTS.md section:

- ``--dataset flickr8k-6k`` (the demo's training set, 6,090 photos, folds of ~1,200 photos): stage ``6k``,
  base `benchmarks/configs/recipe_search_6k_base.yaml` (the demo recipe before this search), JSON
  `results/recipe_search_6k.json`. Staged: ``--grid screen`` (folds 0-2 of 5 x seeds 0, 1) for every
  candidate, then ``--grid confirm`` (5 folds x seeds 0, 1, 2) for the close ones (``--recipes``); the runs
  of the screen are part of the confirmation. Runs go fold by fold across the candidates, so every
  candidate has paired runs early.
- ``--dataset flickr8k-800`` (the earlier demo's 700 train+val photos; the 100 test images are never loaded):
  stages ``head``, ``text``, ``final``, JSON `results/recipe_search.json` (kept as measured).

    python benchmarks/recipe_search.py --dataset flickr8k-6k --stage 6k --grid screen
    python benchmarks/recipe_search.py --dataset flickr8k-6k --stage 6k --grid confirm --recipes "..." "..."
    python benchmarks/recipe_search.py --dataset flickr8k-800 --stage head   # frozen towers: head settings
    python benchmarks/recipe_search.py --dataset flickr8k-6k --report        # table + RESULTS.md section
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section

from temde_hf.convert.towers import offline_towers

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "flickr8k_demo.yaml"  # the chosen recipe (make demo)
# The demo recipe as it was on the Flickr8k-800 sample, byte for byte (quality.py keys its stored runs by the
# file's hash): what quality.py and rerank.py's "demo" rows measured
DEMO_800_CONFIG = REPO / "benchmarks" / "configs" / "flickr8k_800_demo.yaml"
# The demo recipe after the first 6k round (frozen towers, batch 256, no token LayerNorm), byte for byte:
# what the T-EMDE question and the 6k second-stage benchmark measured (the first keys its stored runs by
# the file's text); training their runs with the text tower's top layers does not fit one session here.
FROZEN_6K_CONFIG = REPO / "benchmarks" / "configs" / "flickr8k_6k_frozen_demo.yaml"
# The demo recipe after the second 6k round (the text tower's last 2 layers, mean pooling), byte for byte: what
# the holdout estimate and the T-EMDE question in the fine-tuned setting measured (both key their stored runs
# by the file's text), before that question moved the demo to the T-EMDE head.
TEXT2_6K_CONFIG = REPO / "benchmarks" / "configs" / "flickr8k_6k_text2_demo.yaml"
BASE_CONFIG = REPO / "benchmarks" / "configs" / "recipe_search_base.yaml"  # the 800-photo search's base
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

# The demo's training set. The reference is the demo recipe as it stood before this search (mean pooling,
# flip, token LayerNorm, frozen towers, lr 1e-3, batch 128, 3 epochs); candidates in order of what they
# could change at ten times the data.
TEMDE = ["--sketch_fusion", "concat", "--sketch_warmup_epochs", "1"]
STAGES["6k"] = {
    "demo recipe (mean, flip, token LN, lr 1e-3, batch 128, 3 ep)": [],
    "T-EMDE concat N16 H4 + warm-up 1 ep": [*TEMDE, "--n_sketches", "16", "--n_hyperplanes", "4"],
    "5 epochs": ["--num_train_epochs", "5"],
    "lr 3e-3": ["--learning_rate", "3e-3"],
    "batch 256": ["--per_device_train_batch_size", "256"],
    "no flip": ["--image_flip_augmentation", "false"],
    "no token LayerNorm": ["--token_layer_norm", "false"],
    "T-EMDE concat N32 H6 + warm-up 1 ep": [*TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6"],
    "2 epochs": ["--num_train_epochs", "2"],
    "lr 3e-4": ["--learning_rate", "3e-4"],
    "batch 64": ["--per_device_train_batch_size", "64"],
    "text tower: last 2 of 6 layers, LR x0.1": [
        "--freeze_text_tower", "false", "--text_trainable_layers", "2", "--text_lr_multiplier", "0.1",
    ],
    # the two screen winners of folds 0-1 (seed 0) together
    "batch 256, no token LayerNorm": ["--per_device_train_batch_size", "256", "--token_layer_norm", "false"],
}  # fmt: skip

# The second round at 6k, around the recipe the first chose (the demo's: batch 256, no token LayerNorm) and
# named as increments over it: unfreezing (affordable now that the frozen lower part is cached), the schedule
# once more at the larger batch, and the T-EMDE head on the new recipe.
CHOSEN = STAGES["6k"]["batch 256, no token LayerNorm"]
STAGES["6k-tune"] = {
    "batch 256, no token LayerNorm": CHOSEN,
    "+ text tower: last 2 of 6 layers, LR x0.1": [
        *CHOSEN, "--freeze_text_tower", "false", "--text_trainable_layers", "2", "--text_lr_multiplier", "0.1",
    ],
    "+ image tower: last block + head conv, LR x0.1": [
        *CHOSEN, "--freeze_vision_tower", "false", "--vision_trainable_layers", "1",
        "--vision_lr_multiplier", "0.1",
    ],
    "+ lr 2e-3": [*CHOSEN, "--learning_rate", "2e-3"],
    "+ 4 epochs": [*CHOSEN, "--num_train_epochs", "4"],
    "+ batch 512": [*CHOSEN, "--per_device_train_batch_size", "512"],
    "+ T-EMDE concat N32 H6 + warm-up 1 ep": [*CHOSEN, *TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6"],
    # fold 0's two unfreezing winners together
    "+ text last 2 layers + image last block, LR x0.1": [
        *CHOSEN, "--freeze_text_tower", "false", "--text_trainable_layers", "2", "--text_lr_multiplier", "0.1",
        "--freeze_vision_tower", "false", "--vision_trainable_layers", "1", "--vision_lr_multiplier", "0.1",
    ],
    # the sketch also reads EfficientNet-Lite0's 14 x 14 stage (hidden state 11: 196 tokens of 112 channels)
    "+ T-EMDE concat N32 H6 + warm-up 1 ep, + 14x14 stage tokens": [
        *CHOSEN, *TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6", "--sketch_vision_feature_layers", "11",
    ],
    # the sketch's own knobs around N32 H6: size, the other coder, the weight lambda, the initial temperature
    "+ T-EMDE concat N64 H6 + warm-up 1 ep": [*CHOSEN, *TEMDE, "--n_sketches", "64", "--n_hyperplanes", "6"],
    "+ T-EMDE concat N32 K64 anchor coder + warm-up 1 ep": [
        *CHOSEN, *TEMDE, "--n_sketches", "32", "--sketch_coder", "anchor", "--sketch_width", "64",
    ],
    "+ T-EMDE concat N32 H6 + warm-up 1 ep, lambda 0.5": [
        *CHOSEN, *TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6", "--sketch_weight", "0.5",
    ],
    "+ T-EMDE concat N32 H6 + warm-up 1 ep, tau 0.5": [
        *CHOSEN, *TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6", "--sketch_temperature", "0.5",
    ],
}  # fmt: skip
# The T-EMDE question in the fine-tuned setting: the sketch on top of the second round's winner (the text
# tower's last 2 layers training), against that winner; its runs are reused from stage 6k-tune.
TEXT_TOP2 = "+ text tower: last 2 of 6 layers, LR x0.1"
STAGES["6k-tuned-temde"] = {
    TEXT_TOP2: STAGES["6k-tune"][TEXT_TOP2],
    "text top 2, + T-EMDE concat N32 H6 + warm-up 1 ep, + 14x14 stage tokens": [
        *STAGES["6k-tune"][TEXT_TOP2], *TEMDE, "--n_sketches", "32", "--n_hyperplanes", "6",
        "--sketch_vision_feature_layers", "11",
    ],
}  # fmt: skip


class Dataset(NamedTuple):
    """One data set's search: its base config (the data path is in it), stages, JSON and RESULTS.md section."""

    base_config: Path
    stages: tuple[str, ...]
    results: Path
    section: str
    description: str
    eval_steps: int  # how often the held-out fold is scored (the curve); rarer on the larger set


DATASETS = {
    "flickr8k-6k": Dataset(
        REPO / "benchmarks" / "configs" / "recipe_search_6k_base.yaml", ("6k", "6k-tune", "6k-tuned-temde"),
        REPO / "benchmarks" / "results" / "recipe_search_6k.json", "recipe_search_6k",
        "flickr8k-6k train+val (6,090 images, folds of 1,218); the Flickr8k-800 photos the demo is judged on "
        "are never loaded", 190,
    ),
    "flickr8k-800": Dataset(
        BASE_CONFIG, ("head", "text", "final"), RESULTS, "recipe_search",
        "flickr8k-800 train+val (700 images); the 100 test images are never loaded", 10,
    ),
}  # fmt: skip
# (folds run, seeds) of each grid: the screen for every candidate, the confirmation for the close ones.
GRIDS = {"screen": ((0, 1, 2), (0, 1)), "confirm": ((0, 1, 2, 3, 4), (0, 1, 2))}


def _key(fold: int, seed: int) -> str:
    """A run's key inside its recipe: the same (fold, seed) pairs runs across recipes."""
    return f"fold {fold} | seed {seed}"


def _relative(path: Path) -> str:
    """The tower path as `make demo` passes it (relative to the working directory): the cache key of the
    text tower's outputs includes the tokenizer's path, so this is what lets the search and the demo share
    their cached outputs."""
    return os.path.relpath(path)


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
    cache_dir: Path | None = None,
    eval_steps: int = 10,
) -> dict:
    """One training run (`split_flags` says what it trains and evaluates on); its final eval metrics,
    eval curve, the sketch parts' RSUM (concat models) and its time. The frozen towers' outputs are cached
    in `cache_dir` (default: WORK/cache)."""
    from temde_hf.training.train import main

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(config), "--vision_model_path", _relative(towers[0]), "--text_model_path", _relative(towers[1]),
        *split_flags, "--seed", str(seed),
        "--output_dir", str(out), "--feature_cache_dir", str(cache_dir or work / "cache"), "--report_to", "none",
        "--disable_tqdm", "true", "--save_steps", "0", "--eval_steps", str(eval_steps), "--logging_steps", "10",
        *flags,
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
        # the stage's first recipe, whatever order the runs were made in
        reference = next((r for r in STAGES.get(stage, {}) if r in recipes), next(iter(recipes)))
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


def _spread(stats: dict[str, float], spec: str, unit: str = "runs") -> str:
    """mean ± std (n); a single run has no spread, so none is shown (not a misleading ± 0.0)."""
    mean = format(stats["mean"], spec)
    return (
        f"{mean} ± {stats['std']:.1f} ({stats['n']} {unit})" if stats["n"] > 1 else f"{mean} (1 {unit[:-1]})"
    )


def table(rows: list[dict[str, Any]], folds: int) -> str:
    lines = [
        f"| stage | recipe | runs | R@1 i2t | R@1 t2i | RSUM ({folds}-fold CV) | paired Δ vs stage reference | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r.get("paired_delta_rsum")
        delta_text = _spread(delta, "+.1f", "pairs") if delta else "reference"
        lines.append(
            f"| {r['stage']} | {r['recipe']} | {r['rsum']['n']} | {r['i2t_r1']['mean']:.1f} | "
            f"{r['t2i_r1']['mean']:.1f} | {_spread(r['rsum'], '.1f')} | {delta_text} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def schedule(
    recipes: dict[str, list[str]], folds: tuple[int, ...], seeds: tuple[int, ...]
) -> list[tuple[str, int, int]]:
    """(recipe, fold, seed) in run order: seed by seed, fold by fold, every recipe at each (fold, seed)
    before the next, so an interrupted search leaves every candidate with the same paired runs."""
    return [(recipe, fold, seed) for seed in seeds for fold in folds for recipe in recipes]


def _same_run(results: dict[str, Any], stage: str, recipe: str, key: str) -> dict[str, Any] | None:
    """The run of `recipe` at `key` stored under another stage, if any: a stage's reference is often an
    earlier stage's winner, and training is deterministic given flags, fold and seed."""
    for other, recipes in results["stages"].items():
        if (
            other != stage
            and key in recipes.get(recipe, {})
            and results["flags"][recipe] == STAGES[stage][recipe]
        ):
            return recipes[recipe][key]
    return None


def load_results(output: Path) -> dict[str, Any]:
    """The JSON of earlier runs (or a fresh one); earlier files keyed runs "recipe | fold f | seed s"."""
    results = json.loads(output.read_text()) if output.is_file() else {"stages": {}, "flags": {}}
    for recipes in results["stages"].values():
        for recipe, runs in recipes.items():
            recipes[recipe] = {"fold" + key.split("| fold", 1)[1] if "| fold" in key else key: run
                               for key, run in runs.items()}  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="flickr8k-6k")
    parser.add_argument("--stage", choices=sorted(STAGES), action="append", default=[])
    parser.add_argument("--recipes", nargs="*", default=None, help="only these recipes of the stage(s)")
    parser.add_argument("--folds", type=int, default=5, help="the k of the k-fold split")
    parser.add_argument(
        "--grid", choices=sorted(GRIDS), default=None, help="folds and seeds to run (staging)"
    )
    parser.add_argument("--run-folds", type=int, nargs="+", default=None, help="held-out folds to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    parser.add_argument("--work-dir", default="outputs/recipe_search")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument(
        "--feature-cache-dir",
        default="outputs/feature_cache",
        help="cached frozen-tower outputs (make demo's)",
    )
    parser.add_argument("--output", default=None, help="the data set's JSON by default")
    parser.add_argument("--report", action="store_true", help="only print the table and write RESULTS.md")
    parser.add_argument("--list", action="store_true", help="print the recipes of the stage(s), one per line")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(recipe for stage in args.stage for recipe in STAGES[stage]))
        return {}
    dataset = DATASETS[args.dataset]
    for stage in args.stage:
        if stage not in dataset.stages:
            parser.error(
                f"--stage {stage} is not a stage of --dataset {args.dataset} ({', '.join(dataset.stages)})"
            )
    grid_folds, grid_seeds = GRIDS[args.grid] if args.grid else (tuple(range(args.folds)), (0, 1))
    run_folds = tuple(args.run_folds if args.run_folds is not None else grid_folds)
    seeds = tuple(args.seeds if args.seeds is not None else grid_seeds)
    if any(not 0 <= f < args.folds for f in run_folds):
        parser.error(f"--run-folds must be in 0 .. {args.folds - 1}")
    output, results_md, _ = smoke_paths(args.work_dir, args.output or dataset.results, args.smoke, REPO)
    results = load_results(output)
    if results.get("folds", args.folds) != args.folds:
        parser.error(
            f"{output} holds a {results['folds']}-fold search; --folds {args.folds} would not pair with it"
        )
    results.update(
        folds=args.folds, config=str(dataset.base_config.relative_to(REPO)), data=dataset.description
    )
    if not args.report:
        work = Path(args.work_dir)
        towers, smoke_flags = (
            smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
        )
        cache_dir = Path(args.work_dir) / "smoke" / "cache" if args.smoke else Path(args.feature_cache_dir)
        for stage in args.stage:
            recipes = {r: f for r, f in STAGES[stage].items() if args.recipes is None or r in args.recipes}
            for recipe, flags in recipes.items():
                results["flags"][recipe] = flags
                results["stages"].setdefault(stage, {}).setdefault(recipe, {})
            for recipe, fold, seed in schedule(recipes, run_folds, seeds):
                runs, key = results["stages"][stage][recipe], _key(fold, seed)
                if key in runs:
                    continue  # done in an earlier (interrupted) search
                # the same recipe (its name fixes its flags) at the same fold and seed, run for another stage
                earlier = _same_run(results, stage, recipe, key)
                if earlier is not None:
                    runs[key] = earlier
                    continue
                runs[key] = run_one(
                    [*recipes[recipe], *smoke_flags],
                    cv_flags(fold, args.folds),
                    seed,
                    work,
                    towers,
                    dataset.base_config,
                    cache_dir=cache_dir,
                    eval_steps=dataset.eval_steps,
                )
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(results, indent=1))
                print(f"{recipe} | {key}: RSUM {runs[key]['final']['rsum']:.1f} ({runs[key]['seconds']:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
    rows = summarise(results)
    results["summary"] = rows
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    text = table(rows, args.folds)
    print(text)
    stages = " ".join(f"--stage {s}" for s in results["stages"])
    command = f"python benchmarks/recipe_search.py --dataset {args.dataset} {stages}"
    write_section(
        results_md,
        dataset.section,
        f"    {command}\n\n{results['data']}; {args.folds} folds; runs = held-out folds x seeds, paired by "
        "(fold, seed) with the stage's reference (the paired difference is over the runs both have).\n\n"
        + text,
    )
    return results


if __name__ == "__main__":
    main()
