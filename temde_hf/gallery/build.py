"""Build a gallery index from millions of images: sharded over processes, streamed, resumable.

    accelerate launch -m temde_hf.cli index --model CKPT --images photos/ --out gallery_index/

The image list is cut into shards of ``shard_size`` rows; process ``r`` of ``w`` encodes shards
``r, r + w, r + 2w, ...`` (streaming images batch by batch) and writes each as
``shards/shard-NNNNN.safetensors`` (embeddings + the rows they belong to) plus a JSON of the images it
skipped as unreadable, atomically (temporary file + rename), so a shard on disk is always complete.
After a barrier, rank 0 trains the index on a sample of the shards and adds them one at a time, so no
process ever holds the whole gallery's embeddings. Run the same command again after an interruption
and every finished shard is kept: only the missing ones are encoded.

With ``--store-tokens`` each shard also carries its images' joint-space tokens (float16, padded rows +
lengths, from the same forward pass), and rank 0 streams them shard by shard into the index folder's
``tokens.fp16.safetensors`` (see `tokens`), the store a second-stage rerank reads.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inference.encode import SkippedImage, iter_image_features
from ..inference.encoder import load_encoder
from ..inference.fingerprint import checkpoint_fingerprint
from ..inference.tokens import TokenSet, gather_encoded
from .index import GalleryIndex
from .sources import ImageList
from .spec import DEFAULT_MEMORY_BUDGET, IndexSpec, parse_spec
from .tokens import TOKENS_FILE, read_token_file, token_lengths, write_token_file

logger = logging.getLogger("temde_hf.gallery")

SHARD_DIR, MANIFEST = "shards", "build.json"
# A rank that finished its shards waits at the barrier for the others; encoding can take hours.
BARRIER_TIMEOUT = timedelta(hours=72)


@dataclass
class BuildSettings:
    """How ``temde-hf index`` builds (saved in ``build.json`` for resuming).

    Attributes:
        index_type: ``"auto"`` or one of `INDEX_TYPES`.
        memory_budget: Bytes of index memory the automatic choice may use.
        shard_size: Images per shard (the unit of resuming).
        batch_size: Images per forward pass.
        backend: Encoder backend (`temde_hf.inference.encoder.BACKENDS`).
        shard_dtype: ``"float32"`` (exact) or ``"float16"`` (half the disk) for the shard files.
        on_error: ``"skip"`` unreadable images (counted and listed) or ``"raise"``.
        store_tokens: Also keep every image's joint-space tokens (float16) for a second-stage rerank;
            needs the eager PyTorch encoder (``backend`` ``"auto"`` then means ``"torch"``).
    """

    index_type: str = "auto"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    shard_size: int = 10_000
    batch_size: int = 32
    backend: str = "auto"
    shard_dtype: str = "float32"
    on_error: str = "skip"
    spec_overrides: dict[str, Any] | None = None
    store_tokens: bool = False

    def encoder_backend(self) -> str:
        """The backend the shards are encoded with (tokens come from eager PyTorch only)."""
        if not self.store_tokens:
            return self.backend
        if self.backend.startswith("onnx"):
            raise ValueError(
                f"--store-tokens reads the token embeddings, which --backend {self.backend} does not return; "
                "drop --backend (auto) or pass --backend torch"
            )
        return "torch"


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / SHARD_DIR / f"shard-{shard:05d}.safetensors"


def _write_shard(
    path: Path,
    rows: list[int],
    embeds: torch.Tensor,
    skipped: list[SkippedImage],
    dtype: str,
    tokens: TokenSet | None = None,
) -> None:
    """Write one shard atomically: readers never see a half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"rows": torch.tensor(rows, dtype=torch.int64), "embeds": embeds.to(getattr(torch, dtype))}
    if tokens is not None:  # (m, L, D) float16 + (m,) lengths, the layout of the index's token file
        tensors.update(tokens=tokens.tokens.to(torch.float16), lengths=token_lengths(tokens.mask))
    skip_path = path.with_suffix(".skipped.json")
    tmp_skip = skip_path.with_name(skip_path.name + ".tmp")
    tmp_skip.write_text(json.dumps([vars(s) for s in skipped]))
    os.replace(tmp_skip, skip_path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)  # the shard file appears last: its presence means the shard is complete


def shard_rows(path: Path) -> np.ndarray:
    """`(m,)` gallery rows of one shard (read without loading its embeddings)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.get_tensor("rows")


def shard_embeds(path: Path) -> np.ndarray:
    """`(m, E)` float32 embeddings of one shard."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.get_tensor("embeds").astype(np.float32, copy=False)


