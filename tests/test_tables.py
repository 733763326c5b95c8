"""The one Markdown table formatter, and the evaluation report built on it."""

from __future__ import annotations

import pytest

from temde_hf.evaluation.cli import METRIC_COLUMNS, metrics_table
from temde_hf.evaluation.tables import format_cell, format_table


def test_cells_and_table_layout() -> None:
    assert [format_cell(v) for v in (None, 0.012345, 123456.7, 7, "12.0 ± 1.0")] == [
        "–", "0.0123", "123457", "7", "12.0 ± 1.0",
    ]  # fmt: skip
    assert format_cell(2.25, ".1f") == "2.2" and format_cell(3, ".1f") == "3"  # ints are never reformatted
    rows = [{"name": "a", "ms": 1.5}, {"name": "b"}]
    assert format_table(rows, ["name", "ms"], ["variant", "time (ms)"]) == (
        "| variant | time (ms) |\n|---|---|\n| a | 1.5 |\n| b | – |"
    )
    with pytest.raises(ValueError, match="1 headers for 2 columns"):
        format_table(rows, ["name", "ms"], ["variant"])


def test_metrics_table_has_a_row_per_evaluated_set() -> None:
    metrics = {c: float(i) for i, c in enumerate(METRIC_COLUMNS)}
    result = {"n_images": 5000, "full": metrics, "fold_size": 1000, "folds": [{}] * 5, "folds_mean": metrics}
    result["rerank"] = {
        "reranker": "itm", "k": 20, "stage1_weight": 0.5, "full": metrics, "folds_mean": metrics,
        "latency_ms": {"stage1_i2t": 0.1, "stage1_t2i": 0.2, "stage2_i2t": 3.0, "stage2_t2i": 4.0},
    }  # fmt: skip
    lines = metrics_table(result).splitlines()
    assert lines[0] == "| set | " + " | ".join(METRIC_COLUMNS) + " |"
    cells = " | ".join(f"{float(i):.1f}" for i in range(len(METRIC_COLUMNS)))
    names = [
        "all 5000 images",
        "1000-img folds (x5)",
        "+itm K=20 w=0.5, all images",
        "+itm K=20 w=0.5, folds",
    ]
    assert lines[2:6] == [f"| {name} | {cells} |" for name in names]
    assert lines[6].startswith(
        "per-query latency (ms, median): stage 1 i2t 0.10 / t2i 0.20; stage 2 i2t 3.00"
    )
