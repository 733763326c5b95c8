"""Processor of the T-EMDE dual encoder: an image processor and a tokenizer behind one call."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


def is_visible_text(value: object) -> bool:
    """Whether `value` is a string with a character that is neither whitespace nor invisible (category Cf).

    Defined here, in the self-contained model folder, so Hub remote code (the processor, the Endpoints
    handler) refuses blank text too; ``temde_hf.data.text`` re-exports it for the loaders and commands.
    """
    if not isinstance(value, str):
        return False
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in value)


def text_problem(value: object) -> str | None:
    """Why `value` cannot be used as a caption or query (``None`` when it can): the one text rule.

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


class TemdeProcessor(ProcessorMixin):
    """Wraps the vision tower's image processor and the text tower's tokenizer (CLIPProcessor style).

    `processor(images=..., text=..., return_tensors="pt", padding=True)` returns `pixel_values`,
    `input_ids` and `attention_mask` (plus `token_type_ids` where the tokenizer makes them).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Encode images and/or text.

        Args:
            images: a PIL image, array, or a list of them.
            text: a string or a list of strings.
            padding, truncation, max_length: passed to the tokenizer (captions are truncated to the
                tokenizer's maximum length by default, so one long caption never breaks a batch).

        Returns:
            `BatchFeature` with `pixel_values` `(n_images, C, H, W)` and/or `input_ids`,
            `attention_mask` `(n_texts, seq_len)`.
        """
        if images is None and text is None:
            raise ValueError("TemdeProcessor needs `images=`, `text=` or both.")
        data: dict[str, Any] = {}
        if text is not None and not kwargs.get("is_split_into_words"):
            # An empty, whitespace-only or zero-width text tokenises to [CLS] [SEP] and would be
            # embedded like a caption: a query that matches nothing in particular, with confidence.
            texts = [text] if isinstance(text, str) else list(text)
            bad = next((i for i, t in enumerate(texts) if not is_visible_text(t)), None)
            if bad is not None:
                raise ValueError(
                    f"text[{bad}] = {texts[bad]!r}: not a string with a visible character (empty, only "
                    "whitespace or zero-width characters, or not a string); pass words"
                )
        if text is not None:
            data.update(
                self.tokenizer(
                    text,
                    return_tensors=return_tensors,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length,
                    **kwargs,
                )
            )
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str | Path, text_model_name_or_path: str | Path, **kwargs: Any
    ) -> TemdeProcessor:
        """The processor of a model composed with `TemdeModel.from_vision_text_pretrained`.

        The image processor comes from the vision tower's folder (or Hub id), the tokenizer from the text
        tower's; save it beside the composed model so `AutoProcessor` and the pipelines load that folder.

        Args:
            vision_model_name_or_path / text_model_name_or_path: the same towers the model was built from.
            **kwargs: `vision_*` / `text_*` keyword arguments go to that side's `from_pretrained`.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        vision_kwargs = {k[len("vision_") :]: v for k, v in kwargs.items() if k.startswith("vision_")}
        text_kwargs = {k[len("text_") :]: v for k, v in kwargs.items() if k.startswith("text_")}
        unknown = sorted(
            set(kwargs) - {f"vision_{k}" for k in vision_kwargs} - {f"text_{k}" for k in text_kwargs}
        )
        if unknown:
            raise TypeError(f"unknown arguments {unknown}: prefix each with vision_ or text_")
        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path, **vision_kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"vision tower {vision_model_name_or_path}: no image processor could be loaded ({exc}); the "
                "folder needs the preprocessor_config.json its image processor's save_pretrained writes"
            ) from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **text_kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"text tower {text_model_name_or_path}: no tokenizer could be loaded ({exc}); the folder "
                "needs the files its tokenizer's save_pretrained writes"
            ) from exc
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))


# `save_pretrained` then copies this file next to the checkpoint and writes an `auto_map`, so
# `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` works without temde_hf installed.
TemdeProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["TemdeProcessor"]
