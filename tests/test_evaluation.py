"""Encoding, the `temde-hf evaluate` command, the plot and the `evaluate` metric module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from temde_hf.data import DataError, caption_to_image, flat_captions, load_karpathy, make_synthetic_karpathy
from temde_hf.evaluation.metrics import retrieval_metrics
from temde_hf.evaluation.plots import recall_curve
from temde_hf.inference.encode import encode_dataset

METRIC_DIR = Path(__file__).resolve().parents[1] / "temde_hf" / "evaluation" / "retrieval_metric"


class FakeModel(nn.Module):
    """Embeds an image as its mean colour and a caption as its token-id statistics (order checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.grad_enabled: list[bool] = []

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        return pixel_values.mean(dim=(2, 3))  # (B, 3)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.grad_enabled.append(torch.is_grad_enabled())
        ids = (input_ids * attention_mask).float()
        return torch.stack([ids.sum(1), attention_mask.sum(1).float(), ids[:, 1]], dim=1)  # (B, 3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_karpathy(tmp_path_factory.mktemp("syn"), n_images=30, seed=4)


def test_encode_dataset_keeps_order_in_batches(synthetic: Path) -> None:
    from temde_hf.testing import tiny_processor

    dataset = load_karpathy(synthetic)
    processor = tiny_processor()
    model = FakeModel().train()
    images, texts, owner = encode_dataset(model, processor, dataset, batch_size=7)
    assert images.shape == (30, 3) and texts.shape == (150, 3)
    assert torch.equal(owner, caption_to_image(dataset))
    assert not any(model.grad_enabled) and model.training  # inference_mode inside, mode restored
    one = processor.image_processor(images=[dataset[11]["image"]], return_tensors="pt")["pixel_values"]
    assert torch.allclose(images[11], one.mean(dim=(2, 3))[0])
    caption = flat_captions(dataset)[57]
    ids = processor.tokenizer(caption, return_tensors="pt")["input_ids"][0]
    assert texts[57, 0] == ids.sum() and texts[57, 1] == len(ids)


def test_evaluate_command_on_tiny_checkpoint(synthetic: Path, tmp_path: Path) -> None:
    import transformers

    from temde_hf.evaluation.cli import main
    from temde_hf.testing import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval"
    result = main([str(checkpoint), "--data", str(synthetic), "--split", "all", "--output-dir", str(out),
                   "--fold-size", "10", "--batch-size", "8", "--device", "cpu"])  # fmt: skip
    written = json.loads((out / "metrics.json").read_text())
    assert written["full"] == result["full"] and written["n_images"] == 30 and written["n_captions"] == 150
    assert len(written["folds"]) == 3 and set(written["folds_mean"]) == set(written["full"])
    png = (out / "recall_at_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the same numbers straight from the model: the command loads, encodes and scores correctly
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    dataset = load_karpathy(synthetic)
    with torch.inference_mode():
        pixels = processor(images=[row["image"] for row in dataset], return_tensors="pt")["pixel_values"]
        text = processor(text=flat_captions(dataset), padding=True, return_tensors="pt")
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(text["input_ids"], text["attention_mask"])
    expected = retrieval_metrics(image_embeds @ text_embeds.T, caption_to_image(dataset))
    for key, value in expected.items():
        assert written["full"][key] == pytest.approx(value, abs=1e-3), key
    # a split filter and a missing split
    test_only = main([str(checkpoint), "--data", str(synthetic), "--output-dir", str(tmp_path / "t")])
    assert test_only["n_images"] == sum(row == "test" for row in dataset["split"])
    with pytest.raises(DataError, match="no images of split 'nope'"):
        main(
            [
                str(checkpoint),
                "--data",
                str(synthetic),
                "--split",
                "nope",
                "--output-dir",
                str(tmp_path / "n"),
            ]
        )


def test_evaluate_ranks_the_whole_set_once(synthetic: Path, tmp_path: Path, monkeypatch) -> None:
    # the metrics and the recall plot read the same ranks (COCO 5K: ~7 s of scoring each time)
    from temde_hf.evaluation import cli, folds
    from temde_hf.evaluation.metrics import retrieval_ranks
    from temde_hf.testing import save_tiny_checkpoint

    calls: list[int] = []

    def counted(**kwargs):
        calls.append(kwargs["image_embeds"].shape[0])
        return retrieval_ranks(**kwargs)

    monkeypatch.setattr(cli, "retrieval_ranks", counted)
    monkeypatch.setattr(folds, "retrieval_ranks", counted)
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    argv = [str(checkpoint), "--data", str(synthetic), "--split", "all", "--fold-size", "10"]
    result = cli.main([*argv, "--output-dir", str(tmp_path / "eval")])
    assert calls == [30, 10, 10, 10]  # the whole set once, then each fold
    assert len(result["folds"]) == 3 and (tmp_path / "eval" / "recall_at_k.png").is_file()


def test_recall_curve() -> None:
    ranks = torch.tensor([0, 0, 1, 4, 60])
    curve = recall_curve(ranks, 10)
    assert curve[0] == 40.0 and curve[1] == 60.0 and curve[4] == 80.0 and curve[9] == 80.0


def test_evaluate_metric_module_loads_offline() -> None:
    import evaluate

    gen = torch.Generator().manual_seed(3)
    owner = torch.randint(0, 12, (40,), generator=gen)
    owner[:12] = torch.arange(12)  # every image has a caption
    sim = torch.randn(12, 40, generator=gen)
    from temde_hf.evaluation.retrieval_metric import load_retrieval_metric

    metric = evaluate.load(str(METRIC_DIR))
    assert type(load_retrieval_metric()).__name__ == type(metric).__name__ == "RetrievalMetric"
    for start in range(0, 40, 16):  # streamed in batches like any `evaluate` metric
        metric.add_batch(
            predictions=sim.T[start : start + 16].tolist(), references=owner[start : start + 16].tolist()
        )
    result = metric.compute()
    expected = retrieval_metrics(sim, owner)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-4), key


def test_evaluate_command_csv_splits_and_skips(flickr8k_dir: Path, tmp_path: Path) -> None:
    from temde_hf.evaluation.cli import main
    from temde_hf.testing import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    # the real Flickr8k captions CSV, given its Karpathy test split by the JSON
    result = main([str(checkpoint), "--data", str(flickr8k_dir / "captions.txt"), "--image-root",
                   str(flickr8k_dir / "images"), "--splits-from", str(flickr8k_dir / "dataset_flickr8k.json"),
                   "--max-images", "12", "--output-dir", str(tmp_path / "csv")])  # fmt: skip
    assert result["n_images"] == 12 and result["n_captions"] == 60 and result["split"] == "test"
    # a missing image is skipped on request and listed in metrics.json
    root = tmp_path / "syn"
    json_path = make_synthetic_karpathy(root, n_images=10, seed=1)
    (root / "images" / "img_00002.png").unlink()
    out = tmp_path / "skip"
    args = [str(checkpoint), "--data", str(json_path), "--split", "all", "--output-dir", str(out)]
    with pytest.raises(DataError, match=r"img_00002\.png.*image file not found"):
        main(args)
    result = main([*args, "--on-error", "skip"])
    written = json.loads((out / "metrics.json").read_text())
    assert (
        result["n_images"] == 9 and len(written["skipped"]) == 1 and "img_00002.png" in written["skipped"][0]
    )
