"""Quality ablation: the same frozen towers, data and budget for every pooling head, over seeds.

Heads (one model class, chosen by config): the tower's pooler, masked mean, a transformer layer +
mean, and T-EMDE (`concat` / `replace` fusion × `soft_dlsh` / `anchor` coder). Each run trains the
head on cached EfficientNet-Lite0 / MiniLM outputs of the Flickr8k train split, keeps the epoch with
the best *val* RSUM, and reports val and test. A small sweep of N / H / τ is scored on val only.

    python benchmarks/quality.py [--seeds 0 1 2] [--epochs 2] [--output benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from temde_hf.demo import DemoArguments, build_model, build_towers, cached_features
from temde_hf.training.frozen import HeadTrainingArguments, evaluate_cached, train_head

VARIANTS: dict[str, dict] = {
    "pooler": {"pooling": "pooler", "sketch_fusion": "none"},
    "mean": {"pooling": "mean", "sketch_fusion": "none"},
    "transformer layer + mean": {"pooling": "attention", "sketch_fusion": "none"},
    "T-EMDE concat soft_dlsh": {"sketch_fusion": "concat", "sketch_coder": "soft_dlsh"},
    "T-EMDE replace soft_dlsh": {"sketch_fusion": "replace", "sketch_coder": "soft_dlsh"},
    "T-EMDE concat anchor": {"sketch_fusion": "concat", "sketch_coder": "anchor"},
    "T-EMDE replace anchor": {"sketch_fusion": "replace", "sketch_coder": "anchor"},
}
SWEEP: dict[str, dict] = {
    "concat N=16 H=6": {"sketch_fusion": "concat", "n_sketches": 16},
    "concat N=64 H=6": {"sketch_fusion": "concat", "n_sketches": 64},
    "concat N=32 H=4": {"sketch_fusion": "concat", "n_hyperplanes": 4},
    "concat N=32 H=6 tau=0.3": {"sketch_fusion": "concat", "sketch_temperature": 0.3},
}
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def run(setting: dict, seed: int, epochs: int, feats: dict, towers: tuple, demo: DemoArguments) -> dict:
    torch.manual_seed(seed)
    model, _ = build_model(demo, *towers, **setting)
    train_head(model, feats["train"], feats["val"], HeadTrainingArguments(epochs=epochs, eval_every=1, seed=seed),
               progress=False)  # fmt: skip
    return {"val": evaluate_cached(model, feats["val"]), "test": evaluate_cached(model, feats["test"])}


def summarise(runs: list[dict], split: str) -> dict:
    out = {}
    for key in KEYS:
        values = [r[split][key] for r in runs]
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [results[n]["test"]["rsum"]["mean"] for n in names]
    stds = [results[n]["test"]["rsum"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(names, means, xerr=stds, color=["tab:gray"] * 3 + ["tab:blue"] * (len(names) - 3))
    ax.set_xlim(min(means) - 40, max(means) + 20)
    ax.set_xlabel("test RSUM (mean ± std over seeds)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/quality.json")
    args = parser.parse_args(argv)
    demo = DemoArguments()
    towers = build_towers(demo.work_dir)
    model, processor = build_model(demo, *towers)
    feats = {split: cached_features(model, processor, demo, split) for split in ("train", "val", "test")}
    results, sweep = {}, {}
    start = time.time()
    for name, setting in VARIANTS.items():
        runs = [run(setting, seed, args.epochs, feats, towers, demo) for seed in args.seeds]
        results[name] = {
            "setting": setting,
            "runs": runs,
            "val": summarise(runs, "val"),
            "test": summarise(runs, "test"),
        }
        print(f"{name:<28} test RSUM {results[name]['test']['rsum']['mean']:6.1f} ± "
              f"{results[name]['test']['rsum']['std']:4.1f}   ({time.time() - start:.0f} s)", file=sys.stderr)  # fmt: skip
    if not args.no_sweep:
        for name, setting in SWEEP.items():
            runs = [run(setting, seed, args.epochs, feats, towers, demo) for seed in args.seeds[:2]]
            sweep[name] = {"setting": setting, "val": summarise(runs, "val")}
    payload = {
        "data": "flickr8k-800: train 600 / val 100 / test 100 images, 5 captions each",
        "towers": "EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, frozen, cached outputs",
        "budget": f"{args.epochs} epochs over all train pairs, batch 128, AdamW 2e-3, best val epoch kept",
        "seeds": args.seeds,
        "results": results,
        "sweep_val": sweep,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    plot(results, output.with_suffix(".png"))
    header = f"{'head':<28}" + "".join(f"{k:>14}" for k in KEYS)
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        cells = "".join(f"{r['test'][k]['mean']:8.1f} ±{r['test'][k]['std']:4.1f}" for k in KEYS)
        print(f"{name:<28}{cells}")
    if sweep:
        print("\nsweep (val RSUM, mean over 2 seeds):")
        for name, r in sweep.items():
            print(f"  {name:<28}{r['val']['rsum']['mean']:8.1f} ±{r['val']['rsum']['std']:4.1f}")
    return payload


if __name__ == "__main__":
    main()
