"""Retrieve fast, rerank smart on the real towers and photos: does a second stage lift retrieval?

Four things are measured on Flickr8k-800 through the one trainer and `temde-hf evaluate`'s two-stage path,
with the recipe search's base recipe (`benchmarks/configs/recipe_search_base.yaml`: T-EMDE concat N 32 H 6
over frozen, cached EfficientNet-Lite0 + MiniLM; kept fixed so stored runs keep their meaning) or, with
``--recipe demo``, the recipe `make demo` shipped on Flickr8k-800, or, with ``--recipe demo6k``, the recipe it
ships now, trained on the 6,090 Flickr8k-6k photos (`RECIPES`): stage 1 alone (the dual encoder's inner
product); stage 1 + the token-level alignment rerank (TERAN); stage 1 + the matching-head rerank (a
cross-encoder trained with hard negatives mined by the dual encoder); stage 1 after distillation
(VLDeformer-style KL towards the alignment score or the head, at two weights).

Every training variant runs on each fold x seed of the k-fold split of the train+val images (the
recipe search's harness: 700 images, the test images never loaded) and every variant x reranker x K is
scored on the held-out fold, each ordering its K candidates by stage 2 alone or fused with stage 1
(`fuse_scores`, weights `WEIGHTS`); the variant of each row of the report, and the K and fusion weight
of each reranker, are chosen by that cross-validated RSUM. Only then is the test split used: every
variant is trained on all 700 images per seed (the same seeds, so differences are paired) and its saved checkpoint evaluated from
pixels on the 100 test images, with the single-query CPU latency of each stage at K = 20 and 100.

``--recipe demo6k`` does the same at the demo's scale: the k-fold CV runs over the 6,090 Flickr8k-6k photos
(train + val; ``--run-folds`` runs some folds of the split, and the report averages over the folds every
variant has), and the final runs are the demo's (`temde_question.TRAIN_FLAGS`: all 6,090 photos, per seed),
each saved checkpoint scored from pixels on all 800 Flickr8k-800 photos as one gallery (``--gallery``; none
of them in the training set), latencies measured there. The frozen towers' outputs are cached in
``--feature-cache-dir`` (make demo's), shared with the demo and the recipe search.

    python benchmarks/rerank.py --towers-dir outputs [--folds 3] [--cv-seeds 0]
        [--seeds 0 1]
    python benchmarks/rerank.py --report     # tables + the RESULTS.md and README sections from the JSON
    python benchmarks/rerank.py --recipe demo --folds 5   # the same on the demo's recipe (its own JSON)
    python benchmarks/rerank.py --recipe demo6k --folds 5 --run-folds 0 1 2 --cv-seeds 0 --seeds 0 1
    python benchmarks/rerank.py --smoke --folds 2 --seeds 0 --variants base   # tiny: the harness only

Runs are stored in the JSON as they finish, so the search resumes where it stopped; on a shared machine
take the lock per run: ``until flock LOCK python benchmarks/rerank.py --max-runs 1; do :; done`` (exit
status 3 while runs remain).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section
from recipe_search import (
    BASE_CONFIG,
    DEMO_800_CONFIG,
    FROZEN_6K_CONFIG,
    KEYS,
    REPO,
    TEST_FLAGS,
    _relative,
    cv_flags,
    mean_std,
)
from temde_question import GALLERY, TRAIN_FLAGS

KS = (20, 100)
# fusion weights of stage 1 (`fuse_scores`: z(stage 2) + w·z(stage 1) over each query's K); 0 = stage 2 alone.
# A JSON's report uses the weights its first runs had (later runs score a superset).
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
# A CPU-sized matching head: 1 joint-attention layer of width 128 costs ~1/8 of 2 layers of width 256 per pair.
# Every variant with a head uses it: re-scoring K = 100 candidates of each of ~1,400 CV queries per run is
# the benchmark's largest cost on 2 shared cores.
HEAD = ["--itm_layers", "1", "--itm_hidden_size", "128", "--itm_heads", "4"]
# name -> trainer flags over the base recipe (CONFIG), and the rerankers its checkpoint is scored with
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"flags": [], "rerankers": ["alignment"]},
    "alignment loss 0.5": {"flags": ["--alignment_weight", "0.5"], "rerankers": ["alignment"]},
    "matching head on top": {
        "flags": [*HEAD, "--itm_weight", "1", "--itm_detach_tokens", "true"],
        "rerankers": ["itm"],
    },
    "matching head joint": {"flags": [*HEAD, "--itm_weight", "1"], "rerankers": ["itm"]},
    "distill from alignment": {
        "flags": ["--alignment_weight", "0.5", "--distill_weight", "1"],
        "rerankers": ["alignment"],
    },
    "distill from matching head": {
        "flags": [*HEAD, "--itm_weight", "1", "--distill_weight", "1", "--distill_teacher", "itm"],
        "rerankers": ["itm"],
    },
}
VARIANTS["distill from alignment 0.1"] = {
    "flags": ["--alignment_weight", "0.5", "--distill_weight", "0.1"],
    "rerankers": ["alignment"],
}
VARIANTS["distill from matching head 0.1"] = {
    "flags": [*HEAD, "--itm_weight", "1", "--distill_weight", "0.1", "--distill_teacher", "itm"],
    "rerankers": ["itm"],
}
DISTILLED = tuple(v for v in VARIANTS if v.startswith("distill"))
# The recipes measured, each with its own JSON (`results/<name>.json`), RESULTS.md section (`<name>`) and
# README summary (`<name>_summary`): the recipe search's base (where the four rows were measured,
# kept fixed so stored runs keep their meaning), the demo's recipe on Flickr8k-800 (does the shipped model
# gain a stage 2?) and the demo's recipe at its scale (CV on Flickr8k-6k, judged on the Flickr8k-800 photos).
# Each says what it measures in its report: "cv_over" (the CV's images), "final" (the key of the final
# runs: "test seed s" or "judge seed s") and its "label" in the tables, "reported" (the final runs' data)
# and "summary" (the README summary's first sentence); `{images}` / `{captions}` are the final runs' counts.
_ON_TEST = {
    "folds": 3,
    "eval_data": None,
    "cv_over": "the 700 train+val images",
    "final": "test",
    "label": "test",
    "final_text": "test = 100 images / 500 captions",
    "reported": "test** (100 images, 500 captions",
    "summary": "Measured on Flickr8k-800 by `{command}`. {title}; every choice made on CV of the train+val images",
}
RECIPES: dict[str, dict[str, Any]] = {
    "base": {
        **_ON_TEST, "config": BASE_CONFIG, "name": "rerank", "variants": list(VARIANTS),
        "title": "T-EMDE concat N32 H6 recipe (`benchmarks/configs/recipe_search_base.yaml`, frozen towers, cached)",
        "heading": "Two-stage retrieval: rerank (CPU)",
    },
    "demo": {
        **_ON_TEST, "config": DEMO_800_CONFIG, "name": "rerank_demo", "variants": ["base", "alignment loss 0.5"],
        "title": "The demo recipe on Flickr8k-800 (`benchmarks/configs/flickr8k_800_demo.yaml`: mean pooling, flip, "
                 "frozen towers, cached)",
        "heading": "Two-stage retrieval on the demo recipe (CPU)",
    },
    "demo6k": {
        # folds of ~1,218 photos: the standard 1K protocol's gallery size
        "folds": 5, "eval_data": GALLERY, "config": FROZEN_6K_CONFIG, "name": "rerank_6k",
        "variants": ["base", "alignment loss 0.5", "matching head on top", "matching head joint",
                     "distill from alignment 0.1", "distill from matching head 0.1"],
        "title": "The frozen-tower demo recipe of the first 6k round (`benchmarks/configs/flickr8k_6k_frozen_demo.yaml`: "
                 "mean pooling, batch 256, no token LayerNorm, flip, 3 epochs, frozen towers, cached)",
        "heading": "Two-stage retrieval on the demo recipe at 6,090 photos (CPU)",
        "cv_over": "the 6,090 Flickr8k-6k photos (train + val)", "final": "judge", "label": "gallery",
        "final_text": "every variant then trained as `make demo` trains (all 6,090 photos) per seed and judged from "
                      "pixels on all {images:,} Flickr8k-800 photos ({captions:,} captions) as one gallery, none of "
                      "them ever in training",
        "reported": "the unseen gallery** (all {images:,} Flickr8k-800 photos, {captions:,} captions, never in "
                    "training",
        "summary": "Measured by `{command}`. {title}; every choice made on {cv} over the 6,090 Flickr8k-6k photos, "
                   "judged on all {images:,} Flickr8k-800 photos ({captions:,} captions), never in training",
    },
}  # fmt: skip


def _keys(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in KEYS}


def train_and_score(
    flags: list[str], split_flags: list[str], seed: int, work: Path, towers: tuple[Path, Path],
    rerankers: list[str], latency_queries: int, config: Path = BASE_CONFIG, cache_dir: Path | None = None,
    sub_gallery: int | None = None, eval_data: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one run of `config` + `flags`, then score its saved checkpoint from pixels: stage 1, and each
    reranker at each K and fusion weight.

    `cache_dir`: the frozen towers' output cache (default: one under `work`; the tower paths are passed
    relative to the working directory, as `make demo` and the recipe search pass them, so the text tower's
    cache key is theirs); `sub_gallery`: also stage 1 on each disjoint block of this many evaluation images
    (with their captions), in the evaluation order; `eval_data`: score on every image of this data file
    (`load_image_captions`: another gallery than the training data's, e.g. photos never trained on) instead
    of the evaluation split `split_flags` give."""
    import torch

    from temde_hf.data import load_image_captions
    from temde_hf.evaluation.metrics import retrieval_metrics
    from temde_hf.evaluation.rerank import two_stage_metrics
    from temde_hf.inference.rerank import build_reranker
    from temde_hf.inference.tokens import encode_with_tokens
    from temde_hf.loading import load_checkpoint
    from temde_hf.training.arguments import parse_args
    from temde_hf.training.train import load_data
    from temde_hf.training.train import main as train_main

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(config), "--vision_model_path", _relative(towers[0]), "--text_model_path", _relative(towers[1]),
        *split_flags, "--seed", str(seed), "--output_dir", str(out), "--feature_cache_dir", str(cache_dir or work / "cache"),
        "--report_to", "none", "--disable_tqdm", "true", "--save_steps", "0", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    trained = train_main(argv)
    seconds = time.perf_counter() - start
    _, data_args, _ = parse_args(argv)
    if eval_data is None:
        dataset = load_data(data_args, out, seed, accelerator=None).evaluation()
    else:
        dataset = load_image_captions(eval_data)
    model, processor = load_checkpoint(out / "final", with_matching_head="itm" in rerankers)
    length = data_args.max_text_length
    with torch.inference_mode():
        image_embeds, text_embeds, c2i, images, texts = encode_with_tokens(
            model, processor, dataset, max_length=length
        )
        record: dict[str, Any] = {
            "stage1": _keys(retrieval_metrics(caption_to_image=c2i, image_embeds=image_embeds, text_embeds=text_embeds)),
            "trainer_eval_rsum": trained.get("eval_rsum"), "train_seconds": seconds, "rerank": {},
            "eval_images": len(image_embeds), "eval_captions": len(text_embeds),
            "token_bytes_per_image": images.bytes_per_item(), "token_bytes_per_caption": texts.bytes_per_item(),
        }  # fmt: skip
        if sub_gallery:
            record["stage1_sub_galleries"] = [
                _keys(_sub_gallery_metrics(image_embeds, text_embeds, c2i, first, first + sub_gallery))
                for first in range(0, len(image_embeds) - sub_gallery + 1, sub_gallery)
            ]
        for name in rerankers:
            reranker = build_reranker(name, model)
            for k in KS:
                scored = two_stage_metrics(
                    reranker, image_embeds, text_embeds, c2i, images, texts, k,
                    latency_queries=latency_queries, stage1_weights=WEIGHTS,
                )  # fmt: skip
                record["rerank"][f"{name} K={k}"] = {
                    "metrics": {f"{w:g}": _keys(m) for w, m in scored["reranked"].items()},
                    "latency_ms": scored.get("latency_ms"),
                }
    shutil.rmtree(out, ignore_errors=True)
    return record


