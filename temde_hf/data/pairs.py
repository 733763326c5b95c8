"""From image rows to (image, caption) pairs for training and to the caption->image map for evaluation.

Nothing is copied: pair ``i`` is an index ``(row, caption_index)`` into the image-level dataset, and
the image is decoded only when the pair is read.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from .common import open_image


def caption_to_image(dataset: datasets.Dataset) -> torch.Tensor:
    """The image row of every caption, captions in row order then caption order.

    Returns:
        `(n_captions,)` int64: entry ``c`` is the row of caption ``c``'s image.
    """
    counts = torch.tensor([len(c) for c in dataset["captions"]], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def flat_captions(dataset: datasets.Dataset) -> list[str]:
    """All captions in the order of `caption_to_image`."""
    return [caption for captions in dataset["captions"] for caption in captions]


class CaptionPairs(TorchDataset):
    """One item per (image, caption) pair of an image-level dataset, without copying images.

    Items: ``{"image": PIL.Image (RGB), "caption": str, "image_index": int, "image_id": str}``;
    ``image_index`` (the row) lets a loss treat captions of the same image as positives
    (``pair_ids``). An image that cannot be decoded raises `DataError` naming the file.

    Args:
        dataset: Columns ``image``, ``image_id``, ``captions`` (from a loader).
        decode: Decode the image (``False`` returns the stored ``{"path", "bytes"}`` value).
    """

    def __init__(self, dataset: datasets.Dataset, decode: bool = True) -> None:
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.decode = decode
        self.captions = dataset["captions"]
        self.image_ids = dataset["image_id"]
        self.rows = caption_to_image(dataset)
        counts = torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        # position of each pair inside its image's caption list
        starts = torch.cumsum(counts, 0) - counts
        self.caption_index = torch.arange(len(self.rows)) - starts[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        value = self.dataset[row]["image"]
        image: Image.Image | dict = open_image(value) if self.decode else value
        return {
            "image": image,
            "caption": self.captions[row][int(self.caption_index[index])],
            "image_index": row,
            "image_id": self.image_ids[row],
        }
