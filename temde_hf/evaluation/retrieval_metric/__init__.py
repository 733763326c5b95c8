"""The retrieval metric as an `evaluate` module; this file only makes the folder ship in the wheel.

The folder is a self-contained `evaluate` metric (``retrieval_metric.py`` + ``metrics.py``): copy it
anywhere, or load it from an installed wheel, without temde_hf.

``evaluate.load(str(METRIC_PATH))`` (or `load_retrieval_metric`) loads it offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRIC_PATH = Path(__file__).resolve().parent


def load_retrieval_metric(**kwargs: Any) -> Any:
    """``evaluate.load`` of this folder's ``retrieval_metric.py`` (no network)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), **kwargs)
