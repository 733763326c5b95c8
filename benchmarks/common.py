"""Shared pieces of the speed benchmarks: device choice, timing, peak memory and JSON.

Tables come from the library's one formatter, `temde_hf.evaluation.tables.format_table`.

Timings are medians over repeats after warm-up. On CUDA they use CUDA events (GPU time between two
points in the stream) and `torch.cuda.max_memory_allocated`; on CPU, `time.perf_counter` and no memory
figure (the CPU allocator has no peak counter worth reporting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# The shared Flickr8k sample beside the repository (as the tests and the demo reach it).
FLICKR8K_JSON = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-800" / "dataset_flickr8k.json"
)


def resolve_device(name: str | None) -> torch.device:
    """`"cuda"` / `"cpu"` / None (CUDA when present) -> a device; asking for absent CUDA is an error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def device_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, for the JSON and RESULTS.md."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall (CPU) or stream (CUDA) milliseconds of `fn()` over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of one `fn()` call above what was allocated before it, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def is_oom(error: BaseException) -> bool:
    """Out of memory on either device (the benchmark records it instead of stopping)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def write_json(payload: dict[str, Any], output: str | Path) -> Path:
    """Write `payload` as indented JSON, creating parent folders; returns the path."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


TOWER_PRESETS = ("tiny", "base")


def tower_configs(towers: str) -> tuple[Any, Any, dict[str, int]]:
    """The vision and text tower configs of a preset and its input sizes.

    Args:
        towers: `"tiny"` (1-layer ViT on 32-px images, 1-layer BERT: a CPU smoke size) or `"base"`
            (ViT-B/16 at 224 px = 197 tokens and BERT-base: the GPU benchmark size).

    Returns:
        `(ViTConfig, BertConfig, {"image_size", "text_len", "vocab_size"})`.
    """
    from transformers import BertConfig, ViTConfig

    from temde_hf.testing import TINY_IMAGE_SIZE, tiny_tower_configs

    if towers == "tiny":
        vision, text = tiny_tower_configs(hidden_size=64)
        return vision, text, {"image_size": TINY_IMAGE_SIZE, "text_len": 16, "vocab_size": text.vocab_size}
    if towers == "base":
        vision, text = ViTConfig(image_size=224, patch_size=16), BertConfig()
        return vision, text, {"image_size": 224, "text_len": 32, "vocab_size": text.vocab_size}
    raise SystemExit(f"--towers must be one of {TOWER_PRESETS}, got {towers!r}")


def build_model(
    towers: str, fusion: str, kernel: str, n_sketches: int, n_hyperplanes: int, projection_dim: int
) -> tuple[Any, dict[str, int]]:
    """A randomly initialised `TemdeModel` and its input sizes.

    Args:
        towers: `"tiny"` (1-layer ViT on 32-px images, 1-layer BERT: a CPU smoke size) or `"base"`
            (ViT-B/16 at 224 px = 197 tokens and BERT-base, random weights: the GPU benchmark size).
        fusion: `sketch_fusion` (`"none"` is the same towers with plain mean pooling).
        kernel: `sketch_kernel` (`"auto"`, `"torch"`, `"triton"`).

    Returns:
        The model (train mode) and `{"image_size", "text_len", "vocab_size"}`.
    """
    from temde_hf.models.temde import TemdeConfig, TemdeModel

    vision, text, sizes = tower_configs(towers)
    config = TemdeConfig(
        vision_config=vision,
        text_config=text,
        projection_dim=projection_dim,
        pooling="mean",
        sketch_fusion=fusion,
        n_sketches=n_sketches,
        n_hyperplanes=n_hyperplanes,
        sketch_kernel=kernel,
    )
    return TemdeModel(config), sizes