def _no_tokens(path: Path) -> ValueError:
    return ValueError(
        f"{path} holds no token embeddings (encoded without --store-tokens); pass a new --out, or delete the "
        "folder to encode again with --store-tokens"
    )


def shard_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`(m, L, D)` float16 tokens and `(m,)` lengths of one shard built with ``store_tokens``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        if "tokens" not in handle.keys():  # noqa: SIM118 (a safe_open handle is no container)
            raise _no_tokens(path)
        return handle.get_tensor("tokens"), handle.get_tensor("lengths")


def shard_skipped(path: Path) -> list[dict[str, Any]]:
    """The images this shard skipped: ``{"row", "source", "reason"}`` each."""
    listing = path.with_suffix(".skipped.json")
    try:
        skipped = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{listing}: unreadable ({' '.join(str(err).split())}); delete it and {path.name}, then run "
            "temde-hf index again to encode that shard anew"
        ) from err
    if not isinstance(skipped, list):
        raise ValueError(
            f"{listing}: not a JSON list; delete it and {path.name}, then run temde-hf index again"
        )
    return skipped


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """A resumed build must be the same build: same model, same image list, same sharding.

    Shards that carry tokens serve a build without them (the tokens are ignored), not the reverse.
    """
    path = out_dir / MANIFEST
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        saved = err
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path}: not the JSON object temde-hf index writes; pass a new --out, or delete the folder to "
            "start over"
        )
    changed = [key for key in manifest if key != "store_tokens" and saved.get(key) != manifest[key]]
    if changed:
        raise ValueError(
            f"{out_dir} holds shards of another build ({', '.join(changed)} differ); pass a new --out, or "
            "delete the folder to start over"
        )
    if manifest["store_tokens"] and not saved.get("store_tokens"):
        raise ValueError(
            f"{out_dir} holds shards encoded without token embeddings; pass a new --out, or delete the folder "
            "to encode them again with --store-tokens"
        )


