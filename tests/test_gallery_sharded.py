"""The sharded index build: 2 processes equal 1, an interrupted build resumes (with stored tokens too),
sources and checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from temde_hf.gallery import GalleryIndex
from temde_hf.gallery import build as build_module
from temde_hf.gallery.index_cli import main as index_main
from temde_hf.testing import accelerate_launch, make_colour_gallery, save_tiny_checkpoint

pytest.importorskip("faiss", reason="gallery search needs faiss-cpu (the `index` extra)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=7)
    make_colour_gallery(root / "images")
    return checkpoint, root / "images"


def _args(checkpoint: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--images", str(images), "--out", str(out), "--shard-size", "3",
            "--index-type", "flat", "--backend", "torch", *extra]  # fmt: skip


def _vectors(index_dir: Path) -> tuple[list[str], np.ndarray]:
    gallery = GalleryIndex.load(index_dir)
    return gallery.ids, gallery.index.reconstruct_n(0, len(gallery))


@pytest.mark.slow
def test_two_process_build_equals_one_process(setup, tmp_path: Path) -> None:
    checkpoint, images = setup
    index_main(_args(checkpoint, images, tmp_path / "one", "--store-tokens"))
    accelerate_launch(
        "-m", "temde_hf.cli", "index", *_args(checkpoint, images, tmp_path / "two", "--store-tokens")
    )
    meta = json.loads((tmp_path / "two" / "gallery.json").read_text())
    assert meta["build"]["processes"] == 2 and meta["build"]["shards"] == 3
    ids_one, vectors_one = _vectors(tmp_path / "one")
    ids_two, vectors_two = _vectors(tmp_path / "two")
    assert ids_one == ids_two and len(ids_one) == 8
    np.testing.assert_allclose(vectors_two, vectors_one, atol=1e-6)
    tokens_one = GalleryIndex.load(tmp_path / "one").tokens
    tokens_two = GalleryIndex.load(tmp_path / "two").tokens  # shards of both ranks, merged in row order
    assert torch.equal(tokens_two.mask, tokens_one.mask)
    torch.testing.assert_close(tokens_two.tokens, tokens_one.tokens, atol=1e-3, rtol=0)


@pytest.mark.parametrize("store_tokens", [False, True], ids=["embeddings", "with-tokens"])
def test_interrupted_build_resumes_without_reencoding(
    setup, tmp_path: Path, monkeypatch, store_tokens: bool
) -> None:
    checkpoint, images = setup
    out = tmp_path / "idx"
    tokens_flag = ["--store-tokens"] if store_tokens else []
    write_shard = build_module._write_shard
    calls = {"n": 0}

    def dies_on_third_shard(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")  # what a kill leaves behind
            raise KeyboardInterrupt("killed midway")
        return write_shard(path, *args, **kwargs)

    monkeypatch.setattr(build_module, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        index_main(_args(checkpoint, images, out, *tokens_flag))
    finished = sorted((out / "shards").glob("*.safetensors"))
    assert [p.name for p in finished] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    encoded_starts = []
    real_iter = build_module.iter_image_features

    def counting_iter(*args, **kwargs):
        encoded_starts.append(kwargs["start"])
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(build_module, "_write_shard", write_shard)
    monkeypatch.setattr(build_module, "iter_image_features", counting_iter)
    index_main(_args(checkpoint, images, out, *tokens_flag))
    assert encoded_starts == [6]  # only the unfinished shard (rows 6-7) was encoded again
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    index_main(_args(checkpoint, images, tmp_path / "fresh", *tokens_flag))
    ids, vectors = _vectors(out)
    fresh_ids, fresh_vectors = _vectors(tmp_path / "fresh")
    assert ids == fresh_ids
    np.testing.assert_allclose(vectors, fresh_vectors, atol=1e-6)
    resumed, fresh = GalleryIndex.load(out), GalleryIndex.load(tmp_path / "fresh")
    if store_tokens:  # the resumed build's token file holds every image's tokens, in the index's row order
        assert resumed.tokens.tokens.shape[0] == 8 and torch.equal(resumed.tokens.mask, fresh.tokens.mask)
        assert torch.equal(resumed.tokens.tokens, fresh.tokens.tokens)
        meta = json.loads((out / "gallery.json").read_text())
        assert (
            meta["tokens"]["bytes_per_image"] == 17 * 16 * 2 + 4
        )  # 16 patches + CLS, 16-d, fp16, int32 length
    else:
        assert resumed.tokens is None and not (out / "tokens.fp16.safetensors").exists()
    # Re-indexing the same shards with another index type re-uses them (nothing encoded); tokens are
    # only kept when asked for again.
    encoded_starts.clear()
    index_main([*_args(checkpoint, images, out)[:-4], "--index-type", "fp16"])
    assert encoded_starts == [] and GalleryIndex.load(out).index_type == "fp16"
    assert GalleryIndex.load(out).tokens is None
    if not store_tokens:  # shards without tokens cannot serve a build that asks for them
        with pytest.raises(ValueError, match=r"shards encoded without token embeddings.*--store-tokens"):
            index_main(_args(checkpoint, images, out, "--store-tokens"))
    other = save_tiny_checkpoint(tmp_path / "other", seed=8)
    with pytest.raises(ValueError, match="holds shards of another build"):
        index_main(_args(other, images, out))


def test_file_list_source_skips_and_lists_missing_images(setup, tmp_path: Path) -> None:
    checkpoint, images = setup
    listing = tmp_path / "list.txt"
    listing.write_text(f"# gallery\n{images / 'red.png'}\nmissing.png\n{images / 'blue.png'}\n")
    gallery = index_main(
        ["--model", str(checkpoint), "--image-list", str(listing), "--out", str(tmp_path / "idx")]
    )
    assert gallery.ids == [str(images / "red.png"), str(images / "blue.png")]
    assert [s["row"] for s in gallery.skipped] == [1] and "not found" in gallery.skipped[0]["reason"]
    with pytest.raises(ValueError, match=r"image list .* does not exist"):
        index_main(["--model", str(checkpoint), "--image-list", str(tmp_path / "nope.txt"), "--out", "x"])


def test_a_shard_of_only_unreadable_images_is_left_empty(setup, tmp_path: Path) -> None:
    # `gather_encoded` of no batches: an empty shard (and an empty token set), the build goes on
    checkpoint, images = setup
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'red.png'}\n{images / 'blue.png'}\nmissing-1.png\nmissing-2.png\n")
    gallery = index_main(["--model", str(checkpoint), "--image-list", str(listing), "--out", str(tmp_path / "idx"),
                          "--shard-size", "2", "--store-tokens", "--backend", "torch"])  # fmt: skip
    assert gallery.ids == [str(images / "red.png"), str(images / "blue.png")]
    assert [s["row"] for s in gallery.skipped] == [2, 3]  # shard 1 (rows 2, 3): no image read
    assert len(GalleryIndex.load(tmp_path / "idx").tokens) == 2
