"""Retrieve fast, rerank smart on the real towers and photos: does a second stage lift retrieval?

Four things are measured on Flickr8k-800 through the one trainer and `temde-hf evaluate`'s two-stage path,
with the recipe search's base recipe (`benchmarks/configs/recipe_search_base.yaml`: T-EMDE concat N 32 H 6
over frozen, cached EfficientNet-Lite0 + MiniLM; kept fixed so stored runs keep their meaning) or, with
``--recipe demo``, the recipe `make demo` ships (`RECIPES`): stage 1 alone (the dual encoder's inner
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

    python benchmarks/rerank.py --towers-dir outputs [--folds 3] [--cv-seeds 0]
        [--seeds 0 1]
    python benchmarks/rerank.py --report     # tables + the RESULTS.md and README sections from the JSON
    python benchmarks/rerank.py --recipe demo --folds 5   # the same on the demo's recipe (its own JSON)
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
from recipe_search import BASE_CONFIG, DEMO_800_CONFIG, KEYS, REPO, TEST_FLAGS, cv_flags, mean_std

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
# kept fixed so stored runs keep their meaning) and the demo's recipe (does the shipped model gain a stage 2?).
RECIPES: dict[str, dict[str, Any]] = {
    "base": {
        "config": BASE_CONFIG, "name": "rerank", "variants": list(VARIANTS),
        "title": "T-EMDE concat N32 H6 recipe (`benchmarks/configs/recipe_search_base.yaml`, frozen towers, cached)",
        "heading": "Two-stage retrieval: rerank (CPU)",
    },
    "demo": {
        "config": DEMO_800_CONFIG, "name": "rerank_demo", "variants": ["base", "alignment loss 0.5"],
        "title": "The demo recipe on Flickr8k-800 (`benchmarks/configs/flickr8k_800_demo.yaml`: mean pooling, flip, "
                 "frozen towers, cached)",
        "heading": "Two-stage retrieval on the demo recipe (CPU)",
    },
}  # fmt: skip


def _keys(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in KEYS}


def train_and_score(
    flags: list[str], split_flags: list[str], seed: int, work: Path, towers: tuple[Path, Path],
    rerankers: list[str], latency_queries: int, config: Path = BASE_CONFIG, cache_dir: Path | None = None,
    sub_gallery: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one run of `config` + `flags`, then score its saved checkpoint from pixels: stage 1, and each
    reranker at each K and fusion weight.

    `cache_dir`: the frozen towers' output cache (default: one under `work`); `sub_gallery`: also stage 1 on
    each disjoint block of this many evaluation images (with their captions), in the evaluation order."""
    import torch

    from temde_hf.evaluation.metrics import retrieval_metrics
    from temde_hf.evaluation.rerank import two_stage_metrics
    from temde_hf.inference.encode import encode_dataset
    from temde_hf.inference.rerank import build_reranker
    from temde_hf.inference.tokens import encode_token_sets
    from temde_hf.loading import load_checkpoint
    from temde_hf.training.arguments import parse_args
    from temde_hf.training.train import load_data
    from temde_hf.training.train import main as train_main

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(config), "--vision_model_path", str(towers[0]), "--text_model_path", str(towers[1]),
        *split_flags, "--seed", str(seed), "--output_dir", str(out), "--feature_cache_dir", str(cache_dir or work / "cache"),
        "--report_to", "none", "--disable_tqdm", "true", "--save_steps", "0", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    trained = train_main(argv)
    seconds = time.perf_counter() - start
    _, data_args, _ = parse_args(argv)
    dataset = load_data(data_args, out, seed, accelerator=None).evaluation()
    model, processor = load_checkpoint(out / "final", with_matching_head="itm" in rerankers)
    length = data_args.max_text_length
    with torch.inference_mode():
        image_embeds, text_embeds, c2i = encode_dataset(model, processor, dataset, max_length=length)
        images, texts = encode_token_sets(model, processor, dataset, max_length=length)
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


def _per_seed(runs: dict[str, Any], seeds: list[int], folds: int, pick: Any) -> list[float]:
    """The CV value of each seed: `pick(record)` averaged over the folds."""
    return [statistics.fmean(pick(runs[f"cv fold {f} seed {s}"]) for f in range(folds)) for s in seeds]