def make_batch(sizes: dict[str, int], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pixels and token ids; captions padded to `text_len` with 0-40% padding per row."""
    generator = torch.Generator().manual_seed(0)
    size, text_len = sizes["image_size"], sizes["text_len"]
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    input_ids = torch.randint(5, sizes["vocab_size"], (batch, text_len), generator=generator)
    lengths = torch.randint((3 * text_len) // 5, text_len + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(text_len)[None, :] < lengths[:, None]).long()
    batch_dict = {
        "pixel_values": pixel_values,
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
    }
    return {k: v.to(device) for k, v in batch_dict.items()}


def model_variants(device: torch.device) -> dict[str, tuple[str, str]]:
    """Name -> (sketch_fusion, sketch_kernel): plain pooling, T-EMDE, and on CUDA T-EMDE's torch path."""
    variants = {"plain-mean": ("none", "torch"), "temde-concat": ("concat", "auto")}
    if device.type == "cuda":
        variants["temde-concat-torch-kernel"] = ("concat", "torch")
    return variants


def model_benchmark_args(
    argv: list[str] | None,
    doc: str | None,
    default_output: Path,
    *,
    batch_size: tuple[int, int],
    warmup: int,
    repeats: int,
) -> argparse.Namespace:
    """The command line shared by the model-level benchmarks (encode throughput, training step), resolved.

    Args:
        argv: The arguments (``None``: `sys.argv`).
        doc: The benchmark's description.
        default_output: Its JSON path.
        batch_size: Default batch size `(on CUDA, on CPU)`.
        warmup: Default warm-up calls; `repeats`: default timed calls (``--quick``: 1 and 3, batch 8).

    Returns:
        The parsed arguments with `device` a `torch.device`, `batch_size`, `warmup` and `repeats` filled in,
        and `n_sketches` / `n_hyperplanes` parsed from ``--sketch NxH``.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if present")
    parser.add_argument("--towers", choices=TOWER_PRESETS, default="tiny")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up, 3 repeats")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"default {batch_size[0]} (cuda) / {batch_size[1]} (cpu)"
    )
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--sketch", default="32x6", help="NxH of the sketch")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on cuda")
    parser.add_argument("--warmup", type=int, default=None, help=f"default {warmup}")
    parser.add_argument("--repeats", type=int, default=None, help=f"default {repeats}")
    parser.add_argument("--output", type=Path, default=default_output)
    parser.add_argument(
        "--report", action="store_true", help="rewrite the RESULTS.md section from --output; measure nothing"
    )
    args = parser.parse_args(argv)
    if args.report:  # nothing is measured: the device need not be present
        return args
    args.device = resolve_device(args.device)
    default_batch = batch_size[0] if args.device.type == "cuda" else batch_size[1]
    args.batch_size = args.batch_size or (8 if args.quick else default_batch)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else warmup)
    args.repeats = args.repeats or (3 if args.quick else repeats)
    args.n_sketches, args.n_hyperplanes = (int(v) for v in args.sketch.lower().split("x"))
    return args


def variant_models(args: argparse.Namespace) -> Iterator[tuple[str, Any, dict[str, int]]]:
    """`(name, model on args.device, input sizes)` of each `model_variants` entry, built one at a time."""
    for name, (fusion, kernel) in model_variants(args.device).items():
        model, sizes = build_model(
            args.towers, fusion, kernel, args.n_sketches, args.n_hyperplanes, args.projection_dim
        )
        yield name, model.to(args.device), sizes
        del model  # before the next variant is built: never two models in memory at once


def model_benchmark_settings(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    """The settings a model-level benchmark records in its JSON."""
    return {
        "towers": args.towers, "batch_size": args.batch_size, "projection_dim": args.projection_dim,
        "sketch": args.sketch, "dtype": args.dtype if args.device.type == "cuda" else "fp32",
        "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick, **sizes,
    }  # fmt: skip


def model_benchmark_command(
    script: str, payload: dict[str, Any], output: Path, defaults: dict[str, Any]
) -> str:
    """The command that measured a model-level benchmark's `payload`, rebuilt from its settings.

    Args:
        script: The benchmark's file name.
        defaults: Its defaults: ``batch_size`` `(cuda, cpu)`, ``warmup``, ``repeats`` (as given to
            `model_benchmark_args`); flags at their defaults are left out.
    """
    import shlex

    settings, device = payload["settings"], payload["env"]["device"].split(":")[0]
    quick = settings.get("quick", False)
    batch = 8 if quick else defaults["batch_size"][0 if device == "cuda" else 1]
    expected = {"towers": "tiny", "batch_size": batch, "projection_dim": 256, "sketch": "32x6",
                "warmup": 1 if quick else defaults["warmup"], "repeats": 3 if quick else defaults["repeats"]}  # fmt: skip
    words = ["--device", device]
    for key, default in expected.items():
        if settings[key] != default:
            words += [f"--{key.replace('_', '-')}", str(settings[key])]
    if device == "cuda" and settings["dtype"] != "bf16":
        words += ["--dtype", settings["dtype"]]
    if quick:
        words.append("--quick")
    return shlex.join(["python", f"benchmarks/{script}", *words, "--output", shown_path(output)])


def write_section(path: Path, name: str, markdown: str, heading: str | None = None) -> None:
    """Replace the generated section `name` of a Markdown file (between BEGIN/END markers) with `markdown`.

    A benchmark writes its own numbers into RESULTS.md / README.md this way, so no figure there is typed
    by hand or left behind by a change of defaults. A missing section is appended (under `heading`).
    """
    begin, end = f"<!-- BEGIN {name} (generated: do not edit) -->", f"<!-- END {name} -->"
    body = markdown.lstrip("\n").rstrip()  # not strip(): a leading indented code line keeps its indent
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading or name}\n\n{block}\n"
    path.write_text(text)


REPO = Path(__file__).resolve().parents[1]
# --smoke: the trainer flags that shrink any recipe to a tiny model and two steps (after the recipe's own)
SMOKE_TRAINER_FLAGS = [
    "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3", "--per_device_train_batch_size", "8",
    "--max_steps", "2", "--eval_steps", "2", "--itm_hidden_size", "8", "--itm_heads", "2", "--max_text_length", "24",
]  # fmt: skip


def add_smoke_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random towers, a generated 30-image dataset, two training steps: runs the harness end to "
        "end (CI) and measures nothing; results and doc sections go under --work-dir/smoke, never the repo's",
    )


def smoke_setup(work_dir: str | Path) -> tuple[tuple[Path, Path], list[str]]:
    """The ``--smoke`` stand-ins: tiny tower folders and the trainer flags (data included) to append."""
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.testing import save_tiny_towers

    folder = Path(work_dir) / "smoke"
    towers = save_tiny_towers(folder / "towers", num_hidden_layers=2)  # recipes may train the last layers
    data = make_synthetic_karpathy(folder / "data", n_images=30, seed=0)
    return towers, [*SMOKE_TRAINER_FLAGS, "--data", str(data)]


def smoke_paths(
    work_dir: str | Path, output: str | Path, smoke: bool, repo: Path = REPO
) -> tuple[Path, Path, Path]:
    """(results JSON, RESULTS.md, README.md) a run writes: `output` and `repo`'s docs, or files under
    ``work_dir/smoke`` for a ``--smoke`` run, whose numbers mean nothing."""
    if not smoke:
        return Path(output), repo / "benchmarks" / "RESULTS.md", repo / "README.md"
    folder = Path(work_dir) / "smoke"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / Path(output).name, folder / "RESULTS.md", folder / "README.md"


# ----------------------------------------------------------------------------------------------
# Sections written from a stored JSON (the measuring run and ``--report`` render the same text)
# ----------------------------------------------------------------------------------------------
def results_doc(output: str | Path, trial: bool = False, repo: Path = REPO) -> Path:
    """The RESULTS.md a run with JSON `output` writes its section into.

    The repository's `benchmarks/RESULTS.md` for a JSON in its `benchmarks/results/` folder (a measurement
    meant for the docs); otherwise, and for a ``--quick`` (`trial`) run, a RESULTS.md beside the JSON, so a
    test's or a trial's numbers never land in the repository's docs.
    """
    results = (repo / "benchmarks" / "results").resolve()
    if not trial and Path(output).resolve().parent == results:
        return repo / "benchmarks" / "RESULTS.md"
    return Path(output).parent / "RESULTS.md"


def shown_path(path: str | Path, repo: Path = REPO) -> str:
    """`path` as a command in the docs shows it: relative to the repository root when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def stored_path(path: str | Path, repo: Path = REPO) -> str:
    """`path` as a results JSON records it: relative to the repository root (``..`` allowed), so the
    stored run names no machine's folders and reads the same wherever the clone lives."""
    # abspath, not resolve: a linked ../shared stays ../shared
    return os.path.relpath(os.path.abspath(path), repo)


