"""The Inference Endpoints handler, run locally on an exported folder."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from temde_hf.hub.publish import export_for_hub
from temde_hf.testing import run_without_temde_hf, save_tiny_checkpoint

LABELS = ["red", "green", "blue", "a dog on the grass"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("handler")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=1)
    export_for_hub(checkpoint, root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def handler_and_model(export_dir: Path, colour_gallery: dict[str, Path]):
    from importlib.util import module_from_spec, spec_from_file_location

    # load the handler.py that ships in the export, as Inference Endpoints would
    spec = spec_from_file_location("exported_handler", export_dir / "handler.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(str(export_dir))
    image = Image.open(colour_gallery["green"]).convert("RGB")
    return handler, handler.model, handler.processor, image


def test_candidate_labels_give_sorted_scores_matching_the_model(handler_and_model) -> None:
    handler, model, processor, image = handler_and_model
    result = handler({"inputs": image, "parameters": {"candidate_labels": LABELS}})
    scores = [r["score"] for r in result]
    assert sorted(r["label"] for r in result) == sorted(LABELS)
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    batch = processor(
        images=[image], text=[f"This is a photo of {label}." for label in LABELS], return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**batch).logits_per_image[0].softmax(-1)
    by_label = {r["label"]: r["score"] for r in result}
    assert [by_label[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
    # comma-separated labels and base64 images (the JSON form of a request) give the same answer
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    again = handler({"inputs": encoded, "parameters": {"candidate_labels": ", ".join(LABELS)}})
    assert [r["label"] for r in again] == [r["label"] for r in result]


def test_image_and_text_embeddings(handler_and_model) -> None:
    handler, model, processor, image = handler_and_model
    embed_dim = model.config.embed_dim
    image_embeds = torch.tensor(handler({"inputs": image})["image_embeds"])
    assert image_embeds.shape == (1, embed_dim)
    with torch.no_grad():
        expected = model.get_image_features(
            pixel_values=processor(images=[image])["pixel_values"]
        ).pooler_output
    torch.testing.assert_close(image_embeds, expected, atol=1e-5, rtol=1e-5)

    text_embeds = torch.tensor(handler({"inputs": ["a red square", "a dog"]})["text_embeds"])
    assert text_embeds.shape == (2, embed_dim)
    one = torch.tensor(handler({"inputs": {"text": "a dog"}})["text_embeds"])
    torch.testing.assert_close(one[0], text_embeds[1], atol=1e-5, rtol=1e-5)
    assert torch.tensor(handler({"inputs": {"image": image}})["image_embeds"]).shape == (1, embed_dim)


def test_bad_requests_are_explained(handler_and_model) -> None:
    handler = handler_and_model[0]
    with pytest.raises(ValueError, match="could not be decoded"):
        handler({"inputs": {"image": b"not an image"}})
    with pytest.raises(ValueError, match="needs 'inputs'"):
        handler({"inputs": {"text": []}})
    with pytest.raises(ValueError, match="unsupported"):
        handler({"inputs": 3.5})


# Inference Endpoints run the exported folder without temde_hf installed: so does this interpreter.
SERVE_WITHOUT_PACKAGE = """
import base64, json, sys
from importlib.util import module_from_spec, spec_from_file_location

export, image_path = sys.argv[1], sys.argv[2]
spec = spec_from_file_location("handler", f"{export}/handler.py")
module = module_from_spec(spec)
spec.loader.exec_module(module)
handler = module.EndpointHandler(export)
image = base64.b64encode(open(image_path, "rb").read()).decode()
print(json.dumps({
    "image_embeds": handler({"inputs": image})["image_embeds"],
    "text_embeds": handler({"inputs": ["a red square", "a dog"]})["text_embeds"],
    "ranking": handler({"inputs": image, "parameters": {"candidate_labels": ["red", "green", "blue"]}}),
    "temde_hf_loaded": any(m.split(".")[0] == "temde_hf" for m in sys.modules),
}))
"""


@pytest.mark.slow
def test_exported_handler_serves_without_the_package(
    export_dir: Path, handler_and_model, colour_gallery: dict[str, Path], tmp_path: Path
) -> None:
    handler, _, _, image = handler_and_model
    out = run_without_temde_hf(
        SERVE_WITHOUT_PACKAGE,
        str(export_dir),
        str(colour_gallery["green"]),
        cwd=tmp_path,
    )
    served = json.loads(out.strip().splitlines()[-1])
    assert not served["temde_hf_loaded"]
    expected_image = handler({"inputs": image})["image_embeds"]
    torch.testing.assert_close(
        torch.tensor(served["image_embeds"]), torch.tensor(expected_image), atol=1e-5, rtol=0
    )
    expected_text = handler({"inputs": ["a red square", "a dog"]})["text_embeds"]
    torch.testing.assert_close(
        torch.tensor(served["text_embeds"]), torch.tensor(expected_text), atol=1e-5, rtol=0
    )
    expected = handler({"inputs": image, "parameters": {"candidate_labels": ["red", "green", "blue"]}})
    assert [r["label"] for r in served["ranking"]] == [r["label"] for r in expected]


def test_malformed_requests_and_templates_are_explained(handler_and_model) -> None:
    handler, _, _, image = handler_and_model
    with pytest.raises(ValueError, match=r"request body must be a JSON object with 'inputs'"):
        handler(["a dog", "a cat"])
    with pytest.raises(ValueError, match=r"'parameters' must be a JSON object"):
        handler({"inputs": image, "parameters": ["red"]})
    for template in ("a photo of {label}", "{} and {}", "no placeholder", 7):
        with pytest.raises(ValueError, match=r"hypothesis_template' must be a string with one '\{\}'"):
            handler(
                {"inputs": image, "parameters": {"candidate_labels": LABELS, "hypothesis_template": template}}
            )
    with pytest.raises(ValueError, match=r"candidate_labels' must be a list of non-empty strings"):
        handler({"inputs": image, "parameters": {"candidate_labels": ["red", 3]}})
    with pytest.raises(ValueError, match=r"candidate_labels' is empty"):
        handler({"inputs": image, "parameters": {"candidate_labels": []}})
    with pytest.raises(ValueError, match=r"'inputs' has unknown keys \['picture'\]"):
        handler({"inputs": {"picture": image}})
    with pytest.raises(ValueError, match=r"texts must be a string or a list of strings"):
        handler({"inputs": {"text": 5}})
    with pytest.raises(ValueError, match=r"'inputs' bytes could not be decoded as an image"):
        handler({"inputs": b"\x89PNG not really"})


def test_decoded_pixels_are_capped(handler_and_model) -> None:
    from temde_hf.testing import png_declaring_size

    handler, _, _, image = handler_and_model
    bomb = png_declaring_size(12000, 12000)  # 67 bytes that would decode to 144 megapixels
    assert handler.max_image_pixels < 12000 * 12000
    for request in ({"inputs": {"image": bomb}}, {"inputs": base64.b64encode(bomb).decode()}):
        with pytest.raises(ValueError, match=r"image refused: image has 144,000,000 pixels .* limit of"):
            handler(request)
    limit = handler.max_image_pixels
    handler.max_image_pixels = 1000
    try:
        with pytest.raises(ValueError, match=r"2,304 pixels \(48 x 48\), more than the limit of 1,000"):
            handler({"inputs": image})
    finally:
        handler.max_image_pixels = limit
