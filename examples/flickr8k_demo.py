"""The README's main job: real towers, real photos, the real trainer, a checkpoint you can `from_pretrained`.

    python examples/flickr8k_demo.py [--data PATH] [--eval-data PATH] [--output-dir outputs/demo] [trainer flags ...]

1. Builds the two pretrained towers that install offline (EfficientNet-Lite0 converted once; MiniLM).
2. Trains with `accelerate launch` (one CPU process) of `examples/train_temde.py` and the committed
   recipe `examples/configs/flickr8k_demo.yaml` (chosen by `benchmarks/recipe_search.py`) on the train and
   val splits of ``--data`` (the shared Flickr8k-6k set: 6,090 photos); any extra flag (e.g.
   ``--num_train_epochs 2`` or ``--overwrite_output_dir true``) is passed to the trainer.
3. Evaluates the *saved* checkpoint from raw pixels and captions (`temde-hf evaluate`) on photos it never
   saw: every photo of ``--eval-data`` as one gallery (the shared Flickr8k-800 sample, disjoint from the
   training photos: 800 photos, 4,000 captions) and that set's 100-photo test split (the gallery of the
   earlier demos), stage 1 and with the token-alignment second stage at its defaults
   (``--rerank alignment``, on the test split); writes ``metrics.json``, the recall@K plots and the model card with the exact
   run settings.
4. With ``--update-docs`` it also writes the results table into README.md and the card into
   `model_cards/`, so the numbers there are always the ones this command measured.

Data: ``--data`` takes any Karpathy split JSON (Flickr8k, Flickr30k, COCO), an image folder with
``metadata.jsonl``, a captions CSV, parquet or a Hub dataset id; ``--eval-data`` the same (``none``: only
the test split of ``--data``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "flickr8k_demo.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k-6k" / "dataset_flickr8k.json"
# Unseen by the demo model: the Flickr8k-800 sample shares no photo with Flickr8k-6k.
DEFAULT_EVAL_DATA = REPO.parent / "shared" / "data" / "flickr8k-800" / "dataset_flickr8k.json"
CARD_NAME = "temde-efficientnet-lite0-minilm-flickr8k-demo"
MISSING_DATA = (
    "flickr8k_demo: no dataset at {data} ({flag}). Point {flag} at a Flickr8k / Flickr30k / COCO copy: a Karpathy "
    "split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json; images under "
    "--image-root or images/ beside it), an image folder with metadata.jsonl, or a Hub dataset id, e.g. "
    'make demo ARGS="--data /data/flickr30k/dataset_flickr30k.json --image-root /data/flickr30k/images '
    '--eval-data none" (--eval-data none: judge on the test split of --data only)'
)


def _data_exists(data: str) -> bool:
    """A local path that exists, or something that is not a local path (a Hub dataset id)."""
    path = Path(data)
    return path.exists() or (not path.is_absolute() and data.count("/") == 1 and not data.startswith("."))


def _relative(path: str | Path) -> str:
    """`path` relative to the working directory when it is local: the run settings and the card record
    where the towers and data were relative to the run, not one machine's absolute paths."""
    return os.path.relpath(path) if Path(path).exists() else str(path)


def launch_threads() -> int:
    """The CPU threads of the one training process: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train(args: argparse.Namespace, trainer_flags: list[str], towers: tuple[Path, Path]) -> None:
    """`accelerate launch` of the trainer in one CPU process (every launcher flag explicit).

    The process gets every core: left unset, `accelerate launch` gives a process that is not told `--cpu`
    one thread (OMP_NUM_THREADS=1), which halves the training steps' speed on 2 cores."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--num_cpu_threads_per_process", str(launch_threads()),
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "examples" / "train_temde.py"),
        str(CONFIG), "--vision_model_path", _relative(towers[0]), "--text_model_path", _relative(towers[1]),
        "--data", _relative(args.data), "--output_dir", args.output_dir,
        "--feature_cache_dir", str(Path(args.work_dir) / "feature_cache"),
        *(["--image_root", args.image_root] if args.image_root else []), *trainer_flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise SystemExit(
            f"flickr8k_demo: training failed (exit code {result.returncode}); see the lines above"
        )


# The unseen gallery is also scored in blocks of this many photos: the size of a small judgement set
BLOCK = 200


def galleries(args: argparse.Namespace) -> list[tuple[str, str, str, str | None, int]]:
    """What the saved checkpoint is judged on: (name, data, split, image root, block size or 0) per gallery.
    The first is the headline (the model card's results). Each is scored by stage 1 and by the token-alignment
    rerank (one encode pass gives both their inputs); the whole unseen set also in `BLOCK`-photo blocks."""
    if args.eval_data.lower() == "none":
        return [("test", args.data, "test", args.image_root, 0)]
    return [
        ("all", args.eval_data, "all", args.eval_image_root, BLOCK),
        ("test", args.eval_data, "test", args.eval_image_root, 0),
    ]


def evaluate(
    final: Path, name: str, data: str, split: str, image_root: str | None, block: int
) -> dict[str, Any]:
    """The saved checkpoint, from pixels, on one gallery (a fresh folder each run): stage 1 and the alignment
    rerank at the defaults every user gets (`temde-hf evaluate --rerank alignment`), on the whole gallery and,
    with `block`, on each disjoint block of that many photos (``folds_mean``)."""
    from temde_hf.evaluation.cli import main as evaluate_main

    out = final / f"eval-{name}"
    shutil.rmtree(out, ignore_errors=True)  # this run's own evaluation of this run's checkpoint
    argv = [str(final), "--data", data, "--split", split, "--output-dir", str(out), "--max-length", "40"]
    argv += ["--rerank", "alignment", "--fold-size", str(block)]
    argv += ["--image-root", image_root] if image_root else []
    return evaluate_main(argv)


