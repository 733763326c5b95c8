"""Gallery search: encode images once, keep them in a FAISS index, query by text or by image.

T-EMDE's similarity is one inner product of the fused embeddings (global part + sketch part), so a
gallery is an inner-product index over the model's retrieval embeddings and a search ranks as the
model's ``logits_per_text`` would (exactly for ``flat``; the other types trade a measured recall for
memory and speed, see `spec`).

Modules: `spec` (index types and the automatic choice), `index` (`GalleryIndex`: build, search,
save/load), `tokens` (the images' stored token embeddings, for a second-stage rerank), `sources`
(folder / file list / dataset), `build` (sharded, resumable encoding with `accelerate`), `api`
(in-memory build and query), `index_cli` / `search_cli` (``temde-hf index`` / ``search``).
"""

from .api import (
    build_gallery,
    build_gallery_from_dataset,
    build_gallery_from_folder,
    search,
)
from .build import BuildSettings, build_gallery_sharded
from .index import GalleryIndex, SearchHit
from .sources import ImageList, from_dataset, from_file_list, from_folder, list_images
from .spec import INDEX_TYPES, IndexSpec, choose_spec

__all__ = [
    "INDEX_TYPES",
    "BuildSettings",
    "GalleryIndex",
    "ImageList",
    "IndexSpec",
    "SearchHit",
    "build_gallery",
    "build_gallery_from_dataset",
    "build_gallery_from_folder",
    "build_gallery_sharded",
    "choose_spec",
    "from_dataset",
    "from_file_list",
    "from_folder",
    "list_images",
    "search",
]
