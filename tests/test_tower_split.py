"""Partly trained towers: the frozen lower part cached once, only the top blocks run per training step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertModel, ViTModel

from temde_hf.data import make_synthetic_karpathy
from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
from temde_hf.models.temde.modeling_efficientnet_lite import EfficientNetLiteModel
from temde_hf.testing import TINY_IMAGE_SIZE, save_tiny_towers, tiny_tower_configs, tiny_trainer_argv
from temde_hf.training.batches import model_inputs
from temde_hf.training.checkpointing import list_checkpoints
from temde_hf.training.features import build_tower_cache
from temde_hf.training.optim import freeze_towers, frozen_lower_modules, tower_blocks, train_mode
from temde_hf.training.tower_split import LowerStates, LowerTower, attach_upper_towers, find_tower_split
from temde_hf.training.train import main


def _efficientnet(drop_connect_rate: float = 0.0) -> EfficientNetLiteModel:
    """Three stages, 4 blocks, stride 8: a `(B, 16, 4, 4)` map at 32 px."""
    config = EfficientNetLiteConfig(
        image_size=TINY_IMAGE_SIZE, stem_channels=8, kernel_sizes=[3, 3, 5], strides=[1, 2, 2],
        expand_ratios=[1, 4, 4], out_channels=[8, 12, 16], num_block_repeats=[1, 2, 1], hidden_dim=24,
        drop_connect_rate=drop_connect_rate,
    )  # fmt: skip
    return EfficientNetLiteModel(config).eval()


def _towers() -> dict[str, torch.nn.Module]:
    vision, text = tiny_tower_configs(num_hidden_layers=3)
    return {
        "bert": BertModel(text).eval(),
        "vit": ViTModel(vision).eval(),
        "efficientnet_lite": _efficientnet(),
    }


def _inputs(name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if name == "bert":
        input_ids = torch.randint(5, 60, (3, 9), generator=generator)
        mask = torch.ones_like(input_ids)
        mask[0, 4:], mask[1, 7:] = 0, 0  # padded rows: the top layers must see the same padding mask
        return {"input_ids": input_ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)}


@pytest.mark.parametrize("name", ["bert", "vit", "efficientnet_lite"])
@pytest.mark.parametrize("n_upper", [1, 2])
def test_lower_then_upper_equals_the_full_forward(name: str, n_upper: int) -> None:
    tower = _towers()[name]
    split = find_tower_split(tower, n_upper)
    assert split is not None and split.cut == len(split.blocks()) - n_upper
    assert split.blocks() is tower_blocks(tower)  # where `--*_trainable_layers` counts the layers
    inputs = _inputs(name)
    with torch.no_grad():
        full = tower(**inputs, return_dict=True)
        lower = split.lower(inputs)
        out = split.upper(lower, inputs.get("attention_mask"))
    assert lower.ndim == (4 if name == "efficientnet_lite" else 3)
    valid = inputs.get("attention_mask", torch.ones(full.last_hidden_state.shape[:2]))
    torch.testing.assert_close(out.last_hidden_state * valid[..., None], full.last_hidden_state * valid[..., None],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    if full.pooler_output is not None:
        torch.testing.assert_close(out.pooler_output, full.pooler_output, atol=1e-5, rtol=1e-5)


def test_no_split_for_an_unknown_tower_or_a_tower_that_trains_every_block() -> None:
    towers = _towers()
    assert find_tower_split(towers["bert"], 3) is None  # 3 of 3 layers train: nothing below to cache
    assert find_tower_split(towers["bert"], 0) is None

    class Other(torch.nn.Module):  # no registered split (no config.model_type)
        layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    assert find_tower_split(Other(), 1) is None


def test_the_frozen_lower_part_stays_in_eval_mode_when_training() -> None:
    """Dropout and stochastic depth are off below the first trainable block, so the lower part gives in
    training exactly what its cache holds; the top blocks train as before."""
    from temde_hf.testing import tiny_model

    model = tiny_model(dropout=0.1)
    model.text_model = BertModel(tiny_tower_configs(dropout=0.1, num_hidden_layers=3)[1])
    freeze_towers(model, {"vision": None, "text": 1})
    lower = frozen_lower_modules(model.text_model)
    assert lower == [
        model.text_model.embeddings,
        model.text_model.encoder.layer[0],
        model.text_model.encoder.layer[1],
    ]
    train_mode(model)
    assert not any(m.training for module in lower for m in module.modules())
    assert model.text_model.encoder.layer[2].training and model.vision_model.training
    assert frozen_lower_modules(model.vision_model) == []  # trains entirely
    whole = BertModel(tiny_tower_configs(num_hidden_layers=3)[1])
    whole.pooler.requires_grad_(False)  # e.g. unused under mean pooling: the layers below still all train
    assert frozen_lower_modules(whole) == []


def _lower_cache(tmp_path: Path, tower: torch.nn.Module, n_upper: int, dtype: str):
    split = find_tower_split(tower, n_upper)
    images = torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    cache = build_tower_cache(tmp_path / dtype, "k", LowerTower(split), lambda rows: {"pixel_values": images[rows]},
                              6, batch_size=4, dtype=dtype, backend="torch")  # fmt: skip
    return split, cache, images


def test_a_convolutional_lower_part_is_cached_with_its_grid(tmp_path: Path) -> None:
    """The EfficientNet map `(B, C, h, w)` is stored as h·w tokens with its grid, and read back as the map."""
    from temde_hf.training.batches import ImageInputs

    tower = _efficientnet()
    split, cache, images = _lower_cache(tmp_path, tower, 1, "float32")
    assert cache.grid == [8, 8] and cache.plan.width == 12  # 3 of 4 blocks: 12 channels at stride 4
    inputs = ImageInputs.__new__(ImageInputs)
    inputs.images, inputs.cache, inputs.lower = [None] * 6, cache, True
    lower = inputs([5, 0, 2])["vision_lower"]
    with torch.no_grad():
        torch.testing.assert_close(
            lower, split.lower({"pixel_values": images[[5, 0, 2]]}), atol=1e-6, rtol=1e-6
        )
        out = split.upper(lower)
        full = tower(pixel_values=images[[5, 0, 2]])
    torch.testing.assert_close(out.pooler_output, full.pooler_output, atol=1e-5, rtol=1e-5)


def test_the_model_runs_only_the_top_blocks_on_lower_states() -> None:
    """`attach_upper_towers`: a `LowerStates` input runs the top layers (and none below) and embeds like the
    raw input; raw inputs still run the whole tower."""
    from temde_hf import TemdeConfig, TemdeModel

    vision, text = tiny_tower_configs(num_hidden_layers=3)
    config = TemdeConfig(
        vision_config=vision, text_config=text, projection_dim=16, n_sketches=4, n_hyperplanes=3
    )
    model = TemdeModel(config).eval()
    splits = {part: find_tower_split(getattr(model, f"{part}_model"), 1) for part in ("vision", "text")}
    attach_upper_towers(model, splits)
    pixels, tokens = _inputs("vit"), _inputs("bert")
    with torch.no_grad():
        lower = {"vision_lower": splits["vision"].lower(pixels), "text_lower": splits["text"].lower(tokens),
                 "attention_mask": tokens["attention_mask"]}  # fmt: skip
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in splits["text"].lower_modules()]
        cached = model(**model_inputs(lower))
        assert calls == []
        full = model(**pixels, **tokens)
        assert len(calls) == 3  # embeddings + 2 lower layers
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(cached.image_embeds, full.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.text_embeds, full.text_embeds, atol=1e-5, rtol=1e-5)
    assert isinstance(model_inputs(lower)["vision_outputs"], LowerStates)


# --- the trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("split")
    # dropout in the top layers: the cached run must draw its random numbers like the uncached one
    vision, text = save_tiny_towers(root / "towers", dropout=0.1, num_hidden_layers=2)
    data = make_synthetic_karpathy(root / "data", n_images=24, seed=0)
    return {"root": root, "vision": vision, "text": text, "data": data}


def _argv(setup: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return tiny_trainer_argv(
        setup["vision"], setup["text"], output_dir,
        "--per_device_train_batch_size", "8", "--gradient_cache_micro_batches", "2",
        "--learning_rate", "2e-3", "--warmup_steps", "1", "--logging_steps", "1", "--max_steps", "3",
        "--max_eval_images", "4", "--eval_steps", "3", "--feature_cache_backend", "torch", "--seed", "7", *extra,
        data=setup["data"],
    )  # fmt: skip


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((list_checkpoints(output_dir)[-1] / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


class _LowerCalls:
    """Counts forwards of the text tower's lower modules (embeddings, first layer) during training steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from temde_hf.training import loop

        self.in_step, self.calls, self.hooks = False, 0, []
        original = loop._optimizer_step

        def step(*args, **kwargs):
            self.in_step = True
            try:
                return original(*args, **kwargs)
            finally:
                self.in_step = False

        def freeze(model, *args, **kwargs):
            text = model.text_model
            for module in (text.embeddings, text.encoder.layer[0]):
                self.hooks.append(module.register_forward_hook(self._count))
            return original_freeze(model, *args, **kwargs)

        original_freeze = loop.freeze_unused_parameters
        monkeypatch.setattr(loop, "_optimizer_step", step)
        monkeypatch.setattr(loop, "freeze_unused_parameters", freeze)

    def _count(self, *_) -> None:
        self.calls += self.in_step