def summarise(
    runs: dict[str, Any],
    cv_seeds: list[int],
    seeds: list[int],
    folds: int,
    weights: Sequence[float] = WEIGHTS,
) -> dict[str, Any]:
    """CV and test RSUM of every (variant, stage), the choices made on CV (K and fusion weight among
    `weights`), and the paired test deltas."""
    rows: dict[str, dict[str, Any]] = {}
    for variant, spec in VARIANTS.items():
        store = runs.get(variant, {})
        cv_keys = [f"cv fold {f} seed {s}" for s in cv_seeds for f in range(folds)]
        if not all(k in store for k in [*cv_keys, *(f"test seed {s}" for s in seeds)]):
            continue
        stages = {"stage 1": lambda r: r["stage1"]}
        for name in spec["rerankers"]:
            for k in KS:
                for w in weights:
                    stages[f"+{name} K={k} w={w:g}"] = partial(
                        _reranked, key=f"{name} K={k}", weight=f"{w:g}"
                    )
        for stage, pick in stages.items():
            test = [pick(store[f"test seed {s}"])["rsum"] for s in seeds]
            rows[f"{variant} | {stage}"] = {
                "variant": variant, "stage": stage,
                "cv": mean_std(_per_seed(store, cv_seeds, folds, lambda r, pick=pick: pick(r)["rsum"])),
                "test": mean_std(test), "test_per_seed": test,
                "test_r1": [statistics.fmean(pick(store[f"test seed {s}"])[k] for s in seeds) for k in ("i2t_r1", "t2i_r1")],
            }  # fmt: skip
    if "base | stage 1" not in rows:
        return {"rows": rows}
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
    return {"rows": rows, "choices": choices}


def latency(runs: dict[str, Any], variant: str, key: str, seeds: list[int]) -> dict[str, float]:
    """Per-query milliseconds of each stage (i2t and t2i): the lowest of the test runs' medians.

    Another job on the 2 shared cores only ever adds time (one run measured at load 3.2 took 70-110 ms
    per query where its twin took 0.6-3), so the fastest run is the estimate; every run's medians stay in
    the JSON.
    """
    found = [runs[variant][f"test seed {s}"]["rerank"][key]["latency_ms"] for s in seeds]
    return {name: min(f[name] for f in found) for name in found[0]}


def _pm(stat: dict[str, float]) -> str:
    """`mean ± std`, or the mean alone when it is one value (one CV seed: no spread to show)."""
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}" if stat.get("n", 2) > 1 else f"{stat['mean']:.1f}"


