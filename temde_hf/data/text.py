"""What counts as text: one check shared by the loaders, the search command and the Endpoints handler.

A tokenizer turns an empty or invisible string into ``[CLS] [SEP]`` and the model embeds it like any
caption, so a blank query would return confident nonsense. Whitespace and the zero-width / format
characters (Unicode category ``Cf``: U+200B, U+200C, U+200D, U+2060, U+FEFF, ...) carry no words.
"""

from __future__ import annotations

# The one definition lives in the self-contained model folder, so Hub remote code carries it too.
from ..models.temde.processing_temde import is_visible_text, text_problem

__all__ = ["is_visible_text", "text_problem"]