TEXT_1 = ("--text_trainable_layers", "1")
VISION_1_FLIP = ("--vision_trainable_layers", "1", "--image_flip_augmentation", "true")
FLOAT32 = ("--feature_cache_dtype", "float32")


@pytest.mark.parametrize(
    ("flags", "tolerance"),
    [((*TEXT_1, *FLOAT32), 1e-5), (TEXT_1, 1e-3), ((*VISION_1_FLIP, *FLOAT32), 1e-5)],
    ids=["text-float32", "text-float16", "vision-flip-float32"],
)
def test_caching_the_lower_part_trains_the_same_model(
    setup: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: tuple[str, ...],
    tolerance: float,
) -> None:
    """`--*_trainable_layers 1`: training on the cached lower part (the top layer run per step) gives the
    losses and weights of running the whole tower every step (float32 cache: identical here; the default
    float16 cache: 2.5e-4 apart after 3 steps); the lower layers never run in a step."""
    torch.set_num_threads(1)
    cached, direct = tmp_path / "cached", tmp_path / "direct"
    counter = _LowerCalls(monkeypatch)
    a = main(_argv(setup, cached, *flags))
    if "--text_trainable_layers" in flags:
        assert counter.calls == 0
    b = main(_argv(setup, direct, *flags, "--cache_tower_outputs", "false"))
    if "--text_trainable_layers" in flags:
        assert counter.calls > 0  # the same hooks count the uncached run's lower layers
    part = "text" if "--text_trainable_layers" in flags else "vision"
    names = sorted(p.parent.name for p in (cached / "feature_cache").glob("*/header.json"))
    flip = "--image_flip_augmentation" in flags
    assert len(names) == (2 if flip else 1) and all(n.startswith(f"{part}-lower1-") for n in names)
    assert any(n.endswith("-mirrored") for n in names) == flip
    losses_a, losses_b = _losses(cached), _losses(direct)
    assert sorted(losses_a) == [1, 2, 3]
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], abs=tolerance), step
    if tolerance < 1e-4:
        assert a["eval_rsum"] == pytest.approx(b["eval_rsum"])
    weights = [AutoModel.from_pretrained(out / "final").state_dict() for out in (cached, direct)]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], atol=tolerance, rtol=tolerance, msg=key)


