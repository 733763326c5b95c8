"""The T-EMDE vision-text dual encoder.

Data flow, per modality: tower -> `last_hidden_state` tokens `(B, L, H_tower)` -> per-token projection
to the joint space `(B, L, D)` -> global head ê `(B, D)` and the shared T-EMDE sketch Ŝ `(B, N, K)` ->
fused embedding `(B, E)`. With `config.sketch_vision_feature_layers` the image sketch also reads
the vision tower's chosen hidden states (each projected by its own layer), while the global head keeps
the last map's tokens. `forward` is built from `get_image_features` / `get_text_features`, so the
embeddings used for retrieval are by construction the trained ones.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_temde import TemdeConfig
from .loading_temde import StrictLoadingMixin, require_folder
from .loss_temde import info_nce_loss
from .modeling_efficientnet_lite import EfficientNetLiteModel
from .pooling_temde import POOLING_HEADS
from .sketch_temde import SketchCoder, TemdeSketch

# Tower architectures that ship inside this folder (so remote code builds them without registration).
LOCAL_TOWERS: dict[str, type[PreTrainedModel]] = {
    EfficientNetLiteModel.config_class.model_type: EfficientNetLiteModel
}

# What `save_pretrained` writes into `config.json` so the checkpoint loads as remote code.
AUTO_MAP = {
    "AutoConfig": "configuration_temde.TemdeConfig",
    "AutoModel": "modeling_temde.TemdeModel",
    "AutoModelForZeroShotImageClassification": "modeling_temde.TemdeModel",
    # the dual encoder with its matching head (see matching_temde): the model with every training head
    "AutoModelForPreTraining": "matching_temde.TemdeForImageTextRetrieval",
}


@dataclass
class TemdeEncoderOutput(BaseModelOutputWithPooling):
    r"""Output of `get_image_features` / `get_text_features`.

    pooler_output (`(batch, embed_dim)`): the final fused, normalised embedding (what an index stores).
    last_hidden_state, hidden_states, attentions: the tower's own outputs.
    token_embeds (`(batch, tokens, projection_dim)`): tokens projected to the joint space.
    token_mask (`(batch, tokens)`): 1 for real tokens, 0 for padding.
    global_embeds (`(batch, projection_dim)`): the unit-norm global vector ê (before fusion).
    sketch (`(batch, n_sketches, sketch_width)`): the row-normalised sketch Ŝ, or None without one.
    sketch_token_embeds (`(batch, sketch_tokens, projection_dim)`): the tokens the sketch read when they are
        more than `token_embeds` (`config.sketch_vision_feature_layers`: the last map's tokens, then each
        extra map's), else None (the sketch read `token_embeds`).
    sketch_token_mask (`(batch, sketch_tokens)`): 1 for real tokens of `sketch_token_embeds`, or None.
    """

    token_embeds: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    global_embeds: torch.Tensor | None = None
    sketch: torch.Tensor | None = None
    sketch_token_embeds: torch.Tensor | None = None
    sketch_token_mask: torch.Tensor | None = None


@dataclass
class TemdeOutput(ModelOutput):
    r"""Output of [`TemdeModel.forward`] (CLIP-shaped, plus the sketches).

    loss (`()`, when `return_loss`): symmetric InfoNCE over the row-paired batch (CLIP's loss; the trainer
        offers the other losses of `LOSSES`).
    logits_per_image (`(n_images, n_texts)`): `logit_scale · <image_embeds, text_embeds>`.
    logits_per_text (`(n_texts, n_images)`): its transpose.
    text_embeds / image_embeds (`(n, embed_dim)`): the fused embeddings.
    text_sketch / image_sketch (`(n, n_sketches, sketch_width)`): the row-normalised sketches, or None.
    text_model_output / vision_model_output: the towers' outputs.
    logit_scale (`(1,)`): `exp(logit_scale)`, the multiplier of the logits. Returned so that a training
        loss computed outside `forward` (on embeddings gathered across processes) reads it through the
        (possibly DDP-wrapped) forward: a parameter read outside forward gets no gradient synchronisation.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_sketch: torch.Tensor | None = None
    image_sketch: torch.Tensor | None = None
    text_model_output: TemdeEncoderOutput | None = None
    vision_model_output: TemdeEncoderOutput | None = None
    logit_scale: torch.Tensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def tower_hidden_size(config: PreTrainedConfig) -> int:
    """Width of a tower's `last_hidden_state`, whatever the architecture calls it."""
    for name in ("hidden_size", "hidden_dim", "embed_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)  # ConvNeXt, ResNet, ...
    if sizes:
        return int(sizes[-1])
    raise ValueError(
        f"Cannot tell the output width of a {type(config).__name__} tower (no hidden_size / hidden_sizes); "
        "set `hidden_size` on its config."
    )


def hidden_state_widths(config: PreTrainedConfig) -> list[int] | None:
    """Channels of each of a tower's `hidden_states`, or None where this cannot be told from its config.

    EfficientNet-Lite: (stem, every block, head); a transformer tower: `num_hidden_layers + 1` states
    (embeddings, then each layer) of `hidden_size` channels.
    """
    if config.model_type == EfficientNetLiteModel.config_class.model_type:
        widths = [config.stem_channels]  # the stem is never width-scaled in Lite
        for stage, channels in enumerate(config.out_channels):
            widths += [config.round_channels(channels)] * config.stage_repeats(stage)
        return [*widths, config.hidden_dim]
    width, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if isinstance(width, int) and isinstance(layers, int) and not getattr(config, "hidden_sizes", None):
        return [width] * (layers + 1)
    return None


def sketch_feature_layers(config: TemdeConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`config.sketch_vision_feature_layers` as non-negative indices into the vision tower's
    `hidden_states`, and each one's channels; `((), ())` without the option.

    Raises:
        ValueError: The tower's hidden states cannot be told from its config, or an index is out of range.
    """
    layers = config.sketch_vision_feature_layers
    if not layers:
        return (), ()
    vision = config.vision_config
    widths = hidden_state_widths(vision)
    if widths is None:
        raise ValueError(
            f"TemdeConfig.sketch_vision_feature_layers is not supported for a {vision.model_type} vision tower "
            "(its hidden states' channels cannot be told from its config); use EfficientNet-Lite or a "
            "transformer tower (ViT, CLIP, ...), or drop the option."
        )
    n = len(widths)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(
            f"TemdeConfig.sketch_vision_feature_layers={layers}: {bad} out of range for the "
            f"{vision.model_type} tower's {n} hidden states (indices -{n} .. {n - 1})."
        )
    indices = tuple(i % n for i in layers)
    if len(set(indices)) != len(indices):
        raise ValueError(f"TemdeConfig.sketch_vision_feature_layers={layers} names one hidden state twice.")
    return indices, tuple(widths[i] for i in indices)


def _as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """Tower output -> token sequence `(B, L, C)`; convolutional maps `(B, C, h, w)` become `h·w` tokens."""
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2)
    if hidden.ndim != 3:
        raise ValueError(
            f"Expected tower hidden states of shape (B, L, C) or (B, C, h, w), got {tuple(hidden.shape)}."
        )
    return hidden


def _normed(norm: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the optional token LayerNorm (`config.token_layer_norm`)."""
    return hidden if norm is None else norm(hidden)


def _as_tower_output(value: Any, name: str) -> ModelOutput:
    """Precomputed tower outputs, as a `BaseModelOutputWithPooling` or
    `(last_hidden_state, pooler_output?, hidden_states?)`."""
    if isinstance(value, ModelOutput):
        return value
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3 and torch.is_tensor(value[0]):
        return BaseModelOutputWithPooling(
            last_hidden_state=value[0],
            pooler_output=value[1] if len(value) >= 2 else None,
            hidden_states=value[2] if len(value) == 3 else None,
        )
    raise ValueError(
        f"`{name}` must be a BaseModelOutputWithPooling or a tuple (last_hidden_state, pooler_output), "
        f"got {type(value).__name__}."
    )


# One-element parameters: shape (1,), as FSDP2 cannot shard 0-dim ones; earlier checkpoints stored them 0-dim.
_ONE_ELEMENT = ("logit_scale", "sketch.log_temperature")


def _scalar_parameters_hook(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any
) -> None:
    """Load a 0-dim `logit_scale` / `sketch.log_temperature` of an older checkpoint into the `(1,)` one."""
    for name in _ONE_ELEMENT:
        key = prefix + name
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)


def check_inputs(name: str, tensor: Any, layout: str, mask: torch.Tensor | None = None) -> None:
    """One clear `ValueError` for a batch the towers would fail on with a reshape/einsum error.

    Args:
        name: the argument, e.g. ``"pixel_values"``.
        tensor: must be a non-empty tensor with one dimension per name in `layout`.
        layout: e.g. ``"(batch, seq_len)"``.
        mask: an `attention_mask` for `tensor`: same shape, and no all-padding row (such a text has no
            token, and its embedding would silently be all zeros).
    """
    ndim = layout.count(",") + 1
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or tensor.numel() == 0:
        got = f"shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{name} must be a non-empty tensor of shape {layout}, got {got}; prepare it with the processor "
            "(one item still needs its batch dimension: x.unsqueeze(0))."
        )
    if mask is None:
        return
    if mask.shape != tensor.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but {name} {tuple(tensor.shape)}.")
    if not torch.compiler.is_compiling() and not mask.any(dim=-1).all():
        rows = (~mask.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows[:8]} are all padding, so those texts have no token to embed; "
            "drop them, or tokenize them with the processor (which always keeps [CLS]/[SEP])."
        )


