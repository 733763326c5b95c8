"""ONNX export: onnxruntime reproduces the eager fused embeddings; stale or missing graphs are refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from temde_hf.inference.encode import encode_images, encode_texts
from temde_hf.inference.encoder import load_encoder
from temde_hf.testing import GALLERY_CAPTIONS, make_colour_gallery, save_tiny_checkpoint

pytest.importorskip("onnxruntime", reason="the ONNX backend is the `onnx` extra")
pytest.importorskip("onnx", reason="the ONNX backend is the `onnx` extra")

from temde_hf.export.onnx_export import main as export_main
from temde_hf.inference.onnx_runtime import OnnxTemdeEncoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx")
    # A sketch chunk of 8 tokens: captions span several chunks, so the traced loop is exercised.
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=3, sketch_chunk_size=8)
    export_main([str(checkpoint), "--int8", "--max-text-length", "32"])
    make_colour_gallery(root / "images")
    return checkpoint


def _spins(session: Any) -> str:
    """An onnxruntime session's intra-op spinning setting ("0": idle threads sleep)."""
    return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_onnxruntime_matches_eager(exported: Path) -> None:
    meta = json.loads((exported / "onnx" / "onnx_export.json").read_text())
    assert meta["max_text_length"] == 32 and max(meta["max_abs_diff"].values()) < 1e-5
    onnx, processor = load_encoder(exported)  # "auto" picks the graphs beside the weights
    eager, _ = load_encoder(exported, backend="torch")
    assert isinstance(onnx, OnnxTemdeEncoder) and not isinstance(eager, OnnxTemdeEncoder)
    assert _spins(onnx._image) == _spins(onnx._text) == "0"  # idle threads sleep
    images = sorted((exported.parent / "images").glob("*.png"))
    np.testing.assert_allclose(
        encode_images(onnx, processor, images, batch_size=3, progress=False),
        encode_images(eager, processor, images, batch_size=3, progress=False),
        atol=1e-5,
    )
    # Lengths from 3 to > 3 chunks, padded in one batch: padding must add nothing to the sketch.
    captions = [*GALLERY_CAPTIONS[:3], "a " * 20 + "dog", "red"]
    np.testing.assert_allclose(
        encode_texts(onnx, processor, captions, progress=False),
        encode_texts(eager, processor, captions, progress=False),
        atol=1e-5,
    )
    int8, _ = load_encoder(exported, backend="onnx-int8")
    cosine = torch.nn.functional.cosine_similarity(
        encode_texts(int8, processor, captions, progress=False),
        encode_texts(eager, processor, captions, progress=False),
    )
    assert cosine.min() > 0.9  # approximate by design; the benchmark measures its retrieval accuracy


def test_onnx_refuses_long_captions_and_stale_graphs(exported: Path, tmp_path: Path) -> None:
    onnx, processor = load_encoder(exported, backend="onnx")
    with pytest.raises(ValueError, match="longer than the 32 the ONNX text graph takes"):
        encode_texts(onnx, processor, ["a " * 40 + "dog"], progress=False)
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copytree(exported, stale, dirs_exist_ok=True)
    model, _ = load_encoder(stale, backend="torch")
    with torch.no_grad():
        model.logit_scale.add_(1.0)  # other weights, same graphs
    model.save_pretrained(stale)
    with pytest.raises(ValueError, match=r"exported from other weights .* re-run: temde-hf export-onnx"):
        load_encoder(stale)