def _sub_gallery_metrics(
    image_embeds: Any, text_embeds: Any, c2i: Any, first: int, stop: int
) -> dict[str, float]:
    """Stage-1 metrics of images ``first:stop`` and their captions as a gallery of their own."""
    from temde_hf.evaluation.metrics import retrieval_metrics

    keep = (c2i >= first) & (c2i < stop)
    return retrieval_metrics(
        caption_to_image=c2i[keep] - first,
        image_embeds=image_embeds[first:stop],
        text_embeds=text_embeds[keep],
    )


def _reranked(record: dict[str, Any], key: str, weight: str) -> dict[str, float]:
    return record["rerank"][key]["metrics"][weight]


def _per_seed(runs: dict[str, Any], seeds: list[int], folds: Sequence[int], pick: Any) -> list[float]:
    """The CV value of each seed: `pick(record)` averaged over the held-out `folds`."""
    return [statistics.fmean(pick(runs[f"cv fold {f} seed {s}"]) for f in folds) for s in seeds]


def shared_folds(
    runs: dict[str, Any], cv_seeds: list[int], seeds: list[int], folds: int, final: str = "test"
) -> list[int]:
    """The held-out folds the report averages over: those that every variant with all its final runs
    (``"{final} seed s"``) has for every CV seed (all `folds` once every fold ran; a subset when only some
    folds of the split were run, ``--run-folds``)."""
    found = []
    for store in runs.values():
        if all(f"{final} seed {s}" in store for s in seeds):
            done = {f for f in range(folds) if all(f"cv fold {f} seed {s}" in store for s in cv_seeds)}
            if done:  # a variant without one complete fold is left out of the tables (and said so)
                found.append(done)
    return sorted(set.intersection(*found)) if found else []


