"""What counts as text: one check shared by the loaders, the search command and the Endpoints handler.

A tokenizer turns an empty or invisible string into ``[CLS] [SEP]`` and the model embeds it like any
caption, so a blank query would return confident nonsense. Whitespace and the zero-width / format
characters (Unicode category ``Cf``: U+200B, U+200C, U+200D, U+2060, U+FEFF, ...) carry no words.
"""

from __future__ import annotations

# The one definition lives in the self-contained model folder, so Hub remote code carries it too.
from ..models.temde.processing_temde import is_visible_text

__all__ = ["is_visible_text", "text_problem"]


def text_problem(value: object) -> str | None:
    """Why `value` cannot be used as a caption or query (``None`` when it can).

    Returns:
        A short reason such as ``"not a string (int 42)"`` or ``"empty or invisible text"``.
    """
    if value is None:
        return "missing (null / None), not a string"
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"not a string ({type(value).__name__} {shown})"
    if not is_visible_text(value):
        return "empty or invisible text (only whitespace or zero-width characters)"
    return None
