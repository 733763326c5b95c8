"""`GalleryIndex`: a FAISS index over gallery embeddings, with ids, paths and the model that made them.

Saved folder:

- ``index.faiss``: the FAISS index searched first (loaded into memory);
- ``vectors.fp16.faiss``: the full fused vectors as fp16 codes, only for index types that re-rank a
  shortlist exactly (memory-mapped on load: a query reads only its shortlist's rows);
- ``tokens.fp16.safetensors``: the images' joint-space token embeddings, only when the index was built
  with ``store_tokens`` (``temde-hf index --store-tokens``; memory-mapped on load, see `tokens`): what a
  second-stage reranker re-scores each query's top-K from (``search(..., rerank="alignment")``);
- ``gallery.json``: ids, paths, the checkpoint and its fingerprint, the index settings and why they
  were chosen, the images skipped as unreadable, the stored tokens' layout and bytes per image, and how
  the index was built.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.rerank import (
    DEFAULT_RERANK_K,
    DEFAULT_STAGE1_WEIGHT,
    Reranker,
    build_reranker,
    rerank_candidates,
)
from ..inference.tokens import TokenSet
from .spec import IndexSpec, check_index_settings, parse_spec
from .tokens import TOKENS_FILE, read_token_file, token_info, write_token_file

INDEX_FILE = "index.faiss"
STORE_FILE = "vectors.fp16.faiss"
META_FILE = "gallery.json"
FORMAT_VERSION = 2
_RERANK_CHUNK = 64  # queries re-ranked at once: bounds the gathered (chunk, k_factor·k, E) block
_TOKEN_WRITE_ROWS = 4096  # token rows copied to disk at once when saving


def faiss_module() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:  # optional dependency: the `index` extra
        raise ImportError("gallery search needs faiss: pip install 'temde_hf[index]' (faiss-cpu)") from err
    return faiss


@dataclass
class SearchHit:
    """One search result.

    Attributes:
        rank: 1-based position in the result list.
        id: The item's id.
        score: Its stage-1 score (the inner product of the fused embeddings).
        path: Its file path, if known.
        rerank_score: When the search reranked this item, the score that ordered the reranked items:
            the reranker's, or with ``rerank_fusion`` its fusion with stage 1 (`fuse_scores`); else None.
    """

    rank: int
    id: str
    score: float
    path: str | None = None
    rerank_score: float | None = None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _read_meta(meta_path: Path, rebuild: str) -> dict[str, Any]:
    """``gallery.json`` as a dict of this format version, or one line naming it and the fix."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: not valid JSON ({_one_line(err)}); {rebuild}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON object; {rebuild}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}; rebuild the "
            "index with this version of temde-hf index"
        )
    return meta


