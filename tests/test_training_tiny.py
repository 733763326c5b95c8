"""Tiny offline towers, models and batches for the training tests (plus checks of the helpers' pieces).

Other training test modules import the builders from here (``from test_training_tiny import ...``).
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel

from temde_hf import TemdeConfig, TemdeModel
from temde_hf.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, TEMPLATES
from temde_hf.training.arguments import parse_args
from temde_hf.training.batches import EpochBatchSampler
from temde_hf.training.checkpointing import list_checkpoints, resolve_resume
from temde_hf.training.optim import build_param_groups, freeze_towers, lr_lambda, train_mode

VOCAB_SIZE_HINT = 128


def _words() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{", " ").replace("}", " ").split()}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | {"big", "small"}
    return sorted(words)


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer from a small vocabulary file (every synthetic caption word, plus letters)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_words(), *string.ascii_lowercase]
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True, model_max_length=24)


def vit_config(dropout: float = 0.0) -> ViTConfig:
    return ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def bert_config(dropout: float = 0.0, vocab_size: int = VOCAB_SIZE_HINT) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def make_towers(root: Path, dropout: float = 0.0) -> tuple[Path, Path]:
    """Save a tiny ViT (+ image processor) and a tiny BERT (+ tokenizer) as local pretrained folders."""
    vision_dir, text_dir = root / "vit", root / "bert"
    torch.manual_seed(0)
    ViTModel(vit_config(dropout), add_pooling_layer=False).save_pretrained(vision_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    tokenizer = make_tokenizer(text_dir)
    BertModel(bert_config(dropout, len(tokenizer)), add_pooling_layer=False).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


def tiny_model(seed: int = 0, **overrides: object) -> TemdeModel:
    """A random tiny T-EMDE model (ViT 32-px + BERT, hidden 32, 1 layer, no dropout)."""
    torch.manual_seed(seed)
    settings = {"projection_dim": 16, "n_sketches": 4, "n_hyperplanes": 3, "pooling": "mean"}
    config = TemdeConfig(
        vision_config=vit_config().to_dict(), text_config=bert_config().to_dict(), **{**settings, **overrides}
    )
    return TemdeModel(config).train()


def tiny_batch(n: int, seed: int = 0, n_images: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs for `n` pairs; ``n_images`` distinct images (pairs share them through ``pair_ids``)."""
    g = torch.Generator().manual_seed(seed)
    n_images = n_images or n
    pair_ids = torch.arange(n) % n_images
    images = torch.randn(n_images, 3, 32, 32, generator=g)
    input_ids = torch.randint(5, VOCAB_SIZE_HINT, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    attention_mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {
        "pixel_values": images[pair_ids],
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "pair_ids": pair_ids,
    }


def test_tiny_towers_build_a_model(tmp_path: Path) -> None:
    vision_dir, text_dir = make_towers(tmp_path)
    model = TemdeModel.from_vision_text_pretrained(vision_dir, text_dir, projection_dim=16, n_sketches=4)
    batch = tiny_batch(3)
    assert model.encode_image(batch["pixel_values"]).shape == (3, model.config.embed_dim)


def test_config_file_then_cli_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  model_config: cfg.json\ndata:\n  synthetic_images: 10\n"
        "training:\n  learning_rate: 0.5\n  per_device_train_batch_size: 4\n"
    )
    model_args, data_args, args = parse_args([str(config), "--learning_rate", "0.25"])
    assert args.learning_rate == 0.25  # the flag wins over the file
    assert args.per_device_train_batch_size == 4 and data_args.synthetic_images == 10
    assert model_args.model_config == "cfg.json"
    config.write_text("model_config: cfg.json\nsynthetic_images: 4\nlearning_rat: 1.0\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args([str(config)])


def test_sampler_shards_one_global_order_and_resumes() -> None:
    full = list(EpochBatchSampler(20, 4, seed=3, epoch=1))
    ranks = [list(EpochBatchSampler(20, 2, rank=r, world_size=2, seed=3, epoch=1)) for r in (0, 1)]
    # process r holds the r-th half of each global batch
    assert [a + b for a, b in zip(*ranks)] == full
    assert list(EpochBatchSampler(20, 4, seed=3, epoch=1, skip_batches=2)) == full[2:]
    assert list(EpochBatchSampler(20, 4, seed=3, epoch=2)) != full


def test_param_groups_freeze_and_schedule() -> None:
    model = tiny_model()
    args = parse_args(
        [
            "--model_config",
            "x",
            "--synthetic_images",
            "4",
            "--learning_rate",
            "1.0",
            "--vision_lr_multiplier",
            "0.1",
            "--text_lr_multiplier",
            "0.5",
        ]
    )[2]
    freeze_towers(model, freeze_vision=True, freeze_text=False)
    groups = {g["name"]: g for g in build_param_groups(model, args)}
    assert not any(name.startswith("vision/") for name in groups)
    assert groups["text/decay"]["lr"] == 0.5 and groups["head/decay"]["lr"] == 1.0
    assert any(p is model.logit_scale for p in groups["head/no_decay"]["params"])
    train_mode(model, freeze_vision=True, freeze_text=False)
    assert not model.vision_model.training and model.text_model.training and model.training
    cosine = lr_lambda("cosine", total_steps=10, warmup_steps=2, step_size=0, gamma=0.1)
    assert cosine(0) < cosine(1) < cosine(2) == 1.0 and cosine(10) == pytest.approx(0.0)
    step = lr_lambda("step", total_steps=10, warmup_steps=0, step_size=3, gamma=0.5)
    assert [step(s) for s in (0, 3, 6)] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("name", ["tiny_synthetic", "flickr30k", "coco"])
def test_example_configs_parse(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / f"{name}.yaml"
    model_args, _, args = parse_args([str(path), "--vision_model_path", "v", "--text_model_path", "t"])
    assert model_args.config_overrides()["sketch_fusion"] == "concat"
    assert args.per_device_train_batch_size >= 16 and args.output_dir.startswith("outputs/")


def test_resume_ignores_half_written_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012", "step-00000011"):
        (root / name).mkdir(parents=True)
    for name in ("step-00000002", "step-00000010"):  # step-11 was killed before its state was written
        (root / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000010"]
    assert resolve_resume(tmp_path, "latest") == root / "step-00000010"
    assert resolve_resume(tmp_path / "fresh", "latest") is None  # a first run with --resume latest
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-00000011"))
