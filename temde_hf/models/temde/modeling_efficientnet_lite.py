"""EfficientNet-Lite as a transformers vision tower (an own port; see the configuration's docstring).

Data flow: `pixel_values (batch, 3, H, W)` → stem (3×3 stride-2 conv, BN, ReLU6) → MBConv blocks
(1×1 expand → depthwise k×k → 1×1 project, BN after each, ReLU6 after the first two, residual when the
shape is kept; no squeeze-and-excitation) → head (1×1 conv to `hidden_dim`, BN, ReLU6) → feature map
`(batch, hidden_dim, H/32, W/32)`. The tower exposes that map as a token sequence
`(batch, H/32 * W/32, hidden_dim)` (49 tokens at 224 px) so token-level poolers treat it like a ViT, and
its global average as `pooler_output`.

Convolutions use TensorFlow "same" padding computed from the input size (for stride 2 the extra pixel
goes right/bottom), which is what the pretrained TF weights expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .loading_temde import StrictLoadingMixin


def _activation(name: str) -> nn.Module:
    """The block activation named by `config.hidden_act`."""
    if name == "relu6":
        return nn.ReLU6()
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()  # "swish" / "silu"


def _batch_norm(channels: int, config: EfficientNetLiteConfig) -> nn.BatchNorm2d:
    # The config keeps TF's decay (share of the old running stat); PyTorch wants the share of the new one.
    return nn.BatchNorm2d(channels, eps=config.batch_norm_eps, momentum=1.0 - config.batch_norm_momentum)


class EfficientNetLiteSameConv2d(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow "same" padding: output size `ceil(input / stride)`.

    The total padding `max((ceil(i / s) - 1) * s + k - i, 0)` is split with the smaller half first, so a
    stride-2 3×3 conv on an even input pads one pixel on the right/bottom only (PyTorch's symmetric
    padding would shift every feature by half a pixel against the pretrained weights).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)

    @staticmethod
    def _pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pads then convolves `(batch, in, H, W)` → `(batch, out, ceil(H/s), ceil(W/s))`."""
        kernel, stride = self.kernel_size[0], self.stride[0]
        if kernel > 1 or stride > 1:
            top, bottom = self._pad(hidden_states.shape[-2], kernel, stride)
            left, right = self._pad(hidden_states.shape[-1], kernel, stride)
            if top or bottom or left or right:
                hidden_states = F.pad(hidden_states, (left, right, top, bottom))
        return super().forward(hidden_states)


