"""The Inference Endpoints handler, loaded from an exported folder the way the Endpoints toolkit loads it.

Every request shape the Hub's zero-shot-image-classification and feature-extraction tasks send is
replayed and checked against the model itself; every input the handler cannot serve is refused with its
status and a message saying what to send instead.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from temde_hf.hub.publish import export_for_hub
from temde_hf.testing import load_endpoint_handler, run_without_temde_hf, save_tiny_checkpoint

LABELS = ["red", "green", "blue", "a dog on the grass"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("handler")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=1)
    export_for_hub(checkpoint, root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def module(export_dir: Path) -> ModuleType:
    return load_endpoint_handler(export_dir)


@pytest.fixture(scope="module")
def handler_and_model(module: ModuleType, export_dir: Path, colour_gallery: dict[str, Path]):
    handler = module.EndpointHandler(str(export_dir))
    image = Image.open(colour_gallery["green"]).convert("RGB")
    return handler, handler.model, handler.processor, image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _expected_scores(model, processor, images: list[Image.Image], labels: list[str]) -> torch.Tensor:
    """`(n_images, n_labels)` softmax of the model's own forward over every label at once."""
    texts = [f"This is a photo of {label}." for label in labels]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits_per_image.softmax(-1)


def _expected_embeds(model, processor, images=(), texts=()) -> torch.Tensor:
    with torch.no_grad():
        if images:
            return model.get_image_features(
                pixel_values=processor(images=list(images))["pixel_values"]
            ).pooler_output
        batch = processor(text=list(texts), return_tensors="pt", padding=True)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return model.get_text_features(**batch).pooler_output


