"""Gallery search with a second stage: the index keeps fp16 tokens, and a rerank only reorders the top-K.

The references are the reranker's own scores (`Reranker.score_pairs`, the code `temde-hf evaluate
--rerank` uses) on tokens encoded afresh, never the search's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from temde_hf.gallery import GalleryIndex, build_gallery_from_folder, search
from temde_hf.gallery.index_cli import main as index_main
from temde_hf.gallery.search_cli import main as search_main
from temde_hf.gallery.tokens import read_token_file, token_info, write_token_file
from temde_hf.inference.encode import iter_image_features, iter_text_features
from temde_hf.inference.rerank import RERANKERS, build_reranker
from temde_hf.inference.tokens import TokenSet, token_set_of
from temde_hf.loading import load_checkpoint
from temde_hf.models.temde.alignment_temde import paired_alignment_scores
from temde_hf.testing import GALLERY_CAPTIONS, make_colour_gallery, save_tiny_checkpoint

pytest.importorskip("faiss", reason="gallery search needs faiss-cpu (the `index` extra)")
QUERIES = GALLERY_CAPTIONS[::3]  # 6 captions


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint with a matching head, its 8-image gallery indexed with tokens, and the model."""
    root = tmp_path_factory.mktemp("rerank")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=3, matching_head=True)
    make_colour_gallery(root / "images")
    model, processor = load_checkpoint(checkpoint, with_matching_head=True)
    gallery = build_gallery_from_folder(
        checkpoint, root / "images", store_tokens=True, progress=False, model_and_processor=(model, processor)
    )
    gallery.save(root / "index")
    return checkpoint, root, model, processor


def _fresh(model, processor, paths: list[str], texts: list[str]):
    """Float32 tokens encoded now: the gallery's images and the queries (embeddings of the queries too)."""
    _, images = token_set_of(
        iter_image_features(model, processor, paths, token_dtype=torch.float32, progress=False)
    )
    query_embeds, texts = token_set_of(
        iter_text_features(model, processor, texts, token_dtype=torch.float32, progress=False)
    )
    return images, query_embeds, texts


def _all_scores(reranker, images: TokenSet, texts: TokenSet) -> torch.Tensor:
    """`(n_texts, n_images)` reranker scores of every (caption, image) pair."""
    cols, rows = torch.meshgrid(torch.arange(len(texts)), torch.arange(len(images)), indexing="ij")
    return reranker.score_pairs(images, rows.flatten(), texts, cols.flatten()).reshape(
        len(texts), len(images)
    )


def test_stored_fp16_tokens_round_trip_and_score_like_fresh_ones(setup) -> None:
    _, root, model, processor = setup
    gallery = GalleryIndex.load(root / "index")
    meta = json.loads((root / "index" / "gallery.json").read_text())
    # tiny ViT: 16 patches + CLS = 17 tokens of 16-d, stored fp16 (+ an int32 length)
    assert meta["tokens"]["bytes_per_image"] == 17 * 16 * 2 + 4 and meta["tokens"]["max_tokens"] == 17
    assert gallery.tokens.tokens.dtype == torch.float16 and gallery.tokens.tokens.shape == (8, 17, 16)
    assert meta["build"]["token_bytes"] == (root / "index" / "tokens.fp16.safetensors").stat().st_size
    images, _, texts = _fresh(model, processor, gallery.paths, QUERIES)
    torch.testing.assert_close(gallery.tokens.tokens.float(), images.tokens, atol=2e-3, rtol=1e-3)
    assert torch.equal(gallery.tokens.mask, images.mask)
    for name in RERANKERS:  # the stored half-precision tokens score within fp16 tolerance of fresh ones
        reranker = build_reranker(name, model)
        torch.testing.assert_close(
            _all_scores(reranker, gallery.tokens, texts),
            _all_scores(reranker, images, texts),
            atol=5e-3,
            rtol=1e-3,
        )


