"""Run the ONNX graphs of ``temde-hf export-onnx`` with onnxruntime, behind the model's encode API.

`OnnxTemdeEncoder` has the two methods the batched encoder (`temde_hf.inference.encode`) calls,
``encode_image(pixel_values)`` and ``encode_text(input_ids, attention_mask)``, so ``evaluate``,
``index`` and ``search`` use it exactly like an eager `TemdeModel`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fingerprint import checkpoint_fingerprint
from .onnx_layout import int8_name, onnx_layout

INSTALL_HINT = "pip install 'temde_hf[onnx]' (onnxruntime + onnx)"


def require_onnxruntime() -> Any:
    """The onnxruntime module, or an ImportError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"the ONNX backend needs onnxruntime: {INSTALL_HINT}") from err
    return onnxruntime


def cpu_session_options(threads: int | None = None) -> Any:
    """onnxruntime options of every CPU session the package opens: `threads` intra-op threads (onnxruntime's
    default when None), and idle threads sleep instead of spinning. The DataLoader workers decoding the next
    images need the same cores between runs: with spinning, 2 decoding workers halved the speed of the
    training cache pass (`export.tower_graph`)."""
    options = require_onnxruntime().SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnx_available(checkpoint: str | Path) -> bool:
    """Whether the checkpoint has exported graphs and onnxruntime is installed."""
    checkpoint = Path(checkpoint)
    if not all((checkpoint / name).is_file() for name in onnx_layout(checkpoint)):
        return False
    try:
        require_onnxruntime()
    except ImportError:
        return False
    return True


class OnnxTemdeEncoder:
    """onnxruntime sessions of a checkpoint's exported encoders (CPU).

    Args:
        checkpoint: The checkpoint folder holding the graphs and ``onnx_export.json``.
        quantized: Use the int8 graphs (``temde-hf export-onnx --int8``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, one per core).

    Raises:
        ImportError: Without onnxruntime.
        ValueError: When the graphs are missing or were exported from other weights.
    """

    training = False
    device = torch.device("cpu")

    def __init__(
        self, checkpoint: str | Path, *, quantized: bool = False, threads: int | None = None
    ) -> None:
        ort = require_onnxruntime()
        checkpoint = Path(checkpoint)
        image_graph, text_graph, meta_file = onnx_layout(checkpoint)
        meta_path = checkpoint / meta_file
        if not meta_path.is_file():
            raise ValueError(
                f"{checkpoint} has no ONNX graphs ({meta_file}); run: temde-hf export-onnx {checkpoint}"
            )
        rerun = f"re-run: temde-hf export-onnx {checkpoint}{' --int8' * quantized}"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{meta_path}: unreadable ({' '.join(str(err).split())}); {rerun}") from err
        current = checkpoint_fingerprint(checkpoint)
        if meta.get("fingerprint") != current:
            raise ValueError(
                f"{meta_path}: the ONNX graphs were exported from other weights (fingerprint "
                f"{meta.get('fingerprint')} != {current}); re-run: temde-hf export-onnx {checkpoint}"
            )
        names = [int8_name(image_graph), int8_name(text_graph)] if quantized else [image_graph, text_graph]
        missing = [name for name in names if not (checkpoint / name).is_file()]
        if missing:
            raise ValueError(
                f"{checkpoint} lacks {missing}; run: temde-hf export-onnx {checkpoint}{' --int8' * quantized}"
            )
        options = cpu_session_options(threads)
        providers = ["CPUExecutionProvider"]
        sessions = []
        for name in names:
            try:
                sessions.append(ort.InferenceSession(str(checkpoint / name), options, providers=providers))
            except Exception as err:  # onnxruntime's own types (InvalidProtobuf, Fail, ...): a damaged graph
                detail = " ".join(str(err).split())[:200]
                raise ValueError(
                    f"{checkpoint / name}: not a readable ONNX graph ({detail}); {rerun}"
                ) from err
        self._image, self._text = sessions
        self.backend = "onnx-int8" if quantized else "onnx"
        try:
            self.embed_dim = int(meta["embed_dim"])
            self.image_size = tuple(meta["image_size"])
            self.max_text_length = int(meta["max_text_length"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{meta_path}: missing or malformed entry ({err}); {rerun}") from err

    def eval(self) -> OnnxTemdeEncoder:
        """No-op (inference only), so callers can treat this like a model."""
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, 3, H, W)` -> fused embeddings `(batch, E)`."""
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but the graph was exported for "
                f"{self.image_size}: use the checkpoint's own processor"
            )
        feed = {"pixel_values": pixel_values.detach().cpu().numpy().astype(np.float32, copy=False)}
        return torch.from_numpy(self._image.run(None, feed)[0])

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, seq)` token ids -> fused embeddings `(batch, E)`."""
        if input_ids.shape[1] > self.max_text_length:
            raise ValueError(
                f"a caption of {input_ids.shape[1]} tokens is longer than the {self.max_text_length} the ONNX "
                "text graph takes: pass max_length (--max-length) or re-export with --max-text-length"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feed = {
            "input_ids": input_ids.detach().cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.detach().cpu().numpy().astype(np.int64, copy=False),
        }
        return torch.from_numpy(self._text.run(None, feed)[0])
