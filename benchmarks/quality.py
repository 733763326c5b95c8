"""Pooling ablation: does the T-EMDE sketch beat mean pooling (frozen towers; the text tower fine-tuned)?

Cross-validated, paired by seed, reported either way.

Heads (one model class, chosen by flags): masked mean, a transformer layer + mean, the tower's pooler, and
T-EMDE (`concat` with each coder, `replace`). Every head runs through the one trainer, in each tower setting,
on every fold x seed of the k-fold split of the train+val images (`recipe_search.py`'s harness); the best
plain and the best T-EMDE head of each setting are picked by their cross-validated RSUM. Only then are
photos outside that split looked at, and the two picked heads are compared seed by seed there. Two scales
(``--scale``), each with its own recipe files, JSON, plot and RESULTS.md section:

- ``6k`` (default): the demo's training set, Flickr8k-6k (6,090 photos), with `recipe_search.py
  --dataset flickr8k-6k`'s fold protocol (5 folds of 1,218, its cached tower outputs). The recipe is the 6k
  search's per setting (`benchmarks/configs/flickr8k_6k_frozen_demo.yaml` with frozen towers,
  `flickr8k_6k_text2_demo.yaml` with the text tower's last 2 layers training); T-EMDE heads use its sketch
  size, N32 H6. Every head is then trained per seed on all 6,090 photos as `make demo` trains and judged
  from pixels on the unseen Flickr8k-800 gallery (`temde_question.py`'s `train_and_judge`): there is no
  test split. One seed and frozen towers by default (a text-tower run takes ~6x a frozen one here).
- ``800``: the earlier demo's recipe on the 700 train+val photos of Flickr8k-800
  (`benchmarks/configs/flickr8k_800_demo.yaml`, T-EMDE N16 H4); every head is trained on all 700 per seed
  and evaluated on the 100 test images (results/quality.json, kept as measured).

    python benchmarks/quality.py [--settings frozen text] [--heads ...] [--folds 5] [--run-folds 0 1 2] [--seeds 0]
    python benchmarks/quality.py --scale 800 [--settings frozen text] [--folds 5] [--seeds 0 1 2]
    python benchmarks/quality.py --scale 800 --report      # re-render the section from the stored JSON

Runs are stored with the flags and the recipe file's hash that made them, so a change of recipe reruns them
instead of reusing stale numbers; an interrupted run resumes by rerunning the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import add_smoke_argument, load_report, smoke_paths, smoke_setup, write_section
from recipe_search import (
    DATASETS,
    DEMO_800_CONFIG,
    FROZEN_6K_CONFIG,
    KEYS,
    REPO,
    TEST_FLAGS,
    TEXT2_6K_CONFIG,
    cv_flags,
    mean_std,
    run_one,
)
from temde_question import GALLERY, train_and_judge

from temde_hf.convert.towers import offline_towers
from temde_hf.evaluation.tables import format_table

# A λ = 0 warm-up of the recipe's sketch applies to `concat` only (the other heads have no λ to switch).
NO_WARMUP = ["--sketch_warmup_epochs", "0"]
PLAIN: dict[str, list[str]] = {
    "mean": ["--pooling", "mean", "--sketch_fusion", "none", *NO_WARMUP],
    "transformer layer + mean": ["--pooling", "attention", "--sketch_fusion", "none", *NO_WARMUP],
    "tower pooler": ["--pooling", "pooler", "--sketch_fusion", "none", *NO_WARMUP],
}


def temde_heads(sketch: list[str]) -> dict[str, list[str]]:
    """The T-EMDE heads with the sketch size `sketch` (a λ = 0 first epoch for `concat`; `replace` has no λ)."""
    return {
        "T-EMDE concat soft_dlsh": ["--sketch_fusion", "concat", "--sketch_coder", "soft_dlsh", *sketch,
                                    "--sketch_warmup_epochs", "1"],
        "T-EMDE concat anchor": ["--sketch_fusion", "concat", "--sketch_coder", "anchor", *sketch,
                                 "--sketch_warmup_epochs", "1"],
        "T-EMDE replace soft_dlsh": ["--sketch_fusion", "replace", "--sketch_coder", "soft_dlsh", *sketch,
                                     *NO_WARMUP],
    }  # fmt: skip


# The sketch size the 800-photo recipe search found best for `concat` (N 16, H 4).
TEMDE = temde_heads(["--n_sketches", "16", "--n_hyperplanes", "4"])
# Tower settings: both towers frozen, and the text tower's last two layers fine-tuned (`recipe_search.py`'s
# "text" / "6k-tune" candidate). At 6k each setting's recipe file already says so; the flags restate it.
SETTINGS: dict[str, list[str]] = {
    "frozen": ["--freeze_text_tower", "true", "--text_trainable_layers", "0"],
    "text": ["--freeze_text_tower", "false", "--text_trainable_layers", "2", "--text_lr_multiplier", "0.1"],
}
TARGET_GAIN = 2.0  # RSUM, from the issue
RESULTS = REPO / "benchmarks" / "results" / "quality.json"


class Scale(NamedTuple):
    """One scale of the ablation: its recipe file per tower setting, the T-EMDE sketch size, how a CV run
    is scored, where heads are judged after the choice, its defaults, and where the answer is written."""

    configs: dict[str, Path]  # tower setting -> the recipe file every head starts from
    sketch: list[str]
    eval_steps: int  # how often the held-out fold is scored (`recipe_search.py`'s, per data set)
    judged: str  # the key of the after-the-choice RSUM in the stored runs: "test" or "gallery"
    judged_label: str  # how the table names it
    settings: tuple[str, ...]  # default --settings
    seeds: tuple[int, ...]  # default --seeds
    results: Path
    section: str  # RESULTS.md section
    readme_section: str | None  # README.md section (None: RESULTS.md only)
    heading: str


SCALES = {
    "6k": Scale(
        {"frozen": FROZEN_6K_CONFIG, "text": TEXT2_6K_CONFIG},
        # the sketch size of the 6k search's T-EMDE candidates (and `temde_question.py`'s default one)
        ["--n_sketches", "32", "--n_hyperplanes", "6"],
        DATASETS["flickr8k-6k"].eval_steps, "gallery", "unseen gallery", ("frozen",), (0,),
        REPO / "benchmarks" / "results" / "quality_6k.json", "quality_6k", "quality_6k_summary",
        "Quality ablation at 6,090 photos",
    ),
    "800": Scale(
        {"frozen": DEMO_800_CONFIG, "text": DEMO_800_CONFIG}, ["--n_sketches", "16", "--n_hyperplanes", "4"],
        DATASETS["flickr8k-800"].eval_steps, "test", "test", ("frozen", "text"), (0, 1, 2), RESULTS, "quality",
        "quality_summary", "Quality ablation: pooling heads through the one trainer (CPU)",
    ),
}  # fmt: skip


def head_flags(head: str, scale: Scale) -> list[str]:
    """The trainer flags of `head` at `scale` (the T-EMDE heads take the scale's sketch size)."""
    return PLAIN[head] if head in PLAIN else temde_heads(scale.sketch)[head]


def recipe_hash(config: Path) -> str:
    return hashlib.sha256(config.read_text().encode()).hexdigest()[:16]


def verdict(
    results: dict[str, Any], plain: list[str], temde: list[str], judged: str = "test"
) -> dict[str, Any]:
    """The issue's target, decided without the judged photos choosing anything.

    `results[head]["runs"]` holds one entry per seed with the cross-validated ``val`` RSUM (mean over
    folds) and the `judged` RSUM (``test``: that seed's model trained on all train+val images, on the test
    split; ``gallery``: on the unseen gallery). The best plain and the best T-EMDE head are each picked by
    mean ``val`` RSUM; their `judged` RSUM is then compared seed by seed. Met when the mean paired gain is at
    least `TARGET_GAIN` and at least the std of that gain.
    """
    best_plain = max(plain, key=lambda n: results[n]["val"]["rsum"]["mean"])
    best_temde = max(temde, key=lambda n: results[n]["val"]["rsum"]["mean"])
    out = {"best_plain_by_val": best_plain, "best_temde_by_val": best_temde, "target_gain": TARGET_GAIN}
    for split in ("val", judged):
        deltas = [
            t[split]["rsum"] - p[split]["rsum"]
            for t, p in zip(results[best_temde]["runs"], results[best_plain]["runs"], strict=True)
        ]
        out[f"{split}_paired_gain"] = {**mean_std(deltas), "per_seed": deltas}
    gain = out[f"{judged}_paired_gain"]
    out["met"] = gain["mean"] >= TARGET_GAIN and gain["mean"] >= gain["std"]
    return out


class Runner(NamedTuple):
    """How one invocation trains: towers, work folder, tower-output cache, the unseen gallery (6k)."""

    towers: tuple[Path, Path]
    work: Path
    cache_dir: Path | None  # None: WORK/cache (the 800 scale, as it was measured)
    gallery: Path


def run_head(flags: list[str], config: Path, scale: Scale, args: argparse.Namespace, runner: Runner,
             store: dict[str, Any], save: Any) -> dict[str, Any]:  # fmt: skip
    """Cross-validation runs and judged runs of one head in one setting (resuming from `store`, unless it
    was made with other flags or another recipe file)."""
    fingerprint = hashlib.sha256(json.dumps([flags, config.read_text()]).encode()).hexdigest()[:16]
    if store.get("fingerprint") != fingerprint:
        store.clear()
        store["fingerprint"] = fingerprint
    cv = {"cache_dir": runner.cache_dir, "eval_steps": scale.eval_steps} if scale.judged == "gallery" else {}
    for seed in args.seeds:
        for fold in args.run_folds:
            key = f"cv fold {fold} seed {seed}"
            if key not in store:
                store[key] = run_one(
                    flags, cv_flags(fold, args.folds), seed, runner.work, runner.towers, config, **cv
                )
                save()
        key = f"{scale.judged} seed {seed}"
        if key not in store:
            if scale.judged == "test":
                store[key] = run_one(flags, TEST_FLAGS, seed, runner.work, runner.towers, config)
            else:  # trained on every photo as `make demo` trains, judged from pixels on the unseen gallery
                store[key] = train_and_judge(config, flags, seed, runner.work, runner.towers, runner.gallery,
                                             runner.cache_dir)  # fmt: skip
            save()
    runs = []
    for seed in args.seeds:
        cv_runs = [store[f"cv fold {f} seed {seed}"]["final"] for f in args.run_folds]
        judged = store[f"{scale.judged} seed {seed}"]
        runs.append({
            "seed": seed,
            "val": {k: statistics.fmean(r[k] for r in cv_runs) for k in KEYS},
            scale.judged: judged["final" if scale.judged == "test" else "gallery"],
        })  # fmt: skip
    out = {
        "runs": runs,
        "val": {k: mean_std([r["val"][k] for r in runs]) for k in KEYS},
        scale.judged: {k: mean_std([r[scale.judged][k] for r in runs]) for k in KEYS},
    }
    if scale.judged == "gallery":
        out["gallery_size"] = {k: store[f"gallery seed {args.seeds[0]}"][k] for k in ("images", "captions")}
    return out


def table(summary: dict[str, Any], judged: str = "test", label: str = "test") -> str:
    rows = [
        {
            "towers": setting,
            "head": head,
            "cv": f"{r['val']['rsum']['mean']:.1f} ± {r['val']['rsum']['std']:.1f}",
            "judged": f"{r[judged]['rsum']['mean']:.1f} ± {r[judged]['rsum']['std']:.1f}",
            "r1": f"{r[judged]['i2t_r1']['mean']:.1f} / {r[judged]['t2i_r1']['mean']:.1f}",
        }
        for setting, heads in summary.items()
        for head, r in heads["heads"].items()
    ]
    headers = ["towers", "head", "CV RSUM (mean ± std over seeds)", f"{label} RSUM", f"{label} R@1 i2t / t2i"]
    lines = [format_table(rows, ["towers", "head", "cv", "judged", "r1"], headers), ""]
    for setting, heads in summary.items():
        v = heads["verdict"]
        gain = v[f"{judged}_paired_gain"]
        lines.append(
            f"- **{setting}**: picked by CV: {v['best_temde_by_val']} vs {v['best_plain_by_val']}; {label} RSUM gain "
            f"{gain['mean']:+.1f} ± {gain['std']:.1f} per seed ({', '.join(f'{d:+.1f}' for d in gain['per_seed'])})"
            f" → target (≥ {TARGET_GAIN:+.0f} and beyond the spread) **{'met' if v['met'] else 'not met'}**."
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, judged: str = "test", label: str = "test") -> None:
    """Bars per head and tower setting: cross-validated and judged RSUM, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for ax, (setting, heads) in zip(axes[0], summary.items(), strict=True):
        names = list(heads["heads"])
        for offset, split in ((-0.2, "val"), (0.2, judged)):
            ax.bar([i + offset for i in range(len(names))],
                   [heads["heads"][n][split]["rsum"]["mean"] for n in names], width=0.4,
                   yerr=[heads["heads"][n][split]["rsum"]["std"] for n in names],
                   label="CV (train+val)" if split == "val" else label)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"towers: {setting}")
        ax.set_ylabel("RSUM")
        ax.set_ylim(
            bottom=min(h[s]["rsum"]["mean"] for h in heads["heads"].values() for s in ("val", judged)) - 40
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command(
    scale: str, setting: str, heads: list[str], folds: int, run_folds: list[int], seeds: list[int]
) -> str:
    """The command line that measures `setting` with these flags (as the section shows it)."""
    words = ["python benchmarks/quality.py", *(["--scale", scale] if scale != "6k" else []), "--settings", setting,
             "--heads", *(f'"{h}"' for h in heads), "--folds", str(folds)]  # fmt: skip
    if list(run_folds) != list(range(folds)):
        words += ["--run-folds", *map(str, run_folds)]
    return " ".join([*words, "--seeds", *map(str, seeds)])


def shown_command(stored: str, scale: str) -> str:
    """A stored command as it reproduces its runs now: those measured before ``--scale`` existed ran at 800,
    which is no longer the default, so the flag is added when rendering (the stored JSON is kept as it was)."""
    if scale == "6k" or "--scale" in stored:
        return stored
    return stored.replace("quality.py ", f"quality.py --scale {scale} ", 1)


def render(stored: dict[str, Any], scale: str) -> str:
    """The RESULTS.md section of a stored JSON at `scale` (a measuring run and ``--report`` write the same)."""
    spec, summary = SCALES[scale], stored["summary"]
    commands = "\n".join(f"    {shown_command(v['command'], scale)}" for v in summary.values())
    if scale == "800":
        about = "CV folds over the 700 train+val images and paired seeds as in each command; a CV RSUM is over one held-out fold (5 folds: 140 images, 3 folds: 233), and RSUM falls as the gallery grows, so compare heads within a setting."
    else:
        size = next(iter(next(iter(summary.values()))["heads"].values()))["gallery_size"]
        recipes = "; ".join(f"{s}: `{spec.configs[s].relative_to(REPO)}`" for s in summary)
        about = (
            "CV folds over the 6,090 Flickr8k-6k train+val photos (`recipe_search.py --dataset flickr8k-6k`'s "
            "split: a CV RSUM is over one held-out fold of 1,218 photos), the held-out folds and paired seeds "
            f"as in each command, on each setting's 6k recipe ({recipes}); T-EMDE heads N32 H6. Then every head "
            f"is trained per seed on all 6,090 photos and judged from pixels on all {size['images']} Flickr8k-800 "
            f"photos ({size['captions']:,} captions) as one gallery, none of them in the training set (the "
            "unseen-gallery columns); RSUM falls as the gallery grows, so compare heads within a column."
        )
    return f"{commands}\n\n{about}\n\n" + table(summary, spec.judged, spec.judged_label)


def pending(scale: str) -> str:
    """The section of a scale not measured yet: the command that writes it (the defaults)."""
    spec = SCALES[scale]
    heads = [*PLAIN, *TEMDE]
    shown = "\n".join(
        f"    {command(scale, s, heads, 5, list(range(5)), list(spec.seeds))}" for s in spec.settings
    )
    return f"Not measured yet; this command measures it and writes this section:\n\n{shown}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="6k",
                        help="6k: Flickr8k-6k CV, judged on the unseen Flickr8k-800 gallery; 800: the earlier "
                        "Flickr8k-800 ablation (train+val CV, its test split)")  # fmt: skip
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=None,
                        help="tower settings (default: frozen at 6k, frozen text at 800)")  # fmt: skip
    parser.add_argument("--heads", nargs="+", choices=[*PLAIN, *TEMDE], default=[*PLAIN, *TEMDE],
                        help="a subset of the heads (at least one plain and one T-EMDE)")  # fmt: skip
    parser.add_argument("--folds", type=int, default=5, help="the k of the k-fold split")
    parser.add_argument("--run-folds", type=int, nargs="+", default=None,
                        help="held-out folds to run (default: all); the CV RSUM is their mean")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 at 6k, 0 1 2 at 800")
    parser.add_argument("--work-dir", default="outputs/quality")
    parser.add_argument("--towers-dir", default="outputs")
    parser.add_argument("--feature-cache-dir", default="outputs/feature_cache",
                        help="cached frozen-tower outputs at 6k (make demo's and the 6k search's); the 800 "
                        "scale caches under --work-dir, as it was measured")  # fmt: skip
    parser.add_argument(
        "--gallery", type=Path, default=GALLERY, help="the unseen photos at 6k (Karpathy JSON)"
    )
    parser.add_argument("--output", default=None, help="the scale's JSON by default")
    parser.add_argument("--report", action="store_true", help="only re-render the stored JSON's section")
    add_smoke_argument(parser)
    args = parser.parse_args(argv)
    spec = SCALES[args.scale]
    args.settings = args.settings or list(spec.settings)
    args.seeds = args.seeds or list(spec.seeds)
    args.run_folds = args.run_folds if args.run_folds is not None else list(range(args.folds))
    if any(not 0 <= f < args.folds for f in args.run_folds):
        parser.error(f"--run-folds must be in 0 .. {args.folds - 1} (--folds {args.folds})")
    plain, temde = [h for h in args.heads if h in PLAIN], [h for h in args.heads if h in TEMDE]
    if not plain or not temde:
        parser.error("--heads needs at least one plain and one T-EMDE head")
    output, results_md, readme = smoke_paths(args.work_dir, args.output or spec.results, args.smoke, REPO)
    if args.report:
        stored = load_report(output)
        text = render(stored, args.scale)
        print(text)
        write_section(results_md, spec.section, text, spec.heading)
        if spec.readme_section:
            write_section(readme, spec.readme_section, text)
        return stored
    stored = json.loads(output.read_text()) if output.is_file() else {}
    runs = stored.setdefault("runs", {})
    towers, smoke_flags = smoke_setup(args.work_dir) if args.smoke else (offline_towers(args.towers_dir), [])
    work = Path(args.work_dir)
    if args.smoke:
        gallery, cache_dir = Path(smoke_flags[smoke_flags.index("--data") + 1]), work / "smoke" / "cache"
    else:
        gallery, cache_dir = args.gallery, Path(args.feature_cache_dir)
    runner = Runner(towers, work, cache_dir if args.scale == "6k" else None, gallery)

    def save() -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({**stored, "runs": runs}, indent=1))

    # Settings run by earlier invocations stay in the report while their recipe file is the same one.
    summary = {k: v for k, v in stored.get("summary", {}).items()
               if v.get("recipe") == recipe_hash(spec.configs[k])}  # fmt: skip
    for setting in args.settings:
        config = spec.configs[setting]
        heads = {}
        for head in args.heads:
            store = runs.setdefault(f"{setting} | {head}", {})
            flags = [*head_flags(head, spec), *SETTINGS[setting], *smoke_flags]
            heads[head] = run_head(flags, config, spec, args, runner, store, save)
            print(f"{setting} | {head}: CV RSUM {heads[head]['val']['rsum']['mean']:.1f}", file=sys.stderr)
        summary[setting] = {
            "heads": heads, "verdict": verdict(heads, plain, temde, spec.judged), "recipe": recipe_hash(config),
            "command": command(args.scale, setting, args.heads, args.folds, args.run_folds, args.seeds),
        }  # fmt: skip
    stored.update(summary=summary)
    save()
    text = render(stored, args.scale)
    print(text)
    plot(summary, output.with_suffix(".png"), spec.judged, spec.judged_label)
    write_section(results_md, spec.section, text, spec.heading)
    if spec.readme_section:
        write_section(readme, spec.readme_section, text)
    return stored


if __name__ == "__main__":
    main()
