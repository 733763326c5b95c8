"""A tower cut in two: the frozen lower part (cached once) and the top blocks that train (run every step).

With ``--vision_trainable_layers N`` / ``--text_trainable_layers N`` only a tower's last `N` blocks
train, with the modules after them (final norm, head conv, pooler). The blocks below give the same output
for an item every epoch, so with ``--cache_tower_outputs`` the trainer caches the hidden state entering the
first trainable block (`LowerTower`, through `features.build_tower_cache`: the same on-disk cache as a
frozen tower's outputs) and each step runs only the top (`TowerSplit.upper`), on the cached rows, with
gradients. The saved model is the usual full model: its tower runs from pixels / tokens.

Each architecture is one `TowerSplit` subclass registered under its ``config.model_type`` with
`register_tower_split`; `find_tower_split` returns ``None`` for a tower without one (the trainer then
runs the whole tower every step, as without the cache).

In the model, a batch's cached lower part arrives as ``vision_outputs`` / ``text_outputs`` wrapped in
`LowerStates`; `attach_upper_towers` makes the model run the top blocks on it at the point where it would
have run the tower (inside the forward that `accelerate` wrapped, so DDP sees the top blocks' parameters
used, and dropout draws its random numbers in the same order as the whole tower would).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import BertModel, ViTModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..models.temde.modeling_efficientnet_lite import EfficientNetLiteModel, EfficientNetLiteModelOutput
from .optim import tower_blocks

_SPLITS: dict[str, type[TowerSplit]] = {}

__all__ = [
    "LowerStates",
    "LowerTower",
    "TowerSplit",
    "attach_upper_towers",
    "find_tower_split",
    "register_tower_split",
]


def register_tower_split(*model_types: str) -> Callable[[type[TowerSplit]], type[TowerSplit]]:
    """Class decorator: the split of towers whose ``config.model_type`` is one of `model_types`."""

    def register(cls: type[TowerSplit]) -> type[TowerSplit]:
        for model_type in model_types:
            _SPLITS[model_type] = cls
        return cls

    return register


class TowerSplit:
    """One tower as stem -> blocks -> finish; the lower part is the stem and the first `cut` blocks.

    A subclass names the tower class it reads (`tower_class`) and defines its stem, blocks and finish as
    the tower's own forward runs them; `lower` followed by `upper` then equals that forward.

    Args:
        tower: The tower.
        n_upper: Blocks on top that train, ``1 <= n_upper < len(blocks)``.
    """

    tower_class: ClassVar[type[nn.Module]]

    def __init__(self, tower: nn.Module, n_upper: int) -> None:
        self.tower = tower
        n_blocks = len(self.blocks())
        if not 1 <= n_upper < n_blocks:
            raise ValueError(f"a split needs 1 <= top blocks < {n_blocks}, got {n_upper}")
        self.cut = n_blocks - n_upper

    # --- what a subclass defines -------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        """The tower's stack of blocks (the one `optim.freeze_towers` counts the trainable layers in)."""
        raise NotImplementedError

    def stem(self) -> list[nn.Module]:
        """The modules before the first block."""
        raise NotImplementedError

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower's inputs (``pixel_values``, or ``input_ids`` + ``attention_mask``) -> the stem output."""
        raise NotImplementedError

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, blocks: nn.ModuleList
    ) -> torch.Tensor:
        """`blocks` over `hidden` (text: with the padding `attention_mask` `(B, L)`, 1 for real tokens)."""
        for block in blocks:
            hidden = block(hidden)
        return hidden

    def finish(self, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
        """The last block's output -> the tower's output (final norm / head conv / pooler)."""
        raise NotImplementedError

    # --- the two parts -----------------------------------------------------------------------------
    def lower_modules(self) -> list[nn.Module]:
        """The modules of the lower part (the stem and the first `cut` blocks)."""
        return [*self.stem(), *self.blocks()[: self.cut]]

    def lower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The hidden state entering block `cut`: `(B, L, C)` tokens, or `(B, C, h, w)` for a conv tower."""
        return self.run_blocks(self.embed(inputs), inputs.get("attention_mask"), self.blocks()[: self.cut])

    def upper(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> BaseModelOutputWithPooling:
        """The top blocks and the finish on `lower`'s output: the tower's output for those items.

        Args:
            hidden: `lower`'s output (cached: any float dtype; run in the tower's dtype).
            attention_mask: Text: `(B, L)` 1 for real tokens.
        """
        hidden = hidden.to(next(self.blocks()[self.cut].parameters()).dtype)
        return self.finish(self.run_blocks(hidden, attention_mask, self.blocks()[self.cut :]))


@register_tower_split("bert")
class BertSplit(TowerSplit):
    """BERT-like text towers (MiniLM): embeddings + ``encoder.layer[:cut]`` | the other layers + pooler."""

    tower_class = BertModel

    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layer

    def stem(self) -> list[nn.Module]:
        return [self.tower.embeddings]

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tower.embeddings(
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, blocks: nn.ModuleList
    ) -> torch.Tensor:
        # the mask BertModel.forward builds from the padding mask (its form depends on the attention kernel)
        mask = create_bidirectional_mask(
            config=self.tower.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in blocks:
            hidden = layer(hidden, mask)
        return hidden

    def finish(self, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
        pooled = self.tower.pooler(hidden) if self.tower.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


@register_tower_split("vit")
class ViTSplit(TowerSplit):
    """ViT: patch embeddings + ``layers[:cut]`` | the other layers + layernorm + pooler."""

    tower_class = ViTModel

    def blocks(self) -> nn.ModuleList:
        return self.tower.layers

    def stem(self) -> list[nn.Module]:
        return [self.tower.embeddings]

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.tower.embeddings.patch_embeddings.projection.weight.dtype
        return self.tower.embeddings(inputs["pixel_values"].to(dtype))

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, blocks: nn.ModuleList
    ) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.tower.config, inputs_embeds=hidden, attention_mask=None)
        for layer in blocks:
            hidden = layer(hidden, mask)
        return hidden

    def finish(self, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
        hidden = self.tower.layernorm(hidden)
        pooled = self.tower.pooler(hidden) if self.tower.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


@register_tower_split("efficientnet_lite")
class EfficientNetLiteSplit(TowerSplit):
    """EfficientNet-Lite: stem + ``encoder.blocks[:cut]`` | the other blocks + head conv + global mean.

    The lower part's output is a feature map `(B, C, h, w)` (cached as ``h·w`` tokens with its grid).
    """

    tower_class = EfficientNetLiteModel

    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.blocks

    def stem(self) -> list[nn.Module]:
        return [self.tower.embeddings]

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tower.embeddings(
            inputs["pixel_values"].to(self.tower.embeddings.convolution.weight.dtype)
        )

    def finish(self, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
        encoder = self.tower.encoder
        feature_map = encoder.activation(encoder.top_bn(encoder.top_conv(hidden)))
        return EfficientNetLiteModelOutput(
            last_hidden_state=feature_map.flatten(2).transpose(1, 2),  # (B, h·w, C), as the tower's forward
            pooler_output=feature_map.mean(dim=(2, 3)),
            feature_map=feature_map,
        )


def find_tower_split(tower: nn.Module, n_upper: int) -> TowerSplit | None:
    """The split of `tower` with its last `n_upper` blocks on top, or ``None`` when its architecture has
    none registered (or `n_upper` covers every block: nothing below to cache)."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    split_class = _SPLITS.get(model_type)
    if split_class is None or not isinstance(tower, split_class.tower_class):
        return None
    try:
        split = split_class(tower, n_upper)
    except ValueError:  # n_upper covers every block
        return None
    # the blocks `freeze_towers` counts the trainable ones in: else the cut is not where training starts
    return split if split.blocks() is tower_blocks(tower) else None


