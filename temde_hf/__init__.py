"""temde_hf: T-EMDE sketch pooling for vision-text dual encoders, native to Hugging Face transformers.

Importing the package registers the "temde" model type with transformers' Auto classes.
"""

from .models.temde import (
    ALIGNMENT_AGGREGATIONS,
    LOSSES,
    POOLING_HEADS,
    SKETCH_CODERS,
    SketchCoder,
    TemdeConfig,
    TemdeForImageTextRetrieval,
    TemdeModel,
    TemdeOutput,
    TemdeProcessor,
    TemdeSketch,
    alignment_scores,
    paired_alignment_scores,
    register_auto_classes,
)

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ALIGNMENT_AGGREGATIONS",
    "LOSSES",
    "POOLING_HEADS",
    "SKETCH_CODERS",
    "SketchCoder",
    "TemdeConfig",
    "TemdeForImageTextRetrieval",
    "TemdeModel",
    "TemdeOutput",
    "TemdeProcessor",
    "TemdeSketch",
    "__version__",
    "alignment_scores",
    "paired_alignment_scores",
]
