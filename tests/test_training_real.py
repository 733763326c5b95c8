"""A short real-data run of the one trainer: the real pretrained towers on a handful of shared photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from temde_hf.convert.towers import offline_towers
from temde_hf.training.train import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_towers_train_on_shared_photos(flickr8k_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    vision, text = offline_towers(tmp_path)  # converts EfficientNet-Lite0 (verified), finds MiniLM
    out = tmp_path / "run"
    metrics = main([
        str(REPO / "examples" / "configs" / "flickr8k_demo.yaml"),
        "--vision_model_path", str(vision), "--text_model_path", str(text),
        "--data", str(flickr8k_dir / "dataset_flickr8k.json"), "--output_dir", str(out),
        "--max_train_images", "12", "--max_eval_images", "6", "--max_steps", "3", "--eval_steps", "3",
        "--per_device_train_batch_size", "16", "--report_to", "none", "--disable_tqdm", "true",
        "--train_split", "train", "--eval_split", "val",  # the demo recipe trains on both, evaluates on none
        "--sketch_warmup_epochs", "0",  # 3 steps: the demo's warm-up epoch would leave the sketch undrawn
    ])  # fmt: skip
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert 0 <= metrics["eval_rsum"] <= 600
    model = AutoModel.from_pretrained(out / "final")
    assert model.config.vision_config.model_type == "efficientnet_lite"
    assert model.sketch is not None and bool(model.sketch.initialized)
    # the frozen vision tower's weights are the converted ImageNet ones, untouched by training
    converted = AutoModel.from_pretrained(vision)
    for name, value in converted.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value, msg=name)