class LowerTower(nn.Module):
    """The lower part of a split as a tower (what `features.build_tower_cache` runs and caches), in eval mode.

    Called like a tower (``pixel_values``, or ``input_ids`` + ``attention_mask``), it returns the hidden
    state entering the first top block as ``last_hidden_state`` (no pooled output). It holds the lower
    modules themselves, so its fingerprint (`features.tower_fingerprint`) covers their weights and
    changes with the cut. A convolutional lower part records its map's `(h, w)` in `grid` on its first
    call (the cache stores the map as ``h·w`` tokens and gives the grid back to rebuild it).
    """

    def __init__(self, split: TowerSplit) -> None:
        super().__init__()
        self.split = split
        self.config = split.tower.config
        self.lower = nn.ModuleList(split.lower_modules())
        self.grid: list[int] | None = None
        # Frozen: eval mode (no dropout, fixed BatchNorm statistics). Made in train mode, as any module, it
        # would put the tower's lower modules in train mode whenever its mode is restored (ONNX export).
        self.eval()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling:
        names = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        hidden = self.split.lower({k: v for k, v in names.items() if v is not None})
        if hidden.ndim == 4 and self.grid is None:
            self.grid = [int(size) for size in hidden.shape[-2:]]
        return BaseModelOutputWithPooling(last_hidden_state=hidden)


@dataclass
class LowerStates:
    """A batch's cached lower-part output, passed as ``vision_outputs`` / ``text_outputs``.

    Attributes:
        hidden: `(B, L, C)` tokens or `(B, C, h, w)` map (the text's padding mask is the forward's
            ``attention_mask``).
    """

    hidden: torch.Tensor


def attach_upper_towers(model: nn.Module, splits: dict[str, TowerSplit]) -> None:
    """Make `model` (a `TemdeModel`) run the top blocks of ``splits[part]`` on `LowerStates` inputs.

    The model's tower step (`_vision_tower` / `_text_tower`, which returns precomputed outputs or runs
    the tower) gets one more case: `LowerStates` -> `TowerSplit.upper`. Every other input goes to the
    model's own method; a part without a split keeps it unchanged (`LowerStates` there raises the model's
    error for bad precomputed outputs).

    Args:
        model: The unwrapped model (before `accelerator.prepare`).
        splits: ``"vision"`` / ``"text"`` -> that tower's split.
    """
    cls = type(model)
    if "vision" in splits:

        def vision_tower(pixel_values: Any, vision_outputs: Any, **kwargs: Any) -> Any:
            if isinstance(vision_outputs, LowerStates):
                return splits["vision"].upper(vision_outputs.hidden)
            return cls._vision_tower(model, pixel_values, vision_outputs, **kwargs)

        model._vision_tower = vision_tower
    if "text" in splits:

        def text_tower(input_ids: Any, attention_mask: Any, text_outputs: Any, **kwargs: Any) -> Any:
            if isinstance(text_outputs, LowerStates):
                return splits["text"].upper(text_outputs.hidden, attention_mask)
            return cls._text_tower(model, input_ids, attention_mask, text_outputs, **kwargs)

        model._text_tower = text_tower
