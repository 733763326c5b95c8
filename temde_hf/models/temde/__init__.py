"""The T-EMDE model folder: config, sketch, pooling heads, losses, model and processor.

Everything here imports only torch, transformers and sibling modules (relative imports), so
`save_pretrained` can ship these files as Hub remote code.
"""

from .alignment_temde import ALIGNMENT_AGGREGATIONS, alignment_scores, paired_alignment_scores
from .configuration_temde import TemdeConfig
from .loss_temde import LOSSES, SCORE_LOSSES, info_nce_loss, vse_hinge_loss
from .matching_temde import TemdeForImageTextRetrieval, TemdeMatchingHead, TemdeRetrievalOutput
from .modeling_temde import TemdeEncoderOutput, TemdeModel, TemdeOutput, TemdePreTrainedModel
from .pooling_temde import POOLING_HEADS
from .processing_temde import TemdeProcessor
from .sketch_temde import SKETCH_CODERS, SketchCoder, TemdeSketch


def register_auto_classes() -> None:
    """Make the Auto classes know "temde" and "efficientnet_lite".

    `AutoModel` / `AutoModelForZeroShotImageClassification` give the dual encoder `TemdeModel`;
    `AutoModelForPreTraining` gives `TemdeForImageTextRetrieval`, the dual encoder with its image–text
    matching head (the model with all its training heads, as for BERT's next-sentence or FLAVA's
    matching head).
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForPreTraining,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
    )

    from .modeling_efficientnet_lite import register_efficientnet_lite

    register_efficientnet_lite()  # the EfficientNet-Lite tower that ships in this folder
    AutoConfig.register(TemdeConfig.model_type, TemdeConfig, exist_ok=True)
    AutoModel.register(TemdeConfig, TemdeModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(TemdeConfig, TemdeModel, exist_ok=True)
    AutoModelForPreTraining.register(TemdeConfig, TemdeForImageTextRetrieval, exist_ok=True)
    AutoProcessor.register(TemdeConfig, TemdeProcessor, exist_ok=True)


__all__ = [
    "ALIGNMENT_AGGREGATIONS",
    "LOSSES",
    "POOLING_HEADS",
    "SCORE_LOSSES",
    "SKETCH_CODERS",
    "SketchCoder",
    "TemdeConfig",
    "TemdeEncoderOutput",
    "TemdeForImageTextRetrieval",
    "TemdeMatchingHead",
    "TemdeModel",
    "TemdeOutput",
    "TemdePreTrainedModel",
    "TemdeProcessor",
    "TemdeRetrievalOutput",
    "TemdeSketch",
    "alignment_scores",
    "info_nce_loss",
    "paired_alignment_scores",
    "register_auto_classes",
    "vse_hinge_loss",
]
