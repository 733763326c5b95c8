"""The T-EMDE model folder: config, sketch, pooling heads, losses, model and processor.

Everything here imports only torch, transformers and sibling modules (relative imports), so
`save_pretrained` can ship these files as Hub remote code.
"""

from .configuration_temde import TemdeConfig
from .loss_temde import LOSSES, info_nce_loss, vse_hinge_loss
from .modeling_temde import TemdeEncoderOutput, TemdeModel, TemdeOutput, TemdePreTrainedModel
from .pooling_temde import POOLING_HEADS
from .processing_temde import TemdeProcessor
from .sketch_temde import SKETCH_CODERS, TemdeSketch


def register_auto_classes() -> None:
    """Make the Auto classes (config, model, zero-shot, processor) know "temde" and "efficientnet_lite"."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
    )

    from .modeling_efficientnet_lite import register_efficientnet_lite

    register_efficientnet_lite()  # the EfficientNet-Lite tower that ships in this folder
    AutoConfig.register(TemdeConfig.model_type, TemdeConfig, exist_ok=True)
    AutoModel.register(TemdeConfig, TemdeModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(TemdeConfig, TemdeModel, exist_ok=True)
    AutoProcessor.register(TemdeConfig, TemdeProcessor, exist_ok=True)


__all__ = [
    "LOSSES",
    "POOLING_HEADS",
    "SKETCH_CODERS",
    "TemdeConfig",
    "TemdeEncoderOutput",
    "TemdeModel",
    "TemdeOutput",
    "TemdePreTrainedModel",
    "TemdeProcessor",
    "TemdeSketch",
    "info_nce_loss",
    "register_auto_classes",
    "vse_hinge_loss",
]