def summarise(
    runs: dict[str, Any],
    cv_seeds: list[int],
    seeds: list[int],
    folds: int,
    weights: Sequence[float] = WEIGHTS,
    final: str = "test",
) -> dict[str, Any]:
    """CV and final RSUM of every (variant, stage), the choices made on CV (K and fusion weight among
    `weights`), and the paired final deltas.

    The final runs are ``"{final} seed s"`` (the test split, or the unseen gallery of ``--recipe demo6k``);
    their fields keep the name ``test``. CV values average over `shared_folds` (returned as ``cv_folds``)."""
    rows: dict[str, dict[str, Any]] = {}
    cv_folds = shared_folds(runs, cv_seeds, seeds, folds, final)
    for variant, spec in VARIANTS.items():
        store = runs.get(variant, {})
        cv_keys = [f"cv fold {f} seed {s}" for s in cv_seeds for f in cv_folds]
        if not cv_folds or not all(k in store for k in [*cv_keys, *(f"{final} seed {s}" for s in seeds)]):
            continue
        stages = {"stage 1": lambda r: r["stage1"]}
        for name in spec["rerankers"]:
            for k in KS:
                for w in weights:
                    stages[f"+{name} K={k} w={w:g}"] = partial(
                        _reranked, key=f"{name} K={k}", weight=f"{w:g}"
                    )
        for stage, pick in stages.items():
            test = [pick(store[f"{final} seed {s}"])["rsum"] for s in seeds]
            rows[f"{variant} | {stage}"] = {
                "variant": variant, "stage": stage,
                "cv": mean_std(_per_seed(store, cv_seeds, cv_folds, lambda r, pick=pick: pick(r)["rsum"])),
                "test": mean_std(test), "test_per_seed": test,
                "test_r1": [statistics.fmean(pick(store[f"{final} seed {s}"])[k] for s in seeds) for k in ("i2t_r1", "t2i_r1")],
            }  # fmt: skip
    if "base | stage 1" not in rows:
        return {"rows": rows, "cv_folds": cv_folds}
    base = rows["base | stage 1"]
    for row in rows.values():
        row["test_paired_delta"] = mean_std(
            [a - b for a, b in zip(row["test_per_seed"], base["test_per_seed"])]
        )

    def best(candidates: list[str]) -> str | None:
        present = [c for c in candidates if c in rows]
        return max(present, key=lambda c: rows[c]["cv"]["mean"]) if present else None

    choices = {"stage 1 alone": "base | stage 1"}
    for name, label in (
        ("alignment", "stage 1 + alignment rerank"),
        ("itm", "stage 1 + matching-head rerank"),
    ):
        chosen = best([k for k, r in rows.items() if r["stage"].startswith(f"+{name} ")])
        if chosen:
            choices[label] = chosen
    chosen = best([f"{v} | stage 1" for v in DISTILLED])
    if chosen:
        choices["stage 1 after distillation"] = chosen
    choices["best by CV overall"] = best(list(rows))
    return {"rows": rows, "choices": choices, "cv_folds": cv_folds}


