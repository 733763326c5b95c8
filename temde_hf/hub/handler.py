"""Inference Endpoints handler for a T-EMDE checkpoint (shipped as ``handler.py`` next to the weights).

This file is copied verbatim into every exported Hub folder, so it imports only transformers, torch and
PIL (never ``temde_hf``): the model comes from the folder's own remote code, and images are decoded by
``image_decoding.py``, which the export ships beside this file (the package's one image decoder).

Requests (``data`` is the deserialised request body)::

    {"inputs": <image>, "parameters": {"candidate_labels": ["a dog", "a cat"]}}
        -> [{"label": "a dog", "score": 0.93}, ...]            sorted, best first
    {"inputs": <image>}                         -> {"image_embeds": [[...]]}   (1, embed_dim)
    {"inputs": "a dog" | ["a dog", "a cat"]}    -> {"text_embeds": [[...]]}    (n, embed_dim)
    {"inputs": {"image": <image>} | {"text": ...}}   the same, with the modality named explicitly

``<image>`` is a PIL image, raw bytes, a base64 string or a data URL (never a URL to fetch). An image
with more than ``max_image_pixels`` pixels (default `MAX_IMAGE_PIXELS`, or the environment variable
``TEMDE_HF_MAX_IMAGE_PIXELS``) is refused before it is decoded. A malformed request raises a
`ValueError` saying what is wrong and what is expected.

On a CPU endpoint, embeddings come from onnxruntime when the folder has the graphs of
``temde-hf export-onnx`` and onnxruntime is installed (the same fused embeddings, faster).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

DEFAULT_TEMPLATE = "This is a photo of {}."
# 50 megapixels (150 MB as RGB): above phone cameras, far below a 12000 x 12000 decompression bomb.
MAX_IMAGE_PIXELS = 50_000_000
_DECODER_FILE = "image_decoding.py"


def _load_decoder() -> ModuleType:
    """``image_decoding.py`` from beside this file (an export) or from the package's data folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / _DECODER_FILE, here.parent / "data" / _DECODER_FILE):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("temde_image_decoding", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise ImportError(
        f"{here / _DECODER_FILE} is missing: export the checkpoint again with `temde-hf publish`"
    )


_decoder = _load_decoder()


def _to_image(value: Any, max_pixels: int) -> Image.Image | None:
    """Decode an image from PIL / bytes / base64 / data URL; ``None`` when it is not image data.

    Raises:
        ValueError: The data is an image, but larger than `max_pixels`.
    """
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:image") else value
        try:
            value = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
    if not isinstance(value, Image.Image | bytes | bytearray):
        return None
    try:
        return _decoder.decode_image(value, max_pixels)
    except _decoder.ImageTooLargeError as exc:
        raise ValueError(f"'inputs' image refused: {exc}") from exc
    except _decoder.ImageDecodeError:
        return None


def _check_template(template: Any) -> str:
    """The hypothesis template, if it has exactly one ``{}`` where the label goes."""
    try:
        ok = isinstance(template, str) and template.count("{}") == 1 and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"'parameters.hypothesis_template' must be a string with one '{{}}' where the label goes, "
            f"e.g. {DEFAULT_TEMPLATE!r}; got {template!r}"
        )
    return template


