"""ONNX graphs of a frozen tower's outputs (what the T-EMDE head reads), run with onnxruntime to cache them.

`run_tower` is the one definition of those outputs: the tower's ``last_hidden_state`` as tokens
`(B, L, C)` (a convolutional map `(B, C, h, w)` becomes ``h·w`` tokens) and its pooled output `(B, C')`
(the first token where the tower has no pooler), and, when `layers` are asked for (the vision tower's maps
that `TemdeConfig.sketch_vision_feature_layers` also feeds to the sketch), those hidden states as tokens
`(B, L_i, C_i)`. The eager cache pass calls it directly; `export_tower` traces it with the exporter of
``temde-hf export-onnx`` into a graph with the outputs ``hidden``, ``pooled`` (and ``layer<i>`` for each
asked state ``i``), and `OnnxTower` runs that graph.

Inputs: ``pixel_values`` `(B, 3, H, W)` for an image tower; ``input_ids`` + ``attention_mask`` `(B, L)`
for a text tower (any ``L`` up to the traced length).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..inference.onnx_runtime import cpu_session_options, require_onnxruntime
from ..models.temde.modeling_temde import _as_tokens
from .onnx_export import _export

OUTPUTS = ["hidden", "pooled"]


def layer_names(layers: Sequence[int]) -> list[str]:
    """The graph outputs (and cache arrays) of hidden states `layers`: ``layer<i>``."""
    return [f"layer{i}" for i in layers]


def run_tower(
    tower: nn.Module, inputs: dict[str, torch.Tensor], layers: Sequence[int] = ()
) -> tuple[torch.Tensor, ...]:
    """One forward of a tower -> (tokens `(B, L, C)`, pooled `(B, C')`, then hidden state ``i`` as tokens
    `(B, L_i, C_i)` for each ``i`` in `layers`: non-negative indices into the tower's `hidden_states`)."""
    asked = {"output_hidden_states": True} if layers else {}
    if "pixel_values" in inputs:
        output = tower(pixel_values=inputs["pixel_values"], return_dict=True, **asked)
    else:
        output = tower(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True, **asked
        )
    hidden = _as_tokens(output.last_hidden_state)
    pooled = getattr(output, "pooler_output", None)
    maps = tuple(_as_tokens(output.hidden_states[i]) for i in layers)
    return hidden, (pooled if pooled is not None else hidden[:, 0]).flatten(1), *maps


class _TowerGraph(nn.Module):
    def __init__(self, tower: nn.Module, names: list[str], layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.tower, self.names, self.layers = tower, names, tuple(layers)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, pooled, *maps = run_tower(self.tower, dict(zip(self.names, args)), self.layers)
        return hidden.contiguous(), pooled, *(m.contiguous() for m in maps)


def export_tower(
    tower: nn.Module, example: dict[str, torch.Tensor], path: str | Path, layers: Sequence[int] = ()
) -> Path:
    """Trace `tower` on `example` (its inputs; text at the longest length it will see) into `path`, with
    the outputs of `run_tower(tower, example, layers)`.

    The file appears only once complete (written beside it, then renamed), so a graph file that exists
    is whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = ["pixel_values"] if "pixel_values" in example else ["input_ids", "attention_mask"]
    args = tuple(example[name].cpu() for name in names)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    training = tower.training
    try:
        _export(_TowerGraph(tower.cpu(), names, layers), args, tmp, names, [*OUTPUTS, *layer_names(layers)])
    finally:
        tower.train(training)
    os.replace(tmp, path)
    return path


class OnnxTower:
    """An exported tower graph in an onnxruntime CPU session, called like `run_tower`.

    Args:
        path: The graph written by `export_tower`.
        threads: Intra-op threads (default: torch's, so processes sharing a machine split it alike).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        options = cpu_session_options(threads or torch.get_num_threads())
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]  # hidden, pooled, then any layer<i>

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feed: dict[str, Any] = {}
        for name in self.names:
            value = inputs[name].detach().cpu().numpy()
            feed[name] = value.astype(np.float32 if name == "pixel_values" else np.int64, copy=False)
        return tuple(torch.from_numpy(value) for value in self.session.run(self.outputs, feed))
