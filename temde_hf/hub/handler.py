"""Inference Endpoints handler for a T-EMDE checkpoint (shipped as ``handler.py`` next to the weights).

This file is copied verbatim into every exported Hub folder, so it imports only transformers, torch and
PIL (never ``temde_hf``): the model comes from the folder's own remote code.

Requests (``data`` is the deserialised request body)::

    {"inputs": <image>, "parameters": {"candidate_labels": ["a dog", "a cat"]}}
        -> [{"label": "a dog", "score": 0.93}, ...]            sorted, best first
    {"inputs": <image>}                         -> {"image_embeds": [[...]]}   (1, embed_dim)
    {"inputs": "a dog" | ["a dog", "a cat"]}    -> {"text_embeds": [[...]]}    (n, embed_dim)
    {"inputs": {"image": <image>} | {"text": ...}}   the same, with the modality named explicitly

``<image>`` is a PIL image, raw bytes, a base64 string or a data URL.

On a CPU endpoint, embeddings come from onnxruntime when the folder has the graphs of
``temde-hf export-onnx`` and onnxruntime is installed (the same fused embeddings, faster).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

DEFAULT_TEMPLATE = "This is a photo of {}."


def _to_image(value: Any) -> Image.Image | None:
    """Decode an image from PIL / bytes / base64 / data URL; ``None`` when it is not an image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:image") else value
        try:
            value = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return None
    if isinstance(value, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
        except (OSError, SyntaxError):
            return None
        return image.convert("RGB")
    return None


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
        path: the model folder (the Endpoint passes the repository snapshot).
    """

    def __init__(self, path: str = "") -> None:
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.onnx = _onnx_sessions(path)

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        """Answer one request (see the module docstring for the formats)."""
        inputs = data.get("inputs", data)
        params = data.get("parameters") or {}
        image, texts = self._split_inputs(inputs)
        labels = params.get("candidate_labels")
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        if image is not None and labels:
            return self.classify(image, labels, params.get("hypothesis_template", DEFAULT_TEMPLATE))
        if image is not None:
            return {"image_embeds": self.embed_images([image]).tolist()}
        if texts:
            return {"text_embeds": self.embed_texts(texts).tolist()}
        raise ValueError("request needs 'inputs': an image (bytes/base64/PIL) or a text or list of texts")

    @staticmethod
    def _split_inputs(inputs: Any) -> tuple[Image.Image | None, list[str]]:
        if isinstance(inputs, dict):
            image = _to_image(inputs["image"]) if inputs.get("image") is not None else None
            if inputs.get("image") is not None and image is None:
                raise ValueError("'inputs.image' could not be decoded as an image (PIL, bytes or base64)")
            text = inputs.get("text") or []
            return image, [text] if isinstance(text, str) else list(text)
        if isinstance(inputs, list):
            return None, [str(item) for item in inputs]
        image = _to_image(inputs)
        if image is not None:
            return image, []
        if isinstance(inputs, str):
            return None, [inputs]
        raise ValueError(f"unsupported 'inputs' of type {type(inputs).__name__}")

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