def _check_labels(labels: Any) -> list[str] | None:
    """Candidate labels as a list of non-empty strings (a comma-separated string is split)."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if not isinstance(labels, list) or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(
            "'parameters.candidate_labels' must be a list of non-empty strings (or one comma-separated "
            f"string); got {labels!r}"
        )
    if not labels:
        raise ValueError("'parameters.candidate_labels' is empty; give at least one label")
    return labels


def _onnx_sessions(path: str) -> dict[str, Any] | None:
    """onnxruntime sessions of the exported encoder graphs beside the weights, or None."""
    folder = Path(path)
    graphs = {"image": folder / "image_encoder.onnx", "text": folder / "text_encoder.onnx"}
    if torch.cuda.is_available() or not all(g.is_file() for g in graphs.values()):
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    sessions = {
        k: onnxruntime.InferenceSession(str(g), providers=["CPUExecutionProvider"]) for k, g in graphs.items()
    }
    sessions["max_text_length"] = json.loads((folder / "onnx_export.json").read_text())["max_text_length"]
    return sessions


class EndpointHandler:
    """Zero-shot classification and embedding endpoint.

    Args:
        path: the model folder (the Endpoint passes the repository snapshot). Its weights must be
            safetensors: pickle-based weights are refused, since unpickling can run code.
        max_image_pixels: refuse larger images; default ``TEMDE_HF_MAX_IMAGE_PIXELS`` or
            `MAX_IMAGE_PIXELS`.
    """

    def __init__(self, path: str = "", max_image_pixels: int | None = None) -> None:
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True, use_safetensors=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        if max_image_pixels is None:
            max_image_pixels = int(os.environ.get("TEMDE_HF_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))
        self.max_image_pixels = max_image_pixels
        self.onnx = _onnx_sessions(path)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        """Answer one request (see the module docstring for the formats)."""
        if not isinstance(data, dict):
            raise ValueError(
                f"the request body must be a JSON object with 'inputs' (and optional 'parameters'); "
                f"got {type(data).__name__}"
            )
        # Without "inputs", the body itself names the modality: {"image": ...} or {"text": ...}.
        inputs = data["inputs"] if "inputs" in data else {k: v for k, v in data.items() if k != "parameters"}
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"'parameters' must be a JSON object; got {type(params).__name__}")
        image, texts = self._split_inputs(inputs)
        labels = _check_labels(params.get("candidate_labels"))
        if image is not None and labels:
            template = _check_template(params.get("hypothesis_template", DEFAULT_TEMPLATE))
            return self.classify(image, labels, template)
        if image is not None:
            return {"image_embeds": self.embed_images([image]).tolist()}
        if texts:
            return {"text_embeds": self.embed_texts(texts).tolist()}
        raise ValueError("request needs 'inputs': an image (bytes/base64/PIL) or a text or list of texts")

    def _split_inputs(self, inputs: Any) -> tuple[Image.Image | None, list[str]]:
        if isinstance(inputs, dict):
            unknown = sorted(str(key) for key in inputs if key not in ("image", "text"))
            if unknown:
                raise ValueError(f"'inputs' has unknown keys {unknown}; use 'image' or 'text'")
            image = None
            if inputs.get("image") is not None:
                image = _to_image(inputs["image"], self.max_image_pixels)
                if image is None:
                    raise ValueError("'inputs.image' could not be decoded as an image (PIL, bytes or base64)")
            return image, self._texts(inputs.get("text") or [])
        if isinstance(inputs, list):
            return None, self._texts(inputs)
        image = _to_image(inputs, self.max_image_pixels)
        if image is not None:
            return image, []
        if isinstance(inputs, str):
            return None, [inputs]
        if isinstance(inputs, bytes | bytearray):
            raise ValueError("'inputs' bytes could not be decoded as an image")
        raise ValueError(f"unsupported 'inputs' of type {type(inputs).__name__}")

    @staticmethod
    def _texts(value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"texts must be a string or a list of strings; got {value!r:.80}")
        return texts

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Retrieval embeddings `(n_images, embed_dim)`."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if self.onnx is not None:
            return torch.from_numpy(self.onnx["image"].run(None, {"pixel_values": pixel_values.numpy()})[0])
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Retrieval embeddings `(n_texts, embed_dim)`."""
        limit = {"max_length": self.onnx["max_text_length"]} if self.onnx is not None else {}
        batch = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True, **limit)
        if self.onnx is not None:
            feed = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
            return torch.from_numpy(self.onnx["text"].run(None, feed)[0])
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model.get_text_features(**batch).pooler_output

    @torch.no_grad()
    def classify(self, image: Image.Image, labels: list[str], template: str) -> list[dict[str, Any]]:
        """Softmax over the candidate labels of the model's image-text logits, best first."""
        batch = self.processor(
            images=[image],
            text=[template.format(label) for label in labels],
            return_tensors="pt",
            padding=True,
        )
        logits = self.model(**batch).logits_per_image[0]  # (n_labels,)
        scores = logits.softmax(dim=-1).tolist()
        ranked = sorted(zip(labels, scores), key=lambda pair: -pair[1])
        return [{"label": label, "score": float(score)} for label, score in ranked]
