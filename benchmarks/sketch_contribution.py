"""What the sketch adds inside a trained `concat` head: val RSUM of the fused embedding vs its two parts.

A `concat` embedding is `[ê, sqrt(λ/N)·Ŝ]`, so one trained model can be scored with the pooled part
alone, the sketch part alone and both. Comparing *within* a model removes the seed-to-seed spread that
dominates comparisons between separately trained heads. Val split only.

    python benchmarks/sketch_contribution.py [--seeds 0 1 2] [--output benchmarks/results/sketch_contribution.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from temde_hf.demo import DemoArguments, build_model, build_towers, cached_features
from temde_hf.evaluation.folds import evaluate_embeddings
from temde_hf.training.frozen import (
    HeadTrainingArguments,
    TowerFeatures,
    embed_cached,
    train_head,
)

SETTINGS: dict[str, tuple[dict, dict]] = {
    "concat soft_dlsh": ({"sketch_fusion": "concat"}, {}),
    "concat soft_dlsh + warm-up": ({"sketch_fusion": "concat"}, {"sketch_warmup_epochs": 1}),
}
PARTS = ("fused", "pooled part", "sketch part")


@torch.no_grad()
def part_rsums(model: torch.nn.Module, feats: TowerFeatures) -> dict[str, float]:
    """Val RSUM of the fused embedding `(.., D + N·K)`, its first D dims and its last N·K dims."""
    images, texts = embed_cached(model, feats)
    d = model.config.projection_dim
    slices = {"fused": slice(None), "pooled part": slice(0, d), "sketch part": slice(d, None)}

    def rsum(part: slice) -> float:
        result = evaluate_embeddings(images[:, part], texts[:, part], feats.caption_to_image, fold_size=None)
        return result["full"]["rsum"]

    return {name: rsum(part) for name, part in slices.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/sketch_contribution.json")
    args = parser.parse_args(argv)
    demo = DemoArguments()
    towers = build_towers(demo.work_dir)
    model, processor = build_model(demo, *towers)
    train, val = (cached_features(model, processor, demo, split) for split in ("train", "val"))
    results = {}
    for name, (setting, training) in SETTINGS.items():
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model, _ = build_model(demo, *towers, **setting)
            head_args = HeadTrainingArguments(epochs=args.epochs, eval_every=1, seed=seed, **training)
            train_head(model, train, val, head_args, progress=False)
            runs.append(part_rsums(model, val))
        gains = [r["fused"] - r["pooled part"] for r in runs]
        results[name] = {"runs": runs, "gain_over_pooled_part": gains, "mean_gain": statistics.fmean(gains)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"split": "val", "seeds": args.seeds, "epochs": args.epochs, "results": results}
    output.write_text(json.dumps(payload, indent=2))
    print(
        f"{'head (val RSUM per seed)':<30}" + "".join(f"{p:>26}" for p in PARTS) + f"{'fused − pooled':>20}"
    )
    for name, r in results.items():
        cells = "".join(f"{' / '.join(f'{run[p]:.1f}' for run in r['runs']):>26}" for p in PARTS)
        print(f"{name:<30}{cells}{r['mean_gain']:>+20.1f}")
    return payload


if __name__ == "__main__":
    main()