def load_report(output: str | Path) -> dict[str, Any]:
    """The stored JSON ``--report`` re-renders; a missing one is a one-line error naming the flag."""
    path = Path(output)
    if not path.is_file():
        raise SystemExit(
            f"--report: no stored results at {path} (--output); run the benchmark without --report first, "
            "or pass --output PATH of a stored run"
        )
    return json.loads(path.read_text())


def num(value: float | None, digits: int = 3) -> str:
    """A measured number for a table cell or a sentence: `digits` significant digits, thousands separated
    from 1,000 up (never an exponent), "–" for None."""
    if value is None:
        return "–"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def env_sentence(env: dict[str, Any]) -> str:
    """What a JSON says it was measured on, as one sentence fragment."""
    where = env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('cpu_threads', '?')} torch threads)"
    return f"{where}, torch {env.get('torch', '?')}, Python {env.get('python', '?')}"


def load_sentence(values: dict[str, Any]) -> str:
    """``"load average 1.9 (start), 2.6 (after 100000)"`` from `{label: 1-min value or (1, 5, 15)-min triple}`."""
    parts = [
        f"{(v[0] if isinstance(v, (list, tuple)) else v):.1f} ({label})"
        for label, v in values.items()
        if v is not None
    ]
    return "1-minute load average " + ", ".join(parts) if parts else "load average not recorded"


def checkpoint_summary(checkpoint: str | Path) -> dict[str, Any]:
    """The head of a checkpoint as its `config.json` states it (what a section says it measured)."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    keys = ("pooling", "sketch_fusion", "projection_dim", "n_sketches", "n_hyperplanes", "sketch_coder")
    return {key: config[key] for key in keys if key in config}


def checkpoint_sentence(summary: dict[str, Any]) -> str:
    """``"pooling mean, sketch_fusion concat, projection_dim 256, ..."`` (empty when nothing was recorded)."""
    return ", ".join(f"`{key}` {value}" for key, value in summary.items())
