"""Gallery search: encode images once, keep them in a FAISS index, query by text or by image.

T-EMDE's similarity is one inner product of the fused embeddings (global part + sketch part), so the
index is a plain inner-product index over the model's retrieval embeddings: the search ranks exactly
as the model's ``logits_per_text`` would.

    temde-hf index --model CHECKPOINT --images photos/ --out gallery_index/
    temde-hf search --index gallery_index/ --text "a dog runs on the beach" -k 5

Saved index folder: ``index.faiss`` (the vectors) + ``gallery.json`` (ids, image paths, the model path
and the index settings).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

INDEX_FILE = "index.faiss"
META_FILE = "gallery.json"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
INDEX_TYPES = ("flat", "hnsw")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # optional dependency: the `index` extra
        raise ImportError("gallery search needs faiss: pip install 'temde_hf[index]' (faiss-cpu)") from err
    return faiss


@dataclass
class SearchHit:
    """One search result."""

    rank: int
    id: str
    score: float
    path: str | None = None


def load_model_and_processor(model_path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Load a saved T-EMDE checkpoint (model in eval mode) and its processor."""
    from transformers import AutoModel, AutoProcessor

    import temde_hf  # noqa: F401  (registers the "temde" Auto classes)

    if not (Path(model_path) / "config.json").is_file():
        raise ValueError(f"{model_path} is not a checkpoint folder (no config.json)")
    model = AutoModel.from_pretrained(model_path).eval()
    return model, AutoProcessor.from_pretrained(model_path)


def _open(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Image.Image | str | Path],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Retrieval embeddings of images, `(n_images, embed_dim)` float32."""
    chunks = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="encode images", disable=not progress, unit="batch"
    ):
        batch = [_open(image) for image in images[start : start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        chunks.append(model.get_image_features(pixel_values=pixel_values).pooler_output.float().cpu().numpy())
    if not chunks:
        raise ValueError("no images to encode")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    processor: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Retrieval embeddings of texts, `(n_texts, embed_dim)` float32."""
    chunks = []
    for start in tqdm(
        range(0, len(texts), batch_size), desc="encode texts", disable=not progress, unit="batch"
    ):
        batch = processor(
            text=list(texts[start : start + batch_size]), return_tensors="pt", padding=True, truncation=True
        )
        chunks.append(
            model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .pooler_output.float()
            .cpu()
            .numpy()
        )
    if not chunks:
        raise ValueError("no texts to encode")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so ids are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return files


