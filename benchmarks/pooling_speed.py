"""Pooling heads, forward + backward: time and peak memory against the number of tokens L.

Heads on the same `(batch, L, dim)` token features and padding mask:

- `mean`: masked mean.
- `mean+matmul`: masked mean plus one `dim x (N*H)` projection of every token (the arithmetic floor of
  a sketch: T-EMDE's only large matmul).
- `attention`: attention pooling with one learned query (`nn.MultiheadAttention`).
- `transformer+mean`: one `nn.TransformerEncoderLayer` (pre-norm, FFN 4x) then masked mean.
- `temde-torch` / `temde-triton`: masked mean concatenated with the T-EMDE sketch (`TemdeSketch`, the
  model's own module) with `sketch_kernel="torch"` (chunked PyTorch) or `"triton"` (fused, CUDA only).

    python benchmarks/pooling_speed.py --device cuda              # batch 128, dim 1024, bf16, all L
    python benchmarks/pooling_speed.py --device cpu --quick       # small smoke run

Prints a markdown table, writes JSON (`--output`) and a log-log plot of time against L next to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` beside this script
from common import device_info, format_table, is_oom, peak_memory_mib, resolve_device, time_fn, write_json

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

    def __init__(self, dim: int, n_sketches: int, n_hyperplanes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, n_sketches * n_hyperplanes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.proj(tokens)  # (B, L, N*H)
        return torch.cat([masked_mean(tokens, mask), (z * mask.to(z.dtype).unsqueeze(-1)).sum(1)], dim=-1)


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

    def __init__(self, dim: int, n_sketches: int, n_hyperplanes: int, kernel: str) -> None:
        super().__init__()
        config = TemdeConfig(
            projection_dim=dim, n_sketches=n_sketches, n_hyperplanes=n_hyperplanes, sketch_kernel=kernel
        )
        self.sketch = TemdeSketch(config)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([masked_mean(tokens, mask), self.sketch(tokens, mask).flatten(1)], dim=-1)


def build_heads(
    dim: int, heads: int, sketches: list[tuple[int, int]], device: torch.device
) -> dict[str, nn.Module]:
    """Every head to benchmark, by name (the fused kernel only where it can run: CUDA + triton)."""
    built: dict[str, nn.Module] = {
        "mean": MeanHead(),
        "attention": AttentionPoolHead(dim, heads),
        "transformer+mean": TransformerMeanHead(dim, heads),
    }
    for n, h in sketches:
        built[f"mean+matmul N{n}H{h}"] = MeanMatmulHead(dim, n, h)
        built[f"temde-torch N{n}H{h}"] = TemdeHead(dim, n, h, "torch")
        if device.type == "cuda" and HAS_TRITON:
            built[f"temde-triton N{n}H{h}"] = TemdeHead(dim, n, h, "triton")
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


def measure(name: str, step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> dict:
    try:
        ms = time_fn(step, device, warmup, repeats)
        return {"ms": ms, "peak_mib": peak_memory_mib(step, device), "status": "ok"}
    except RuntimeError as error:  # OOM at large L is a result, not a crash
        if not is_oom(error):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "status": "oom"}


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
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    batch = args.batch_size or (8 if args.quick else 128)
    dim = args.dim or (128 if args.quick else 1024)
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    repeats = args.repeats or (3 if args.quick else 20)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    sketches = [tuple(int(v) for v in s.lower().split("x")) for s in args.sketches]
    heads = {k: v.to(device, dtype) for k, v in build_heads(dim, args.heads, sketches, device).items()}

    rows = []
    for tokens in tokens_list:
        x, mask = make_inputs(batch, tokens, dim, dtype, device)
        for name, head in heads.items():
            result = measure(name, fwd_bwd_step(head, x, mask), device, warmup, repeats)
            rows.append({"head": name, "tokens": tokens, **result})
        del x, mask
    settings = {
        "batch_size": batch, "dim": dim, "heads": args.heads, "tokens": list(tokens_list), "dtype": str(dtype),
        "sketches": [f"N{n}H{h}" for n, h in sketches], "warmup": warmup, "repeats": repeats, "quick": args.quick,
    }  # fmt: skip
    payload = {
        "benchmark": "pooling_speed",
        "env": device_info(device),
        "settings": settings,
        "results": rows,
    }
    path = write_json(payload, args.output)
    print(format_table(rows, ["head", "tokens", "ms", "peak_mib", "status"]))
    if not args.no_plot:
        title = f"pooling fwd+bwd, batch {batch}, dim {dim}, {dtype}, {device_info(device).get('gpu', 'cpu')}"
        payload["plot"] = str(plot(rows, path.with_suffix(".png"), title))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
