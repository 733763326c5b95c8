"""The T-EMDE question at the demo's scale: the best T-EMDE head against the best plain head, on unseen photos.

Both heads were chosen by 5-fold CV over the 6,090 Flickr8k-6k photos (`recipe_search.py --dataset flickr8k-6k`),
in one of two settings (``--setting``):

- ``frozen``: both towers frozen. The plain head is the demo recipe of the first round
  (`benchmarks/configs/flickr8k_6k_frozen_demo.yaml`, stage `6k`).
- ``tuned``: the demo recipe of the second round, whose text tower trains its last 2 layers
  (`benchmarks/configs/flickr8k_6k_text2_demo.yaml`, stage `6k-tuned-temde`).

The T-EMDE head is the setting's recipe with the sketch flags of a T-EMDE candidate (``--temde`` names it; every
candidate run so far stays in the JSON and the tables). Each is
trained, per seed, exactly as `make demo` trains (all 6,090 photos), and its saved checkpoint is evaluated from
pixels on every Flickr8k-800 photo as one gallery (800 photos, 4,000 captions; none of them in the training
set). The two are compared seed by seed (same seed: same data order and initial head). Nothing is chosen
here. Runs are appended to the JSON as they finish: an interrupted comparison resumes by rerunning it.

    python benchmarks/temde_question.py --temde "T-EMDE concat N32 H6 + warm-up 1 ep" --seeds 0 1
    python benchmarks/temde_question.py --setting tuned --seeds 0 1 \
        --temde "text top 2, + T-EMDE concat N32 H6 + warm-up 1 ep, + 14x14 stage tokens"
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
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, smoke_paths, smoke_setup, write_section
from recipe_search import FROZEN_6K_CONFIG, KEYS, REPO, STAGES, TEXT2_6K_CONFIG, mean_std

from temde_hf.convert.towers import offline_towers

RESULTS = REPO / "benchmarks" / "results"


class Setting(NamedTuple):
    """Where the question is asked: the recipe both heads start from, the CV stages that chose them, and
    where the answer is written (JSON name; RESULTS.md / README section)."""

    config: Path
    stages: tuple[str, ...]
    default_temde: str
    name: str
    title: str
    description: str


SETTINGS = {
    "frozen": Setting(
        FROZEN_6K_CONFIG, ("6k", "6k-tune"), "T-EMDE concat N32 H6 + warm-up 1 ep", "temde_question",
        "The T-EMDE question at 6,090 photos",
        "frozen towers: the plain head of that round's demo recipe "
        "(`benchmarks/configs/flickr8k_6k_frozen_demo.yaml`, stage `6k`)",
    ),
    "tuned": Setting(
        TEXT2_6K_CONFIG, ("6k-tuned-temde",),
        "text top 2, + T-EMDE concat N32 H6 + warm-up 1 ep, + 14x14 stage tokens", "temde_question_tuned",
        "The T-EMDE question in the fine-tuned setting",
        "the text tower's last 2 layers training: the plain head of the second round's demo recipe "
        "(`benchmarks/configs/flickr8k_6k_text2_demo.yaml`, stage `6k-tuned-temde`)",
    ),
}  # fmt: skip
GALLERY = REPO.parent / "shared" / "data" / "flickr8k-800" / "dataset_flickr8k.json"
TRAIN_FLAGS = ["--train_split", "train,val", "--eval_split", "none"]  # as make demo: every training photo
PLAIN = "demo recipe (plain head)"


def train_and_judge(
    config: Path,
    flags: list[str],
    seed: int,
    work: Path,
    towers: tuple[Path, Path],
    gallery: Path,
    cache_dir: Path,
) -> dict[str, Any]:
    """Train `config` + `flags` with `seed`, then score the saved checkpoint from pixels on `gallery`."""
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
        str(config), "--vision_model_path", str(towers[0]), "--text_model_path", str(towers[1]), *TRAIN_FLAGS,
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


def table(results: dict[str, Any], temde: str) -> str:
    """Per seed: RSUM (and R@1) of each head on the gallery, and the paired difference T-EMDE - plain."""
    plain = results["plain"]
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


def verdict(results: dict[str, Any], temde: str, target: float = 2.0) -> str:
    """The issue's rule: T-EMDE ships if it wins by at least `target` RSUM beyond the paired spread."""
    runs, plain = results["runs"], results["plain"]
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
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="frozen",
                        help="frozen towers, or the shipped recipe whose text tower trains its top layers")  # fmt: skip
    parser.add_argument("--temde", default=None, help="the T-EMDE candidate of the setting's CV stages "
                        "(default: the best one by CV)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work-dir", default="outputs/temde_question")
    parser.add_argument("--towers-dir", default="outputs", help="where the converted vision tower lives")
    parser.add_argument(
        "--feature-cache-dir", default="outputs/feature_cache", help="make demo's tower cache"
    )
    parser.add_argument("--gallery", type=Path, default=GALLERY, help="the unseen photos (Karpathy JSON)")
    parser.add_argument("--output", default=None, help="the setting's JSON by default")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    stage = {name: flags for s in setting.stages for name, flags in STAGES[s].items()}
    temde = args.temde or setting.default_temde
    if temde not in stage:
        parser.error(f"--temde {temde!r} is not a candidate of stage(s) {', '.join(setting.stages)}; "
                     f"choose one of: {', '.join(sorted(stage))}")  # fmt: skip
    work = Path(args.work_dir)
    towers, smoke_flags = smoke_setup(work) if args.smoke else (offline_towers(args.towers_dir), [])
    gallery = Path(smoke_flags[smoke_flags.index("--data") + 1]) if args.smoke else args.gallery
    cache_dir = work / "smoke" / "cache" if args.smoke else Path(args.feature_cache_dir)
    output, results_md, readme = smoke_paths(
        work, args.output or RESULTS / f"{setting.name}.json", args.smoke, REPO
    )
    results = json.loads(output.read_text()) if output.is_file() else {"runs": {}}
    recipe_hash = hashlib.sha256(setting.config.read_text().encode()).hexdigest()[:16]
    if results.get("recipe") != recipe_hash:
        results = {"runs": {}}  # the setting's recipe changed: earlier runs measured another one
    results.update(plain=PLAIN, recipe=recipe_hash, gallery=str(gallery.relative_to(gallery.parents[2])))
    results.pop("temde", None)  # older files named one candidate; every head but the plain one is one now
    heads = {PLAIN: [], temde: stage[temde]}
    for seed in args.seeds:  # seed by seed, both heads: paired results early
        for head, flags in heads.items():
            runs = results["runs"].setdefault(head, {})
            if str(seed) in runs:
                continue  # done in an earlier run
            extra = smoke_flags
            if args.smoke and "--sketch_vision_feature_layers" in flags:  # the tiny tower has 3 hidden states
                extra = [*smoke_flags, "--sketch_vision_feature_layers", "1"]
            runs[str(seed)] = train_and_judge(
                setting.config, [*flags, *extra], seed, work, towers, gallery, cache_dir
            )
            runs[str(seed)]["flags"] = flags
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    images = next(iter(results["runs"][PLAIN].values()))["images"]
    parts = [
        f"Both heads chosen by 5-fold CV over the 6,090 Flickr8k-6k photos (`recipe_search.py`), "
        f"{setting.description}, and the same recipe with a T-EMDE candidate's sketch flags; trained as "
        f"`make demo` trains (all 6,090 photos), evaluated from pixels on all {images} Flickr8k-800 photos as "
        "one gallery (none in the training set), paired by seed."
    ]
    for candidate in [head for head in results["runs"] if head != PLAIN]:
        text, said = table(results, candidate), verdict(results, candidate)
        print(text)
        print(said)
        runs = results["runs"]
        seeds = " ".join(sorted(set(runs[PLAIN]) & set(runs[candidate]), key=int))  # the paired ones
        setting_flag = "" if args.setting == "frozen" else f" --setting {args.setting}"
        parts.append(
            f'    python benchmarks/temde_question.py{setting_flag} --temde "{candidate}" --seeds {seeds}\n\n'
            f"{text}\n\n{said}"
        )
    markdown = "\n\n".join(parts)
    write_section(results_md, setting.name, markdown, setting.title)
    write_section(readme, setting.name, markdown, setting.title)
    return results


if __name__ == "__main__":
    main()