class GalleryIndex:
    """A FAISS inner-product index over gallery embeddings, with ids, paths and the model that made them.

    Args:
        embeddings: `(n_items, embed_dim)` retrieval embeddings.
        ids: one id per row (e.g. the image's path relative to the gallery folder).
        paths: optional file path per row (what a UI shows).
        model_path: the checkpoint that produced the embeddings (queries must use the same one).
        index_type: ``"flat"`` (exact) or ``"hnsw"`` (approximate, for large galleries).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
        model_path: str | None = None,
        index_type: str = "flat",
    ) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
            raise ValueError(f"embeddings {embeddings.shape} and {len(ids)} ids do not match")
        self.ids, self.paths = list(ids), list(paths) if paths is not None else [None] * len(ids)
        self.model_path, self.index_type = model_path, index_type
        self.index = self._new_index(embeddings.shape[1], index_type)
        self.index.add(embeddings)

    @staticmethod
    def _new_index(dim: int, index_type: str) -> Any:
        faiss = _faiss()
        if index_type == "flat":
            return faiss.IndexFlatIP(dim)
        if index_type == "hnsw":
            return faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        raise ValueError(f"index_type {index_type!r} unknown; choose one of {INDEX_TYPES}")

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def embed_dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[SearchHit]]:
        """Top-``k`` items per query row of `(n_queries, embed_dim)`, best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.embed_dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.embed_dim}: same model?")
        scores, rows = self.index.search(queries, min(k, len(self)))
        return [
            [
                SearchHit(rank=r + 1, id=self.ids[i], score=float(s), path=self.paths[i])
                for r, (s, i) in enumerate(zip(score_row, row))
                if i >= 0
            ]
            for score_row, row in zip(scores, rows)
        ]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``index.faiss`` + ``gallery.json`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(out_dir / INDEX_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "model_path": self.model_path,
            "index_type": self.index_type,
            "metric": "inner_product",
            "embed_dim": self.embed_dim,
            "ids": self.ids,
            "paths": self.paths,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
        return out_dir

    @classmethod
    def load(cls, index_dir: str | Path) -> GalleryIndex:
        """Read a folder written by `save`."""
        index_dir = Path(index_dir)
        meta_path = index_dir / META_FILE
        if not meta_path.is_file() or not (index_dir / INDEX_FILE).is_file():
            raise ValueError(f"{index_dir} is not a gallery index (needs {INDEX_FILE} and {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        self = cls.__new__(cls)
        self.index = _faiss().read_index(str(index_dir / INDEX_FILE))
        self.ids, self.paths = meta["ids"], meta["paths"]
        self.model_path, self.index_type = meta["model_path"], meta["index_type"]
        if len(self.ids) != self.index.ntotal:
            raise ValueError(f"{meta_path} lists {len(self.ids)} ids but the index holds {self.index.ntotal}")
        return self


def build_gallery(
    model_path: str | Path,
    images: Sequence[Image.Image | str | Path],
    ids: Sequence[str],
    *,
    paths: Sequence[str | None] | None = None,
    batch_size: int = 32,
    index_type: str = "flat",
    progress: bool = True,
    model_and_processor: tuple[torch.nn.Module, Any] | None = None,
) -> GalleryIndex:
    """Encode ``images`` with the checkpoint at ``model_path`` and index them."""
    model, processor = model_and_processor or load_model_and_processor(model_path)
    embeddings = encode_images(model, processor, images, batch_size=batch_size, progress=progress)
    return GalleryIndex(
        embeddings, ids, paths=paths, model_path=str(Path(model_path).resolve()), index_type=index_type
    )


def build_gallery_from_folder(model_path: str | Path, folder: str | Path, **kwargs: Any) -> GalleryIndex:
    """Index every image under ``folder``; ids are paths relative to it."""
    files = list_images(folder)
    ids = [p.relative_to(folder).as_posix() for p in files]
    return build_gallery(model_path, files, ids, paths=[str(p.resolve()) for p in files], **kwargs)


def build_gallery_from_dataset(
    model_path: str | Path,
    dataset: Any,
    *,
    image_column: str = "image",
    id_column: str | None = None,
    **kwargs: Any,
) -> GalleryIndex:
    """Index a `datasets.Dataset` whose ``image_column`` holds images or image paths."""
    if image_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {image_column!r} (columns: {dataset.column_names})")
    images = dataset[image_column]
    ids = [str(v) for v in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    paths = [str(v) if isinstance(v, (str, Path)) else None for v in images]
    return build_gallery(model_path, images, ids, paths=paths, **kwargs)


def search(
    gallery: GalleryIndex,
    model: torch.nn.Module,
    processor: Any,
    *,
    texts: Iterable[str] = (),
    images: Iterable[Image.Image | str | Path] = (),
    k: int = 5,
) -> list[list[SearchHit]]:
    """Query the gallery by texts and/or images (text queries first), top-``k`` each."""
    texts, images = list(texts), list(images)
    if not texts and not images:
        raise ValueError("give at least one text or image query")
    hits: list[list[SearchHit]] = []
    if texts:
        hits += gallery.search(encode_texts(model, processor, texts), k)
    if images:
        hits += gallery.search(encode_images(model, processor, images, progress=False), k)
    return hits


def index_main(argv: Sequence[str] | None = None) -> GalleryIndex:
    """``temde-hf index``: encode an image folder or a saved dataset and write a search index."""
    parser = argparse.ArgumentParser(prog="temde-hf index", description="encode a gallery and build an index")
    parser.add_argument("--model", required=True, help="checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (recursive)")
    source.add_argument("--dataset", help="a `datasets` folder written by save_to_disk")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--id-column")
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--index-type", choices=INDEX_TYPES, default="flat")
    args = parser.parse_args(argv)
    kwargs = {"batch_size": args.batch_size, "index_type": args.index_type}
    if args.images:
        gallery = build_gallery_from_folder(args.model, args.images, **kwargs)
    else:
        from datasets import load_from_disk

        dataset = load_from_disk(args.dataset)
        gallery = build_gallery_from_dataset(
            args.model, dataset, image_column=args.image_column, id_column=args.id_column, **kwargs
        )
    gallery.save(args.out)
    print(f"indexed {len(gallery)} images ({gallery.embed_dim}-d, {args.index_type}) -> {args.out}")
    return gallery


def search_main(argv: Sequence[str] | None = None) -> list[list[SearchHit]]:
    """``temde-hf search``: top-k gallery items for text and/or image queries."""
    parser = argparse.ArgumentParser(prog="temde-hf search", description="query a gallery index")
    parser.add_argument("--index", required=True, help="folder written by `temde-hf index`")
    parser.add_argument("--text", action="append", default=[], help="text query (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="image query path (repeatable)")
    parser.add_argument("-k", "--top-k", type=int, default=5)
    parser.add_argument("--model", help="checkpoint (default: the one recorded in the index)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    gallery = GalleryIndex.load(args.index)
    model, processor = load_model_and_processor(args.model or gallery.model_path)
    hits = search(gallery, model, processor, texts=args.text, images=args.image, k=args.top_k)
    queries = [f"text: {t}" for t in args.text] + [f"image: {p}" for p in args.image]
    if args.json:
        print(
            json.dumps(
                [{"query": q, "hits": [vars(h) for h in row]} for q, row in zip(queries, hits)], indent=1
            )
        )
    else:
        for query, row in zip(queries, hits):
            print(query)
            for hit in row:
                print(f"  {hit.rank:>3}  {hit.score:8.4f}  {hit.id}")
    return hits