def _resolve_attention_implementation(tower: PreTrainedModel) -> None:
    """Give a tower whose config lost its attention implementation one again.

    Building a `TemdeConfig` from pretrained towers' configs resets their `_attn_implementation` to
    None, and a BERT tower with None attends to padding (its attention mask is not applied): a caption's
    tokens then change with the batch's padding. A reloaded checkpoint gets "sdpa" from
    `from_pretrained`, so without this a freshly composed model (the one a trainer trains) and its saved
    copy would embed captions differently.
    """
    config = tower.config
    if hasattr(config, "_attn_implementation") and config._attn_implementation is None:
        config._attn_implementation = "sdpa" if getattr(tower, "_supports_sdpa", False) else "eager"


def _build_tower(config: PreTrainedConfig) -> PreTrainedModel:
    """A tower from its config: local architectures first (they ship with this folder), then the Auto map."""
    if config.model_type in LOCAL_TOWERS:
        return LOCAL_TOWERS[config.model_type](config)
    if config.model_type == "clip":  # a full CLIP config: take the matching tower
        raise ValueError(
            "Pass CLIP's `vision_config` / `text_config`, not the full CLIPConfig, as a tower config."
        )
    return AutoModel.from_config(config)


class TemdePreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """`from_pretrained` is strict (see `StrictLoadingMixin`): missing or misshapen weights are refused."""

    config: TemdeConfig
    config_class = TemdeConfig
    base_model_prefix = "temde"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # The matching head of `TemdeForImageTextRetrieval`: dropped by `TemdeModel`, fresh from a plain checkpoint.
    _optional_head_prefixes = ("itm_head.",)
    _one_element_parameters = _ONE_ELEMENT

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, SketchCoder):  # every coder owns its initialisation (see SketchCoder)
            module.reset_parameters()
        elif isinstance(module, TemdeSketch):
            init.constant_(module.log_temperature, math.log(self.config.sketch_temperature))
            init.zeros_(module.initialized)
        elif isinstance(module, TemdeModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        else:
            super()._init_weights(module)


class TemdeModel(TemdePreTrainedModel):
    """A vision-text dual encoder whose embeddings fuse a pooled vector with a shared T-EMDE sketch.

    Args:
        config: the architecture; `vision_config` and `text_config` are required.
        vision_model, text_model: optional ready-made towers (e.g. pretrained), used instead of
            building them from the sub-configs.
    """

    def __init__(
        self,
        config: TemdeConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ) -> None:
        for name, tower in (("vision_config", vision_model), ("text_config", text_model)):
            if getattr(config, name) is None and tower is None:
                raise ValueError(
                    f"TemdeConfig.{name} is missing: pass {name}=... (a tower config or dict with model_type), "
                    "or build the model with TemdeModel.from_vision_text_pretrained(vision_dir, text_dir)."
                )
        for name, tower in (("vision_config", vision_model), ("text_config", text_model)):
            if tower is None:
                continue
            declared = getattr(config, name)
            if declared is not None and tower_hidden_size(declared) != tower_hidden_size(tower.config):
                raise ValueError(
                    f"The {name.split('_')[0]} tower outputs {tower_hidden_size(tower.config)} features but "
                    f"TemdeConfig.{name} declares {tower_hidden_size(declared)}: pass the tower's own config "
                    "(or leave it out and the tower's config is used)."
                )
            setattr(config, name, tower.config)
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else _build_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else _build_tower(config.text_config)
        # One config object per tower, shared by the tower and this model (saved once, in config.json).
        self.vision_model.config = config.vision_config
        self.text_model.config = config.text_config
        for tower in (self.vision_model, self.text_model):
            _resolve_attention_implementation(tower)

        d = config.projection_dim
        self.visual_projection = nn.Linear(tower_hidden_size(config.vision_config), d, bias=False)
        self.text_projection = nn.Linear(tower_hidden_size(config.text_config), d, bias=False)
        self.pooling = POOLING_HEADS[config.pooling](config) if config.sketch_fusion != "replace" else None
        self.sketch = TemdeSketch(config) if config.sketch_fusion != "none" else None
        # `replace`: the flattened sketch, mapped to D, is the global vector (the drop-in for attention pooling).
        self.sketch_projection = (
            nn.Linear(config.n_sketches * config.sketch_width, d)
            if config.sketch_fusion == "replace"
            else None
        )
        # Optional LayerNorm of every tower token before its projection (`config.token_layer_norm`).
        self.visual_token_norm = (
            nn.LayerNorm(tower_hidden_size(config.vision_config)) if config.token_layer_norm else None
        )
        # `config.sketch_vision_feature_layers`: the extra maps' tokens, for the sketch only. Each map has
        # its own channels (EfficientNet-Lite0's 14 x 14 stage: 112, the head: 1280), so each gets its own
        # projection (and LayerNorm) into the joint space. Modules exist only with the option: a model
        # without it has the state dict of before, and its checkpoints load unchanged.
        self.sketch_feature_layers, widths = sketch_feature_layers(config)
        self.sketch_vision_projections = (
            nn.ModuleList(nn.Linear(width, d, bias=False) for width in widths) if widths else None
        )
        self.sketch_vision_token_norms = (
            nn.ModuleList(nn.LayerNorm(width) for width in widths)
            if widths and config.token_layer_norm
            else None
        )
        self.text_token_norm = (
            nn.LayerNorm(tower_hidden_size(config.text_config)) if config.token_layer_norm else None
        )
        # Shape (1,), not (): FSDP2 cannot shard 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        self.register_load_state_dict_pre_hook(_scalar_parameters_hook)
        self.post_init()

    # ----------------------------------------------------------------------------------------------
    # The head: projected tokens -> fused embedding
    # ----------------------------------------------------------------------------------------------
    def embed_tokens(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor | None = None,
        sketch_weight: float | None = None,
        sketch_tokens: torch.Tensor | None = None,
        sketch_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Fuse projected tokens into the final embedding.

        Args:
            tokens: `(B, L, D)` tokens in the joint space.
            mask: `(B, L)`, 1 for real tokens.
            pooled: `(B, D)` the tower's projected pooled output (used by the `"pooler"` head).
            sketch_weight: λ of the `concat` fusion for this call (default `config.sketch_weight`); a
                trainer's sketch warm-up passes 0 here instead of editing the config.
            sketch_tokens: `(B, L', D)` the token set the sketch reads instead of `tokens` (with
                `sketch_mask` `(B, L')`): `tokens` plus the extra maps' of `config.sketch_vision_feature_layers`.

        Returns:
            `(embeds (B, E), global_embeds (B, D), sketch (B, N, K) or None)`.
        """
        if sketch_tokens is None:
            sketch_tokens, sketch_mask = tokens, mask
        sketch = self.sketch(sketch_tokens, sketch_mask) if self.sketch is not None else None
        if self.config.sketch_fusion == "replace":
            global_embeds = self.sketch_projection(sketch.flatten(1).to(tokens.dtype))
        else:
            global_embeds = self.pooling(tokens, mask, pooled)
        global_embeds = F.normalize(global_embeds, dim=-1)
        if self.config.sketch_fusion != "concat":
            return global_embeds, global_embeds, sketch
        # sqrt(λ/N) makes <e_I, e_T> = <ê_I, ê_T> + λ·(1/N)·Σ_n <Ŝ_n(I), Ŝ_n(T)>.
        lam = self.config.sketch_weight if sketch_weight is None else sketch_weight
        weight = math.sqrt(lam / self.config.n_sketches)
        embeds = torch.cat([global_embeds, weight * sketch.flatten(1).to(global_embeds.dtype)], dim=-1)
        return embeds, global_embeds, sketch

    def _head_output(
        self,
        tower_output: ModelOutput,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor | None,
        sketch_weight: float | None = None,
        sketch_tokens: torch.Tensor | None = None,
        sketch_mask: torch.Tensor | None = None,
        keep_hidden_states: bool = True,
    ) -> TemdeEncoderOutput:
        embeds, global_embeds, sketch = self.embed_tokens(
            tokens, mask, pooled, sketch_weight, sketch_tokens, sketch_mask
        )
        return TemdeEncoderOutput(
            last_hidden_state=getattr(tower_output, "last_hidden_state", None),
            pooler_output=embeds,
            hidden_states=getattr(tower_output, "hidden_states", None) if keep_hidden_states else None,
            attentions=getattr(tower_output, "attentions", None),
            token_embeds=tokens,
            token_mask=mask,
            global_embeds=global_embeds,
            sketch=sketch,
            sketch_token_embeds=sketch_tokens,
            sketch_token_mask=sketch_mask,
        )

    # ----------------------------------------------------------------------------------------------
    # Towers -> projected tokens
    # ----------------------------------------------------------------------------------------------
    def project_image_hidden_states(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Vision tower outputs -> `(tokens (B, L, D), mask (B, L), pooled (B, D) or None)`.

        Split out of `get_image_features` so frozen-tower training can cache the tower's outputs.
        """
        tokens = self.visual_projection(_normed(self.visual_token_norm, _as_tokens(hidden)))
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        if pooled is not None:
            pooled = self.visual_projection(_normed(self.visual_token_norm, pooled.flatten(1)))
        return tokens, mask, pooled

    def project_sketch_feature_maps(
        self, tokens: torch.Tensor, mask: torch.Tensor, hidden_states: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sketch's image token set: the last map's projected tokens, then each extra map's.

        Args:
            tokens: `(B, L, D)` the last map's projected tokens; mask `(B, L)` likewise.
            hidden_states: the vision tower's `hidden_states` (its tuple, or a dict from the indices of
                `self.sketch_feature_layers` to their maps, which is what a tower cache holds); each map
                `(B, C_i, h_i, w_i)` or `(B, L_i, C_i)`.

        Returns:
            `(sketch_tokens (B, L + Σ L_i, D), sketch_mask)`, or `(None, None)` without the option.
        """
        if not self.sketch_feature_layers:
            return None, None
        if hidden_states is None:
            raise ValueError(
                "TemdeConfig.sketch_vision_feature_layers needs the vision tower's hidden_states, but the vision "
                "outputs have none: run the tower with output_hidden_states=True (or pass pixel_values); a "
                "tower whose top blocks train on a cached lower part (--vision_trainable_layers) does not "
                "support the option."
            )
        parts, masks = [tokens], [mask]
        norms = self.sketch_vision_token_norms or [None] * len(self.sketch_feature_layers)
        for index, projection, norm in zip(self.sketch_feature_layers, self.sketch_vision_projections, norms):
            try:
                hidden = _as_tokens(hidden_states[index])
            except (IndexError, KeyError):
                raise ValueError(
                    f"the vision outputs' hidden_states lack state {index} "
                    "(TemdeConfig.sketch_vision_feature_layers); recompute them with this config."
                ) from None
            if hidden.shape[-1] != projection.in_features:
                raise ValueError(
                    f"vision hidden state {index} has {hidden.shape[-1]} channels, but the config's tower "
                    f"gives it {projection.in_features} (TemdeConfig.sketch_vision_feature_layers)."
                )
            extra = projection(_normed(norm, hidden))
            parts.append(extra)
            masks.append(torch.ones(extra.shape[:2], dtype=mask.dtype, device=mask.device))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def project_text_hidden_states(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Text tower outputs -> `(tokens (B, L, D), mask (B, L), pooled (B, D) or None)`."""
        tokens = self.text_projection(_normed(self.text_token_norm, hidden))
        if attention_mask is None:
            attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        if pooled is not None:
            pooled = self.text_projection(_normed(self.text_token_norm, pooled))
        return tokens, attention_mask, pooled

    def _vision_tower(
        self, pixel_values: torch.Tensor | None, vision_outputs: Any, **kwargs: Any
    ) -> ModelOutput:
        """The vision tower's output: computed from `pixel_values`, or the precomputed `vision_outputs`."""
        if vision_outputs is not None:
            return _as_tower_output(vision_outputs, "vision_outputs")
        if pixel_values is None:
            raise ValueError("get_image_features needs `pixel_values` (or precomputed `vision_outputs`).")
        return self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)

    def _text_tower(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        text_outputs: Any,
        **kwargs: Any,
    ) -> ModelOutput:
        """The text tower's output: computed from `input_ids`, or the precomputed `text_outputs`."""
        if text_outputs is not None:
            return _as_tower_output(text_outputs, "text_outputs")
        if input_ids is None:
            raise ValueError("get_text_features needs `input_ids` (or precomputed `text_outputs`).")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # not every tower takes token_type_ids
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # Public features (transformers v5 convention) and plain-tensor helpers
    # ----------------------------------------------------------------------------------------------
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        sketch_weight: float | None = None,
        **kwargs: Any,
    ) -> TemdeEncoderOutput:
        """Image embeddings.

        Args:
            pixel_values: `(batch, channels, height, width)` from the processor.
            vision_outputs: the vision tower's output for these images, computed earlier (e.g. cached while
                the tower is frozen): `last_hidden_state` `(batch, tokens, C)` or `(batch, C, h, w)` and
                optionally `pooler_output` `(batch, C)`. The tower is then skipped, like `encoder_outputs`
                in transformers' encoder-decoder models. With `config.sketch_vision_feature_layers` it
                also needs `hidden_states`: the tower's tuple, or a dict holding just those indices.
            sketch_weight: λ of the `concat` fusion for this call (default `config.sketch_weight`).
            **kwargs: passed to the vision tower (e.g. `output_hidden_states`).

        Returns:
            [`TemdeEncoderOutput`] with the final embedding `(batch, embed_dim)` in `pooler_output`.
        """
        if vision_outputs is None:
            check_inputs("pixel_values", pixel_values, "(batch, channels, height, width)")
        # the extra maps of `config.sketch_vision_feature_layers` are hidden states: ask the tower for them
        # only then (and return them only when the caller asked too)
        asked = bool(kwargs.get("output_hidden_states"))
        if self.sketch_feature_layers and vision_outputs is None:
            kwargs["output_hidden_states"] = True
        out = self._vision_tower(pixel_values, vision_outputs, **kwargs)
        tokens, mask, pooled = self.project_image_hidden_states(
            out.last_hidden_state, getattr(out, "pooler_output", None)
        )
        sketch_tokens, sketch_mask = self.project_sketch_feature_maps(
            tokens, mask, getattr(out, "hidden_states", None)
        )
        keep = asked or vision_outputs is not None or not self.sketch_feature_layers
        return self._head_output(out, tokens, mask, pooled, sketch_weight, sketch_tokens, sketch_mask, keep)

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        text_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        sketch_weight: float | None = None,
        **kwargs: Any,
    ) -> TemdeEncoderOutput:
        """Text embeddings.

        Args:
            input_ids: `(batch, seq_len)`.
            attention_mask: `(batch, seq_len)`, 1 for real tokens; padding adds nothing to the sketch.
            text_outputs: the text tower's output for these captions, computed earlier (see
                `get_image_features`); `attention_mask` still marks its padding.
            sketch_weight: λ of the `concat` fusion for this call (default `config.sketch_weight`).

        Returns:
            [`TemdeEncoderOutput`] with the final embedding `(batch, embed_dim)` in `pooler_output`.
        """
        if text_outputs is None:
            check_inputs("input_ids", input_ids, "(batch, seq_len)", attention_mask)
        out = self._text_tower(
            input_ids,
            attention_mask,
            text_outputs,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            **kwargs,
        )
        tokens, mask, pooled = self.project_text_hidden_states(
            out.last_hidden_state, attention_mask, getattr(out, "pooler_output", None)
        )
        return self._head_output(out, tokens, mask, pooled, sketch_weight)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, C, H, W)` -> embeddings `(batch, embed_dim)`."""
        return self.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """`(batch, seq_len)` token ids -> embeddings `(batch, embed_dim)`."""
        return self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).pooler_output

    @torch.no_grad()
    def initialize_sketch(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """DLSH initialisation of the sketch from valid projected tokens `(M, D)` of both modalities."""
        if self.sketch is None:
            raise ValueError("This model has no sketch (sketch_fusion='none'); nothing to initialise.")
        self.sketch.initialize(tokens, generator=generator)

    # ----------------------------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        vision_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        text_outputs: BaseModelOutputWithPooling | tuple[torch.Tensor, ...] | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        sketch_weight: float | None = None,
    ) -> TemdeOutput:
        """Embed images and/or captions, score every pair and (optionally) compute the loss.

        With only one modality the output holds just its embeddings (this is what transformers'
        `feature-extraction` / `image-feature-extraction` pipelines call). `return_dict=False` gives a tuple.

        Args:
            input_ids: `(n_texts, seq_len)`; attention_mask likewise.
            pixel_values: `(n_images, C, H, W)`.
            vision_outputs / text_outputs: precomputed tower outputs that replace `pixel_values` /
                `input_ids` (see `get_image_features`).
            return_loss: symmetric InfoNCE on the row-paired batch (needs n_images == n_texts).
            sketch_weight: λ of the `concat` fusion for this call (default `config.sketch_weight`).

        Returns:
            [`TemdeOutput`] with `logits_per_image` `(n_images, n_texts)` when both are given, and
            `logit_scale` always.
        """
        has_images = pixel_values is not None or vision_outputs is not None
        has_texts = input_ids is not None or text_outputs is not None
        if not has_images and not has_texts:
            raise ValueError(
                "TemdeModel.forward needs `input_ids`, `pixel_values` or both (use the processor)."
            )
        tower_kwargs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v}
        vision = text = None
        if has_images:
            vision = self.get_image_features(
                pixel_values=pixel_values,
                vision_outputs=vision_outputs,
                sketch_weight=sketch_weight,
                **tower_kwargs,
            )
        if has_texts:
            text = self.get_text_features(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                text_outputs=text_outputs,
                sketch_weight=sketch_weight,
                **tower_kwargs,
            )
        image_embeds = vision.pooler_output if vision is not None else None
        text_embeds = text.pooler_output if text is not None else None
        logit_scale = self.logit_scale.exp()
        logits_per_text = loss = None
        if vision is not None and text is not None:
            logits_per_text = logit_scale * text_embeds @ image_embeds.T  # (n_texts, n_images)
        if return_loss:
            if logits_per_text is None or image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    "return_loss needs paired batches of images and texts, got "
                    f"{0 if image_embeds is None else image_embeds.shape[0]} images and "
                    f"{0 if text_embeds is None else text_embeds.shape[0]} texts."
                )
            loss = info_nce_loss(image_embeds, text_embeds, logit_scale=logit_scale)
        return TemdeOutput(
            loss=loss,
            logits_per_image=logits_per_text.T if logits_per_text is not None else None,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_sketch=text.sketch if text is not None else None,
            image_sketch=vision.sketch if vision is not None else None,
            text_model_output=text,
            vision_model_output=vision,
            logit_scale=logit_scale,
        )

    # ----------------------------------------------------------------------------------------------
    # Composition and serialisation
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str | Path, text_model_name_or_path: str | Path, **kwargs: Any
    ) -> TemdeModel:
        """Compose a T-EMDE model from two pretrained towers; the head and sketch start fresh.

        Args:
            vision_model_name_or_path: a folder (or Hub id) of the image tower, e.g. a ViT or the converted
                EfficientNet-Lite0. A CLIP checkpoint contributes its vision tower.
            text_model_name_or_path: likewise for the text tower (BERT, MiniLM, CLIP text, ...).
            **kwargs: `vision_*` / `text_*` keyword arguments go to that tower's `from_pretrained`
                (e.g. `text_dtype`); everything else overrides [`TemdeConfig`] fields.
        """
        vision_kwargs = {k[len("vision_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("vision_")}
        text_kwargs = {k[len("text_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("text_")}
        vision_model = _load_tower(vision_model_name_or_path, "vision", **vision_kwargs)
        text_model = _load_tower(text_model_name_or_path, "text", **text_kwargs)
        config = TemdeConfig.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus this folder's code and an `auto_map` (Hub remote code)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_remote_code(save_directory)


def _load_tower(name_or_path: str | Path, kind: str, **kwargs: Any) -> PreTrainedModel:
    """Load one pretrained tower, with a clear error when the folder is not a transformers model."""
    kwargs.setdefault("use_safetensors", True)  # pickle weights can run code when loaded: never read them
    fix = "pass a folder written by save_pretrained, or a Hub id of the form ORG/NAME"
    require_folder(name_or_path, f"{kind} tower", fix)  # a mistyped folder is not looked up on the Hub
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(
            f"{kind} tower folder {path} has no config.json: point to a folder written by save_pretrained "
            "(for EfficientNet-Lite0 run `temde-hf convert-efficientnet-lite OUTPUT_DIR` first)."
        )
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":  # take the matching half of a CLIP checkpoint
        from transformers import CLIPTextModel, CLIPVisionModel

        tower_cls = CLIPVisionModel if kind == "vision" else CLIPTextModel
        return tower_cls.from_pretrained(name_or_path, **kwargs)
    if config.model_type in LOCAL_TOWERS:
        return LOCAL_TOWERS[config.model_type].from_pretrained(name_or_path, **kwargs)
    return AutoModel.from_pretrained(name_or_path, config=config, **kwargs)


def copy_remote_code(save_directory: str | Path) -> list[Path]:
    """Copy this model folder's modules next to a checkpoint, so `trust_remote_code=True` loads it.

    Only the folder's own files travel (they import nothing but torch, transformers and each other).
    """
    here = Path(__file__).resolve().parent
    copied = []
    for source in sorted(here.glob("*.py")):
        if source.name == "__init__.py":
            continue
        target = Path(save_directory) / source.name
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


__all__ = ["TemdeEncoderOutput", "TemdeModel", "TemdeOutput", "TemdePreTrainedModel", "copy_remote_code"]