def latency(
    runs: dict[str, Any], variant: str, key: str, seeds: list[int], final: str = "test"
) -> dict[str, float]:
    """Per-query milliseconds of each stage (i2t and t2i): the lowest of the final runs' medians.

    Another job on the 2 shared cores only ever adds time (one run measured at load 3.2 took 70-110 ms
    per query where its twin took 0.6-3), so the fastest run is the estimate; every run's medians stay in
    the JSON.
    """
    found = [runs[variant][f"{final} seed {s}"]["rerank"][key]["latency_ms"] for s in seeds]
    return {name: min(f[name] for f in found) for name in found[0]}


def _pm(stat: dict[str, float]) -> str:
    """`mean ± std`, or the mean alone when it is one value (one CV seed: no spread to show)."""
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}" if stat.get("n", 2) > 1 else f"{stat['mean']:.1f}"


def cv_label(folds: int, cv_folds: Sequence[int]) -> str:
    """The CV's name in the report: "5-fold CV", or "folds 0, 1, 2 of a 5-fold CV" when it averages over
    some folds of the split only."""
    if list(cv_folds) == list(range(folds)):
        return f"{folds}-fold CV"
    return f"fold{'s' if len(cv_folds) > 1 else ''} {', '.join(map(str, cv_folds))} of a {folds}-fold CV"


