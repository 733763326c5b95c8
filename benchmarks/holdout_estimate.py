"""What the demo recipes score on galleries they never saw, at the sizes they are judged at: an estimate, not a choice.

The demo checkpoint is judged on unseen Flickr8k photos: a 1,000-photo gallery stored squashed to 224 x 224
like the shared Flickr8k-6k set, and 200 natural-shape photos; RSUM falls as the gallery grows. This script
trains a recipe (`--recipe`, `RECIPES`: `demo`, the T-EMDE recipe `make demo` ships,
`examples/configs/flickr8k_demo.yaml`; or `text2-mean`, the mean-pooling recipe it replaced,
`benchmarks/configs/flickr8k_6k_text2_demo.yaml`; through the trainer, as `make demo` does) on the 5,090
train photos of Flickr8k-6k only and evaluates the saved checkpoint from pixels on its 1,000 val photos
(5,000 captions) as one gallery, and on each of the five disjoint 200-photo blocks of them, for a few
seeds: stage 1, and with the alignment rerank at the defaults a user gets (`temde-hf evaluate --rerank
alignment`, on the 1,000-photo gallery). Nothing is chosen here: the recipes were fixed by `recipe_search.py`
(cross-validation over train + val) before this ran. The frozen towers' outputs live in the demo's cache
folder (`--feature-cache-dir`). Each recipe's runs are stored under its name in one JSON and kept while its
config text is unchanged: a rerun trains only missing seeds. The section shows every recipe with runs.

    python benchmarks/holdout_estimate.py --recipe demo [--seeds 0 1 2]
    python benchmarks/holdout_estimate.py --report        # re-render the sections from the JSON, train nothing
    python benchmarks/holdout_estimate.py --smoke --seeds 0    # tiny towers and data: the harness only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, load_report, smoke_paths, smoke_setup, write_section
from recipe_search import CONFIG, KEYS, REPO, TEXT2_6K_CONFIG, mean_std
from rerank import train_and_score

from temde_hf.convert.towers import offline_towers
from temde_hf.inference.rerank import DEFAULT_RERANK_K, DEFAULT_STAGE1_WEIGHT

RESULTS = REPO / "benchmarks" / "results" / "holdout_estimate.json"
SPLIT_FLAGS = ["--train_split", "train", "--eval_split", "val"]  # 5,090 photos in, 1,000 photos out
SUB_GALLERY = 200  # the size of the smaller judgement gallery
SMOKE_SUB_GALLERY = 4  # the smoke data's evaluation split is smaller than 200 images
RERANKED = (f"alignment K={DEFAULT_RERANK_K}", f"{DEFAULT_STAGE1_WEIGHT:g}")  # the defaults' stored metrics
# --recipe name -> (trainer config, what the recipe is to the project); the section shows them in this order
RECIPES: dict[str, tuple[Path, str]] = {
    "demo": (CONFIG, "the recipe `make demo` ships"),
    "text2-mean": (TEXT2_6K_CONFIG, "the recipe `make demo` shipped before its T-EMDE head"),
}
# --smoke: the tiny vision tower has 3 hidden states (embeddings + 2 layers), not EfficientNet-Lite0's 14 x 14
# stage (layer 11); a recipe whose sketch also reads an earlier vision layer reads the tiny tower's middle
# one instead (as temde_question.py's smoke run does); everything else of the recipe is kept
SMOKE_FEATURE_LAYERS = ["--sketch_vision_feature_layers", "1"]
SMOKE_NOTE = (
    "A `--smoke` run: tiny random towers, a generated dataset and each recipe shrunk by the smoke trainer "
    f"flags (and `{' '.join(SMOKE_FEATURE_LAYERS)}` for a sketch over an earlier vision layer); the "
    "heads named below are the configs', the numbers mean nothing."
)


def _metrics(run: dict[str, Any], key: str, weight: str) -> dict[str, float]:
    """A run's metrics with the second stage `key` ("alignment K=20") at fusion weight `weight`."""
    return run["rerank"][key]["metrics"][weight]