def test_missing_onnxruntime_gives_install_hint(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    model, _ = load_encoder(exported)  # auto falls back to eager when onnxruntime is absent
    assert not isinstance(model, OnnxTemdeEncoder)
    with pytest.raises(ImportError, match=r"pip install 'temde_hf\[onnx\]'"):
        load_encoder(exported, backend="onnx")
    checkpoint = save_tiny_checkpoint(exported.parent / "plain", seed=4)
    with pytest.raises(ImportError, match="needs onnxruntime"):
        export_main([str(checkpoint)])


def test_evaluate_through_onnxruntime_equals_eager(exported: Path, tmp_path: Path) -> None:
    from temde_hf.data.synthetic import make_synthetic_karpathy
    from temde_hf.evaluation.cli import main as evaluate_main

    data = make_synthetic_karpathy(tmp_path / "data", n_images=12, seed=3)
    results = {
        backend: evaluate_main(
            [
                str(exported),
                "--data",
                str(data),
                "--split",
                "all",
                "--backend",
                backend,
                "--output-dir",
                str(tmp_path / backend),
                "--max-length",
                "32",
            ]
        )
        for backend in ("torch", "onnx")
    }
    assert results["onnx"]["encoder_backend"] == "onnx" and results["torch"]["encoder_backend"] == "torch"
    for key, value in results["torch"]["full"].items():
        assert results["onnx"]["full"][key] == pytest.approx(value, abs=1e-6), key


def test_published_handler_serves_through_onnxruntime(exported: Path, tmp_path: Path) -> None:
    from PIL import Image

    from temde_hf.hub.publish import export_for_hub
    from temde_hf.testing import load_endpoint_handler

    report = export_for_hub(exported, tmp_path / "export")
    assert "onnx" in report.files
    assert {p.name for p in (tmp_path / "export" / "onnx").iterdir()} == {
        "vision_model.onnx", "text_model.onnx", "vision_model_quantized.onnx", "text_model_quantized.onnx",
        "onnx_export.json",
    }  # fmt: skip
    handler = load_endpoint_handler(tmp_path / "export").EndpointHandler(str(tmp_path / "export"))
    assert handler.onnx is not None  # CPU + graphs + onnxruntime: the handler serves through them
    assert _spins(handler.onnx["image"]) == _spins(handler.onnx["text"]) == "0"
    eager, processor = load_encoder(exported, backend="torch")
    image = Image.open(exported.parent / "images" / "green.png").convert("RGB")
    served = torch.tensor(handler({"inputs": image}))
    np.testing.assert_allclose(served, encode_images(eager, processor, [image], progress=False), atol=1e-5)
    served = torch.tensor(handler({"inputs": GALLERY_CAPTIONS[:2]}))
    np.testing.assert_allclose(
        served, encode_texts(eager, processor, GALLERY_CAPTIONS[:2], progress=False), atol=1e-5
    )


def test_saturated_sketch_logits_stay_finite(tmp_path: Path) -> None:
    # A tiny temperature saturates every hyperplane sigmoid, as real photos do for some hyperplanes:
    # the graph must compute log σ without underflowing to −inf (−inf · 0 would give NaN).
    checkpoint = save_tiny_checkpoint(tmp_path / "cold", seed=6, sketch_temperature=1e-3)
    export_main([str(checkpoint)])
    onnx, _ = load_encoder(checkpoint, backend="onnx")
    eager, _ = load_encoder(checkpoint, backend="torch")
    pixel_values = 5 * torch.randn(4, 3, 32, 32)
    out = onnx.encode_image(pixel_values)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out, eager.encode_image(pixel_values).detach(), atol=1e-5)


def test_graphs_are_in_the_onnx_layout_and_the_older_flat_layout_is_still_read(
    exported: Path, tmp_path: Path
) -> None:
    """transformers.js / optimum read `onnx/vision_model.onnx`-style names; folders exported before keep working."""
    from temde_hf.hub.publish import export_for_hub
    from temde_hf.testing import load_endpoint_handler

    meta = json.loads((exported / "onnx" / "onnx_export.json").read_text())
    assert meta["graphs"] == [
        "onnx/vision_model.onnx", "onnx/text_model.onnx",
        "onnx/vision_model_quantized.onnx", "onnx/text_model_quantized.onnx",
    ]  # fmt: skip
    assert not list(exported.glob("*.onnx"))  # nothing beside the weights any more
    legacy = tmp_path / "legacy"
    shutil.copytree(exported, legacy, ignore=shutil.ignore_patterns("onnx"))
    renames = {
        "vision_model.onnx": "image_encoder.onnx",
        "text_model.onnx": "text_encoder.onnx",
        "vision_model_quantized.onnx": "image_encoder.int8.onnx",
        "text_model_quantized.onnx": "text_encoder.int8.onnx",
        "onnx_export.json": "onnx_export.json",
    }
    for new, old in renames.items():
        shutil.copy2(exported / "onnx" / new, legacy / old)
    captions = GALLERY_CAPTIONS[:3]
    for backend in ("onnx", "onnx-int8"):
        new_model, processor = load_encoder(exported, backend=backend)
        old_model, _ = load_encoder(legacy, backend=backend)
        assert isinstance(old_model, OnnxTemdeEncoder)
        np.testing.assert_allclose(
            encode_texts(old_model, processor, captions, progress=False),
            encode_texts(new_model, processor, captions, progress=False),
        )
    export_for_hub(legacy, tmp_path / "export")
    handler = load_endpoint_handler(tmp_path / "export").EndpointHandler(str(tmp_path / "export"))
    assert handler.onnx is not None  # the handler reads the older layout too


def test_damaged_graphs_or_export_record_are_named(exported: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    graph = damaged / "onnx" / "vision_model.onnx"
    graph.write_bytes(graph.read_bytes()[:200])  # truncated protobuf
    with pytest.raises(
        ValueError, match=r"vision_model\.onnx: not a readable ONNX graph .*re-run: temde-hf export-onnx"
    ):
        OnnxTemdeEncoder(damaged)
    (damaged / "onnx" / "onnx_export.json").write_text("{garbled")
    with pytest.raises(ValueError, match=r"onnx_export\.json: unreadable .*re-run: temde-hf export-onnx"):
        OnnxTemdeEncoder(damaged)


def test_a_linked_graph_in_the_onnx_folder_is_refused_by_publish(exported: Path, tmp_path: Path) -> None:
    from temde_hf.hub.publish import export_for_hub

    linked = tmp_path / "linked"
    shutil.copytree(exported, linked)
    secret = tmp_path / "elsewhere.onnx"
    secret.write_bytes(b"not this checkpoint's")
    (linked / "onnx" / "text_model.onnx").unlink()
    (linked / "onnx" / "text_model.onnx").symlink_to(secret)
    with pytest.raises(ValueError, match=r"onnx/text_model\.onnx: is a symbolic link"):
        export_for_hub(linked, tmp_path / "export")