def encode_shards(
    model_path: str | Path,
    source: ImageList,
    out_dir: str | Path,
    settings: BuildSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Encode this process's missing shards; returns ``{"encoded": a, "resumed": b}`` shard counts."""
    out_dir = Path(out_dir)
    n_shards = -(-len(source) // settings.shard_size)
    counts = {"encoded": 0, "resumed": 0}
    mine = [s for s in range(rank, n_shards, world_size)]
    todo = [s for s in mine if not shard_path(out_dir, s).is_file()]
    counts["resumed"] = len(mine) - len(todo)
    if not todo:
        return counts
    model, processor = load_encoder(model_path, backend=settings.encoder_backend())
    for shard in todo:
        start = shard * settings.shard_size
        stop = min(start + settings.shard_size, len(source))
        skipped: list[SkippedImage] = []
        batches = list(
            iter_image_features(
                model,
                processor,
                source.images,
                token_dtype=torch.float16 if settings.store_tokens else None,
                batch_size=settings.batch_size,
                start=start,
                stop=stop,
                on_error=settings.on_error,
                skipped=skipped,
                image_column=source.image_column,
                progress=progress,
                desc=f"shard {shard + 1}/{n_shards} (rank {rank})",
            )
        )
        # no batches when every image of the shard was unreadable: an empty shard is written
        rows, embeds, tokens = gather_encoded(batches, settings.store_tokens)
        _write_shard(shard_path(out_dir, shard), rows, embeds, skipped, settings.shard_dtype, tokens)
        counts["encoded"] += 1
    return counts


def _shard_files(out_dir: Path, n_shards: int) -> list[Path]:
    files = [shard_path(out_dir, s) for s in range(n_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(
            f"{out_dir / SHARD_DIR} lacks {len(missing)} shards ({missing[:3]} ...): run the build again"
        )
    return files


def _train_sample(files: list[Path], counts: list[int], size: int, seed: int = 0) -> np.ndarray | None:
    """`(size, E)` rows drawn evenly from every shard (training sees the whole gallery, not its start)."""
    if size == 0:
        return None
    rng = np.random.default_rng(seed)
    total = sum(counts)
    parts = []
    for file, count in zip(files, counts):
        take = min(count, int(np.ceil(size * count / max(total, 1))))
        if take:
            parts.append(shard_embeds(file)[np.sort(rng.choice(count, take, replace=False))])
    return np.concatenate(parts)[:size]


def merge_shards(
    out_dir: str | Path,
    source: ImageList,
    settings: BuildSettings,
    *,
    model_path: str | Path,
    global_dim: int | None = None,
) -> GalleryIndex:
    """Rank 0's step: train the index on a sample of the shards, then add them one by one (not saved)."""
    out_dir = Path(out_dir)
    files = _shard_files(out_dir, -(-len(source) // settings.shard_size))
    rows_per_shard = [shard_rows(f) for f in files]
    rows = np.concatenate(rows_per_shard)
    skipped = [entry for f in files for entry in shard_skipped(f)]
    if len(rows) == 0:
        raise ValueError(
            f"no image of {len(source)} could be read ({len(skipped)} skipped): nothing to index"
        )
    nonempty = [(f, len(r)) for f, r in zip(files, rows_per_shard) if len(r)]
    dim = int(shard_embeds(nonempty[0][0]).shape[1])
    spec: IndexSpec = parse_spec(
        settings.index_type,
        len(rows),
        dim,
        memory_budget=settings.memory_budget,
        global_dim=global_dim,
        **(settings.spec_overrides or {}),
    )
    logger.info("index %s (%s): %s", spec.kind, spec.factory(dim), spec.reason)
    sample = _train_sample([f for f, _ in nonempty], [c for _, c in nonempty], spec.train_size(len(rows)))
    gallery = GalleryIndex.build(
        spec,
        dim,
        sample,
        (shard_embeds(f) for f, _ in tqdm(nonempty, desc="add shards to the index", unit="shard")),
        [source.ids[r] for r in rows],
        paths=[source.paths[r] for r in rows],
    )
    gallery.model_path = str(Path(model_path).resolve())
    gallery.model_fingerprint = checkpoint_fingerprint(model_path)
    gallery.skipped = skipped
    if settings.store_tokens:
        token_file = merge_shard_tokens([f for f, _ in nonempty], out_dir / TOKENS_FILE)
        gallery.attach_tokens(read_token_file(token_file), token_file)
    gallery.build_info.update(
        shards=len(files), shard_size=settings.shard_size, shard_dtype=settings.shard_dtype
    )
    return gallery


def merge_shard_tokens(files: list[Path], out_path: Path) -> Path:
    """Stream the shards' tokens, in row order, into the index's token file (one shard in memory)."""
    from safetensors import safe_open

    lengths, dim = [], 0
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            if "tokens" not in handle.keys():  # noqa: SIM118 (a safe_open handle is no container)
                raise _no_tokens(file)
            lengths.append(handle.get_tensor("lengths"))
            dim = max(dim, handle.get_slice("tokens").get_shape()[2])
    batches = (shard_tokens(f)[0] for f in tqdm(files, desc="copy shard tokens", unit="shard"))
    return write_token_file(out_path, np.concatenate(lengths), dim, batches)


def global_dim_of(model_path: str | Path) -> int | None:
    """The global part's width of a ``concat`` checkpoint (its first ``projection_dim`` values), else None."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config["projection_dim"]) if config.get("sketch_fusion") == "concat" else None


def build_gallery_sharded(
    model_path: str | Path,
    source: ImageList,
    out_dir: str | Path,
    settings: BuildSettings | None = None,
    *,
    progress: bool = True,
) -> GalleryIndex | None:
    """Encode (sharded over the processes `accelerate launch` started, resuming) and index a gallery.

    Returns:
        The saved index on rank 0, None on the other ranks.
    """
    from accelerate import PartialState

    settings = settings or BuildSettings()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"--out {out_dir}: is a file; pass a folder for the index (new, or an earlier build)"
        )
    # Without CUDA, `cpu=True` is what makes a multi-process launch really distributed (gloo).
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    if state.num_processes > 1:
        # a live process group can abort the interpreter at exit; ending it at exit (not here) lets a
        # failing process print its error line first
        atexit.register(state.destroy_process_group)
    manifest = {
        "model_fingerprint": checkpoint_fingerprint(model_path),
        "images": source.digest(),
        "n_images": len(source),
        "shard_size": settings.shard_size,
        "shard_dtype": settings.shard_dtype,
        "store_tokens": settings.store_tokens,
    }
    settings.encoder_backend()  # refuse --store-tokens with an ONNX backend before any work
    if state.is_main_process:
        _check_manifest(out_dir, manifest)
    state.wait_for_everyone()
    if not state.is_main_process:
        _check_manifest(out_dir, manifest)
    counts = encode_shards(
        model_path,
        source,
        out_dir,
        settings,
        rank=state.process_index,
        world_size=state.num_processes,
        progress=progress and state.is_local_main_process,
    )
    logger.info(
        "rank %d: encoded %d shards, kept %d finished ones",
        state.process_index,
        counts["encoded"],
        counts["resumed"],
    )
    state.wait_for_everyone()
    gallery = None
    if state.is_main_process:
        gallery = merge_shards(
            out_dir, source, settings, model_path=model_path, global_dim=global_dim_of(model_path)
        )
        gallery.build_info.update(processes=state.num_processes)
        gallery.save(out_dir)
    state.wait_for_everyone()
    return gallery