def test_another_split_point_uses_another_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    """Runs sharing a cache folder: the lower part of another N is another folder, never the stale one."""
    torch.set_num_threads(1)
    cache = tmp_path / "cache"
    vision, text = save_tiny_towers(tmp_path / "towers3", num_hidden_layers=3)
    towers = {**setup, "vision": vision, "text": text}
    for n in ("1", "2", "1"):
        main(_argv(towers, tmp_path / f"run{n}-{len(list(cache.glob('*')))}", "--text_trainable_layers", n,
                   "--feature_cache_dir", str(cache), "--max_steps", "1"))  # fmt: skip
    names = sorted(p.name for p in cache.glob("text-*"))
    assert [n.split("-")[1] for n in names] == ["lower1", "lower2"]  # 3 - N layers below; the rerun reused


def test_an_unsupported_tower_runs_whole_with_one_warning(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from temde_hf.training import tower_split

    monkeypatch.setattr(tower_split, "_SPLITS", {k: v for k, v in tower_split._SPLITS.items() if k != "bert"})
    torch.set_num_threads(1)
    with caplog.at_level(logging.WARNING, logger="temde_hf.training"):
        main(_argv(setup, tmp_path / "run", "--text_trainable_layers", "1", "--max_steps", "1"))
    lines = [r.getMessage() for r in caplog.records if "trainable_layers" in r.getMessage()]
    assert len(lines) == 1 and "whole text tower runs every step" in lines[0]
    assert not list((tmp_path / "run" / "feature_cache").glob("text-*"))


@pytest.mark.parametrize("name", ["bert", "efficientnet_lite"])
def test_the_onnx_cache_pass_of_a_lower_part_matches_eager(name: str, tmp_path: Path) -> None:
    """The cache pass exports the lower part like a tower (its own graph: another fingerprint than the
    whole tower's) and its rows equal the eager pass's (text: captions shorter than the traced length)."""
    pytest.importorskip("onnxruntime")
    tower = _towers()[name]
    split = find_tower_split(tower, 1)
    items = _inputs(name)
    n = len(next(iter(items.values())))

    def make(rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[rows] for k, v in items.items()}

    lengths = None if name != "bert" else items["attention_mask"].sum(1).tolist()
    caches = {
        backend: build_tower_cache(
            tmp_path / backend,
            "k",
            LowerTower(split),
            make,
            n,
            batch_size=2,
            dtype="float32",
            lengths=lengths,
            backend=backend,
            graph_dir=tmp_path / "graphs",
        )
        for backend in ("onnx", "torch")
    }
    assert len(list((tmp_path / "graphs").glob("*.onnx"))) == 1
    assert caches["onnx"].grid == caches["torch"].grid == (None if name == "bert" else [8, 8])
    for a, b in zip(caches["onnx"].rows(torch.arange(n)), caches["torch"].rows(torch.arange(n))):
        assert (a is None and b is None) or float((a - b).abs().max()) < 1e-4