def test_token_file_is_padding_exact(tmp_path: Path) -> None:
    """Ragged rows stored padded: padding is zeroed, lengths survive, scores equal the unpadded rows'."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 7, 3])
    tokens = torch.randn(4, 7, 8, generator=g) * 3  # garbage beyond each length
    mask = torch.arange(7)[None, :] < lengths[:, None]
    # the rows arrive in two batches of different padded widths, as a sharded build sends them
    path = write_token_file(tmp_path / "t.safetensors", lengths, 8, [tokens[:2, :5], tokens[2:]])
    stored = read_token_file(path)
    assert stored.tokens.shape == (4, 7, 8) and torch.equal(stored.mask, mask)
    assert torch.all(stored.tokens[~mask] == 0)
    torch.testing.assert_close(stored.tokens[mask].float(), tokens[mask], atol=5e-3, rtol=1e-3)
    text = torch.randn(1, 4, 8, generator=g)
    for row in range(4):
        n = int(lengths[row])
        padded = paired_alignment_scores(
            stored.tokens[row : row + 1], stored.mask[row : row + 1], text, torch.ones(1, 4)
        )
        alone = paired_alignment_scores(
            stored.tokens[row : row + 1, :n], torch.ones(1, n), text, torch.ones(1, 4)
        )
        torch.testing.assert_close(padded, alone)
    assert token_info(stored)["valid_bytes_per_image"] == pytest.approx(17 / 4 * 8 * 2)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"truncated; rebuild the index with temde-hf index --store-tokens"):
        read_token_file(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_rerank_reorders_only_the_top_k(setup, name: str) -> None:
    _, root, model, processor = setup
    gallery = GalleryIndex.load(root / "index")
    plain = search(gallery, model, processor, texts=QUERIES, k=8)
    hits = search(gallery, model, processor, texts=QUERIES, k=8, rerank=name, rerank_k=4, rerank_fusion=0)
    _, _, texts = _fresh(model, processor, gallery.paths, QUERIES)
    expected = _all_scores(build_reranker(name, model), gallery.tokens, texts)
    changed = 0
    for q, (before, after) in enumerate(zip(plain, hits)):
        assert {h.id for h in after[:4]} == {h.id for h in before[:4]}  # the candidate set never changes
        assert [h.id for h in after[4:]] == [h.id for h in before[4:]]  # the rest keep their stage-1 order
        assert all(h.rerank_score is None for h in after[4:]) and [h.rank for h in after] == list(range(1, 9))
        rows = [gallery.ids.index(h.id) for h in after[:4]]
        second = [h.rerank_score for h in after[:4]]
        assert second == sorted(second, reverse=True)
        np.testing.assert_allclose(second, expected[q, rows].numpy(), rtol=1e-5, atol=1e-5)
        changed += [h.id for h in after] != [h.id for h in before]
    assert changed  # stage 2 did reorder some query's candidates
    # a dominant stage-1 weight in the fusion gives back the stage-1 order
    fused = search(gallery, model, processor, texts=QUERIES, k=8, rerank=name, rerank_k=4, rerank_fusion=1e6)
    assert [[h.id for h in row] for row in fused] == [[h.id for h in row] for row in plain]


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_rerank_k_covering_the_gallery_is_full_rescoring(setup, name: str) -> None:
    _, root, model, processor = setup
    gallery = GalleryIndex.load(root / "index")
    hits = search(gallery, model, processor, texts=QUERIES, k=5, rerank=name, rerank_k=100, rerank_fusion=0)
    images, _, texts = _fresh(model, processor, gallery.paths, QUERIES)
    # the reference scores every (caption, image) from freshly encoded float32 tokens
    full = _all_scores(build_reranker(name, model), images, texts)
    for q, row in enumerate(hits):
        assert [h.id for h in row] == [gallery.ids[i] for i in full[q].argsort(descending=True)[:5]]


def test_cli_index_store_tokens_and_search_rerank(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, root, model, processor = setup
    index_main(["--model", str(checkpoint), "--images", str(root / "images"), "--out", str(tmp_path / "idx"),
                "--store-tokens", "--shard-size", "5"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "stored token embeddings: 0.5 KiB/image (fp16, up to 17 x 16" in printed  # 548 B
    argv = ["--index", str(tmp_path / "idx"), "--text", QUERIES[0], "-k", "3"]
    hits = search_main([*argv, "--rerank", "itm", "--rerank-k", "6", "--json"])
    printed = json.loads(capsys.readouterr().out)
    gallery = GalleryIndex.load(tmp_path / "idx")
    # the command line and the Python API share their defaults (the fusion weight chosen on CV)
    expected = search(gallery, model, processor, texts=QUERIES[:1], k=3, rerank="itm", rerank_k=6)
    alone = search(
        gallery, model, processor, texts=QUERIES[:1], k=3, rerank="itm", rerank_k=6, rerank_fusion=0
    )
    assert [h.rerank_score for h in expected[0]] != pytest.approx([h.rerank_score for h in alone[0]])
    assert [h["id"] for h in printed[0]["hits"]] == [h.id for h in hits[0]] == [h.id for h in expected[0]]
    assert [h["rerank_score"] for h in printed[0]["hits"]] == pytest.approx(
        [h.rerank_score for h in expected[0]]
    )


def test_rerank_errors_name_the_fix(setup, tmp_path: Path) -> None:
    checkpoint, root, model, processor = setup
    index_main(
        ["--model", str(checkpoint), "--images", str(root / "images"), "--out", str(tmp_path / "bare")]
    )
    argv = ["--index", str(tmp_path / "bare"), "--text", "a red square"]
    with pytest.raises(
        ValueError, match=r"bare stores no token embeddings.*rebuild it with temde-hf index --store-tokens"
    ):
        search_main([*argv, "--rerank", "alignment"])
    with pytest.raises(ValueError, match="search the --image queries in a separate call without --rerank"):
        search_main([*argv, "--image", str(root / "images" / "red.png"), "--rerank", "alignment"])
    with pytest.raises(ValueError, match="--rerank-k 0: must be >= 1"):
        search_main([*argv, "--rerank", "alignment", "--rerank-k", "0"])
    # a checkpoint without a matching head: itm is refused, alignment works
    plain = save_tiny_checkpoint(tmp_path / "plain", seed=4)
    index_main(
        [
            "--model",
            str(plain),
            "--images",
            str(root / "images"),
            "--out",
            str(tmp_path / "p"),
            "--store-tokens",
        ]
    )
    argv = ["--index", str(tmp_path / "p"), "--text", "a red square"]
    with pytest.raises(ValueError, match=r"has no trained matching head.*--rerank alignment"):
        search_main([*argv, "--rerank", "itm"])
    assert len(search_main([*argv, "--rerank", "alignment", "-k", "2"])[0]) == 2
    gallery = GalleryIndex.load(tmp_path / "p")
    plain_model, plain_processor = load_checkpoint(plain)
    with pytest.raises(ValueError, match="needs a model with a matching head"):
        search(gallery, plain_model, plain_processor, texts=["a red square"], rerank="itm")
    bare = GalleryIndex.load(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"stores no token embeddings.*store_tokens=True"):
        search(bare, model, processor, texts=["a red square"], rerank="alignment")
