"""Gallery index: encode -> FAISS -> save -> load -> search equals brute force; the CLI's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from temde_hf.gallery import (
    GalleryIndex,
    build_gallery_from_dataset,
    build_gallery_from_folder,
    search,
)
from temde_hf.gallery.index_cli import main as index_main
from temde_hf.gallery.search_cli import main as search_main
from temde_hf.inference.encode import encode_images, encode_texts
from temde_hf.inference.encoder import load_encoder
from temde_hf.inference.fingerprint import checkpoint_fingerprint
from temde_hf.testing import GALLERY_CAPTIONS, make_colour_gallery, save_tiny_checkpoint

pytest.importorskip("faiss", reason="gallery search needs faiss-cpu (the `index` extra)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gallery")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=2)
    make_colour_gallery(root / "images")
    (root / "images" / "nested").mkdir()
    gradient = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[:, None, None], (1, 48, 3))
    Image.fromarray(gradient).save(root / "images" / "nested" / "gradient.png")
    return checkpoint, root / "images", load_encoder(checkpoint, backend="torch", device="cpu")


def _brute_force(gallery_embeds, query_embeds, k: int) -> np.ndarray:
    scores = np.asarray(query_embeds) @ np.asarray(gallery_embeds).T  # (n_queries, n_images)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_index_save_load_search_equals_brute_force(setup, tmp_path: Path) -> None:
    checkpoint, folder, (model, processor) = setup
    gallery = build_gallery_from_folder(checkpoint, folder, batch_size=3, progress=False)
    assert len(gallery) == 9 and gallery.ids[0] == "black.png" and "nested/gradient.png" in gallery.ids
    gallery.save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "gallery.json").read_text())
    assert meta["model_path"] == str(checkpoint.resolve()) and meta["embed_dim"] == model.config.embed_dim
    assert meta["model_fingerprint"] == checkpoint_fingerprint(checkpoint)
    loaded = GalleryIndex.load(tmp_path / "index")

    paths = [Path(p) for p in loaded.paths]
    gallery_embeds = encode_images(model, processor, paths, progress=False)
    text_queries = GALLERY_CAPTIONS[:6]
    hits = search(loaded, model, processor, texts=text_queries, images=[paths[4]], k=4)
    queries = np.concatenate([encode_texts(model, processor, text_queries), gallery_embeds[4:5]])
    expected = _brute_force(gallery_embeds, queries, 4)
    for query, row, want in zip(queries, hits, expected):
        assert [h.id for h in row] == [loaded.ids[i] for i in want]
        np.testing.assert_allclose(
            [h.score for h in row], gallery_embeds[want].numpy() @ query, rtol=1e-4, atol=1e-4
        )
    assert hits[-1][0].id == loaded.ids[4]  # an image finds itself first


def test_hnsw_and_dataset_source(setup) -> None:
    checkpoint, folder, (model, processor) = setup
    from datasets import Dataset

    files = sorted(str(p) for p in folder.glob("*.png"))
    dataset = Dataset.from_dict({"image": files, "name": [Path(f).stem for f in files]})
    gallery = build_gallery_from_dataset(
        checkpoint,
        dataset,
        id_column="name",
        index_type="hnsw",
        progress=False,
        model_and_processor=(model, processor),
    )
    queries = encode_texts(model, processor, GALLERY_CAPTIONS[:4])
    gallery_embeds = encode_images(model, processor, files, progress=False)
    expected = _brute_force(gallery_embeds, queries, 3)
    for row, want in zip(gallery.search(queries, 3), expected):  # 8 items: HNSW is exact here
        assert [h.id for h in row] == [Path(files[i]).stem for i in want]
    with pytest.raises(ValueError, match="no column 'img'"):
        build_gallery_from_dataset(checkpoint, dataset, image_column="img")


def test_cli_index_skips_unreadable_images_and_search_equals_brute_force(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, folder, (model, processor) = setup
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "broken.png").write_bytes(b"not a png")  # unreadable: skipped, counted, listed
    index_main(["--model", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "idx")])
    printed = capsys.readouterr().out
    assert "indexed 9 images" in printed and "skipped 1 unreadable" in printed
    meta = json.loads((tmp_path / "idx" / "gallery.json").read_text())
    assert meta["n_skipped"] == 1 and meta["skipped"][0]["source"].endswith("broken.png")
    assert meta["index_type"] == "flat" and "fit" in meta["index"]["reason"]  # the automatic choice, recorded
    assert "broken.png" not in meta["ids"]

    hits = search_main(["--index", str(tmp_path / "idx"), "--text", GALLERY_CAPTIONS[0], "-k", "3", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in printed[0]["hits"]] == [h.id for h in hits[0]] and len(hits[0]) == 3
    gallery = GalleryIndex.load(tmp_path / "idx")
    expected = _brute_force(
        encode_images(model, processor, gallery.paths, progress=False),
        encode_texts(model, processor, GALLERY_CAPTIONS[:1]),
        3,
    )[0]
    assert [h.id for h in hits[0]] == [gallery.ids[i] for i in expected]


def test_search_refuses_another_model_and_bad_k(setup, tmp_path: Path) -> None:
    checkpoint, folder, _ = setup
    index_main(["--model", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "idx")])
    other = save_tiny_checkpoint(tmp_path / "other", seed=5)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"built by another model .* fingerprint"):
        search_main(["--index", str(tmp_path / "idx"), "--model", str(other), "--text", "a red square"])
    for k in ("0", "-3"):
        with pytest.raises(ValueError, match=f"-k must be a positive number of results, got {k}"):
            search_main(["--index", str(tmp_path / "idx"), "--text", "a red square", "-k", k])
    with pytest.raises(ValueError, match="not a gallery index"):
        search_main(["--index", str(tmp_path), "--text", "a red square"])


def test_bad_inputs(setup, tmp_path: Path) -> None:
    checkpoint, _, _ = setup
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        build_gallery_from_folder(checkpoint, tmp_path / "empty")
    with pytest.raises(ValueError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)
    gallery = GalleryIndex(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="query dim 2 != index dim 3"):
        gallery.search(np.ones((1, 2)), 1)
    with pytest.raises(ValueError, match="k must be a positive"):
        gallery.search(np.ones((1, 3)), 0)
    with pytest.raises(ValueError, match="index type 'ivf' unknown"):
        GalleryIndex(np.eye(3), ["a", "b", "c"], index_type="ivf")
