"""Image–caption data: loaders to `datasets.Dataset`, caption pairs for training, export, synthetic data."""

from __future__ import annotations

from .synthetic import make_synthetic_karpathy

__all__ = ["make_synthetic_karpathy"]
