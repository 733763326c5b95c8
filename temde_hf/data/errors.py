"""Errors and skip reports of the data loaders.

Bad data never disappears silently: a loader either raises `DataError` (naming the file or entry and
the fix) or, with ``on_error="skip"``, leaves the entry out, counts it in a `LoadReport` and logs a
warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("temde_hf.data")

OnError = Literal["raise", "skip"]


class DataError(ValueError):
    """A dataset file or entry that cannot be used as it is; the message names it and the fix."""


@dataclass
class LoadReport:
    """What a loader kept and what it skipped (only filled when ``on_error="skip"``).

    Attributes:
        source: The file or folder that was loaded.
        n_loaded: Images kept.
        skipped: ``(entry, reason)`` for every image left out.
        n_captions_truncated: Images that had more captions than asked for (first ones kept).
    """

    source: str = ""
    n_loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_captions_truncated: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        text = f"{self.source}: loaded {self.n_loaded} images, skipped {self.n_skipped}"
        if self.n_captions_truncated:
            text += f", kept the first captions of {self.n_captions_truncated}"
        reasons = "; ".join(f"{entry}: {reason}" for entry, reason in self.skipped[:5])
        if reasons:
            text += f" ({reasons}{' ...' if self.n_skipped > 5 else ''})"
        return text


def check_on_error(on_error: str) -> None:
    """Raise a `ValueError` for an unknown ``on_error`` mode."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def handle_bad_entry(entry: str, reason: str, fix: str, on_error: OnError, report: LoadReport) -> None:
    """Raise a `DataError` for a bad entry, or record it as skipped.

    Args:
        entry: What is bad (a file name, ``images[12]``, a CSV line).
        reason: What is wrong with it.
        fix: What the user can do about it.
        on_error: ``"raise"`` or ``"skip"``.
        report: Where a skip is counted.
    """
    if on_error == "raise":
        fix = fix[:1].upper() + fix[1:]
        raise DataError(f"{entry}: {reason}. {fix} (or pass on_error='skip' to leave such entries out)")
    report.skipped.append((entry, reason))