def results_table(
    results: dict[str, dict[str, Any]], train: str, minutes: float, command: str, fresh: str
) -> str:
    """Per gallery: stage 1, the mean of its photo blocks (where scored), and the alignment rerank."""
    from temde_hf.evaluation.tables import format_table

    columns = ["name", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    rows, sizes = [], []
    for name, result in results.items():
        gallery = f"{name}: {result['n_images']} photos"
        rows.append({**result["full"], "name": gallery, "rsum": f"**{result['full']['rsum']:.1f}**"})
        if folds := result.get("folds"):
            block = f"{gallery}, mean of its {len(folds)} blocks of {result['fold_size']}"
            rows.append(
                {**result["folds_mean"], "name": block, "rsum": f"{result['folds_mean']['rsum']:.1f}"}
            )
        if rerank := result.get("rerank"):
            second = (
                f"{gallery}, + {rerank['reranker']} rerank (K={rerank['k']}, w={rerank['stage1_weight']:g})"
            )
            rows.append({**rerank["full"], "name": second, "rsum": f"{rerank['full']['rsum']:.1f}"})
        sizes.append(f"{name}: {result['n_images']} photos, {result['n_captions']} captions")
    headers = ["gallery (never seen in training)", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "RSUM"]
    return (
        f"Measured by `{command}` ({minutes:.0f} min on this machine's 2 CPU cores, {fresh}). "
        f"{CARD_NAME}, trained on {train}, evaluated from pixels on {'; '.join(sizes)}; the rerank row "
        "re-scores each query's top K with the token-level alignment at `temde-hf evaluate --rerank "
        "alignment`'s defaults:\n\n" + format_table(rows, columns, headers, float_format=".1f")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="training data (its train and val splits)")
    parser.add_argument("--image-root", default=None)
    parser.add_argument(
        "--eval-data", default=str(DEFAULT_EVAL_DATA), help="unseen photos: all of them, then its test split; "
        "none: the test split of --data"
    )  # fmt: skip
    parser.add_argument("--eval-image-root", default=None)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--work-dir", default="outputs", help="converted towers and cached features")
    parser.add_argument("--update-docs", action="store_true", help="write README.md's table and model_cards/")
    args, trainer_flags = parser.parse_known_args(argv)
    for flag, data in (("--data", args.data), ("--eval-data", args.eval_data)):
        if not _data_exists(data) and not (flag == "--eval-data" and data.lower() == "none"):
            raise SystemExit(MISSING_DATA.format(data=data, flag=flag))
    start = time.perf_counter()
    from temde_hf.convert.towers import HUB_IDS, offline_towers
    from temde_hf.hub.model_card import write_model_card

    # What this run did from nothing, so the reported minutes say what they include.
    converted = not (Path(args.work_dir) / "towers" / "efficientnet-lite0" / "model.safetensors").is_file()
    cache = Path(args.work_dir) / "feature_cache"
    cached_before = set(cache.glob("*/header.json"))  # one folder per finished cache
    towers = offline_towers(args.work_dir)
    train(args, trainer_flags, towers)
    final = Path(args.output_dir) / "final"
    results = {name: evaluate(final, name, *gallery) for name, *gallery in galleries(args)}
    headline = next(iter(results))
    settings = (Path(args.output_dir) / "run_settings.yaml").read_text()
    card = write_model_card(
        final,
        final / f"eval-{headline}" / "metrics.json",
        final / "README.md",
        model_name=CARD_NAME,
        base_models=list(HUB_IDS),
        datasets=["flickr8k"],
        dataset_name=f"{Path(galleries(args)[0][1]).parent.name}, split {galleries(args)[0][2]}: "
        f"{results[headline]['n_images']} photos none of which was trained on",
        run_settings=settings,
    )
    minutes = (time.perf_counter() - start) / 60
    computed = set(cache.glob("*/header.json")) - cached_before
    fresh = (
        f"tower conversion {'included' if converted else 'done earlier'}, "
        f"{len(computed)} cache(s) of frozen tower outputs (whole towers or their lower layers) computed in the run"
    )
    for name, result in results.items():
        result["demo_minutes"] = minutes
        (final / f"eval-{name}" / "metrics.json").write_text(json.dumps(result, indent=2))
    command = "make demo" + (f' ARGS="{" ".join(argv)}"' if argv else "")
    table = results_table(results, _trained_on(settings, args.data), minutes, command, fresh)
    print(table)
    print(f"checkpoint: {final}  (AutoModel.from_pretrained, or trust_remote_code=True without temde_hf)")
    if args.update_docs:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        shutil.copyfile(card, REPO / "model_cards" / f"{CARD_NAME}.md")
        write_section(REPO / "README.md", "demo_results", table)
    return results


def _trained_on(run_settings: str, data: str) -> str:
    """'the train, val splits of flickr8k-6k' from the run's saved settings (what the trainer really used)."""
    import yaml

    splits = yaml.safe_load(run_settings).get("data", {}).get("train_split", "?")
    return f"the {splits} split(s) of {Path(data).parent.name or data}"


if __name__ == "__main__":
    main()
