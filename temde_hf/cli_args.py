"""Command-line arguments that more than one ``temde-hf`` command takes, with their one-line checks.

The commands (``evaluate``, ``index``, ``search``) are applications side by side: none imports another,
so a flag two of them share is defined here, once, and each command's module imports it. Checks raise a
`ValueError` naming the flag, its value and the fix; `temde_hf.cli` prints it as one line.
"""

from __future__ import annotations

import argparse
import math

import torch

from .inference.rerank import DEFAULT_RERANK_K, DEFAULT_STAGE1_WEIGHT, RERANKERS


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_rerank_arguments(parser: argparse.ArgumentParser, rerank_help: str) -> None:
    """``--rerank NAME --rerank-k K --rerank-fusion W``: the second stage, as ``evaluate`` and ``search`` take it."""
    parser.add_argument("--rerank", default=None, choices=sorted(RERANKERS), help=rerank_help)
    parser.add_argument(
        "--rerank-k", type=int, default=DEFAULT_RERANK_K, help="candidates per query re-scored (--rerank)"
    )
    parser.add_argument(
        "--rerank-fusion",
        type=float,
        default=DEFAULT_STAGE1_WEIGHT,
        help="order the K candidates by z(stage 2) + W * z(stage 1), standardised per query (--rerank; "
        f"default {DEFAULT_STAGE1_WEIGHT:g}, chosen on cross-validation); 0: by stage 2 alone",
    )


def check_rerank_arguments(args: argparse.Namespace) -> None:
    """One-line ValueErrors for a bad ``--rerank-k`` / ``--rerank-fusion``."""
    if args.rerank_k < 1:
        raise ValueError(f"--rerank-k {args.rerank_k}: must be >= 1")
    if not math.isfinite(args.rerank_fusion) or args.rerank_fusion < 0:
        raise ValueError(f"--rerank-fusion {args.rerank_fusion}: must be a finite number >= 0")


def check_device(device: str | None, flag: str) -> None:
    """A one-line ValueError for a device torch does not know or this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{flag} {device}: not a device name; pass cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"{flag} {device}: no such CUDA device on this machine ({torch.cuda.device_count()} found); "
            "pass --device cpu, or a cuda:N that exists"
        )


__all__ = ["add_rerank_arguments", "check_device", "check_rerank_arguments", "positive_int"]
