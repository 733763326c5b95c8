"""Adding a part is one decorated class: the config accepts it, the model builds it, the trainer trains it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from temde_hf import LOSSES, POOLING_HEADS, TemdeModel
from temde_hf.models.temde.pooling_temde import PoolingHead
from temde_hf.testing import save_tiny_towers, tiny_config


@pytest.fixture
def max_head():
    @POOLING_HEADS.register("max_test")
    class MaxHead(PoolingHead):
        """Masked max over tokens, plus a learned offset (so the head has a parameter to save)."""

        def __init__(self, config) -> None:
            super().__init__(config)
            self.offset = torch.nn.Parameter(torch.zeros(config.projection_dim))

        def forward(self, tokens, mask, pooled):
            return tokens.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1) + self.offset

    yield MaxHead
    del POOLING_HEADS["max_test"]


def test_a_registered_head_is_configured_trained_saved_and_reloaded(max_head, tmp_path: Path) -> None:
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    assert "max_test" in POOLING_HEADS and isinstance(
        TemdeModel(tiny_config(pooling="max_test")).pooling, max_head
    )
    vision, text = save_tiny_towers(tmp_path / "towers")
    out = tmp_path / "run"
    main([
        "--vision_model_path", str(vision), "--text_model_path", str(text), "--pooling", "max_test",
        "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3",
        "--data", str(make_synthetic_karpathy(tmp_path / "data", n_images=12, seed=0)),
        "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2", "--max_eval_images", "0", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    loaded = TemdeModel.from_pretrained(out / "final")
    assert isinstance(loaded.pooling, max_head) and loaded.config.pooling == "max_test"
    assert loaded.pooling.offset.abs().sum() > 0  # trained one step, saved, reloaded


def test_unknown_names_point_at_the_registry() -> None:
    with pytest.raises(
        ValueError, match=r"pooling='max'.*pooler, cls, mean, attention.*@POOLING_HEADS.register"
    ):
        tiny_config(pooling="max")
    with pytest.raises(ValueError, match="already registered"):
        POOLING_HEADS.register("mean")(PoolingHead)
    assert set(LOSSES) >= {"info_nce", "vse_hinge"}
