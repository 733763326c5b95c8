"""Shared test settings and fixtures: offline, CPU, deterministic, the `gpu` marker, shared data.

Builders (tiny models, checkpoints, galleries, subprocess runners) live in `temde_hf.testing`; this file
only turns the ones many tests share into fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from temde_hf.testing import import_script, make_colour_gallery

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO.parent / "shared"
FLICKR8K_DIR = SHARED_DIR / "data" / "flickr8k-800"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K_DIR / "dataset_flickr8k.json").is_file():
        pytest.fail(
            f"the shared Flickr8k sample is missing at {FLICKR8K_DIR}; clone the project beside shared/"
        )
    return FLICKR8K_DIR


@pytest.fixture(scope="session")
def colour_gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`temde_hf.testing.make_colour_gallery`, written once per session (read-only): colour -> PNG path."""
    return make_colour_gallery(tmp_path_factory.mktemp("colour_gallery"))


@pytest.fixture(scope="session")
def space_app() -> ModuleType:
    """The Gradio search demo, `examples/space/app.py`, imported as a module (not launched)."""
    return import_script(REPO / "examples" / "space" / "app.py", "temde_space_app")
