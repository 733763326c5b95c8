"""Cached outputs of a frozen tower: computed once, then the training loop reads them instead of the tower.

A frozen tower gives the same output for an item every epoch. With ``--cache_tower_outputs`` (default)
the trainer runs each frozen tower once over the training and evaluation items, stores its
``last_hidden_state`` (as tokens) and pooled output in a safetensors file, and the batches then carry
those tensors; `TemdeModel.forward(vision_outputs=..., text_outputs=...)` skips the tower. The cached
tensors are exactly what the tower would feed the head, so the trained model embeds raw pixels and
captions identically (up to the cache's dtype).

The file name is a hash of everything the outputs depend on (the tower's config and weights, the
processor, the items, the caption length, the dtype), so runs that share a cache folder (folds, seeds,
recipes) compute each tower's outputs once, and a changed tower or dataset never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

# The model's own reshape of tower outputs, so cached tokens are laid out as the live forward's.
from ..models.temde.modeling_temde import _as_tokens

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TowerOutputs:
    """One tower's outputs for a list of items.

    Attributes:
        hidden: `(n, tokens, C)` the tower's `last_hidden_state` as tokens (zero-padded for text).
        pooled: `(n, C)` its pooled output (the first token where the tower has no pooler).
        mask: `(n, tokens)` int64, 1 for real tokens (text only; ``None`` for images).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def save(self, path: Path) -> None:
        tensors = {"hidden": self.hidden.contiguous(), "pooled": self.pooled.contiguous()}
        if self.mask is not None:
            tensors["mask"] = self.mask.contiguous()
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # atomic: an interrupted run never leaves a truncated cache

    @classmethod
    def load(cls, path: Path) -> TowerOutputs:
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path}: damaged tower-output cache ({error}); delete the file and it is recomputed"
            ) from error
        return cls(hidden=tensors["hidden"], pooled=tensors["pooled"], mask=tensors.get("mask"))


def _pooled(output: Any) -> torch.Tensor:
    pooled = getattr(output, "pooler_output", None)
    return (pooled if pooled is not None else _as_tokens(output.last_hidden_state)[:, 0]).flatten(1)


@torch.inference_mode()
def compute_tower_outputs(
    tower: nn.Module,
    make_inputs: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    n_items: int,
    *,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    desc: str,
) -> TowerOutputs:
    """Run a frozen tower over `n_items` items, batch by batch.

    Args:
        tower: The vision or text tower (in eval mode).
        make_inputs: Item indices -> the tower's inputs (`ImageInputs` / `TextInputs` without a cache).
        n_items: Number of items.
        batch_size: Items per forward.
        device: Where the tower runs.
        dtype: Storage dtype of the outputs.
        desc: Progress-bar label.
    """
    hidden, pooled, masks = [], [], []
    for start in tqdm(range(0, n_items, batch_size), desc=desc, unit="batch"):
        inputs = make_inputs(range(start, min(start + batch_size, n_items)))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            output = tower(pixel_values=inputs["pixel_values"], return_dict=True)
        else:
            output = tower(**inputs, return_dict=True)
            masks.append(inputs["attention_mask"].cpu())
        hidden.append(_as_tokens(output.last_hidden_state).to("cpu", dtype))
        pooled.append(_pooled(output).to("cpu", dtype))
    if not masks:
        return TowerOutputs(torch.cat(hidden), torch.cat(pooled))
    # Captions of different batches have different lengths: pad every batch to the longest.
    length = max(h.shape[1] for h in hidden)
    hidden = [torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden]
    masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return TowerOutputs(torch.cat(hidden), torch.cat(pooled), torch.cat(masks).long())


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


def cached_tower_outputs(
    path: Path, compute: Callable[[], TowerOutputs], *, is_main_process: bool, wait: Callable[[], None]
) -> TowerOutputs:
    """Load `path`, or compute it on the main process, save it, and let the others load it.

    Args:
        path: The cache file (its name carries the `cache_key`).
        compute: Builds the outputs (`compute_tower_outputs` with its arguments bound).
        is_main_process: Whether this process computes and writes the file.
        wait: A barrier over all processes (``accelerator.wait_for_everyone``).
    """
    if not path.is_file() and is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("computing the frozen tower's outputs once: %s", path.name)
        compute().save(path)
    wait()
    return TowerOutputs.load(path)
