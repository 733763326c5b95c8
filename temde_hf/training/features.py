"""Cached outputs of a frozen tower: computed once, on disk, then the training loop reads them per batch.

A frozen tower gives the same output for an item every epoch. With ``--cache_tower_outputs`` (default)
the trainer runs each frozen tower once over the training and evaluation items and stores its tokens
and pooled output (and, with `TemdeConfig.sketch_vision_feature_layers`, the vision tower's extra hidden
states that the sketch also reads) in a memory-mapped cache (`temde_hf.training.tower_cache`: the file
format, and why that one); the batches then carry the rows they need and `TemdeModel.forward(vision_outputs=...,
text_outputs=...)` skips the tower. The cached tensors are exactly what the tower would feed the head,
so the trained model embeds raw pixels and captions identically (up to the cache's dtype). A tower whose
top blocks train (``--*_trainable_layers N``) is cached the same way below its first trainable block
(`temde_hf.training.tower_split`): the batches carry that hidden state and each step runs the top blocks.

The pass that fills a cache (`build_tower_cache`):

- writes batch by batch into the final file: memory stays one batch whatever the dataset size;
- runs the tower with onnxruntime when it is installed and the tower runs on CPU (a graph of the
  tower's outputs, `temde_hf.export.tower_graph`, exported once, and used only if it matches the eager
  tower on a few probe items), else eagerly, in bfloat16 autocast and channels-last on a GPU;
- decodes images in DataLoader workers while the tower runs, and takes captions in length order (a
  batch pads to its longest caption: sorted batches pad little);
- under `accelerate launch`, shards the batches over the processes (batch ``b`` to process
  ``b % world_size``), each writing its rows into the same file: the result equals a one-process build;
- resumes an interrupted build from the batches already written.

Storage is float16 by default (``--feature_cache_dtype``): half the disk and page cache of float32;
``benchmarks/scale.py`` reports the rounding against the float32 eager rows.

The folder name is a hash of everything the outputs depend on (the tower's config and weights, the
processor, the items, the caption length, the dtype), so runs that share a cache folder (folds, seeds,
recipes) compute each tower's outputs once, and a changed tower or dataset never reads a stale cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..export.tower_graph import run_tower
from ..inference.cpu_batching import images_per_forward, in_chunks
from .tower_cache import (
    PLAN,
    TORCH_DTYPES,
    CachePlan,
    CacheWriter,
    RowView,
    StaleCacheError,
    TowerOutputs,
    _read_json,
    is_complete,
)

logger = logging.getLogger(__name__)

DTYPES = TORCH_DTYPES
BACKENDS = ("auto", "onnx", "torch")
# onnxruntime vs eager on the first batch, relative to the outputs' scale: above this the graph is not used
ONNX_TOLERANCE = 1e-4
PROBE_ITEMS = 4  # items run eagerly to learn the output shapes and to check the ONNX graph

__all__ = [
    "BACKENDS",
    "DTYPES",
    "RowView",
    "StaleCacheError",
    "TowerOutputs",
    "build_tower_cache",
    "cache_key",
    "caption_lengths",
    "tower_fingerprint",
]


def tower_fingerprint(tower: nn.Module) -> str:
    """A hash of a tower's config and weights (what its outputs depend on besides the inputs)."""
    digest = hashlib.sha1()
    config = getattr(tower, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
        # not in the JSON, but it changes the outputs (e.g. whether a text tower masks its padding)
        digest.update(str(getattr(config, "_attn_implementation", None)).encode())
    for name, tensor in tower.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable `parts`."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Batches(Dataset):
    """Item ``i`` = (batch index, the tower's inputs for that batch): built in DataLoader workers."""

    def __init__(self, make_inputs: Callable[[Sequence[int]], dict], writer: CacheWriter, batches: list[int]):
        self.make_inputs, self.writer, self.batches = make_inputs, writer, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, dict[str, torch.Tensor]]:
        return self.batches[i], self.make_inputs(self.writer.rows(self.batches[i]))