def file_inside(folder: Path, name: Any, what: str) -> Path:
    """`folder / name` for a file name read from a file in `folder`; it may not lead out of `folder`.

    Args:
        folder: The folder the naming file lives in (the gallery index folder).
        name: The relative file name as read (e.g. ``gallery.json``'s token file).
        what: Where the name was read, for the error (e.g. ``".../gallery.json tokens.file"``).

    Raises:
        ValueError: `name` is not a string, is absolute, or resolves outside `folder` (``..``, a link).
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or Path(name).drive:
        raise ValueError(
            f"{what} is {name!r}: must be a file name relative to {folder}; rebuild the index with temde-hf index"
        )
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"{what} is {name!r}, which leads outside {folder}; a gallery index only reads its own files: "
            "rebuild the index with temde-hf index"
        )
    return path


# FAISS prefixes its messages with the C++ function and source line: not for a user.
_FAISS_LOCATION = re.compile(
    r"(Error in .*?\.(cpp|h):\d+: ?|Error: '.*?' failed: ?|Faiss assertion .*? failed in .*?$)"
)


def _first_line(err: BaseException) -> str:
    """The gist of a (possibly multi-line, C++-wrapped) FAISS error, on one line."""
    text = _FAISS_LOCATION.sub("", " ".join(str(err).split())).strip()
    return text[:200] or type(err).__name__


def _as_float32(vectors: Any) -> np.ndarray:
    vectors = vectors.numpy() if hasattr(vectors, "numpy") else vectors
    return np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)


class GalleryIndex:
    """A FAISS inner-product index over gallery embeddings.

    Build one from an in-memory array (small galleries) with the constructor, or stream large ones
    through `GalleryIndex.build`; ``temde-hf index`` does the latter from embedding shards.

    Args:
        embeddings: `(n_items, embed_dim)` retrieval embeddings.
        ids: One id per row (e.g. the image's path relative to the gallery folder).
        paths: Optional file path per row (what a UI shows).
        model_path: The checkpoint that produced the embeddings (queries must use the same one).
        model_fingerprint: Its `checkpoint_fingerprint`, checked by ``temde-hf search``.
        index_type: ``"auto"``, one of `INDEX_TYPES`, or an `IndexSpec`.
        global_dim: Width of the global part of a ``concat`` embedding (for ``global`` / ``auto``).
        tokens: The items' joint-space tokens `(n_items, L, D)` (kept for a second-stage rerank; saved
            as float16), or None.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
        model_path: str | None = None,
        model_fingerprint: str | None = None,
        index_type: str | IndexSpec = "flat",
        global_dim: int | None = None,
        tokens: TokenSet | None = None,
    ) -> None:
        embeddings = _as_float32(embeddings)
        if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
            raise ValueError(f"embeddings {embeddings.shape} and {len(ids)} ids do not match")
        spec = (
            index_type
            if isinstance(index_type, IndexSpec)
            else parse_spec(index_type, len(ids), embeddings.shape[1], global_dim=global_dim)
        )
        built = GalleryIndex.build(
            spec, embeddings.shape[1], embeddings[: spec.train_size(len(ids))], [embeddings], ids, paths=paths
        )
        self.__dict__.update(built.__dict__)
        self.model_path, self.model_fingerprint = model_path, model_fingerprint
        self.attach_tokens(tokens)

    @classmethod
    def build(
        cls,
        spec: IndexSpec,
        dim: int,
        train: np.ndarray | None,
        batches: Iterable[np.ndarray],
        ids: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
    ) -> GalleryIndex:
        """Train on `train` `(m, dim)`, then add `batches` of `(b, dim)` rows one at a time (streaming)."""
        faiss = faiss_module()
        self = cls.__new__(cls)
        self.spec, self.ids = spec, list(ids)
        self.paths = list(paths) if paths is not None else [None] * len(self.ids)
        self.model_path = self.model_fingerprint = None
        self.skipped, self.build_info = [], {}
        self.tokens, self.token_file, self.index_dir = None, None, None
        base_dim = spec.base_dim(dim)
        n_train = 0 if train is None else len(train)
        if spec.nlist and spec.nlist > n_train:
            raise ValueError(
                f"--nlist {spec.nlist}: more IVF lists than the {n_train} training vectors; pass --nlist "
                f"{max(1, n_train // 39)} or less (or leave it out for the automatic value)"
            )
        factory = spec.factory(dim)
        started = time.perf_counter()
        try:  # FAISS reports bad settings as multi-line C++ errors: say which setting, in one line
            self.index = faiss.index_factory(base_dim, factory, faiss.METRIC_INNER_PRODUCT)
            if not self.index.is_trained:
                if n_train == 0:
                    raise ValueError(f"index type {spec.kind!r} needs training vectors")
                self.index.train(_as_float32(train)[:, :base_dim])
        except RuntimeError as err:
            raise ValueError(
                f"--index-type {spec.kind}: FAISS cannot build {factory!r} for {n_train} training vectors of "
                f"{base_dim} dims ({_first_line(err)}); change --nlist / --pq-m or use --index-type auto"
            ) from err
        trained = time.perf_counter()
        self.store = (
            faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            if spec.reranks
            else None
        )
        for batch in batches:
            batch = _as_float32(batch)
            if batch.shape[1] != dim:
                raise ValueError(
                    f"a batch of {batch.shape[1]}-d vectors does not match the index width {dim}"
                )
            self.index.add(np.ascontiguousarray(batch[:, :base_dim]))
            if self.store is not None:
                self.store.add(batch)
        if self.index.ntotal != len(self.ids):
            raise ValueError(f"{self.index.ntotal} vectors were added for {len(self.ids)} ids")
        self.build_info = {
            "train_vectors": 0 if train is None else len(train),
            "train_seconds": round(trained - started, 3),
            "add_seconds": round(time.perf_counter() - trained, 3),
        }
        self._apply_search_params()
        return self

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def embed_dim(self) -> int:
        return self.store.d if self.store is not None else self.index.d

    @property
    def index_type(self) -> str:
        return self.spec.kind

    def attach_tokens(self, tokens: TokenSet | None, file: Path | None = None) -> None:
        """Keep the items' tokens for reranking (`file`: the token file they are mapped from, if any)."""
        if tokens is not None and len(tokens) != len(self.ids):
            raise ValueError(f"{len(tokens)} token rows for {len(self.ids)} gallery items")
        self.tokens, self.token_file = tokens, file

    def _apply_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        faiss = faiss_module()
        if self.spec.nlist:
            faiss.extract_index_ivf(self.index).nprobe = nprobe or self.spec.nprobe or 1
        if self.spec.kind == "hnsw":
            self.index.hnsw.efSearch = ef_search or self.spec.ef_search

    def search_vectors(
        self, queries: Any, k: int, *, nprobe: int | None = None, k_factor: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows of the top-``k`` items per query, best first.

        Args:
            queries: `(n_queries, embed_dim)`.
            nprobe, k_factor: Override the saved search settings for this call.

        Returns:
            `(n_queries, k')` scores and rows (k' = min(k, len(self)); row -1 where nothing was found).
        """
        if k < 1:
            raise ValueError(f"k must be a positive number of results, got {k}")
        queries = _as_float32(queries)
        if queries.shape[1] != self.embed_dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.embed_dim}: same model?")
        check_index_settings({"nprobe": nprobe, "k_factor": k_factor})
        k = min(k, len(self))
        self._apply_search_params(nprobe)
        factor = self.spec.k_factor if k_factor is None else k_factor
        shortlist = min(len(self), k * factor) if self.store is not None and factor else k
        base_dim = self.index.d
        scores, rows = self.index.search(np.ascontiguousarray(queries[:, :base_dim]), shortlist)
        if shortlist == k:
            return scores, rows
        return self._rerank(queries, rows, k)

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact fused scores of each query's shortlist (read from the fp16 store), top-``k`` kept."""
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_rows = np.full((len(queries), k), -1, dtype=np.int64)
        for start in range(0, len(queries), _RERANK_CHUNK):
            block = rows[start : start + _RERANK_CHUNK]  # (chunk, shortlist)
            valid = block >= 0
            vectors = self.store.reconstruct_batch(np.where(valid, block, 0).ravel())
            vectors = vectors.reshape(*block.shape, -1)  # (chunk, shortlist, E)
            exact = np.einsum("qe,qse->qs", queries[start : start + len(block)], vectors)
            exact[~valid] = -np.inf
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            out_scores[start : start + len(block)] = np.take_along_axis(exact, top, axis=1)
            out_rows[start : start + len(block)] = np.where(
                np.take_along_axis(valid, top, axis=1), np.take_along_axis(block, top, axis=1), -1
            )
        return out_scores, out_rows

    def search(
        self,
        queries: Any,
        k: int = 5,
        *,
        rerank: str | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
        text_tokens: TokenSet | None = None,
        model: Any = None,
        rerank_fusion: float = DEFAULT_STAGE1_WEIGHT,
        **settings: Any,
    ) -> list[list[SearchHit]]:
        """Top-``k`` items per query row of `(n_queries, embed_dim)`, best first.

        With ``rerank``, each text query's stage-1 top-``rerank_k`` is re-scored by that reranker
        (`temde_hf.inference.rerank.RERANKERS`, the code ``temde-hf evaluate --rerank`` scores with)
        from the queries' tokens and the gallery's stored tokens, and reordered: the set of candidates
        never changes, and items beyond them follow in stage-1 order.

        Args:
            queries: `(n_queries, embed_dim)` stage-1 embeddings.
            k: Results per query.
            rerank: ``"alignment"`` or ``"itm"`` (needs ``model`` with a matching head), or None.
            rerank_k: Stage-1 candidates re-scored per query.
            text_tokens: The queries' caption tokens `(n_queries, L, D)` (`temde_hf.gallery.search`
                encodes them), needed with ``rerank``.
            model: The checkpoint's model (the reranker reads its config or its matching head).
            rerank_fusion: Order the candidates by `z(stage 2) + w·z(stage 1)` (`fuse_scores`); 0: by
                stage 2 alone.
            settings: ``nprobe`` / ``k_factor`` for this call.
        """
        if rerank is None:
            scores, rows = self.search_vectors(queries, k, **settings)
            return [
                [self._hit(r, i, s) for r, (s, i) in enumerate(zip(score_row, row)) if i >= 0]
                for score_row, row in zip(scores, rows)
            ]
        reranker = self._reranker(rerank, rerank_k, text_tokens, model, len(_as_float32(queries)))
        scores, rows = self.search_vectors(queries, max(k, rerank_k), **settings)
        return [
            self._reranked_hits(reranker, text_tokens, q, scores[q], rows[q], k, rerank_k, rerank_fusion)
            for q in range(len(rows))
        ]

    def require_tokens(self, rerank: str) -> None:
        """Raise a one-line ValueError (with the fix) when the index keeps no tokens to rerank from."""
        if self.tokens is None:
            raise ValueError(
                f"{self.index_dir or 'this gallery index'} stores no token embeddings, which rerank {rerank!r} "
                "re-scores: rebuild it with temde-hf index --store-tokens (store_tokens=True in Python)"
            )

    def _hit(self, rank: int, row: int, score: float, rerank_score: float | None = None) -> SearchHit:
        return SearchHit(rank + 1, self.ids[row], float(score), self.paths[row], rerank_score)

    def _reranker(
        self, name: str, rerank_k: int, text_tokens: TokenSet | None, model: Any, n_queries: int
    ) -> Reranker:
        """The reranker `name` for this search, after checking everything it needs is there."""
        self.require_tokens(name)
        if rerank_k < 1:
            raise ValueError(f"rerank_k must be a positive number of candidates, got {rerank_k}")
        if model is None or text_tokens is None:
            raise ValueError(
                "rerank needs the checkpoint's model and the queries' text_tokens; "
                "temde_hf.gallery.search(gallery, model, processor, texts=..., rerank=...) passes both"
            )
        if len(text_tokens) != n_queries:
            raise ValueError(f"{len(text_tokens)} query token sets for {n_queries} queries")
        return build_reranker(name, model)

    def _reranked_hits(
        self,
        reranker: Reranker,
        text_tokens: TokenSet,
        query: int,
        scores: np.ndarray,
        rows: np.ndarray,
        k: int,
        rerank_k: int,
        fusion: float,
    ) -> list[SearchHit]:
        """One query: its stage-1 top-`rerank_k` reordered by the reranker, then the rest, `k` kept."""
        found = int((rows >= 0).sum())  # FAISS pads with -1 at the end when it found fewer
        n = min(rerank_k, found)
        candidates = torch.from_numpy(rows[None, :n].astype(np.int64))  # (1, n)
        stage1 = dict(zip(rows[:found].tolist(), scores[:found].tolist()))
        reordered, second = rerank_candidates(
            reranker, text_tokens, torch.tensor([query]), self.tokens, candidates, query_is_image=False,
            stage1_scores=torch.from_numpy(scores[None, :n].copy()), stage1_weight=fusion,
        )  # fmt: skip
        hits = [
            self._hit(r, i, stage1[i], s)
            for r, (i, s) in enumerate(zip(reordered[0].tolist(), second[0].tolist()))
        ]
        hits += [self._hit(n + r, i, stage1[i]) for r, i in enumerate(rows[n:found].tolist())]
        return hits[:k]

    # ------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What ``gallery.json`` records (everything but the vectors)."""
        return {
            "format_version": FORMAT_VERSION,
            "model_path": self.model_path,
            "model_fingerprint": self.model_fingerprint,
            "metric": "inner_product",
            "embed_dim": self.embed_dim,
            "n_items": len(self),
            "index_type": self.spec.kind,
            "index": {**self.spec.to_dict(), "faiss_factory": self.spec.factory(self.embed_dim)},
            "tokens": token_info(self.tokens) if self.tokens is not None else None,
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "build": self.build_info,
            "ids": self.ids,
            "paths": self.paths,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``index.faiss`` (+ ``vectors.fp16.faiss``, + ``tokens.fp16.safetensors``) + ``gallery.json``."""
        faiss = faiss_module()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out_dir / INDEX_FILE))
        if self.store is not None:
            faiss.write_index(self.store, str(out_dir / STORE_FILE))
        self.build_info["index_bytes"] = (out_dir / INDEX_FILE).stat().st_size
        if self.store is not None:
            self.build_info["store_bytes"] = (out_dir / STORE_FILE).stat().st_size
        if self.tokens is not None:
            self._save_tokens(out_dir / TOKENS_FILE)
            self.build_info["token_bytes"] = (out_dir / TOKENS_FILE).stat().st_size
        (out_dir / META_FILE).write_text(json.dumps(self.metadata(), indent=1))
        return out_dir

    def _save_tokens(self, path: Path) -> None:
        """Stream the tokens to `path` (nothing to do when they are already mapped from that file)."""
        if self.token_file is not None and Path(self.token_file).resolve() == path.resolve():
            return
        lengths = self.tokens.mask.sum(dim=1)
        chunks = (
            self.tokens.tokens[start : start + _TOKEN_WRITE_ROWS]
            for start in range(0, len(self.tokens), _TOKEN_WRITE_ROWS)
        )
        write_token_file(path, lengths, self.tokens.tokens.shape[2], chunks)

    @classmethod
    def load(cls, index_dir: str | Path, *, mmap_store: bool = True) -> GalleryIndex:
        """Read a folder written by `save` (the re-rank store and the tokens memory-mapped unless
        ``mmap_store=False``)."""
        faiss = faiss_module()
        index_dir = Path(index_dir)
        meta_path = index_dir / META_FILE
        if not meta_path.is_file() or not (index_dir / INDEX_FILE).is_file():
            raise ValueError(
                f"{index_dir} is not a gallery index (needs {INDEX_FILE} and {META_FILE}); build one with "
                "temde-hf index"
            )
        rebuild = "rebuild the index with temde-hf index"
        meta = _read_meta(meta_path, rebuild)
        self = cls.__new__(cls)
        try:
            self.index = faiss.read_index(str(index_dir / INDEX_FILE))
            spec = {k: v for k, v in meta["index"].items() if k != "faiss_factory"}
            self.spec = IndexSpec.from_dict(spec)
            self.store = None
            if self.spec.reranks:
                # IO_FLAG_MMAP_IFC maps the codes of a flat-codes index; plain IO_FLAG_MMAP would read this
                # SQ store into anonymous memory whole (4.6 GB at 1M images, measured).
                flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap_store else 0
                self.store = faiss.read_index(str(index_dir / STORE_FILE), flags)
            self.ids, self.paths = list(meta["ids"]), list(meta["paths"])
            self.model_path, self.model_fingerprint = meta["model_path"], meta.get("model_fingerprint")
            self.skipped, self.build_info = meta.get("skipped", []), meta.get("build", {})
            tokens = meta.get("tokens")
            token_name = tokens["file"] if tokens else None
        except RuntimeError as err:  # FAISS: a truncated or foreign index file
            raise ValueError(
                f"{index_dir}: an index file cannot be read ({_first_line(err)}); {rebuild}"
            ) from err
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(
                f"{meta_path}: missing or malformed entry ({_one_line(err)}); {rebuild}"
            ) from err
        if not isinstance(meta["ids"], list) or not isinstance(meta["paths"], list):
            raise ValueError(f"{meta_path}: 'ids' and 'paths' must be JSON lists; {rebuild}")
        if len(self.ids) != self.index.ntotal or len(self.paths) != len(self.ids):
            raise ValueError(
                f"{meta_path} lists {len(self.ids)} ids and {len(self.paths)} paths but the index holds "
                f"{self.index.ntotal} vectors; {rebuild}"
            )
        self.index_dir, self.tokens, self.token_file = index_dir, None, None
        if token_name is not None:
            token_file = file_inside(index_dir, token_name, f"{meta_path} tokens.file")
            self.attach_tokens(read_token_file(token_file, mmap=mmap_store), token_file)
        self._apply_search_params()
        return self
