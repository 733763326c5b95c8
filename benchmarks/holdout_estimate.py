"""What the demo recipe scores on galleries it never saw, at the sizes it is judged at: an estimate, not a choice.

The demo checkpoint is judged on unseen Flickr8k photos: a 1,000-photo gallery stored squashed to 224 x 224
like the shared Flickr8k-6k set, and 200 natural-shape photos; RSUM falls as the gallery grows. This script
trains the demo recipe of the second 6k round (`benchmarks/configs/flickr8k_6k_text2_demo.yaml`: the text
tower's last 2 layers, mean pooling; through the trainer, as `make demo` does) on the 5,090 train photos of Flickr8k-6k only and evaluates the saved checkpoint from pixels on its 1,000 val photos
(5,000 captions) as one gallery, and on each of the five disjoint 200-photo blocks of them, for a few
seeds: stage 1, and with the alignment rerank at the defaults a user gets (`temde-hf evaluate --rerank
alignment`, on the 1,000-photo gallery). Nothing is chosen here: the recipe was fixed by `recipe_search.py`
(cross-validation over train + val) before this ran. The frozen towers' outputs live in the demo's cache
folder (`--feature-cache-dir`). Stored runs of the same recipe are kept: a rerun trains only missing seeds.

    python benchmarks/holdout_estimate.py [--seeds 0 1 2]
    python benchmarks/holdout_estimate.py --smoke --seeds 0    # tiny towers and data: the harness only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section
from recipe_search import KEYS, REPO, TEXT2_6K_CONFIG, mean_std
from rerank import train_and_score

from temde_hf.convert.towers import offline_towers
from temde_hf.inference.rerank import DEFAULT_RERANK_K, DEFAULT_STAGE1_WEIGHT

RESULTS = REPO / "benchmarks" / "results" / "holdout_estimate.json"
SPLIT_FLAGS = ["--train_split", "train", "--eval_split", "val"]  # 5,090 photos in, 1,000 photos out
SUB_GALLERY = 200  # the size of the smaller judgement gallery
SMOKE_SUB_GALLERY = 4  # the smoke data's evaluation split is smaller than 200 images
RERANKED = (f"alignment K={DEFAULT_RERANK_K}", f"{DEFAULT_STAGE1_WEIGHT:g}")  # the defaults' stored metrics


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", default="outputs/holdout_estimate")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument(
        "--feature-cache-dir",
        default="outputs/feature_cache",
        help="cached frozen-tower outputs (make demo's)",
    )
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    towers, flags = smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
    output, results_md, readme = smoke_paths(args.work_dir, args.output, args.smoke, REPO)
    recipe = TEXT2_6K_CONFIG.read_text()
    sub_gallery = SMOKE_SUB_GALLERY if args.smoke else SUB_GALLERY
    stored = json.loads(output.read_text()) if output.is_file() else {}
    # runs of this recipe and split are kept: a rerun trains only the seeds it lacks (none: the sections are
    # rewritten from the JSON); another recipe starts afresh
    kept = (
        stored.get("runs", {})
        if (stored.get("config"), stored.get("split_flags")) == (recipe, SPLIT_FLAGS)
        else {}
    )
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        if str(seed) not in kept:
            kept[str(seed)] = train_and_score(
                flags,
                SPLIT_FLAGS,
                seed,
                Path(args.work_dir),
                towers,
                ["alignment"],
                0,
                TEXT2_6K_CONFIG,
                cache_dir=None if args.smoke else Path(args.feature_cache_dir),
                sub_gallery=sub_gallery,
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(
                json.dumps({"config": recipe, "split_flags": SPLIT_FLAGS, "runs": kept}, indent=1)
            )
        runs[str(seed)] = kept[str(seed)]
    n_images = f"{runs[str(args.seeds[0])]['eval_images']:,}"
    text = table(runs, n_images, sub_gallery)
    print(text)
    command = "python benchmarks/holdout_estimate.py --seeds " + " ".join(map(str, args.seeds))
    markdown = (
        f"    {command}\n\nThe demo recipe of the second 6k round (`{TEXT2_6K_CONFIG.relative_to(REPO)}`: the text "
        "tower's last 2 layers, mean pooling) trained on the Flickr8k-6k train "
        "photos only, evaluated from pixels on "
        f"its {n_images} val photos as one gallery (5 captions each) and on each disjoint block of "
        f"{sub_gallery} of them; an estimate of the judgements at those sizes, chosen nothing:\n\n" + text
    )
    write_section(results_md, "holdout_estimate", markdown)
    write_section(readme, "holdout_estimate", markdown)
    return runs


if __name__ == "__main__":
    main()
