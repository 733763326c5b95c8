"""Nothing outside training loads pickle-based weights: every entry point refuses them with one line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temde_hf.data import make_synthetic_karpathy
from temde_hf.testing import save_tiny_checkpoint, save_tiny_towers


class _MakesMarker:
    """Unpickling this creates a folder: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def _pickle_only(folder: Path) -> Path:
    """Replace the folder's safetensors weights by the same weights as a (loadable) pickle file."""
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


@pytest.fixture(scope="module")
def pickle_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pickle_only(save_tiny_checkpoint(tmp_path_factory.mktemp("pickle") / "ckpt"))


def test_evaluate_space_app_and_publish_refuse_pickle_weights(
    pickle_checkpoint: Path, space_app, tmp_path: Path
) -> None:
    from temde_hf.evaluation.cli import main as evaluate
    from temde_hf.hub.publish import export_for_hub

    data = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=1)
    message = r"ckpt: weights only in a pickle format \(pytorch_model\.bin\).*refused.*model\.safetensors"
    with pytest.raises(ValueError, match=message):
        evaluate([str(pickle_checkpoint), "--data", str(data), "--output-dir", str(tmp_path / "eval")])
    with pytest.raises(ValueError, match=message):
        space_app.SearchApp(pickle_checkpoint, tmp_path / "index", ["a caption"])
    with pytest.raises(ValueError, match=message):
        export_for_hub(pickle_checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_malicious_pickle_is_never_opened(tmp_path: Path) -> None:
    from temde_hf.evaluation.cli import main as evaluate

    data = make_synthetic_karpathy(tmp_path / "syn", n_images=4, seed=1)
    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_MakesMarker(marker)))
    with pytest.raises(ValueError, match="pickle format"):
        evaluate([str(folder), "--data", str(data), "--output-dir", str(tmp_path / "eval")])
    assert not marker.exists()


def test_endpoint_handler_refuses_pickle_weights(pickle_checkpoint: Path) -> None:
    from temde_hf.hub.handler import EndpointHandler

    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        EndpointHandler(str(pickle_checkpoint))


def test_pretrained_towers_load_from_safetensors_only(tmp_path: Path) -> None:
    from temde_hf import TemdeModel

    vision_dir, text_dir = save_tiny_towers(tmp_path)
    _pickle_only(text_dir)
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        TemdeModel.from_vision_text_pretrained(vision_dir, text_dir, projection_dim=8)
