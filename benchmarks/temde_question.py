"""The T-EMDE question at the demo's scale: the best T-EMDE head against the best plain head, on unseen photos.

Both heads were chosen by 5-fold CV over the 6,090 Flickr8k-6k photos (`recipe_search.py --dataset flickr8k-6k
--stage 6k`) with frozen towers: the plain head is the demo recipe of that round
(`benchmarks/configs/flickr8k_6k_frozen_demo.yaml`), the T-EMDE head is that recipe with the sketch settings of
the best T-EMDE candidate there (``--temde`` names it). Each is
trained, per seed, exactly as `make demo` trains (all 6,090 photos), and its saved checkpoint is evaluated from
pixels on every Flickr8k-800 photo as one gallery (800 photos, 4,000 captions; none of them in the training
set). The two are compared seed by seed (same seed: same data order and initial head). Nothing is chosen
here. Runs are appended to the JSON as they finish: an interrupted comparison resumes by rerunning it.

    python benchmarks/temde_question.py --temde "T-EMDE concat N32 H6 + warm-up 1 ep" --seeds 0 1
    python benchmarks/temde_question.py --smoke --seeds 0        # tiny towers and data: the harness only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section
from recipe_search import FROZEN_6K_CONFIG, KEYS, REPO, STAGES, mean_std

from temde_hf.convert.towers import offline_towers

RESULTS = REPO / "benchmarks" / "results" / "temde_question.json"
# The frozen-tower demo recipe of the first 6k round: the T-EMDE candidates are its sketch flags on top of it
CONFIG = FROZEN_6K_CONFIG
GALLERY = REPO.parent / "shared" / "data" / "flickr8k-800" / "dataset_flickr8k.json"
TRAIN_FLAGS = ["--train_split", "train,val", "--eval_split", "none"]  # as make demo: every training photo
PLAIN = "demo recipe (plain head)"


def train_and_judge(
    flags: list[str], seed: int, work: Path, towers: tuple[Path, Path], gallery: Path, cache_dir: Path
) -> dict[str, Any]:
    """Train the demo config + `flags` with `seed`, then score the saved checkpoint from pixels on `gallery`."""
    import torch

    from temde_hf.data import load_image_captions
    from temde_hf.evaluation.metrics import retrieval_metrics
    from temde_hf.inference.encode import encode_dataset
    from temde_hf.loading import load_checkpoint
    from temde_hf.training.arguments import parse_args
    from temde_hf.training.train import main as train_main

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        str(CONFIG), "--vision_model_path", str(towers[0]), "--text_model_path", str(towers[1]), *TRAIN_FLAGS,
        "--seed", str(seed), "--output_dir", str(out), "--feature_cache_dir", str(cache_dir),
        "--report_to", "none", "--disable_tqdm", "true", "--save_steps", "0", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    train_main(argv)
    seconds = time.perf_counter() - start
    _, data_args, _ = parse_args(argv)
    dataset = load_image_captions(gallery)
    model, processor = load_checkpoint(out / "final")
    with torch.inference_mode():
        images, texts, c2i = encode_dataset(model, processor, dataset, max_length=data_args.max_text_length)
    metrics = retrieval_metrics(caption_to_image=c2i, image_embeds=images, text_embeds=texts)
    shutil.rmtree(out, ignore_errors=True)
    return {"gallery": {k: metrics[k] for k in KEYS}, "images": len(images), "captions": len(texts),
            "train_seconds": seconds}  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """Per seed: RSUM (and R@1) of each head on the gallery, and the paired difference T-EMDE - plain."""
    plain, temde = results["plain"], results["temde"]
    runs = results["runs"]
    seeds = sorted(set(runs.get(plain, {})) & set(runs.get(temde, {})), key=int)
    lines = [
        f"| seed | {plain}: RSUM (R@1 i2t / t2i) | {temde}: RSUM (R@1 i2t / t2i) | T-EMDE - plain |",
        "|---|---|---|---|",
    ]

    def cell(run: dict[str, Any]) -> str:
        g = run["gallery"]
        return f"{g['rsum']:.1f} ({g['i2t_r1']:.1f} / {g['t2i_r1']:.1f})"

    deltas = []
    for seed in seeds:
        p, t = runs[plain][seed], runs[temde][seed]
        deltas.append(t["gallery"]["rsum"] - p["gallery"]["rsum"])
        lines.append(f"| {seed} | {cell(p)} | {cell(t)} | {deltas[-1]:+.1f} |")
    if seeds:
        p_stats = mean_std([runs[plain][s]["gallery"]["rsum"] for s in seeds])
        t_stats = mean_std([runs[temde][s]["gallery"]["rsum"] for s in seeds])
        d_stats = mean_std(deltas)
        lines.append(
            f"| mean ± std | {p_stats['mean']:.1f} ± {p_stats['std']:.1f} | {t_stats['mean']:.1f} ± "
            f"{t_stats['std']:.1f} | **{d_stats['mean']:+.1f} ± {d_stats['std']:.1f}** |"
        )
    return "\n".join(lines)


def verdict(results: dict[str, Any], target: float = 2.0) -> str:
    """The issue's rule: T-EMDE ships if it wins by at least `target` RSUM beyond the paired spread."""
    runs, plain, temde = results["runs"], results["plain"], results["temde"]
    seeds = sorted(set(runs.get(plain, {})) & set(runs.get(temde, {})), key=int)
    if not seeds:
        return "no paired seeds yet"
    deltas = [runs[temde][s]["gallery"]["rsum"] - runs[plain][s]["gallery"]["rsum"] for s in seeds]
    mean = statistics.fmean(deltas)
    spread = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
    wins = mean >= target and (len(deltas) > 1 and mean - spread >= target)
    return (
        f"T-EMDE - plain over {len(deltas)} paired seed(s): {mean:+.1f} RSUM (std {spread:.1f}); "
        + ("T-EMDE wins by >= 2 RSUM beyond the spread: the demo ships it." if wins
           else "not a win of >= 2 RSUM beyond the spread: the demo keeps the plain head.")
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stage = {**STAGES["6k"], **STAGES["6k-tune"]}  # the candidates of both 6k rounds
    parser.add_argument(
        "--plain", default="batch 256", choices=sorted(stage), help="the best plain recipe by CV"
    )
    parser.add_argument("--temde", default="T-EMDE concat N32 H6 + warm-up 1 ep", choices=sorted(stage),
                        help="the best T-EMDE recipe by CV")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work-dir", default="outputs/temde_question")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument(
        "--feature-cache-dir", default="outputs/feature_cache", help="make demo's tower cache"
    )
    parser.add_argument("--gallery", type=Path, default=GALLERY, help="the unseen photos (Karpathy JSON)")
    parser.add_argument("--output", default=str(RESULTS))
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    towers, smoke_flags = smoke_setup(work) if args.smoke else (offline_towers(args.towers_dir), [])
    gallery = Path(smoke_flags[smoke_flags.index("--data") + 1]) if args.smoke else args.gallery
    cache_dir = work / "smoke" / "cache" if args.smoke else Path(args.feature_cache_dir)
    output, results_md, readme = smoke_paths(work, args.output, args.smoke, REPO)
    results = json.loads(output.read_text()) if output.is_file() else {"runs": {}}
    recipe_hash = hashlib.sha256(CONFIG.read_text().encode()).hexdigest()[:16]
    if results.get("recipe") != recipe_hash:
        results = {"runs": {}}  # the demo recipe changed: earlier runs measured another one
    results.update(plain=PLAIN, temde=args.temde, recipe=recipe_hash,
                   gallery=str(gallery.relative_to(gallery.parents[2])))  # fmt: skip
    heads = {PLAIN: [], args.temde: stage[args.temde]}
    for seed in args.seeds:  # seed by seed, both heads: paired results early
        for head, flags in heads.items():
            runs = results["runs"].setdefault(head, {})
            if str(seed) in runs:
                continue  # done in an earlier run
            runs[str(seed)] = train_and_judge([*flags, *smoke_flags], seed, work, towers, gallery, cache_dir)
            runs[str(seed)]["flags"] = flags
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    print(verdict(results))
    seeds = " ".join(map(str, args.seeds))
    markdown = (
        f'    python benchmarks/temde_question.py --temde "{args.temde}" --seeds {seeds}\n\n'
        "Both heads chosen by 5-fold CV over the 6,090 Flickr8k-6k photos (`recipe_search.py`, stage `6k`), "
        "frozen towers: the plain head of that round's demo recipe (`benchmarks/configs/flickr8k_6k_frozen_demo.yaml`), "
        "and the same recipe with the best T-EMDE candidate's sketch flags; trained as "
        "`make demo` trains (all 6,090 photos), evaluated from pixels on all "
        f"{next(iter(next(iter(results['runs'].values())).values()))['images']} Flickr8k-800 photos as one "
        "gallery (none in the training set), paired by seed:\n\n" + text + "\n\n" + verdict(results)
    )
    write_section(results_md, "temde_question", markdown, "The T-EMDE question at 6,090 photos")
    write_section(readme, "temde_question", markdown, "The T-EMDE question at 6,090 photos")
    return results


if __name__ == "__main__":
    main()
