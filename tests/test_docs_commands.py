"""Every command README.md, benchmarks/RESULTS.md and benchmarks/README.md show runs, at smoke size.

The commands are collected from the docs themselves: the lines of ``bash`` code blocks and the indented
command lines of generated sections (``    python benchmarks/...``), with ``\\`` continuations joined and
comments dropped. `SMOKE` maps each one to what runs here instead: the same entry point with its
placeholders (``CKPT``, ``photos/``, ``outputs/demo``, ``CONFIG.yaml``) filled in by tiny stand-ins and
flags that shrink it, an existing test that already runs it, or a stated reason it cannot run in CI. A
command the table does not know fails `test_every_shown_command_has_a_smoke_run`: a new command in the
docs cannot slip by untested.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from temde_hf.testing import save_tiny_checkpoint, save_tiny_towers

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO.parent / "shared"  # the shared data beside the checkout (conftest checks it is there)
DOCS = (REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", REPO / "benchmarks" / "README.md")
COMMAND_WORDS = {"python", "temde-hf", "accelerate", "make"}
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}


def shown_commands(text: str) -> list[str]:
    """The shell commands of a Markdown text, each as ``shlex.join`` of its words (see the module doc)."""
    commands: list[str] = []
    fence: str | None = None  # the open code block's language
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is not None:
            if fence not in SHELL_BLOCKS:
                continue
        elif not (pending or (line.startswith("    ") and stripped.split(" ", 1)[0] in COMMAND_WORDS)):
            continue
        joined = f"{pending}{stripped}" if pending.endswith("\n") else f"{pending} {stripped}".strip()
        if joined.endswith("\\"):
            pending = joined[:-1].strip()
            continue
        try:
            words = shlex.split(joined, comments=True)
        except ValueError:  # a quoted argument spans lines (`python -c "..."`): read on
            pending = f"{joined}\n"
            continue
        pending = ""
        if words:
            commands.append(shlex.join(words))
    return commands


def doc_commands() -> list[str]:
    return list(dict.fromkeys(c for doc in DOCS for c in shown_commands(doc.read_text())))


@dataclass(frozen=True)
class Smoke:
    """Steps run in order in this process: ``("temde-hf", argv)`` through the console script's `main`
    (must return 0) or ``("script", path, argv)`` through the script's own `main`. Arguments are
    formatted with the `workspace` fields."""

    steps: tuple[tuple, ...]
    slow: bool = False


@dataclass(frozen=True)
class Covered:
    """Already run at smoke size by this test (``file::function``)."""

    test: str


@dataclass(frozen=True)
class Excluded:
    """Not run in CI, and why."""

    reason: str


TINY_MODEL = ["--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3"]
TINY_TRAIN = [
    *TINY_MODEL, "--data", "{data}", "--per_device_train_batch_size", "8", "--max_steps", "2",
    "--save_steps", "0", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip
INDEX = ("temde-hf", ["index", "--model", "{ckpt}", "--images", "{images}", "--out", "{tmp}/gallery_index", "--store-tokens",
                      "--index-type", "flat", "--backend", "torch"])  # fmt: skip
EXPORT = ("temde-hf", ["export-onnx", "{ckpt}", "--int8"])
BENCH = REPO / "benchmarks"
CUDA = (
    "needs a CUDA device (the `gpu` benchmark run); its code paths run on CPU in the CPU commands' smoke runs"
)


def _readme_block_after(heading: str) -> list[str]:
    """The commands of the first shell block after `heading` in README.md (as `shown_commands` reads them)."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    block = text[text.index("```bash", start) : text.index("```\n", text.index("```bash", start) + 3) + 4]
    return shown_commands(block)


STREAM_SHARDS, STREAM_TOWERS, STREAM_TRAIN, STREAM_TWO_PROCESSES = _readme_block_after("### Streaming data")

# the measuring runs a shown `--report` command re-renders (each writes its JSON and RESULTS.md into {tmp})
SEARCH_SYNTHETIC = ("script", BENCH / "search_latency.py",
                    ["--synthetic-dim", "8", "--sizes", "600", "--queries", "20", "--repeats", "2", "--quick",
                     "--work-dir", "{tmp}/search-work", "--output", "{tmp}/search.json"])  # fmt: skip
POOLING_TINY = ("script", BENCH / "pooling_speed.py",
                ["--device", "cpu", "--batch-size", "2", "--dim", "16", "--heads", "2", "--tokens", "5", "9",
                 "--sketches", "4x3", "--warmup", "0", "--repeats", "1", "--no-plot", "--output", "{tmp}/pooling.json"])  # fmt: skip
MODEL_TINY = ["--device", "cpu", "--quick", "--batch-size", "2", "--warmup", "0", "--repeats", "1"]
BACKENDS_TINY = ("script", BENCH / "encode_throughput.py",
                 ["--checkpoint", "{ckpt}", "--data", "{data}", "--batch-size", "2", "--repeats", "1",
                  "--output", "{tmp}/encode_backends_cpu.json"])  # fmt: skip

# fmt: off
# the command as the docs show it (shlex.join of its words) -> what runs in CI
SMOKE: dict[str, Smoke | Covered | Excluded] = {
    "make demo": Smoke(
        (("script", REPO / "examples" / "flickr8k_demo.py",
          ["--data", "{data}", "--eval-data", "none", "--output-dir", "{tmp}/demo", "--work-dir", "{tmp}/demo-work",
           "--max_steps", "2",
           "--per_device_train_batch_size", "8"]),),
        slow=True,
    ),
    "make test": Excluded("CI itself: this test runs inside it"),
    "accelerate launch --multi_gpu --num_processes 8 examples/train_temde.py examples/configs/flickr30k.yaml "
    "--vision_model_path towers/vit --text_model_path towers/bert": Smoke(
        (("script", REPO / "examples" / "train_temde.py",
          [str(REPO / "examples" / "configs" / "flickr30k.yaml"), "--vision_model_path", "{vision}",
           "--text_model_path", "{text}", *TINY_TRAIN, "--output_dir", "{tmp}/flickr30k", "--image_root", "{data_images}",
           "--dataloader_num_workers", "0", "--mixed_precision", "no", "--eval_split", "val",
           "--sketch_init_batches", "1"]),),
    ),
    "temde-hf train CONFIG.yaml --resume_from_checkpoint true": Smoke(
        (("temde-hf", ["train", str(REPO / "examples" / "configs" / "tiny_synthetic.yaml"), "--vision_model_path",
                       "{vision}", "--text_model_path", "{text}", "--output_dir", "{tmp}/resume", "--max_steps", "2",
                       "--stop_after_steps", "1", "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true"]),
         ("temde-hf", ["train", str(REPO / "examples" / "configs" / "tiny_synthetic.yaml"), "--vision_model_path",
                       "{vision}", "--text_model_path", "{text}", "--output_dir", "{tmp}/resume", "--max_steps", "2",
                       "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
                       "--resume_from_checkpoint", "true"])),
    ),
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
    "examples/train_temde.py CONFIG.yaml ...": Covered(
        "tests/test_training_distributed.py::test_two_process_training_matches_one_process_and_resumes"
    ),
    "temde-hf index --model CKPT --images photos/ --out gallery_index --store-tokens": Smoke((INDEX,)),
    "temde-hf search --index gallery_index --text 'a dog on the beach' -k 5 --rerank itm --rerank-k 20": Smoke(
        (INDEX, ("temde-hf", ["search", "--index", "{tmp}/gallery_index", "--text", "a red square on a black background",
                              "-k", "5", "--rerank", "itm", "--rerank-k", "20"]))
    ),
    "python benchmarks/search_latency.py --checkpoint outputs/demo --sizes 100000 1000000 --protocol "
    "--output benchmarks/results/search_latency.json": Smoke(
        (("script", BENCH / "search_latency.py",
          ["--checkpoint", "{ckpt}", "--data", "{data}", "--sizes", "600", "--queries", "20", "--repeats", "2",
           "--quick", "--protocol", "--work-dir", "{tmp}/search-work", "--output", "{tmp}/search_latency.json"]),),
        slow=True,
    ),
    "python benchmarks/search_latency.py --checkpoint outputs/demo --sizes 1000000 --types global --probes 32 "
    "--factors 30 --output benchmarks/results/search_latency_1m_global_memory.json": Smoke(
        (("script", BENCH / "search_latency.py",
          ["--checkpoint", "{ckpt}", "--data", "{data}", "--sizes", "600", "--types", "global", "--probes", "2",
           "--factors", "3", "--queries", "20", "--repeats", "2", "--work-dir", "{tmp}/search-work",
           "--output", "{tmp}/search_latency_1m_global_memory.json"]),),
        slow=True,
    ),
    "python benchmarks/search_latency.py --checkpoint outputs/demo --sizes --protocol "
    "--output benchmarks/results/search_protocol.json": Smoke(
        (("script", BENCH / "search_latency.py",
          ["--checkpoint", "{ckpt}", "--data", "{data}", "--sizes", "--queries", "20", "--protocol",
           "--work-dir", "{tmp}/search-work", "--output", "{tmp}/search_protocol.json"]),),
        slow=True,
    ),
    **{f"python benchmarks/search_latency.py --report --output benchmarks/results/{name}.json": Smoke(
        (SEARCH_SYNTHETIC, ("script", BENCH / "search_latency.py", ["--report", "--output", "{tmp}/search.json"])))
       for name in ("search_latency", "search_latency_1m_global_memory", "search_protocol")},
    "python benchmarks/pooling_speed.py --report --output benchmarks/results/pooling_speed_cpu.json": Smoke(
        (POOLING_TINY, ("script", BENCH / "pooling_speed.py", ["--report", "--output", "{tmp}/pooling.json"]))
    ),
    "python benchmarks/encode_throughput.py --report --output benchmarks/results/encode_throughput_cpu_tiny.json": Smoke(
        (("script", BENCH / "encode_throughput.py", [*MODEL_TINY, "--output", "{tmp}/encode.json"]),
         ("script", BENCH / "encode_throughput.py", ["--report", "--output", "{tmp}/encode.json"]))
    ),
    "python benchmarks/train_step.py --report --output benchmarks/results/train_step_cpu_tiny.json": Smoke(
        (("script", BENCH / "train_step.py", [*MODEL_TINY, "--output", "{tmp}/train.json"]),
         ("script", BENCH / "train_step.py", ["--report", "--output", "{tmp}/train.json"]))
    ),
    "python benchmarks/encode_throughput.py --report --output benchmarks/results/encode_backends_cpu.json": Smoke(
        (EXPORT, BACKENDS_TINY,
         ("script", BENCH / "encode_throughput.py", ["--report", "--output", "{tmp}/encode_backends_cpu.json"])),
        slow=True,
    ),
    # --compile (minutes of compiling) and --head-step (a real epoch over the Flickr8k captions) are left out
    "python benchmarks/pooling_speed.py --device cpu --batch-size 32 --dim 256 --heads 4 --tokens 49 197 "
    "--sketches 32x6 --compile --anchor --head-step --output benchmarks/results/pooling_speed_cpu.json": Smoke(
        (("script", BENCH / "pooling_speed.py",
          ["--device", "cpu", "--batch-size", "2", "--dim", "16", "--heads", "2", "--tokens", "5", "9",
           "--sketches", "4x3", "--anchor", "--warmup", "0", "--repeats", "1", "--no-plot",
           "--output", "{tmp}/pooling_speed_cpu.json"]),),
    ),
    "python benchmarks/encode_throughput.py --device cpu --output benchmarks/results/encode_throughput_cpu_tiny.json": Covered(
        "tests/test_benchmarks_smoke.py::test_model_benchmarks_smoke"
    ),
    "python benchmarks/train_step.py --device cpu --output benchmarks/results/train_step_cpu_tiny.json": Covered(
        "tests/test_benchmarks_smoke.py::test_model_benchmarks_smoke"
    ),
    "temde-hf export-onnx outputs/demo/final --int8": Smoke((EXPORT,)),
    "python benchmarks/encode_throughput.py --checkpoint outputs/demo/final --output benchmarks/results/encode_backends_cpu.json": Smoke(
        (EXPORT, BACKENDS_TINY),
        slow=True,
    ),
    "python benchmarks/temde_question.py --temde 'T-EMDE concat N32 H6 + warm-up 1 ep' --seeds 0 1": Smoke(
        (("script", BENCH / "temde_question.py",
          ["--smoke", "--seeds", "0", "--work-dir", "{tmp}/work", "--output", "{tmp}/temde_question.json"]),),
        slow=True,
    ),
    "python benchmarks/temde_question.py --setting tuned --temde 'text top 2, + T-EMDE concat N32 H6 + warm-up 1 ep, "
    "+ 14x14 stage tokens' --seeds 0 1": Smoke(
        (("script", BENCH / "temde_question.py",
          ["--smoke", "--setting", "tuned", "--seeds", "0", "--work-dir", "{tmp}/work",
           "--output", "{tmp}/temde_question_tuned.json"]),),
        slow=True,
    ),
    # the demo recipe's sketch reads EfficientNet-Lite0's layer 11: at smoke size the tiny tower's layer 1
    **{f"python benchmarks/holdout_estimate.py --recipe {recipe} --seeds 0 1 2": Smoke(
        (("script", BENCH / "holdout_estimate.py",
          ["--smoke", "--recipe", recipe, "--seeds", "0", "--work-dir", "{tmp}/work",
           "--output", "{tmp}/holdout_estimate.json"]),),
        slow=True,
    ) for recipe in ("demo", "text2-mean")},
    "python benchmarks/quality.py --settings frozen --heads mean 'transformer layer + mean' "
    "'T-EMDE concat soft_dlsh' 'T-EMDE replace soft_dlsh' --folds 5 --run-folds 0 1 2 --seeds 0": Smoke(
        (("script", BENCH / "quality.py",
          ["--smoke", "--settings", "frozen", "--heads", "mean", "T-EMDE concat soft_dlsh", "--folds", "2",
           "--run-folds", "0", "--seeds", "0", "--work-dir", "{tmp}/work", "--output", "{tmp}/quality_6k.json"]),),
        slow=True,
    ),
    "python benchmarks/quality.py --scale 800 --settings frozen --heads mean 'transformer layer + mean' 'tower pooler' "
    "'T-EMDE concat soft_dlsh' 'T-EMDE concat anchor' 'T-EMDE replace soft_dlsh' --folds 5 --seeds 0 1": Smoke(
        (("script", BENCH / "quality.py",
          ["--smoke", "--scale", "800", "--settings", "frozen", "--heads", "mean", "T-EMDE concat soft_dlsh", "--folds", "2",
           "--seeds", "0", "--work-dir", "{tmp}/work", "--output", "{tmp}/quality.json"]),),
        slow=True,
    ),
    "python benchmarks/quality.py --scale 800 --settings text --heads mean 'T-EMDE concat soft_dlsh' --folds 3 --seeds 0 1": Smoke(
        (("script", BENCH / "quality.py",
          ["--smoke", "--scale", "800", "--settings", "text", "--heads", "mean", "T-EMDE concat soft_dlsh", "--folds", "2",
           "--seeds", "0", "--work-dir", "{tmp}/work", "--output", "{tmp}/quality.json",
           ]),),
        slow=True,
    ),
    "python benchmarks/recipe_search.py --dataset flickr8k-6k --stage 6k --stage 6k-tune --stage 6k-tuned-temde": Smoke(
        (("script", BENCH / "recipe_search.py",
          ["--smoke", "--dataset", "flickr8k-6k", "--stage", "6k", "--stage", "6k-tune", "--stage", "6k-tuned-temde",
           "--recipes", "demo recipe (mean, flip, token LN, lr 1e-3, batch 128, 3 ep)",
           "T-EMDE concat N16 H4 + warm-up 1 ep", "batch 256, no token LayerNorm", "+ batch 512",
           "+ text tower: last 2 of 6 layers, LR x0.1",
           "--folds", "2", "--run-folds", "0", "--seeds", "0", "--work-dir", "{tmp}/work",
           "--output", "{tmp}/recipe_search_6k.json"]),),
        slow=True,
    ),
    "python benchmarks/recipe_search.py --dataset flickr8k-800 --stage head --stage text --stage final": Smoke(
        (("script", BENCH / "recipe_search.py",
          ["--smoke", "--dataset", "flickr8k-800", "--stage", "head", "--stage", "text", "--stage", "final", "--recipes", "no sketch (mean only)",
           "text tower frozen (reference)", "--folds", "2", "--seeds", "0", "--work-dir", "{tmp}/work",
           "--output", "{tmp}/recipe_search.json"]),),
        slow=True,
    ),
    "python benchmarks/rerank.py --folds 3 --cv-seeds 0 --seeds 0 1": Smoke(
        (("script", BENCH / "rerank.py",
          ["--smoke", "--folds", "2", "--cv-seeds", "0", "--seeds", "0", "--variants", "base",
           "--latency-queries", "2", "--work-dir", "{tmp}/work", "--output", "{tmp}/rerank.json"]),),
        slow=True,
    ),
    "python benchmarks/rerank.py --recipe demo --folds 5 --cv-seeds 0 --seeds 0 1": Smoke(
        (("script", BENCH / "rerank.py",
          ["--smoke", "--recipe", "demo", "--folds", "2", "--cv-seeds", "0", "--seeds", "0", "--variants", "base",
           "--latency-queries", "2", "--work-dir", "{tmp}/work", "--output", "{tmp}/rerank_demo.json"]),),
        slow=True,
    ),
    # CV on 1 of 2 folds (the report's --run-folds path), the final run judged on the smoke data as the gallery
    "python benchmarks/rerank.py --recipe demo6k --folds 5 --run-folds 0 --cv-seeds 0 --seeds 0 1": Smoke(
        (("script", BENCH / "rerank.py",
          ["--smoke", "--recipe", "demo6k", "--folds", "2", "--run-folds", "0", "--cv-seeds", "0", "--seeds", "0",
           "--variants", "base", "--latency-queries", "2", "--work-dir", "{tmp}/work",
           "--output", "{tmp}/rerank_6k.json"]),),
        slow=True,
    ),
    # README "Streaming data": the block as shown, run by bash in a folder with shared/ beside it
    STREAM_TRAIN: Smoke((("shell", STREAM_SHARDS), ("shell", STREAM_TOWERS), ("shell", STREAM_TRAIN)), slow=True),
    STREAM_SHARDS: Covered("tests/test_docs_commands.py::test_shown_command_runs_at_smoke_size"),
    STREAM_TOWERS: Covered("tests/test_docs_commands.py::test_shown_command_runs_at_smoke_size"),
    STREAM_TWO_PROCESSES: Covered(
        "tests/test_streaming.py::test_two_process_streaming_run_sees_every_sample_once_per_epoch_and_resumes_exactly"
    ),
    "python benchmarks/pooling_speed.py --device cuda": Excluded(CUDA),
    "python benchmarks/encode_throughput.py --device cuda --towers base": Excluded(CUDA),
    "python benchmarks/train_step.py --device cuda --towers base": Excluded(CUDA),
    "python benchmarks/search_latency.py --device cuda --checkpoint outputs/demo": Excluded(CUDA),
}
# fmt: on


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny stand-ins for the docs' placeholders: a checkpoint with a matching head (``concat``, so every
    index type and reranker applies), towers, a 70-image synthetic dataset and a colour gallery."""
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.testing import make_colour_gallery

    root = tmp_path_factory.mktemp("docs")
    checkpoint = save_tiny_checkpoint(root / "ckpt", matching_head=True, seed=0, sketch_fusion="concat")
    vision, text = save_tiny_towers(root / "towers")
    data = make_synthetic_karpathy(root / "data", n_images=70, seed=0)  # >= 256 train+val captions (PQ)
    make_colour_gallery(root / "photos")
    return {"ckpt": str(checkpoint), "vision": str(vision), "text": str(text), "data": str(data),
            "data_images": str(data.parent / "images"), "images": str(root / "photos"), "tmp": str(root)}  # fmt: skip


def _run_shell(command: str, folder: Path) -> None:
    """`command` exactly as the docs show it, by bash in `folder` (a stand-in for the repository root, with
    the shared data beside it), the test's interpreter and console scripts first on ``PATH``."""
    folder.mkdir(exist_ok=True)
    shared = folder.parent / "shared"
    if not shared.exists():
        shared.symlink_to(SHARED_DIR, target_is_directory=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run(
        ["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command[:200]}\nexit {result.returncode}:\n{result.stderr[-3000:]}"


def _run(step: tuple, fields: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    if step[0] == "shell":
        _run_shell(step[1], Path(fields["tmp"]) / "repo")
        return
    argv = [arg.format(**fields) for arg in step[-1]]
    if step[0] == "temde-hf":
        from temde_hf.cli import main

        assert main(argv) == 0, argv
        return
    # the script itself, as `python SCRIPT ARGS` runs it (its `__main__` block), in this process
    monkeypatch.setattr(sys, "argv", [str(step[1]), *argv])
    try:
        runpy.run_path(str(step[1]), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{step[1].name} exited with {exit_.code}"


def test_every_shown_command_has_a_smoke_run() -> None:
    unknown = [c for c in doc_commands() if c not in SMOKE]
    assert not unknown, (
        "commands shown in README.md / RESULTS.md that tests/test_docs_commands.py's SMOKE table does not know "
        "(add each with its smoke run):\n" + "\n".join(unknown)
    )
    stale = [c for c in SMOKE if c not in doc_commands()]
    assert not stale, "SMOKE entries no doc shows any more (remove them):\n" + "\n".join(stale)


def test_collection_reads_blocks_continuations_and_generated_lines() -> None:
    text = (
        "Intro `python inline.py` is prose.\n\n```bash\nmake demo   # set up\n# a comment\n"
        "accelerate launch a.py \\\n    --flag 1      # trailing\n```\n\n```python\nimport x\n```\n\n"
        '    python benchmarks/b.py --heads "a b" \\\n        --out x.json\n\n    not a command\n'
    )
    assert shown_commands(text) == [
        "make demo", "accelerate launch a.py --flag 1", "python benchmarks/b.py --heads 'a b' --out x.json",
    ]  # fmt: skip


@pytest.mark.parametrize("test", sorted({e.test for e in SMOKE.values() if isinstance(e, Covered)}))
def test_covering_tests_exist(test: str) -> None:
    path, name = test.split("::")
    assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), test


def _smoke_params() -> list:
    return [
        pytest.param(command, marks=[pytest.mark.slow] if entry.slow else [], id=command[:60])
        for command, entry in SMOKE.items()
        if isinstance(entry, Smoke)
    ]


@pytest.mark.parametrize("command", _smoke_params())
def test_shown_command_runs_at_smoke_size(
    command: str, workspace: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {**workspace, "tmp": str(tmp_path)}
    for step in SMOKE[command].steps:
        _run(step, fields, monkeypatch)
