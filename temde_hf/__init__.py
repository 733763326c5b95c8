"""temde_hf: T-EMDE sketch pooling for vision-text dual encoders, native to Hugging Face transformers.

Importing the package registers the "temde" model type with transformers' Auto classes.
"""

from .models.temde import (
    LOSSES,
    POOLING_HEADS,
    SKETCH_CODERS,
    TemdeConfig,
    TemdeModel,
    TemdeOutput,
    TemdeProcessor,
    TemdeSketch,
    register_auto_classes,
)

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "POOLING_HEADS",
    "SKETCH_CODERS",
    "TemdeConfig",
    "TemdeModel",
    "TemdeOutput",
    "TemdeProcessor",
    "TemdeSketch",
    "__version__",
]
