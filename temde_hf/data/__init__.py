"""Image–caption data: loaders to `datasets.Dataset`, caption pairs for training, export, synthetic data.

Every loader returns one row per image with columns ``image`` (`datasets.Image`, decoded lazily),
``image_id`` (str), ``captions`` (list of str) and ``split`` (str).
"""

from __future__ import annotations

from .auto import DATA_FORMATS, detect_format, load_image_captions
from .coco import load_coco_captions
from .common import FEATURES, open_image, verify_image
from .csv_captions import karpathy_split_map, load_caption_csv
from .errors import DataError, LoadReport
from .export import export_imagefolder
from .hub import load_hub_dataset
from .imagefolder import load_imagefolder
from .karpathy import load_karpathy, read_json
from .pairs import CaptionPairs, caption_to_image, flat_captions
from .synthetic import make_synthetic_karpathy

__all__ = [
    "DATA_FORMATS",
    "FEATURES",
    "CaptionPairs",
    "DataError",
    "LoadReport",
    "caption_to_image",
    "detect_format",
    "export_imagefolder",
    "flat_captions",
    "karpathy_split_map",
    "load_caption_csv",
    "load_coco_captions",
    "load_hub_dataset",
    "load_image_captions",
    "load_imagefolder",
    "load_karpathy",
    "make_synthetic_karpathy",
    "open_image",
    "read_json",
    "verify_image",
]