def _sizes(runs: dict[str, Any], seeds: list[int], final: str) -> dict[str, Any]:
    """The final runs' gallery size (`{images}` / `{captions}` of a recipe's texts), where recorded."""
    record = next(
        (v[f"{final} seed {s}"] for v in runs.values() for s in seeds if f"{final} seed {s}" in v), {}
    )
    return {"images": record.get("eval_images"), "captions": record.get("eval_captions")}


def choices_table(
    summary: dict[str, Any],
    runs: dict[str, Any],
    cv_seeds: list[int],
    seeds: list[int],
    folds: int,
    weights: Sequence[float] = WEIGHTS,
    recipe: dict[str, Any] = RECIPES["base"],
) -> list[str]:
    """The issue's rows (each chosen on CV) with their final RSUM, paired Δ and per-query latencies."""
    rows, choices = summary["rows"], summary.get("choices", {})
    final, label = recipe["final"], recipe["label"]
    cv = cv_label(folds, summary.get("cv_folds", range(folds)))
    reported = recipe["reported"].format(**_sizes(runs, seeds, final))
    lines = [
        f"**Chosen on {cv} (seeds {', '.join(map(str, cv_seeds))}), reported on {reported}; "
        f"mean ± std over seeds {', '.join(map(str, seeds))}; Δ = paired difference with stage 1 of "
        "the base model, same seed):",
        "",
        f"| row | variant (chosen by CV) | CV RSUM | {label} RSUM | Δ {label} | {label} R@1 i2t / t2i | ms/query stage 1 (i2t / t2i) | ms/query stage 2 at K=20 | at K=100 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row_label, key in choices.items():
        if row_label == "best by CV overall":
            continue
        r = rows[key]
        ms = {k: "–" for k in ("s1", "20", "100")}
        reranked = r["stage"].startswith("+")
        # "+itm K=20 w=0.5" -> "itm"; a stage-1 row's scan is timed in its variant's (first) reranker runs
        name = r["stage"][1:].split(" ")[0] if reranked else VARIANTS[r["variant"]]["rerankers"][0]
        by_k = {k: latency(runs, r["variant"], f"{name} K={k}", seeds, final) for k in KS}
        ms["s1"] = f"{by_k[20]['stage1_i2t']:.2f} / {by_k[20]['stage1_t2i']:.2f}"
        for k in KS if reranked else ():
            ms[str(k)] = f"{by_k[k]['stage2_i2t']:.1f} / {by_k[k]['stage2_t2i']:.1f}"
        delta = r["test_paired_delta"]
        lines.append(
            f"| {row_label} | {r['variant']} {r['stage'] if r['stage'] != 'stage 1' else ''} | "
            f"{_pm(r['cv'])} | {_pm(r['test'])} | {delta['mean']:+.1f} ± {delta['std']:.1f} | {r['test_r1'][0]:.1f} / {r['test_r1'][1]:.1f} | "
            f"{ms['s1']} | {ms['20']} | {ms['100']} |"
        )
    top = f"w={max(weights):g}"
    at_edge = [
        row_label
        for row_label, key in choices.items()
        if row_label != "best by CV overall" and rows[key]["stage"].endswith(top)
    ]
    if at_edge:
        lines += ["", f"CV chose the largest stage-1 weight searched ({top}) for: {', '.join(at_edge)}; "
                  "a larger weight only moves the order further towards stage 1's."]  # fmt: skip
    return lines


def tables(
    summary: dict[str, Any],
    runs: dict[str, Any],
    cv_seeds: list[int],
    seeds: list[int],
    folds: int,
    weights: Sequence[float] = WEIGHTS,
    recipe: dict[str, Any] = RECIPES["base"],
) -> str:
    rows, label = summary["rows"], recipe["label"]
    lines = choices_table(summary, runs, cv_seeds, seeds, folds, weights, recipe)
    cv = cv_label(folds, summary.get("cv_folds", range(folds)))
    where = "train+val" if recipe["final"] == "test" else "the 6,090 photos"
    lines += ["", f"Every variant and stage ({cv} on {where}; {label}):", "",
              f"| variant | stage | CV RSUM | {label} RSUM | Δ {label} vs base stage 1 |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows.values():
        delta = r.get("test_paired_delta", {"mean": 0.0, "std": 0.0})
        lines.append(
            f"| {r['variant']} | {r['stage']} | {_pm(r['cv'])} | {_pm(r['test'])} | "
            f"{delta['mean']:+.1f} ± {delta['std']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=list(RECIPES), default="base", help="the trainer config measured")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: the recipe's"
    )
    # default: what the JSON's runs used, else the recipe's folds (3; 5 for demo6k), CV seed 0, final seeds 0 1
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--run-folds", type=int, nargs="+", default=None, help="held-out folds to run (all)")
    parser.add_argument("--cv-seeds", type=int, nargs="+", default=None, help="seeds of the CV runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the test (final) runs")
    parser.add_argument("--latency-queries", type=int, default=50)
    parser.add_argument("--work-dir", default="outputs/rerank")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument(
        "--feature-cache-dir",
        default="outputs/feature_cache",
        help="cached frozen-tower outputs (make demo's)",
    )
    parser.add_argument(
        "--gallery",
        type=Path,
        default=None,
        help="--recipe demo6k: the unseen photos judged on (Karpathy JSON)",
    )
    parser.add_argument("--output", default=None, help="default: results/<the recipe's name>.json")
    parser.add_argument("--report", action="store_true", help="only print the tables and write the sections")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (exit 3)")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    final = recipe["final"]
    output, results_md, readme = smoke_paths(
        args.work_dir,
        args.output or REPO / "benchmarks" / "results" / f"{recipe['name']}.json",
        args.smoke,
        REPO,
    )
    stored = json.loads(output.read_text()) if output.is_file() else {}
    runs = stored.setdefault("runs", {})
    if args.folds is not None and runs and stored.get("folds", args.folds) != args.folds:
        parser.error(
            f"{output} holds {stored['folds']}-fold runs; --folds {args.folds} would not pair with them"
        )
    for name, default in (("folds", recipe["folds"]), ("cv_seeds", [0]), ("seeds", [0, 1])):
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name, default))
    run_folds = args.run_folds if args.run_folds is not None else list(range(args.folds))
    if any(not 0 <= f < args.folds for f in run_folds):
        parser.error(f"--run-folds must be in 0 .. {args.folds - 1}")
    weights = stored.get("weights", list(WEIGHTS))  # every stored run has these (new runs score WEIGHTS ⊇)
    if not set(weights) <= set(WEIGHTS):
        raise SystemExit(f"{output}: its runs used fusion weights {weights}, not all in {list(WEIGHTS)}")
    requested = args.variants or recipe["variants"]
    variants = [v for v in VARIANTS if v in stored.get("variants", {}) or v in requested]

    def save() -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(stored, indent=1))

    done = 0
    if not args.report:
        from temde_hf.convert.towers import offline_towers

        towers, smoke_flags = (
            smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
        )
        work = Path(args.work_dir)
        cache_dir = work / "smoke" / "cache" if args.smoke else Path(args.feature_cache_dir)
        eval_data = None
        if recipe["eval_data"] is not None:  # judged on another gallery (the smoke data's photos in --smoke)
            eval_data = Path(smoke_flags[smoke_flags.index("--data") + 1]) if args.smoke else args.gallery
            eval_data = eval_data or recipe["eval_data"]
        final_flags = TEST_FLAGS if eval_data is None else TRAIN_FLAGS
        for variant in requested:
            spec, store = VARIANTS[variant], runs.setdefault(variant, {})
            jobs = [
                (f"cv fold {f} seed {s}", cv_flags(f, args.folds), s, 0)
                for s in args.cv_seeds
                for f in run_folds
            ]
            jobs += [(f"{final} seed {s}", final_flags, s, args.latency_queries) for s in args.seeds]
            for key, split_flags, seed, timed in jobs:
                if key in store:
                    continue  # done in an earlier (interrupted) run
                if args.max_runs is not None and done >= args.max_runs:
                    raise SystemExit(3)  # runs remain
                done += 1
                store[key] = train_and_score(
                    [*spec["flags"], *smoke_flags],
                    split_flags,
                    seed,
                    work,
                    towers,
                    spec["rerankers"],
                    timed,
                    recipe["config"],
                    cache_dir=cache_dir,
                    # only the final runs are judged on the gallery; CV runs score their held-out fold
                    eval_data=eval_data if key.startswith(final) else None,
                )
                store[key]["loadavg"] = os.getloadavg()[0]
                save()
                best = max(
                    [store[key]["stage1"]["rsum"]]
                    + [m["rsum"] for r in store[key]["rerank"].values() for m in r["metrics"].values()]
                )
                print(f"{variant} | {key}: stage 1 RSUM {store[key]['stage1']['rsum']:.1f}, best stage 2 {best:.1f} "
                      f"({store[key]['train_seconds']:.0f} s training)", file=sys.stderr, flush=True)  # fmt: skip
    stored.update(
        recipe=args.recipe, folds=args.folds, cv_seeds=args.cv_seeds, seeds=args.seeds, ks=list(KS),
        weights=weights, variants={v: VARIANTS[v] for v in variants},
    )  # fmt: skip
    summary = summarise(runs, args.cv_seeds, args.seeds, args.folds, weights, final)
    stored["summary"] = summary
    save()
    if "choices" not in summary:
        print(f"not every variant has its {recipe['label']} runs yet: no report", file=sys.stderr)
        return stored
    text = tables(summary, runs, args.cv_seeds, args.seeds, args.folds, weights, recipe)
    print(text)
    loads = [r["loadavg"] for v in runs.values() for k, r in v.items() if k.startswith(final)]
    cv_folds = summary["cv_folds"]
    command = (
        f"python benchmarks/rerank.py{'' if args.recipe == 'base' else f' --recipe {args.recipe}'} --folds {args.folds}"
        + ("" if cv_folds == list(range(args.folds)) else f" --run-folds {' '.join(map(str, cv_folds))}")
        + f" --cv-seeds {' '.join(map(str, args.cv_seeds))} --seeds {' '.join(map(str, args.seeds))}"
    )
    cv = cv_label(args.folds, cv_folds)
    fields = {**_sizes(runs, args.seeds, final), "command": command, "title": recipe["title"], "cv": cv}
    header = (
        f"    {command}\n\n{recipe['title']}, {cv} over {recipe['cv_over']} for every choice (K in "
        f"{', '.join(map(str, KS))}; stage-1 fusion weight w in {', '.join(f'{w:g}' for w in weights)}, "
        f"w = 0: stage 2 alone); matching heads: 1 joint-attention layer of width 128; "
        f"{recipe['final_text'].format(**fields)}. Latency: single-query CPU milliseconds, median over 50 queries, "
        f"the lower of the {recipe['label']} runs' (2 shared cores, load average {min(loads):.1f}–{max(loads):.1f} "
        "during the timed runs), stage-1 embeddings and stored fp16 tokens given; stage 1 = scores over the "
        "gallery + top-K, stage 2 = re-scoring the K.\n\n"
    )
    unfinished = [v for v in variants if not any(r["variant"] == v for r in summary["rows"].values())]
    if unfinished:  # said, not silently dropped
        header += f"Not in these tables (their runs are not all done yet): {', '.join(unfinished)}.\n\n"
    write_section(
        results_md,
        recipe["name"],
        header + text,
        heading=recipe["heading"],
    )
    summary_lines = choices_table(summary, runs, args.cv_seeds, args.seeds, args.folds, weights, recipe)
    write_section(
        readme,
        f"{recipe['name']}_summary",
        recipe["summary"].format(**fields)
        + "; all variants in [benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n\n"
        + "\n".join(summary_lines),
    )
    return stored


if __name__ == "__main__":
    main()