def _assert_ranking(answer: list[dict[str, Any]], expected: torch.Tensor, labels: list[str]) -> None:
    scores = [r["score"] for r in answer]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    by_label = {r["label"]: r["score"] for r in answer}
    assert sorted(by_label) == sorted(labels)
    assert [by_label[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Zero-shot image classification: each shape a client sends, one answer per image
# --------------------------------------------------------------------------------------------------
def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


ZERO_SHOT_SHAPES = {
    "PIL image, label list": lambda im: {"inputs": im, "parameters": {"candidate_labels": LABELS}},
    "base64, comma-separated labels": lambda im: {
        "inputs": _b64(im),
        "parameters": {"candidate_labels": ", ".join(LABELS)},
    },
    # what `base64 image.png` prints: 76 columns per line
    "line-wrapped base64": lambda im: {
        "inputs": base64.encodebytes(_png(im)).decode(),
        "parameters": {"candidate_labels": LABELS},
    },
    "data URI": lambda im: {
        "inputs": "data:image/png;base64," + _b64(im),
        "parameters": {"candidate_labels": LABELS},
    },
    "raw bytes": lambda im: {"inputs": _png(im), "parameters": {"candidate_labels": LABELS}},
    "older keys at the root": lambda im: {"image": _b64(im), "candidateLabels": ",".join(LABELS)},
    "older candidateLabels in parameters": lambda im: {
        "inputs": _b64(im),
        "parameters": {"candidateLabels": LABELS},
    },
    "labels inside inputs": lambda im: {"inputs": {"image": _b64(im), "candidate_labels": LABELS}},
    "explicit template": lambda im: {
        "inputs": im,
        "parameters": {"candidate_labels": LABELS, "hypothesis_template": "This is a photo of {}."},
    },
}


@pytest.mark.parametrize("shape", list(ZERO_SHOT_SHAPES))
def test_zero_shot_shapes_give_the_models_ranking(handler_and_model, shape: str) -> None:
    handler, model, processor, image = handler_and_model
    answer = handler(ZERO_SHOT_SHAPES[shape](image))
    _assert_ranking(answer, _expected_scores(model, processor, [image], LABELS)[0], LABELS)


def test_a_list_of_images_gets_one_ranking_each(handler_and_model, colour_gallery) -> None:
    handler, model, processor, _ = handler_and_model
    images = [Image.open(colour_gallery[c]).convert("RGB") for c in ("red", "blue")]
    answer = handler({"inputs": [_b64(im) for im in images], "parameters": {"candidate_labels": LABELS}})
    assert len(answer) == 2
    expected = _expected_scores(model, processor, images, LABELS)
    for ranking, row in zip(answer, expected):
        _assert_ranking(ranking, row, LABELS)
    as_dict = handler(
        {"inputs": {"image": [_b64(im) for im in images]}, "parameters": {"candidate_labels": LABELS}}
    )
    assert as_dict == answer


def test_requests_are_batched_within_the_limit(module, export_dir, colour_gallery) -> None:
    handler = module.EndpointHandler(str(export_dir), batch_size=2, max_items=50)
    model, processor = handler.model, handler.processor
    chunks: list[int] = []
    for name in ("get_text_features", "get_image_features"):
        original = getattr(model, name)

        def counted(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            chunks.append(out.pooler_output.shape[0])
            return out

        setattr(model, name, counted)
    images = [Image.open(colour_gallery[c]).convert("RGB") for c in ("red", "green", "blue")]
    labels = [*LABELS, "a cat"]
    answer = handler({"inputs": images, "parameters": {"candidate_labels": labels}})
    assert max(chunks) == 2 and sum(chunks) == len(images) + len(labels)  # never more than batch_size
    for ranking, row in zip(answer, _expected_scores(model, processor, images, labels)):
        _assert_ranking(ranking, row, labels)


def test_ten_thousand_labels_are_refused_before_any_forward(handler_and_model, monkeypatch) -> None:
    handler, _, _, image = handler_and_model

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran on a refused request")

    monkeypatch.setattr(handler, "embed_texts", no_forward)
    monkeypatch.setattr(handler, "embed_images", no_forward)
    labels = [f"label {i}" for i in range(10_000)]
    with pytest.raises(
        ValueError, match=r"10001 images \+ texts \+ labels, more than .* limit of 1024"
    ) as info:
        handler({"inputs": _b64(image), "parameters": {"candidate_labels": labels}})
    assert info.value.status == 413


def test_the_limits_are_configurable(module, export_dir, monkeypatch) -> None:
    monkeypatch.setenv("TEMDE_HF_MAX_ITEMS", "3")
    monkeypatch.setenv("TEMDE_HF_BATCH_SIZE", "5")
    handler = module.EndpointHandler(str(export_dir))
    assert (handler.max_items, handler.batch_size) == (3, 5)
    with pytest.raises(
        ValueError, match=r"4 images \+ texts \+ labels, more than .* limit of 3 \(TEMDE_HF_MAX_ITEMS\)"
    ):
        handler({"inputs": ["a", "b", "c", "d"]})
    assert module.EndpointHandler(str(export_dir), max_items=7).max_items == 7


# --------------------------------------------------------------------------------------------------
# Feature extraction: nested lists of floats, one row per input
# --------------------------------------------------------------------------------------------------
FEATURE_SHAPES = {
    "one image (PIL)": (lambda im: {"inputs": im}, "images", 1),
    "one image (base64)": (lambda im: {"inputs": _b64(im)}, "images", 1),
    "one image (line-wrapped base64)": (
        lambda im: {"inputs": base64.encodebytes(_png(im)).decode()},
        "images",
        1,
    ),
    "list of images": (lambda im: {"inputs": [_b64(im), im]}, "images", 2),
    "image named at the root": (lambda im: {"image": _b64(im)}, "images", 1),
    "image named in inputs": (lambda im: {"inputs": {"image": im}}, "images", 1),
    "one text": (lambda im: {"inputs": "a red square"}, "texts", 1),
    "list of texts": (lambda im: {"inputs": ["a red square", "a dog"]}, "texts", 2),
    "text named in inputs": (lambda im: {"inputs": {"text": ["a red square", "a dog"]}}, "texts", 2),
    "text named at the root": (lambda im: {"text": "a red square"}, "texts", 1),
    # a one-word caption is valid base64 too: it must stay a text
    "one word that is valid base64": (lambda im: {"inputs": "sunshine"}, "texts", 1),
    "InferenceClient's root-level options": (
        lambda im: {"inputs": ["a red square", "a dog"], "normalize": False, "truncate": True},
        "texts",
        2,
    ),
}
TEXTS = {1: ["a red square"], 2: ["a red square", "a dog"]}


@pytest.mark.parametrize("shape", list(FEATURE_SHAPES))
def test_feature_extraction_shapes(handler_and_model, shape: str) -> None:
    handler, model, processor, image = handler_and_model
    build, kind, n = FEATURE_SHAPES[shape]
    answer = handler(build(image))
    assert isinstance(answer, list) and all(isinstance(x, float) for row in answer for x in row)
    if kind == "images":
        expected = _expected_embeds(model, processor, images=[image] * n)
    else:
        expected = _expected_embeds(model, processor, texts=["sunshine"] if "base64" in shape else TEXTS[n])
    torch.testing.assert_close(torch.tensor(answer), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("caption", ["sunshine", "Qk0 starts like a bitmap", "iVBORw0KGgo starts like a PNG"])
def test_captions_that_look_like_base64_stay_texts(handler_and_model, caption: str) -> None:
    """Valid base64, even of an image file's first bytes, is not an image when it is a caption."""
    handler, model, processor, _ = handler_and_model
    expected = _expected_embeds(model, processor, texts=[caption])
    torch.testing.assert_close(torch.tensor(handler({"inputs": caption})), expected, atol=1e-5, rtol=1e-5)


def test_normalize_option_gives_unit_rows(handler_and_model) -> None:
    handler = handler_and_model[0]
    raw = torch.tensor(handler({"inputs": ["a red square", "a dog"]}))
    unit = torch.tensor(handler({"inputs": ["a red square", "a dog"], "normalize": True}))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=-1))


def test_image_and_text_together_keep_both(handler_and_model) -> None:
    handler, model, processor, image = handler_and_model
    answer = handler({"inputs": {"image": _b64(image), "text": ["a red square", "a dog"]}})
    image_embeds, text_embeds = torch.tensor(answer["image_embeds"]), torch.tensor(answer["text_embeds"])
    torch.testing.assert_close(
        image_embeds, _expected_embeds(model, processor, images=[image]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        text_embeds, _expected_embeds(model, processor, texts=["a red square", "a dog"]), atol=1e-5, rtol=1e-5
    )
    batch = processor(images=[image], text=["a red square", "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    torch.testing.assert_close(torch.tensor(answer["logits_per_image"]), expected, atol=1e-4, rtol=1e-5)


def test_inference_client_request_and_parsing(handler_and_model) -> None:
    """The bodies huggingface_hub's client builds, and its parsing of the answers."""
    from huggingface_hub.inference._generated.types import ZeroShotImageClassificationOutputElement
    from huggingface_hub.inference._providers.hf_inference import (
        HFInferenceBinaryInputTask,
        HFInferenceFeatureExtractionTask,
    )

    handler, model, processor, image = handler_and_model
    features = HFInferenceFeatureExtractionTask()
    body = features._prepare_payload_as_dict(
        ["a red square", "a dog"], {"normalize": True, "truncate": None, "prompt_name": None}, None
    )
    parsed = np.array(features.get_response(json.dumps(handler(body)).encode()), dtype="float32")
    assert parsed.shape == (2, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(parsed, axis=-1), 1.0, rtol=1e-5)

    zero_shot = HFInferenceBinaryInputTask("zero-shot-image-classification")
    payload = zero_shot._prepare_payload_as_bytes(
        _png(image), {"candidate_labels": LABELS, "hypothesis_template": None}, None, None
    )
    answer = handler(json.loads(payload))
    elements = ZeroShotImageClassificationOutputElement.parse_obj_as_list(json.dumps(answer).encode())
    assert sorted(e.label for e in elements) == sorted(LABELS)
    _assert_ranking(answer, _expected_scores(model, processor, [image], LABELS)[0], LABELS)


# --------------------------------------------------------------------------------------------------
# Refusals: status and a message saying what to send
# --------------------------------------------------------------------------------------------------
def _truncated(image: Image.Image, multiple_of_4: bool) -> str:
    text = _b64(image)
    cut = len(text) // 2 // 4 * 4
    return text[: cut if multiple_of_4 else cut + 1]


BAD_REQUESTS = {
    "image URL with labels": (
        lambda im: {"inputs": "https://example.com/cat.png", "parameters": {"candidate_labels": LABELS}},
        400,
        r"'inputs' is a URL .* never fetches URLs: download the image",
    ),
    "image URL to embed": (lambda im: {"inputs": "http://example.com/cat.png"}, 400, "never fetches URLs"),
    "URL in a list": (
        lambda im: {"inputs": [_b64(im), "s3://bucket/cat.png"]},
        400,
        r"'inputs'\[1\] is a URL",
    ),
    "truncated base64 (bad padding)": (
        lambda im: {"inputs": _truncated(im, False), "parameters": {"candidate_labels": LABELS}},
        422,
        "base64 image is truncated or damaged",
    ),
    "truncated base64 without labels": (
        lambda im: {"inputs": _truncated(im, False)},
        422,
        "truncated or damaged",
    ),
    "truncated image (valid base64)": (
        lambda im: {"inputs": _truncated(im, True), "parameters": {"candidate_labels": LABELS}},
        422,
        "could not be decoded as an image",
    ),
    "truncated image without labels": (
        lambda im: {"inputs": _truncated(im, True)},
        422,
        "could not be decoded",
    ),
    "text/plain data URI": (
        lambda im: {"inputs": "data:text/plain;base64,aGVsbG8=", "parameters": {"candidate_labels": LABELS}},
        415,
        r"data URI of type 'text/plain;base64'; only data:image/...;base64, URIs are images",
    ),
    "bytes that are no image": (
        lambda im: {"inputs": {"image": b"not an image"}},
        422,
        "could not be decoded",
    ),
    "plain text where labels need an image": (
        lambda im: {"inputs": "a dog on the grass", "parameters": {"candidate_labels": LABELS}},
        422,
        r"'inputs' is not an image \('a dog on the grass'\): send the image file's bytes",
    ),
    "empty text": (lambda im: {"inputs": ""}, 400, "needs 'inputs'"),
    "blank text": (lambda im: {"inputs": "   "}, 422, "empty or invisible text"),
    "zero-width text": (lambda im: {"inputs": "\u200b\u200d"}, 422, "empty or invisible text"),
    "one blank text in a list": (
        lambda im: {"inputs": ["a dog", "\ufeff "]},
        422,
        r"'inputs'\[1\]: empty or invisible",
    ),
    "blank named text": (lambda im: {"inputs": {"text": " "}}, 422, r"'inputs.text': empty or invisible"),
    "blank label": (
        lambda im: {"inputs": im, "parameters": {"candidate_labels": ["red", "\u200b"]}},
        400,
        "must be a list of non-empty strings",
    ),
    "no labels after splitting": (
        lambda im: {"inputs": im, "parameters": {"candidate_labels": " , "}},
        400,
        "is empty",
    ),
    "labels without an image": (
        lambda im: {"inputs": {"text": "a dog"}, "parameters": {"candidate_labels": LABELS}},
        400,
        "need an image to classify",
    ),
    "two different label lists": (
        lambda im: {"inputs": im, "parameters": {"candidate_labels": ["red"], "candidateLabels": ["blue"]}},
        400,
        "two different label lists",
    ),
    "images and texts mixed in a list": (
        lambda im: {"inputs": [_b64(im), "a dog"]},
        400,
        "mixes images and texts",
    ),
    "unknown key in inputs": (
        lambda im: {"inputs": {"picture": im}},
        400,
        r"'inputs' has unknown keys \['picture'\]",
    ),
    "unknown parameter": (
        lambda im: {"inputs": "a dog", "parameters": {"top_k": 3}},
        400,
        r"unknown keys \['top_k'\]",
    ),
    "unknown root key": (
        lambda im: {"inputs": "a dog", "options": {}},
        400,
        r"request body has unknown keys \['options'\]",
    ),
    "a prompt name": (
        lambda im: {"inputs": "a dog", "prompt_name": "query"},
        400,
        "'prompt_name' = 'query' is not supported",
    ),
    "other dimensions": (
        lambda im: {"inputs": "a dog", "dimensions": 3},
        400,
        "'dimensions' = 3 is not supported",
    ),
    "normalize not a bool": (
        lambda im: {"inputs": "a dog", "normalize": "yes"},
        400,
        "'normalize' must be true or false",
    ),
    "a number": (lambda im: {"inputs": 3.5}, 400, "must be a text or a non-empty list of texts; got 3.5"),
    "a number in a list": (
        lambda im: {"inputs": ["a dog", 3]},
        422,
        r"'inputs'\[1\]: not a string \(int 3\)",
    ),
    "a null in a list": (  # the loaders' words for it: the one text rule (processing_temde.text_problem)
        lambda im: {"inputs": ["a dog", None]},
        422,
        r"'inputs'\[1\]: missing \(null / None\), not a string",
    ),
    "not an object": (
        lambda im: ["a dog", "a cat"],
        400,
        r"request body must be a JSON object with 'inputs'",
    ),
    "parameters not an object": (
        lambda im: {"inputs": im, "parameters": ["red"]},
        400,
        "'parameters' must be a JSON object",
    ),
    "bad template": (
        lambda im: {
            "inputs": im,
            "parameters": {"candidate_labels": LABELS, "hypothesis_template": "{} and {}"},
        },
        400,
        r"hypothesis_template' must be a string with one '\{\}'",
    ),
    "empty body": (lambda im: {}, 400, "'inputs' needs an 'image'"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_with_status_and_reason(handler_and_model, module, case: str) -> None:
    handler, _, _, image = handler_and_model
    build, status, message = BAD_REQUESTS[case]
    with pytest.raises(module.RequestError, match=message) as info:
        handler(build(image))
    assert info.value.status == status


def test_long_text_is_refused_only_when_truncation_is_off(handler_and_model) -> None:
    handler = handler_and_model[0]
    long_text = " ".join(["dog"] * 200)  # the tiny tokenizer reads 64 tokens
    assert len(handler({"inputs": long_text})) == 1
    with pytest.raises(ValueError, match=r"text 0 has 202 tokens, more than the model's 64") as info:
        handler({"inputs": long_text, "truncate": False})
    assert info.value.status == 413


def test_decoded_pixels_are_capped(handler_and_model) -> None:
    from temde_hf.testing import png_declaring_size

    handler, _, _, image = handler_and_model
    bomb = png_declaring_size(12000, 12000)  # 67 bytes that would decode to 144 megapixels
    assert handler.max_image_pixels < 12000 * 12000
    for request in ({"inputs": {"image": bomb}}, {"inputs": base64.b64encode(bomb).decode()}):
        with pytest.raises(
            ValueError, match=r"image refused: image has 144,000,000 pixels .* limit of"
        ) as info:
            handler(request)
        assert info.value.status == 413
    limit = handler.max_image_pixels
    handler.max_image_pixels = 1000
    try:
        with pytest.raises(ValueError, match=r"2,304 pixels \(48 x 48\), more than the limit of 1,000"):
            handler({"inputs": image})
    finally:
        handler.max_image_pixels = limit


# Inference Endpoints run the exported folder without temde_hf installed: so does this interpreter,
# loading handler.py exactly as the toolkit does (folder on sys.path, module "handler.EndpointHandler").
SERVE_WITHOUT_PACKAGE = """
import base64, json, sys
from importlib.util import module_from_spec, spec_from_file_location

export, image_path = sys.argv[1], sys.argv[2]
spec = spec_from_file_location("handler.EndpointHandler", f"{export}/handler.py")
sys.path.insert(0, export)
module = module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(export)
image = base64.b64encode(open(image_path, "rb").read()).decode()


def refusal(handler, request):
    try:
        handler(request)
    except module.RequestError as exc:
        return [exc.status, str(exc)]


print(json.dumps({
    "image_embeds": handler({"inputs": image}),
    "text_embeds": handler({"inputs": ["a red square", "a dog"]}),
    "ranking": handler({"inputs": image, "parameters": {"candidate_labels": ["red", "green", "blue"]}}),
    "blank": refusal(handler, {"inputs": "\\u200b"}),
    "temde_hf_loaded": any(m.split(".")[0] == "temde_hf" for m in sys.modules),
}))
"""


@pytest.mark.slow
def test_exported_handler_serves_without_the_package(
    export_dir: Path, handler_and_model, colour_gallery: dict[str, Path], tmp_path: Path
) -> None:
    handler, _, _, image = handler_and_model
    out = run_without_temde_hf(
        SERVE_WITHOUT_PACKAGE, str(export_dir), str(colour_gallery["green"]), cwd=tmp_path
    )
    served = json.loads(out.strip().splitlines()[-1])
    assert not served["temde_hf_loaded"]
    assert (
        served["blank"][0] == 422 and "empty or invisible text" in served["blank"][1]
    )  # the text check of the remote code
    torch.testing.assert_close(
        torch.tensor(served["image_embeds"]), torch.tensor(handler({"inputs": image})), atol=1e-5, rtol=0
    )
    expected_text = handler({"inputs": ["a red square", "a dog"]})
    torch.testing.assert_close(
        torch.tensor(served["text_embeds"]), torch.tensor(expected_text), atol=1e-5, rtol=0
    )
    expected = handler({"inputs": image, "parameters": {"candidate_labels": ["red", "green", "blue"]}})
    assert [r["label"] for r in served["ranking"]] == [r["label"] for r in expected]