class EagerTower:
    """`run_tower` on `device`; on a GPU in bfloat16 autocast with channels-last images (faster, same head)."""

    def __init__(self, tower: nn.Module, device: torch.device | str, layers: Sequence[int] = ()) -> None:
        self.tower, self.device, self.layers = tower, torch.device(device), tuple(layers)
        self.gpu = self.device.type == "cuda"
        if self.gpu:
            self.tower = self.tower.to(memory_format=torch.channels_last)

    def restore(self) -> None:
        """Back to the default memory format (the tower is saved with the model: contiguous weights)."""
        if self.gpu:
            self.tower.to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """-> (tokens, pooled, then each extra hidden state as tokens), as `run_tower`, in float32."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        if self.gpu and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu else contextlib.nullcontext()
        with autocast:
            outputs = run_tower(self.tower, inputs, self.layers)
        return tuple(value.float() for value in outputs)


def _onnx_graph(
    tower: nn.Module,
    example: dict[str, torch.Tensor],
    graph: Path,
    reference: tuple[torch.Tensor, ...],
    layers: Sequence[int] = (),
) -> bool:
    """Export `tower` to `graph` (once) and check it against the eager `reference` outputs of `example`.

    Returns:
        Whether the graph is there and matches; a graph that does not match is deleted (eager is used).
    """
    from ..export.tower_graph import OnnxTower, export_tower

    try:
        if not graph.is_file():
            export_tower(tower, example, graph, layers)
        outputs = OnnxTower(graph)(example)
    except Exception as error:  # any failure to export or run the graph: the eager pass is always right
        logger.warning("no ONNX graph of the tower (%s): caching eagerly", error)
        graph.unlink(missing_ok=True)
        return False
    if len(outputs) != len(reference):  # a graph of other outputs (never expected: the name says which)
        graph.unlink()
        return False
    scale = max(1.0, *(float(value.abs().max()) for value in reference))
    diff = max(float((value - ref).abs().max()) for value, ref in zip(outputs, reference))
    if diff <= ONNX_TOLERANCE * scale:
        logger.info("ONNX tower graph %s: largest |onnxruntime - eager| %.2e", graph.name, diff)
        return True
    logger.warning("ONNX tower graph differs from eager by %.2e: caching eagerly", diff)
    graph.unlink()
    return False


def _onnx_usable(backend: str, device: torch.device | str) -> bool:
    if backend == "torch" or torch.device(device).type != "cpu":
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        if backend == "onnx":
            raise ImportError(
                "--feature_cache_backend onnx needs onnxruntime: pip install 'temde_hf[onnx]'"
            ) from err
        return False
    return True


def build_tower_cache(
    folder: str | Path,
    key: str,
    tower: nn.Module,
    make_inputs: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    n_items: int,
    *,
    batch_size: int,
    dtype: str = "float16",
    lengths: Sequence[int] | Callable[[], Sequence[int]] | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    graph_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    wait: Callable[[], None] = lambda: None,
    desc: str = "frozen tower",
    images_per_call: int | str | None = "auto",
    layers: Sequence[int] = (),
) -> TowerOutputs:
    """The finished cache in `folder` for `key`, building (or resuming) it first if needed.

    Collective: every process of the run calls it with the same arguments (`rank`, `world_size` and
    `wait`, a barrier, from the accelerator); each fills its share of the batches.

    Args:
        folder: The cache folder (its name should carry `key`).
        key: The cache key (`cache_key` of everything the outputs depend on).
        tower: The frozen tower (eval mode), or the frozen lower part of one
            (`temde_hf.training.tower_split.LowerTower`).
        make_inputs: Item indices -> the tower's inputs (``pixel_values``, or ``input_ids`` +
            ``attention_mask``); called in DataLoader workers when `num_workers` > 0.
        n_items: Number of items.
        batch_size: Items per forward (and per unit of progress).
        dtype: Storage dtype: ``float32`` | ``float16`` | ``bfloat16``.
        lengths: Text: every item's token count (or a function giving them, called only when a new build
            starts): rows hold the longest, and build batches group items of similar length (far less
            padding than batches in caption order). ``None`` (images): row order, the first items' shape.
        backend: ``auto`` (onnxruntime when installed and on CPU), ``onnx`` or ``torch``.
        device: Where an eager tower runs.
        num_workers: DataLoader workers making the inputs (image decoding) while the tower runs.
        graph_dir: Where the tower's ONNX graph is kept (default: beside the cache folder).
        rank: This process's index.
        world_size: Number of processes.
        wait: A barrier over all processes (``accelerator.wait_for_everyone``).
        desc: Progress-bar label.
        images_per_call: Images per tower forward (a build batch is run in chunks of this many):
            ``"auto"``, a few on a CPU (`temde_hf.inference.cpu_batching`), the whole batch on a GPU;
            ``None``: the whole batch.
        layers: Non-negative indices into the tower's `hidden_states` also stored (as tokens), one array
            each: the vision maps of `TemdeConfig.sketch_vision_feature_layers` (the model's
            ``sketch_feature_layers``). They belong in `key` too (another set is another cache).

    Raises:
        ImportError: ``backend="onnx"`` without onnxruntime.
    """
    folder = Path(folder)
    layers = [int(i) for i in layers]
    if is_complete(folder, key):
        return _with_layers(TowerOutputs(folder, key), layers)
    use_onnx = _onnx_usable(backend, device)
    eager = EagerTower(tower, device, layers)
    if rank == 0:
        # A few items give the output shapes (a new build) and check the graph against eager: every
        # batch, the first included, then goes through the fast path.
        probe = None
        plan = _resumable_plan(folder, key, dtype, batch_size, n_items, layers)
        if plan is None:
            logger.info("computing the frozen tower's outputs once: %s", folder.name)
            probe = make_inputs(list(range(min(PROBE_ITEMS, n_items))))
            hidden, pooled, *maps = eager(probe)
            counts = None if lengths is None else np.asarray(lengths() if callable(lengths) else lengths)
            n_tokens = hidden.shape[1] if counts is None else int(counts.max())
            # a tower whose tokens are a map's cells (a split's convolutional lower part) names its grid
            plan = CachePlan(key, n_items, n_tokens, hidden.shape[2], pooled.shape[1], dtype,
                             "attention_mask" in probe, batch_size, ordered=counts is not None,
                             grid=getattr(tower, "grid", None),
                             layers=[[i, m.shape[1], m.shape[2]] for i, m in zip(layers, maps)] or None)  # fmt: skip
            order = None if counts is None else np.argsort(counts, kind="stable")
            CacheWriter(folder, plan).prepare(order)
        else:
            CacheWriter(folder, plan).prepare()  # resumed: keeps its files, its order and the batches written
        graph = _graph_path(graph_dir, folder, tower, plan) if use_onnx else None
        if graph is not None and not graph.is_file() and len(CacheWriter(folder, plan).pending()):
            probe = _longest(probe or make_inputs(list(range(min(PROBE_ITEMS, n_items)))), plan.tokens)
            _onnx_graph(tower, probe, graph, eager(probe), layers)
    wait()
    plan = CachePlan(**_read_json(folder / PLAN))
    writer = CacheWriter(folder, plan)
    run = eager
    graph = _graph_path(graph_dir, folder, tower, plan) if use_onnx else None
    if graph is not None and graph.is_file():
        from ..export.tower_graph import OnnxTower

        run = OnnxTower(graph)
    pending = writer.pending(rank, world_size)
    # its own generator: an iterator would draw its workers' seed from the global RNG, so a run that
    # builds a cache would train with other random numbers (dropout) than one that does not
    loader = DataLoader(
        _Batches(make_inputs, writer, pending),
        batch_size=None,
        num_workers=num_workers if pending else 0,
        generator=torch.Generator().manual_seed(0),
    )
    bar = tqdm(total=len(pending), desc=f"{desc} [{'onnx' if run is not eager else 'torch'}]", unit="batch",
               disable=rank != 0)  # fmt: skip
    if images_per_call == "auto":
        images_per_call = images_per_forward(device)
    for batch, inputs in _iterate(loader):
        if "pixel_values" in inputs:
            hidden, pooled, *maps = in_chunks(
                lambda x: run({"pixel_values": x}), inputs["pixel_values"], images_per_call
            )
        else:
            hidden, pooled, *maps = run(inputs)
        writer.write(batch, hidden, pooled, inputs.get("attention_mask"), tuple(maps))
        bar.update()
    bar.close()
    eager.restore()
    wait()
    if rank == 0:
        writer.finish()
    wait()
    return _with_layers(TowerOutputs(folder, key), layers)


def _with_layers(outputs: TowerOutputs, layers: list[int]) -> TowerOutputs:
    """`outputs`, if it holds exactly the extra hidden states `layers` (a key that left them out would
    otherwise hand a model a cache without the maps its sketch reads, or with others)."""
    stored = [index for index, *_ in outputs.plan.layers or ()]
    if stored != layers:
        raise StaleCacheError(
            f"{outputs.folder}: cache with extra hidden states {stored}, but {layers} were asked for: "
            "put the layers in the cache key (a folder per set)"
        )
    return outputs


def caption_lengths(
    tokenizer: Any, captions: Sequence[str], max_length: int, chunk: int = 4096
) -> np.ndarray:
    """`(n,)` int32 tokens of each caption after truncation to `max_length` (a text cache's `lengths`)."""
    lengths = np.empty(len(captions), dtype=np.int32)
    for start in range(0, len(captions), chunk):  # chunks: token lists of all captions would be large
        ids = tokenizer(list(captions[start : start + chunk]), truncation=True, max_length=max_length)
        lengths[start : start + len(ids["input_ids"])] = [len(i) for i in ids["input_ids"]]
    return lengths


def _graph_path(graph_dir: str | Path | None, folder: Path, tower: nn.Module, plan: CachePlan) -> Path:
    """The tower's graph: it depends on the weights, (text) the traced length and the extra hidden states
    it outputs only, not on the items."""
    extra = "".join(f"-l{index}" for index, *_ in plan.layers or ())
    name = f"{tower_fingerprint(tower)[:16]}-{plan.tokens}{extra}.onnx"
    return Path(graph_dir or folder.parent / "graphs") / name


def _iterate(loader: DataLoader) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    with torch.inference_mode():
        yield from loader


def _longest(inputs: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """Text inputs padded to `tokens` (the graph is traced at its longest length); images unchanged."""
    if "input_ids" not in inputs:
        return inputs
    pad = tokens - inputs["input_ids"].shape[1]
    # pad id 0 under a 0 mask: the tower ignores those positions
    return {k: torch.nn.functional.pad(v, (0, pad)) for k, v in inputs.items()}


def _resumable_plan(
    folder: Path, key: str, dtype: str, batch_size: int, n_items: int, layers: list[int]
) -> CachePlan | None:
    """The plan of an interrupted build of the same cache (and extra hidden states) in `folder`, or ``None``."""
    saved = _read_json(folder / PLAN)
    if saved is None:
        return None
    try:
        plan = CachePlan(**saved)
    except TypeError:
        return None
    wanted = {"key": key, "dtype": dtype, "batch_size": batch_size, "n_items": n_items}
    if any(asdict(plan)[name] != value for name, value in wanted.items()):
        return None
    if [index for index, *_ in plan.layers or ()] != layers:
        return None
    return plan