def choices_table(
    summary: dict[str, Any],
    runs: dict[str, Any],
    cv_seeds: list[int],
    seeds: list[int],
    folds: int,
    weights: Sequence[float] = WEIGHTS,
) -> list[str]:
    """The issue's rows (each chosen on CV) with their test RSUM, paired Δ and per-query latencies."""
    rows, choices = summary["rows"], summary.get("choices", {})
    lines = [
        f"**Chosen on {folds}-fold CV (seeds {', '.join(map(str, cv_seeds))}), reported on test** (100 images, "
        f"500 captions; mean ± std over seeds {', '.join(map(str, seeds))}; Δ = paired difference with stage 1 of "
        "the base model, same seed):",
        "",
        "| row | variant (chosen by CV) | CV RSUM | test RSUM | Δ test | test R@1 i2t / t2i | ms/query stage 1 (i2t / t2i) | ms/query stage 2 at K=20 | at K=100 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, key in choices.items():
        if label == "best by CV overall":
            continue
        r = rows[key]
        ms = {k: "–" for k in ("s1", "20", "100")}
        reranked = r["stage"].startswith("+")
        # "+itm K=20 w=0.5" -> "itm"; a stage-1 row's scan is timed in its variant's (first) reranker runs
        name = r["stage"][1:].split(" ")[0] if reranked else VARIANTS[r["variant"]]["rerankers"][0]
        by_k = {k: latency(runs, r["variant"], f"{name} K={k}", seeds) for k in KS}
        ms["s1"] = f"{by_k[20]['stage1_i2t']:.2f} / {by_k[20]['stage1_t2i']:.2f}"
        for k in KS if reranked else ():
            ms[str(k)] = f"{by_k[k]['stage2_i2t']:.1f} / {by_k[k]['stage2_t2i']:.1f}"
        delta = r["test_paired_delta"]
        lines.append(
            f"| {label} | {r['variant']} {r['stage'] if r['stage'] != 'stage 1' else ''} | "
            f"{_pm(r['cv'])} | {_pm(r['test'])} | {delta['mean']:+.1f} ± {delta['std']:.1f} | {r['test_r1'][0]:.1f} / {r['test_r1'][1]:.1f} | "
            f"{ms['s1']} | {ms['20']} | {ms['100']} |"
        )
    top = f"w={max(weights):g}"
    at_edge = [
        label
        for label, key in choices.items()
        if label != "best by CV overall" and rows[key]["stage"].endswith(top)
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
) -> str:
    rows = summary["rows"]
    lines = choices_table(summary, runs, cv_seeds, seeds, folds, weights)
    lines += ["", f"Every variant and stage ({folds}-fold CV on train+val; test):", "",
              "| variant | stage | CV RSUM | test RSUM | Δ test vs base stage 1 |", "|---|---|---|---|---|"]  # fmt: skip
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
    # default: what the JSON's runs used, else 3 folds, CV seed 0, test seeds 0 1
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--cv-seeds", type=int, nargs="+", default=None, help="seeds of the CV runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the test runs")
    parser.add_argument("--latency-queries", type=int, default=50)
    parser.add_argument("--work-dir", default="outputs/rerank")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument("--output", default=None, help="default: results/<the recipe's name>.json")
    parser.add_argument("--report", action="store_true", help="only print the tables and write the sections")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (exit 3)")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    output, results_md, readme = smoke_paths(
        args.work_dir,
        args.output or REPO / "benchmarks" / "results" / f"{recipe['name']}.json",
        args.smoke,
        REPO,
    )
    stored = json.loads(output.read_text()) if output.is_file() else {}
    runs = stored.setdefault("runs", {})
    for name, default in (("folds", 3), ("cv_seeds", [0]), ("seeds", [0, 1])):
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name, default))
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
        for variant in requested:
            spec, store = VARIANTS[variant], runs.setdefault(variant, {})
            jobs = [
                (f"cv fold {f} seed {s}", cv_flags(f, args.folds), s, 0)
                for s in args.cv_seeds
                for f in range(args.folds)
            ]
            jobs += [(f"test seed {s}", TEST_FLAGS, s, args.latency_queries) for s in args.seeds]
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
    summary = summarise(runs, args.cv_seeds, args.seeds, args.folds, weights)
    stored["summary"] = summary
    save()
    if "choices" not in summary:
        print("not every variant has its test runs yet: no report", file=sys.stderr)
        return stored
    text = tables(summary, runs, args.cv_seeds, args.seeds, args.folds, weights)
    print(text)
    loads = [r["loadavg"] for v in runs.values() for k, r in v.items() if k.startswith("test")]
    command = (
        f"python benchmarks/rerank.py{' --recipe demo' if args.recipe == 'demo' else ''} --folds {args.folds} "
        f"--cv-seeds {' '.join(map(str, args.cv_seeds))} --seeds {' '.join(map(str, args.seeds))}"
    )
    header = (
        f"    {command}\n\n{recipe['title']}, {args.folds}-fold CV over the 700 train+val images for "
        f"every choice (K in {', '.join(map(str, KS))}; stage-1 fusion weight w in {', '.join(f'{w:g}' for w in weights)}, "
        "w = 0: stage 2 alone); matching heads: 1 joint-attention layer of width 128; test = 100 images / 500 "
        "captions. Latency: single-query CPU milliseconds, median over 50 queries, the lower of the test runs' "
        f"(2 shared cores, load average {min(loads):.1f}–{max(loads):.1f} during the timed runs), stage-1 "
        "embeddings and stored fp16 tokens given; stage 1 = scores over the gallery + top-K, stage 2 = "
        "re-scoring the K.\n\n"
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
    summary_lines = choices_table(summary, runs, args.cv_seeds, args.seeds, args.folds, weights)
    write_section(
        readme,
        f"{recipe['name']}_summary",
        f"Measured on Flickr8k-800 by `{command}`. {recipe['title']}; every choice made on CV of the "
        "train+val images; all variants in [benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n\n"
        + "\n".join(summary_lines),
    )
    return stored


if __name__ == "__main__":
    main()
