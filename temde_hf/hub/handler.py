"""Inference Endpoints handler for a T-EMDE checkpoint (shipped as ``handler.py`` next to the weights).

It serves the request bodies of the Hub's ``zero-shot-image-classification`` and ``feature-extraction``
tasks (what ``huggingface_hub.InferenceClient``, the widgets and ``curl`` users send)::

    {"inputs": <image>, "parameters": {"candidate_labels": ["a dog", "a cat"]}}
        -> [{"label": "a dog", "score": 0.93}, ...]                  sorted, best first
    {"inputs": [<image>, <image>], "parameters": {"candidate_labels": "a dog, a cat"}}
        -> [[{"label": ..., "score": ...}, ...], [...]]              one ranking per image
    {"image": <image>, "candidateLabels": "a dog, a cat"}           the older key names: same answer
    {"inputs": <image> | [<image>, ...]}        -> [[f1, ..., fE], ...]   (n_images, embed_dim)
    {"inputs": "a dog" | ["a dog", "a cat"]}    -> [[f1, ..., fE], ...]   (n_texts, embed_dim)
    {"inputs": {"image": <image>, "text": ["a dog", ...]}}
        -> {"image_embeds": [[...]], "text_embeds": [[...]], "logits_per_image": [[...]]}

Embeddings are plain nested lists of floats, what ``InferenceClient.feature_extraction`` turns into an
array; its root-level options ``normalize`` and ``truncate`` are honoured, the others refused unless
they ask for what the model does anyway. ``<image>`` is a PIL image, raw bytes, base64 text (line
breaks allowed, as the ``base64`` tool prints it) or a ``data:image/...;base64,`` URI.

Refused, with a `RequestError` whose ``status`` is the HTTP status to answer and whose message says what
to send instead: URLs (nothing a request names is ever fetched), data that claims to be an image but
does not decode, empty or invisible text, unknown keys, and requests with more than ``max_items``
images + texts + labels (`MAX_ITEMS`, or ``TEMDE_HF_MAX_ITEMS``). Within the limit, the model runs on
at most ``batch_size`` inputs at a time (`BATCH_SIZE`, or ``TEMDE_HF_BATCH_SIZE``), so memory does not
grow with the request. An image with more than ``max_image_pixels`` pixels (`MAX_IMAGE_PIXELS`, or
``TEMDE_HF_MAX_IMAGE_PIXELS``) is refused from its header, before it is decoded.

The exported folder runs without ``temde_hf`` installed: the Endpoints toolkit puts the repository folder
on ``sys.path`` before it loads this file, so the package's one image decoder (``image_decoding.py``,
which the export ships beside it) and the one visible-text check (``processing_temde.py``, the model's
own remote code) are imported there as top-level modules, and from the package otherwise (the same
files either way).

On a CPU endpoint, embeddings come from onnxruntime when the folder has the graphs of
``temde-hf export-onnx`` and onnxruntime is installed (the same fused embeddings, faster).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

if __name__.startswith("temde_hf."):  # imported from the installed package
    from ..data.image_decoding import ImageDecodeError, ImageTooLargeError, decode_image
    from ..models.temde.processing_temde import text_problem
else:  # the exported folder, which the Endpoints toolkit puts on sys.path
    from image_decoding import ImageDecodeError, ImageTooLargeError, decode_image
    from processing_temde import text_problem

DEFAULT_TEMPLATE = "This is a photo of {}."
# 50 megapixels (150 MB as RGB): above phone cameras, far below a 12000 x 12000 decompression bomb.
MAX_IMAGE_PIXELS = 50_000_000
# Images + texts + labels in one request. 10k labels take minutes on a CPU endpoint: refuse them.
MAX_ITEMS = 1024
# Inputs per forward pass: bounds the activations whatever the request size.
BATCH_SIZE = 64

_LABEL_KEYS = ("candidate_labels", "candidateLabels")  # current name; older widgets/clients
# Root-level options of InferenceClient.feature_extraction (sent beside "inputs", not in "parameters").
_EMBEDDING_OPTIONS = (
    "normalize",
    "truncate",
    "truncation_direction",
    "prompt_name",
    "dimensions",
    "encoding_format",
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# File signatures: a base64 string that decodes to one of these is an image, broken or not.
_IMAGE_MAGIC = (
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
    b"\x00\x00\x01\x00",
)


class RequestError(ValueError):
    """A request this handler does not serve; `status` is the HTTP status to answer it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _shown(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _base64_bytes(value: str, where: str, must_be_image: bool) -> bytes | None:
    """The bytes of a base64 image string; ``None`` when `value` is not base64 of an image file.

    Whitespace is dropped first (``base64`` wraps its output at 76 columns). Unless `must_be_image`, a
    string counts as an image only when it decodes to an image file signature (so a one-word caption
    such as "sunshine", which is valid base64 too, stays a text). Image data that does not decode
    whole (truncated, corrupted) is refused.
    """
    if not must_be_image and " " in value.strip():
        return None  # base64 has no spaces (the base64 tool wraps with newlines): this is a text
    compact = "".join(value.split())
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        return None
    head = base64.b64decode(compact[: len(compact) // 4 * 4][:64])
    has_image_signature = head.startswith(_IMAGE_MAGIC) or head[4:8] == b"ftyp"
    if not (has_image_signature or must_be_image):
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        if not has_image_signature:
            return None  # not base64 at all (a caption): the caller says an image was expected
        raise RequestError(
            f"{where}: the base64 image is truncated or damaged ({exc}); send the whole file, base64-encoded",
            422,
        ) from exc


class EndpointHandler:
    """Zero-shot classification and embedding endpoint.

    Args:
        path: the model folder (the Endpoint passes the repository snapshot). Its weights must be
            safetensors: pickle-based weights are refused, since unpickling can run code.
        max_image_pixels: refuse larger images; default ``TEMDE_HF_MAX_IMAGE_PIXELS`` or `MAX_IMAGE_PIXELS`.
        max_items: refuse requests with more images + texts + labels; default ``TEMDE_HF_MAX_ITEMS`` or
            `MAX_ITEMS`.
        batch_size: inputs per forward pass; default ``TEMDE_HF_BATCH_SIZE`` or `BATCH_SIZE`.
    """

    def __init__(
        self,
        path: str = "",
        max_image_pixels: int | None = None,
        max_items: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True, use_safetensors=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        env = os.environ.get
        self.max_image_pixels = int(
            env("TEMDE_HF_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)
            if max_image_pixels is None
            else max_image_pixels
        )
        self.max_items = int(env("TEMDE_HF_MAX_ITEMS", MAX_ITEMS) if max_items is None else max_items)
        self.batch_size = int(env("TEMDE_HF_BATCH_SIZE", BATCH_SIZE) if batch_size is None else batch_size)
        if self.max_items < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_items and batch_size must be >= 1; got {self.max_items} and {self.batch_size}"
            )
        self.onnx = _onnx_sessions(path)

    # ----------------------------------------------------------------------------------------------
    # Request parsing
    # ----------------------------------------------------------------------------------------------
    def __call__(self, data: Any) -> list[Any] | dict[str, Any]:
        """Answer one request (see the module docstring for the shapes and answers).

        Raises:
            RequestError: the request cannot be served; the message says why and what to send instead.
        """
        if not isinstance(data, dict):
            raise RequestError(
                f"the request body must be a JSON object with 'inputs' (and optional 'parameters'); "
                f"got {type(data).__name__}"
            )
        body = dict(data)
        params = body.pop("parameters", None) or {}
        if not isinstance(params, dict):
            raise RequestError(f"'parameters' must be a JSON object; got {type(params).__name__}")
        params = dict(params)
        options = {key: body.pop(key) for key in _EMBEDDING_OPTIONS if key in body}
        if "inputs" in body:
            inputs = body.pop("inputs")
            _reject_unknown(body, "the request body", ("inputs", "parameters", *_EMBEDDING_OPTIONS))
        else:  # the modality named at the root: {"image": ...}, {"text": ...}, {"image", "candidateLabels"}
            inputs, body = body, {}
        labels_given = [params.pop(key) for key in _LABEL_KEYS if key in params]
        if isinstance(inputs, dict):
            inputs = dict(inputs)
            labels_given += [inputs.pop(key) for key in _LABEL_KEYS if key in inputs]
            _reject_unknown(inputs, "'inputs'", ("image", "text", *_LABEL_KEYS))
        if len(labels_given) > 1 and any(labels != labels_given[0] for labels in labels_given):
            raise RequestError(f"two different label lists were sent ({' and '.join(_LABEL_KEYS)}); send one")
        labels = _check_labels(labels_given[0]) if labels_given else None
        template = params.pop("hypothesis_template", DEFAULT_TEMPLATE)
        options.update({key: params.pop(key) for key in _EMBEDDING_OPTIONS if key in params})
        _reject_unknown(
            params, "'parameters'", ("candidate_labels", "hypothesis_template", *_EMBEDDING_OPTIONS)
        )
        normalize = _check_options(options, self.model.config.embed_dim)

        n_items = _count(inputs) + len(labels or [])
        if n_items > self.max_items:  # counted before anything is decoded or tokenized
            raise RequestError(
                f"the request has {n_items} images + texts + labels, more than this endpoint's limit of "
                f"{self.max_items} (TEMDE_HF_MAX_ITEMS); split it into smaller requests",
                413,
            )
        images, texts, many_images = self._split_inputs(inputs, need_image=labels is not None)
        if labels is not None:
            ranked = self.classify(images, labels, _check_template(template))
            return ranked if many_images else ranked[0]
        if images and texts:
            image_embeds, text_embeds = (
                self.embed_images(images),
                self.embed_texts(texts, options.get("truncate")),
            )
            logits = self._logit_scale() * image_embeds @ text_embeds.T
            return {
                "image_embeds": _listed(image_embeds, normalize),
                "text_embeds": _listed(text_embeds, normalize),
                "logits_per_image": logits.tolist(),
            }
        if images:
            return _listed(self.embed_images(images), normalize)
        return _listed(self.embed_texts(texts, options.get("truncate")), normalize)

    def _split_inputs(self, inputs: Any, need_image: bool) -> tuple[list[Image.Image], list[str], bool]:
        """(images, texts, whether the images came as a list) of the request's ``inputs``."""
        if isinstance(inputs, dict):
            raw_images, raw_texts = inputs.get("image"), inputs.get("text")
            if raw_images is None and raw_texts is None:
                raise RequestError("'inputs' needs an 'image' (bytes, base64 or a data URI) or a 'text'")
            images = [] if raw_images is None else self._images(raw_images, "'inputs.image'")
            texts = [] if raw_texts is None else _texts(raw_texts, "'inputs.text'")
            if need_image and not images:
                raise RequestError("'candidate_labels' need an image to classify in 'inputs' (or 'image')")
            return images, texts, isinstance(raw_images, list)
        if inputs is None or inputs == [] or inputs == "":
            raise RequestError(
                "the request needs 'inputs': an image (bytes, base64 or data URI), a text, or a list"
            )
        if need_image:
            return self._images(inputs, "'inputs'"), [], isinstance(inputs, list)
        values = inputs if isinstance(inputs, list) else [inputs]
        images = [
            self._image_or_none(value, f"'inputs'[{i}]" if isinstance(inputs, list) else "'inputs'")
            for i, value in enumerate(values)
        ]
        if all(image is not None for image in images):
            return images, [], isinstance(inputs, list)
        if any(image is not None for image in images):
            raise RequestError(
                "'inputs' mixes images and texts; send {'image': [...], 'text': [...]} instead"
            )
        return [], _texts(inputs, "'inputs'"), False

    def _images(self, value: Any, where: str) -> list[Image.Image]:
        """Every image of `value` (one or a list); anything that is not an image is refused."""
        values = value if isinstance(value, list) else [value]
        if not values:
            raise RequestError(f"{where} is an empty list; send at least one image")
        images = []
        for i, item in enumerate(values):
            name = f"{where}[{i}]" if isinstance(value, list) else where
            image = self._image_or_none(item, name, must_be_image=True)
            if image is None:
                raise RequestError(
                    f"{name} is not an image ({_shown(item)}): send the image file's bytes, its base64 text, "
                    "or a data:image/...;base64, URI",
                    422,
                )
            images.append(image)
        return images

    def _image_or_none(self, value: Any, where: str, must_be_image: bool = False) -> Image.Image | None:
        """Decode an image; ``None`` when `value` is plainly not image data (e.g. a caption).

        Raises:
            RequestError: a URL (never fetched), a data URI of another type, or image data that does
                not decode or is over the pixel limit.
        """
        if isinstance(value, str):
            if _URL.match(value.strip()):
                raise RequestError(
                    f"{where} is a URL ({_shown(value)}); this endpoint never fetches URLs: download the image "
                    "and send its bytes or base64 text"
                )
            if value.startswith("data:"):
                header, _, payload = value.partition(",")
                if not header.startswith("data:image/") or not header.endswith(";base64"):
                    raise RequestError(
                        f"{where} is a data URI of type {header[5:] or '(none)'!r}; only "
                        "data:image/...;base64, URIs are images",
                        415,
                    )
                value = _base64_bytes(payload, where, must_be_image=True)
                if value is None:
                    raise RequestError(f"{where}: the data URI's payload is not valid base64", 422)
            else:
                value = _base64_bytes(value, where, must_be_image)
                if value is None:
                    return None
        if not isinstance(value, Image.Image | bytes | bytearray):
            return None
        try:
            return decode_image(value, self.max_image_pixels)
        except ImageTooLargeError as exc:
            raise RequestError(f"{where} image refused: {exc}", 413) from exc
        except ImageDecodeError as exc:
            raise RequestError(f"{where} could not be decoded as an image: {exc}", 422) from exc

    # ----------------------------------------------------------------------------------------------
    # Model calls, batched
    # ----------------------------------------------------------------------------------------------
    def _batched(self, items: list[Any], encode: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [encode(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]
        )

    def _logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Retrieval embeddings `(n_images, embed_dim)`, `batch_size` images per forward."""

        def encode(chunk: list[Image.Image]) -> torch.Tensor:
            pixel_values = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            if self.onnx is not None:
                return torch.from_numpy(
                    self.onnx["image"].run(None, {"pixel_values": pixel_values.numpy()})[0]
                )
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        return self._batched(images, encode)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], truncate: bool | None = None) -> torch.Tensor:
        """Retrieval embeddings `(n_texts, embed_dim)`, `batch_size` texts per forward.

        Args:
            texts: visible texts (checked by the caller).
            truncate: ``False`` refuses a text longer than the model reads instead of cutting it.
        """
        if self.onnx is not None:
            max_length = self.onnx["max_text_length"]
        else:
            max_length = min(self.processor.tokenizer.model_max_length, _max_positions(self.model.config))
        if truncate is False:
            lengths = [len(ids) for ids in self.processor.tokenizer(texts)["input_ids"]]
            too_long = [i for i, n in enumerate(lengths) if n > max_length]
            if too_long:
                raise RequestError(
                    f"text {too_long[0]} has {lengths[too_long[0]]} tokens, more than the model's {max_length}, "
                    "and 'truncate' is false; shorten it or allow truncation",
                    413,
                )

        def encode(chunk: list[str]) -> torch.Tensor:
            batch = self.processor(
                text=chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            if self.onnx is not None:
                feed = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
                return torch.from_numpy(self.onnx["text"].run(None, feed)[0])
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            return self.model.get_text_features(**batch).pooler_output

        return self._batched(texts, encode)

    @torch.no_grad()
    def classify(
        self, images: list[Image.Image], labels: list[str], template: str
    ) -> list[list[dict[str, Any]]]:
        """Per image, the softmax over the labels of the model's image-text logits, best first.

        The logits are the model's own (``logit_scale · <image_embeds, text_embeds>``), computed from
        embeddings encoded `batch_size` at a time instead of one forward over every label.
        """
        image_embeds = self.embed_images(images)  # (n_images, E)
        text_embeds = self.embed_texts([template.format(label) for label in labels])  # (n_labels, E)
        scores = (self._logit_scale() * image_embeds @ text_embeds.T).softmax(dim=-1)  # (n_images, n_labels)
        answers = []
        for row in scores.tolist():
            ranked = sorted(zip(labels, row), key=lambda pair: -pair[1])
            answers.append([{"label": label, "score": float(score)} for label, score in ranked])
        return answers


# --------------------------------------------------------------------------------------------------
# Checks of the request's parts
# --------------------------------------------------------------------------------------------------
def _count(inputs: Any) -> int:
    """How many images and texts `inputs` holds."""
    if isinstance(inputs, dict):
        return sum(len(v) if isinstance(v, list) else v is not None for v in inputs.values())
    return len(inputs) if isinstance(inputs, list) else 1


def _reject_unknown(mapping: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    unknown = sorted(str(key) for key in mapping if key not in known)
    if unknown:
        raise RequestError(f"{where} has unknown keys {unknown}; known keys: {', '.join(known)}")


def _texts(value: Any, where: str) -> list[str]:
    """Texts as a list; each must have something visible."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise RequestError(f"{where} must be a text or a non-empty list of texts; got {_shown(value)}")
    for i, text in enumerate(texts):
        problem = text_problem(text)
        if problem:
            name = f"{where}[{i}]" if isinstance(value, list) else where
            raise RequestError(f"{name}: {problem}; send a text with words in it", 422)
    return texts


def _check_template(template: Any) -> str:
    """The hypothesis template, if it has exactly one ``{}`` where the label goes."""
    try:
        ok = isinstance(template, str) and template.count("{}") == 1 and bool(template.format("x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise RequestError(
            f"'parameters.hypothesis_template' must be a string with one '{{}}' where the label goes, "
            f"e.g. {DEFAULT_TEMPLATE!r}; got {template!r}"
        )
    return template


def _check_labels(labels: Any) -> list[str]:
    """Candidate labels as a list of visible strings (a comma-separated string is split)."""
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if not isinstance(labels, list) or any(text_problem(label) for label in labels):
        raise RequestError(
            "'parameters.candidate_labels' must be a list of non-empty strings (or one comma-separated "
            f"string); got {_shown(labels, 80)}"
        )
    if not labels:
        raise RequestError("'parameters.candidate_labels' is empty; give at least one label")
    return labels


def _check_options(options: dict[str, Any], embed_dim: int) -> bool:
    """Validate the feature-extraction options; returns whether to L2-normalise the embeddings."""
    refusals = {
        "prompt_name": (None,),
        "dimensions": (None, embed_dim),
        "encoding_format": (None, "float"),
        "truncation_direction": (None, "right", "Right"),
    }
    for key, allowed in refusals.items():
        if options.get(key) not in allowed:
            raise RequestError(
                f"'{key}' = {options[key]!r} is not supported; this model accepts only "
                f"{', '.join(repr(a) for a in allowed)}"
            )
    for key in ("normalize", "truncate"):
        if options.get(key) not in (None, True, False):
            raise RequestError(f"'{key}' must be true or false; got {_shown(options[key])}")
    return bool(options.get("normalize"))


def _listed(embeds: torch.Tensor, normalize: bool) -> list[list[float]]:
    """`(n, E)` embeddings as the nested list of floats `InferenceClient.feature_extraction` reads."""
    return (F.normalize(embeds, dim=-1) if normalize else embeds).tolist()


def _max_positions(config: Any) -> int:
    text_config = getattr(config, "text_config", None)
    return int(getattr(text_config, "max_position_embeddings", None) or 512)


# Where `temde-hf export-onnx` puts the graphs (image, text, metadata): the `onnx/` layout of
# transformers.js / optimum, then the flat layout of earlier exports.
ONNX_LAYOUTS = (
    ("onnx/vision_model.onnx", "onnx/text_model.onnx", "onnx/onnx_export.json"),
    ("image_encoder.onnx", "text_encoder.onnx", "onnx_export.json"),
)


def _onnx_sessions(path: str) -> dict[str, Any] | None:
    """onnxruntime sessions of the exported encoder graphs beside the weights, or None."""
    folder = Path(path)
    layout = next((files for files in ONNX_LAYOUTS if all((folder / f).is_file() for f in files)), None)
    if torch.cuda.is_available() or layout is None:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    # idle threads sleep between requests instead of spinning on cores other requests' decoding needs
    # (the package's `cpu_session_options`; this file runs without the package)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions: dict[str, Any] = {
        kind: onnxruntime.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])
        for kind, graph in zip(("image", "text"), layout[:2])
    }
    sessions["max_text_length"] = json.loads((folder / layout[2]).read_text())["max_text_length"]
    return sessions