def _sub_mean(run: dict[str, Any]) -> dict[str, float]:
    """A run's stage-1 metrics averaged over its 200-photo blocks."""
    blocks = run["stage1_sub_galleries"]
    return {k: sum(block[k] for block in blocks) / len(blocks) for k in KEYS}


def table(runs: dict[str, dict[str, Any]], n_images: str, sub_gallery: int = SUB_GALLERY) -> str:
    """Per seed and mean ± std: R@1/5/10 both ways and RSUM, per gallery and stage."""
    key, weight = RERANKED
    first = next(iter(runs.values()))
    stages = {
        f"{n_images} photos, stage 1": lambda run: run["stage1"],
        f"{n_images} photos, + alignment rerank (K={DEFAULT_RERANK_K}, w={weight})": lambda run: _metrics(
            run, key, weight
        ),
        f"{sub_gallery} photos (mean of the {len(first['stage1_sub_galleries'])} blocks), stage 1": _sub_mean,
    }
    lines = [
        "| seed | gallery, stage | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, pick in stages.items():
        for seed, run in runs.items():
            lines.append(f"| {seed} | {stage} | " + " | ".join(f"{pick(run)[k]:.1f}" for k in KEYS) + " |")
        stats = {k: mean_std([pick(run)[k] for run in runs.values()]) for k in KEYS}
        lines.append(
            f"| mean ± std | {stage} | "
            + " | ".join(f"{s['mean']:.1f} ± {s['std']:.1f}" for s in stats.values())
            + " |"
        )
    return "\n".join(lines)


def _sections(config_text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `model` and `training` sections of a trainer config (YAML text)."""
    import yaml

    config = yaml.safe_load(config_text) or {}
    return config.get("model") or {}, config.get("training") or {}


def _model(config_text: str) -> dict[str, Any]:
    return _sections(config_text)[0]


def head_words(config_text: str) -> str:
    """The head and trained layers a trainer config (YAML text) sets, in words, from its own values."""
    model, training = _sections(config_text)
    head = f"{model.get('pooling', 'mean')} pooling"
    if model.get("sketch_fusion", "none") != "none":
        sketch = (
            f"T-EMDE sketch ({model['sketch_fusion']}, {model.get('sketch_coder', 'soft_dlsh')}, "
            f"{model.get('n_sketches')} sketches x {model.get('n_hyperplanes')} hyperplanes"
        )
        if model.get("sketch_vision_feature_layers"):
            sketch += f", also over vision layers {model['sketch_vision_feature_layers']}"
        if warmup := training.get("sketch_warmup_epochs"):
            sketch += f", its weight off for the first {warmup} epoch{'' if warmup == 1 else 's'}"
        head = f"{sketch}) beside {head}"
    if training.get("freeze_text_tower") is False and training.get("text_trainable_layers"):
        head += (
            f"; the text tower's last {training['text_trainable_layers']} layers training"
            f" at {training.get('text_lr_multiplier', 1)} x the head's learning rate"
        )
    return head


def migrate(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored JSON in the current format: ``{"split_flags", "sub_gallery", "recipes": {name: {"config",
    "runs"}}}``. The first format (``{"config", "split_flags", "runs"}``) measured only the `text2-mean`
    recipe (its 200-photo blocks): its runs become that recipe's, unchanged."""
    if "recipes" in stored or not stored:
        return stored
    return {
        "split_flags": stored["split_flags"],
        "sub_gallery": SUB_GALLERY,
        "recipes": {"text2-mean": {"config": stored["config"], "runs": stored["runs"]}},
    }


def render(stored: dict[str, Any]) -> str:
    """The section: one block (command, recipe, table) per recipe with runs, in `RECIPES` order; a recipe
    without runs is named with the command that measures it."""
    smoke = " --smoke" if stored.get("smoke") else ""
    blocks = [SMOKE_NOTE] if smoke else []
    for name, (config, role) in RECIPES.items():
        entry = stored.get("recipes", {}).get(name)
        path = config.relative_to(REPO)
        if not entry or not entry["runs"]:
            blocks.append(
                f"**`{path}`**, {role}; head: {head_words(config.read_text())}. No stored runs yet; this "
                "measures it:\n\n"
                f"    python benchmarks/holdout_estimate.py{smoke} --recipe {name} --seeds 0 1 2"
            )
            continue
        runs = dict(sorted(entry["runs"].items(), key=lambda item: int(item[0])))
        n_images = f"{next(iter(runs.values()))['eval_images']:,}"
        sub_gallery = stored.get("sub_gallery", SUB_GALLERY)
        command = f"python benchmarks/holdout_estimate.py{smoke} --recipe {name} --seeds " + " ".join(runs)
        blocks.append(
            f"**`{path}`**, {role}; head: {head_words(entry['config'])}.\n\n    {command}\n\n"
            "Trained on the Flickr8k-6k train photos only, evaluated from pixels on the set's "
            f"{n_images} val photos as one gallery (5 captions each) and on each disjoint block of "
            f"{sub_gallery} of them; an estimate of the judgements at those sizes, chosen nothing:\n\n"
            + table(runs, n_images, sub_gallery)
        )
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=list(RECIPES), default="demo", help="the trainer config measured")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", default="outputs/holdout_estimate")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument(
        "--feature-cache-dir",
        default="outputs/feature_cache",
        help="cached frozen-tower outputs (make demo's)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite the sections from --output's stored runs; train nothing",
    )
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    output, results_md, readme = smoke_paths(args.work_dir, args.output, args.smoke, REPO)
    if args.report:
        stored = migrate(load_report(output))
    else:
        stored = migrate(json.loads(output.read_text()) if output.is_file() else {})
        sub_gallery = SMOKE_SUB_GALLERY if args.smoke else SUB_GALLERY
        if (stored.get("split_flags"), stored.get("sub_gallery")) != (SPLIT_FLAGS, sub_gallery):
            stored = {}  # runs of another split or block size: nothing stored compares
        stored = {
            "split_flags": SPLIT_FLAGS,
            "sub_gallery": sub_gallery,
            "recipes": stored.get("recipes", {}),
        }
        if args.smoke:  # the section says so, and its commands carry the flag
            stored["smoke"] = True
        config = RECIPES[args.recipe][0]
        recipe = config.read_text()
        entry = stored["recipes"].get(args.recipe, {})
        # runs of this recipe are kept: a rerun trains only the seeds it lacks; a changed config starts afresh
        runs = entry.get("runs", {}) if entry.get("config") == recipe else {}
        if entry.get("runs") and not runs:
            print(f"{output}: the stored --recipe {args.recipe} runs measured an older {config.name}; "
                  "training afresh", file=sys.stderr)  # fmt: skip
        stored["recipes"][args.recipe] = {"config": recipe, "runs": runs}
        towers, flags = smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
        if args.smoke and _model(recipe).get("sketch_vision_feature_layers"):
            flags = [*flags, *SMOKE_FEATURE_LAYERS]
        for seed in args.seeds:
            if str(seed) in runs:
                continue
            runs[str(seed)] = train_and_score(
                flags,
                SPLIT_FLAGS,
                seed,
                Path(args.work_dir),
                towers,
                ["alignment"],
                0,
                config,
                cache_dir=None if args.smoke else Path(args.feature_cache_dir),
                sub_gallery=sub_gallery,
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(stored, indent=1))
    if not any(entry["runs"] for entry in stored.get("recipes", {}).values()):
        raise SystemExit(f"--report: {output} (--output) holds no runs; run a --recipe first")
    text = render(stored)
    print(text)
    write_section(results_md, "holdout_estimate", text)
    write_section(readme, "holdout_estimate", text)
    return stored


if __name__ == "__main__":
    main()
