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
# How a user leaves bad entries out, from Python and from the command line.
SKIP_HINT = "on_error='skip' / --on-error skip"
# Split names in use by the supported formats; images of any other value are counted when a split is
# selected, since a typo ("tset") would otherwise make them vanish from every split without a word.
KNOWN_SPLITS = ("train", "val", "validation", "dev", "test", "restval")


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
        other_splits: ``split value -> images`` left out because another split was selected.
    """

    source: str = ""
    n_loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_captions_truncated: int = 0
    other_splits: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def unknown_splits(self) -> dict[str, int]:
        """The left-out split values that are not a known split name (likely typos), with counts."""
        return {name: n for name, n in self.other_splits.items() if name not in KNOWN_SPLITS}

    def select_split(self, split: str, wanted: set[str] | None) -> bool:
        """Whether an image of `split` is kept when `wanted` is selected; counts it when it is not."""
        if wanted is None or split in wanted:
            return True
        self.other_splits[split] = self.other_splits.get(split, 0) + 1
        return False

    @property
    def needs_warning(self) -> bool:
        return bool(self.n_skipped or self.n_captions_truncated or self.unknown_splits)

    def summary(self) -> str:
        text = f"{self.source}: loaded {self.n_loaded} images, skipped {self.n_skipped}"
        if self.n_captions_truncated:
            text += f", kept the first captions of {self.n_captions_truncated}"
        reasons = "; ".join(f"{entry}: {reason}" for entry, reason in self.skipped[:5])
        if reasons:
            text += f" ({reasons}{' ...' if self.n_skipped > 5 else ''})"
        if self.unknown_splits:
            n_unknown = sum(self.unknown_splits.values())
            text += (
                f"; left out {n_unknown} images whose split is not one of {', '.join(KNOWN_SPLITS)} "
                f"({self.unknown_splits}): fix those values, or select them by name"
            )
        return text


def not_utf8(path: object, exc: UnicodeDecodeError) -> DataError:
    """The error for a text file that is not UTF-8 (names the file, the byte, and the fix)."""
    return DataError(
        f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
        "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


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
        raise DataError(f"{entry}: {reason}. {fix} (or leave such entries out: {SKIP_HINT})")
    report.skipped.append((entry, reason))
