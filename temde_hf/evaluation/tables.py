"""One Markdown table formatter for every report: the evaluation CLI, the benchmarks, the demo's README section.

GitHub-flavoured Markdown, so a table printed by a command can be pasted into README.md / RESULTS.md
as it is (and scripts write their own sections with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_cell(value: Any, float_format: str | None = None) -> str:
    """One cell: ``None`` -> "–"; a float with `float_format` (default: 3 significant digits, whole
    numbers from 10,000 up); anything else (ints, pre-formatted strings) as `str`."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if float_format is not None:
            return format(value, float_format)
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    float_format: str | None = None,
) -> str:
    """A Markdown table of `rows` restricted to `columns` (a missing key is an empty "–" cell).

    Args:
        rows: One mapping per table row.
        columns: The keys shown, in order.
        headers: Column titles (default: the keys themselves).
        float_format: Format spec of float cells (e.g. ``".1f"``); see `format_cell`.

    Returns:
        The table, header and separator lines first, without a trailing newline.
    """
    headers = list(columns) if headers is None else list(headers)
    if len(headers) != len(columns):
        raise ValueError(f"{len(headers)} headers for {len(columns)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(format_cell(row.get(c), float_format) for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines)
