"""Every index type round-trips through save/load and finds planted near-duplicates; the automatic choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from temde_hf.gallery import INDEX_TYPES, GalleryIndex, IndexSpec, choose_spec
from temde_hf.gallery.spec import parse_spec

faiss = pytest.importorskip("faiss", reason="gallery search needs faiss-cpu (the `index` extra)")

GLOBAL, SKETCH = 16, 32  # a concat-shaped embedding: global part, then a non-negative sketch part


@pytest.fixture(scope="module")
def gallery_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3,000 clustered vectors, and 20 queries planted next to known rows."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, GLOBAL + SKETCH))
    vectors = centres[rng.integers(0, 30, 3000)] + 0.5 * rng.standard_normal((3000, GLOBAL + SKETCH))
    vectors[:, GLOBAL:] = np.abs(vectors[:, GLOBAL:])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted = rng.choice(3000, 20, replace=False)
    queries = vectors[planted] + 0.01 * rng.standard_normal((20, GLOBAL + SKETCH))
    return vectors.astype(np.float32), queries.astype(np.float32), planted


def _spec(kind: str) -> IndexSpec:
    settings = {"nlist": 16, "nprobe": 4, "pq_m": 8} if kind == "ivfpq" else {"nlist": 16, "nprobe": 4}
    return parse_spec(
        kind, 3000, GLOBAL + SKETCH, global_dim=GLOBAL, **settings if kind in ("ivfpq", "global") else {}
    )


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_index_type_round_trips_and_finds_planted_rows(kind: str, gallery_vectors, tmp_path: Path) -> None:
    faiss.omp_set_num_threads(1)  # k-means threads fight other jobs on a shared 2-core machine
    vectors, queries, planted = gallery_vectors
    gallery = GalleryIndex(vectors, [f"img{i}" for i in range(len(vectors))], index_type=_spec(kind))
    scores, rows = gallery.search_vectors(queries, 5)
    assert (rows[:, 0] == planted).all(), kind  # each planted near-duplicate is found first
    gallery.save(tmp_path / kind)
    loaded = GalleryIndex.load(tmp_path / kind)
    assert loaded.spec == gallery.spec and loaded.ids == gallery.ids
    loaded_scores, loaded_rows = loaded.search_vectors(queries, 5)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    assert (tmp_path / kind / "vectors.fp16.faiss").is_file() == gallery.spec.reranks


@pytest.mark.parametrize("kind", ["ivfpq", "global"])
def test_rerank_of_a_full_shortlist_is_the_exact_ranking(kind: str, gallery_vectors) -> None:
    vectors, queries, _ = gallery_vectors
    gallery = GalleryIndex(vectors, [str(i) for i in range(len(vectors))], index_type=_spec(kind))
    # All lists probed and every item re-scored: only the fp16 rounding of the store remains.
    scores, rows = gallery.search_vectors(queries, 10, nprobe=16, k_factor=300)
    exact = queries @ vectors.T
    stored = queries @ vectors.astype(np.float16).astype(np.float32).T  # what the fp16 store holds
    np.testing.assert_array_equal(rows, np.argsort(-stored, axis=1, kind="stable")[:, :10])
    assert np.mean([len(set(r) & set(e)) for r, e in zip(rows, np.argsort(-exact, axis=1)[:, :10])]) > 9.8
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), atol=2e-3)
    _, approximate = gallery.search_vectors(queries, 10, nprobe=1, k_factor=1)  # no re-ranking help
    assert (approximate != rows).any()  # the settings really change what is searched


def test_automatic_choice_follows_size_and_budget() -> None:
    assert choose_spec(5_000, 2304).kind == "flat"
    assert choose_spec(50_000, 2304).kind == "fp16"  # float32 would read 440 MiB per scan
    assert choose_spec(100_000, 2304).kind == "sq8"
    big = choose_spec(1_000_000, 2304, global_dim=256)
    assert big.kind == "global" and big.k_factor > 0 and big.memory_bytes(1_000_000, 2304) <= 2**30
    assert "fits 1024 MiB" in big.reason
    pq = choose_spec(1_000_000, 2304)  # not a concat embedding: PQ codes sized to the budget
    assert pq.kind == "ivfpq" and 2304 % pq.pq_m == 0 and pq.memory_bytes(1_000_000, 2304) <= 2**30
    assert choose_spec(1_000_000, 2304, memory_budget=256 * 2**20).pq_m < pq.pq_m
    with pytest.raises(ValueError, match="raise --memory-budget"):
        choose_spec(10_000_000, 2304, memory_budget=2**20)
    with pytest.raises(ValueError, match="needs a concat-fusion checkpoint"):
        parse_spec("global", 1000, 64)
    with pytest.raises(ValueError, match=r"k_factor .* applies to"):
        IndexSpec("flat", k_factor=3)