class EfficientNetLiteEmbeddings(nn.Module):
    """Stem: 3×3 stride-2 conv, BN, activation. `(batch, 3, H, W)` → `(batch, stem, H/2, W/2)`."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        self.convolution = EfficientNetLiteSameConv2d(config.num_channels, config.stem_channels, 3, stride=2)
        self.batchnorm = _batch_norm(config.stem_channels, config)
        self.activation = _activation(config.hidden_act)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.activation(self.batchnorm(self.convolution(pixel_values)))


class EfficientNetLiteBlock(GradientCheckpointingLayer):
    """Mobile inverted bottleneck (MBConv) without squeeze-and-excitation.

    Args:
        config: The model configuration (activation, batch-norm settings).
        in_dim: Input channels.
        out_dim: Output channels.
        kernel_size: Depthwise kernel size.
        stride: Depthwise stride.
        expand_ratio: Width of the bottleneck relative to `in_dim`; 1 skips the expansion conv.
        drop_rate: Stochastic-depth probability of the residual branch (training only).
    """

    def __init__(
        self,
        config: EfficientNetLiteConfig,
        in_dim: int,
        out_dim: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_rate: float,
    ):
        super().__init__()
        inner_dim = in_dim * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self.expand_conv = EfficientNetLiteSameConv2d(in_dim, inner_dim, 1)
            self.expand_bn = _batch_norm(inner_dim, config)
        self.depthwise_conv = EfficientNetLiteSameConv2d(
            inner_dim, inner_dim, kernel_size, stride=stride, groups=inner_dim
        )
        self.depthwise_bn = _batch_norm(inner_dim, config)
        self.project_conv = EfficientNetLiteSameConv2d(inner_dim, out_dim, 1)
        self.project_bn = _batch_norm(out_dim, config)
        self.activation = _activation(config.hidden_act)
        self.residual = stride == 1 and in_dim == out_dim
        self.drop_rate = drop_rate

    def _drop_path(self, branch: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: zero the branch of whole samples, rescale the survivors."""
        if not self.training or self.drop_rate == 0.0:
            return branch
        keep = 1.0 - self.drop_rate
        # (batch, 1, 1, 1): one Bernoulli draw per sample
        mask = torch.rand(branch.shape[0], 1, 1, 1, dtype=branch.dtype, device=branch.device) < keep
        return branch * mask.to(branch.dtype) / keep

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, in_dim, H, W)` → `(batch, out_dim, ceil(H/stride), ceil(W/stride))`."""
        branch = hidden_states
        if self.expand:
            branch = self.activation(self.expand_bn(self.expand_conv(branch)))
        branch = self.activation(self.depthwise_bn(self.depthwise_conv(branch)))
        branch = self.project_bn(self.project_conv(branch))  # linear bottleneck: no activation
        if self.residual:
            return hidden_states + self._drop_path(branch)
        return branch


class EfficientNetLiteEncoder(nn.Module):
    """All MBConv blocks (flat list, stage by stage) and the head conv to `hidden_dim` channels."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__()
        n_blocks = config.num_blocks
        blocks: list[EfficientNetLiteBlock] = []
        in_dim = config.stem_channels  # the stem is never width-scaled in Lite
        for stage in range(len(config.out_channels)):
            out_dim = config.round_channels(config.out_channels[stage])
            for repeat in range(config.stage_repeats(stage)):
                blocks.append(
                    EfficientNetLiteBlock(
                        config,
                        in_dim=in_dim,
                        out_dim=out_dim,
                        kernel_size=config.kernel_sizes[stage],
                        stride=config.strides[stage] if repeat == 0 else 1,
                        expand_ratio=config.expand_ratios[stage],
                        # linearly growing stochastic depth, as in the reference training recipe
                        drop_rate=config.drop_connect_rate * len(blocks) / n_blocks,
                    )
                )
                in_dim = out_dim
        self.blocks = nn.ModuleList(blocks)
        self.top_conv = EfficientNetLiteSameConv2d(in_dim, config.hidden_dim, 1)
        self.top_bn = _batch_norm(config.hidden_dim, config)
        self.activation = _activation(config.hidden_act)

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Runs the blocks and the head.

        Args:
            hidden_states: Stem output `(batch, stem_channels, H/2, W/2)`.
            output_hidden_states: Also return every intermediate map.

        Returns:
            The head's feature map `(batch, hidden_dim, H/32, W/32)` and, if asked, the tuple
            (stem output, output of each block, head output), each `(batch, channels, h, w)`.
        """
        all_states: tuple[torch.Tensor, ...] | None = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states)
            if all_states is not None:
                all_states += (hidden_states,)
        hidden_states = self.activation(self.top_bn(self.top_conv(hidden_states)))
        if all_states is not None:
            all_states += (hidden_states,)
        return hidden_states, all_states


class EfficientNetLitePreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Weight initialisation and loading hooks shared by the EfficientNet-Lite models.

    `from_pretrained` is strict (see `StrictLoadingMixin`); the ImageNet classifier is the optional head.
    """

    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EfficientNetLiteBlock"]
    _optional_head_prefixes = ("classifier.",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """He-normal (fan-out) convolutions, unit batch norms, uniform `±1/sqrt(out)` classifier.

        Uses `transformers.initialization`, whose functions skip tensors already loaded from a checkpoint.
        """
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)


@dataclass
class EfficientNetLiteModelOutput(BaseModelOutputWithPoolingAndNoAttention):
    """Output of `EfficientNetLiteModel`.

    Args:
        last_hidden_state: Final feature map as tokens `(batch, h * w, hidden_dim)`, row-major over the
            `(h, w)` grid (49 tokens for 224 px).
        pooler_output: Global average of the feature map `(batch, hidden_dim)`.
        hidden_states: If requested, (stem, every block, head) maps `(batch, channels, h, w)`.
        feature_map: The final feature map in image layout `(batch, hidden_dim, h, w)`.
    """

    feature_map: torch.FloatTensor | None = None


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite feature extractor: tokens `(batch, h*w, hidden_dim)` and a pooled vector."""

    # The converted checkpoints carry the ImageNet classifier; loading just the tower drops it quietly.
    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.embeddings = EfficientNetLiteEmbeddings(config)
        self.encoder = EfficientNetLiteEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> EfficientNetLiteModelOutput | tuple[torch.Tensor, ...]:
        """Encodes images.

        Args:
            pixel_values: Normalised images `(batch, num_channels, height, width)`.
            output_hidden_states: Return every intermediate feature map (defaults to the config).
            return_dict: Return a tuple instead of the output dataclass when False.
            **kwargs: Ignored (accepts generic arguments such as `interpolate_pos_encoding`).

        Returns:
            `EfficientNetLiteModelOutput` with `last_hidden_state (batch, h*w, hidden_dim)` and
            `pooler_output (batch, hidden_dim)`.
        """
        if pixel_values is None:
            raise ValueError(
                "EfficientNetLiteModel.forward needs `pixel_values` (batch, channels, height, width)"
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if return_dict is None:
            return_dict = self.config.return_dict
        pixel_values = pixel_values.to(self.embeddings.convolution.weight.dtype)

        feature_map, hidden_states = self.encoder(self.embeddings(pixel_values), output_hidden_states)
        pooled = feature_map.mean(dim=(2, 3))  # (batch, hidden_dim)
        # (batch, C, h, w) -> (batch, C, h*w) -> (batch, h*w, C): one token per spatial cell, row-major
        tokens = feature_map.flatten(2).transpose(1, 2)
        if not return_dict:
            return tuple(v for v in (tokens, pooled, hidden_states) if v is not None)
        return EfficientNetLiteModelOutput(
            last_hidden_state=tokens,
            pooler_output=pooled,
            hidden_states=hidden_states,
            feature_map=feature_map,
        )


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite with its linear classifier on the pooled features (ImageNet-1k when pretrained)."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.efficientnet_lite = EfficientNetLiteModel(config)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = (
            nn.Linear(config.hidden_dim, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> ImageClassifierOutputWithNoAttention | tuple[torch.Tensor, ...]:
        """Classifies images.

        Args:
            pixel_values: Normalised images `(batch, num_channels, height, width)`.
            labels: Optional class indices `(batch,)` (or targets, per `config.problem_type`).
            output_hidden_states: Return every intermediate feature map.
            return_dict: Return a tuple instead of the output dataclass when False.
            **kwargs: Ignored.

        Returns:
            `ImageClassifierOutputWithNoAttention` with `logits (batch, num_labels)` and `loss` if labels.
        """
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs = self.efficientnet_lite(
            pixel_values, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        if not return_dict:
            rest = (logits, outputs.hidden_states) if outputs.hidden_states is not None else (logits,)
            return (loss, *rest) if loss is not None else rest
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states
        )


def register_efficientnet_lite() -> None:
    """Registers the config and models with `AutoConfig`, `AutoModel` and `AutoModelForImageClassification`.

    Idempotent (`exist_ok=True`), so every importer of the package may call it.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
    AutoModelForImageClassification.register(
        EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True
    )


__all__ = [
    "EfficientNetLiteForImageClassification",
    "EfficientNetLiteModel",
    "EfficientNetLiteModelOutput",
    "EfficientNetLitePreTrainedModel",
    "register_efficientnet_lite",
]
