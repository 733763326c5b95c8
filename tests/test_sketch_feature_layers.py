"""`TemdeConfig.sketch_vision_feature_layers`: extra vision maps feed the sketch's token set (and only it),
from pixels, from a frozen tower's cache, through save/load, the ONNX graphs and the trainer flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import temde_hf  # noqa: F401  (registers the Auto classes)
from temde_hf import TemdeConfig, TemdeModel
from temde_hf.data import make_synthetic_karpathy
from temde_hf.data.common import open_image
from temde_hf.inference.encode import encode_images
from temde_hf.models.temde.configuration_efficientnet_lite import EfficientNetLiteConfig
from temde_hf.testing import (
    TINY_IMAGE_SIZE,
    make_colour_gallery,
    save_tiny_checkpoint,
    save_tiny_towers,
    tiny_batch,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_tower_configs,
    tiny_trainer_argv,
)
from temde_hf.training.arguments import parse_args
from temde_hf.training.batches import model_inputs
from temde_hf.training.checkpointing import list_checkpoints
from temde_hf.training.features import StaleCacheError, build_tower_cache
from temde_hf.training.train import main

# The tiny ViT's hidden states: (embeddings, its one layer); state 0 = 16 patches + [CLS] = 17 tokens.
LAYER = [0]


def _pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return tiny_batch(n, seed=seed)["pixel_values"]


def _calls_with_hidden_states(model: TemdeModel) -> list[bool]:
    """Records, per vision-tower call, whether the tower was asked for its hidden states."""
    asked: list[bool] = []
    model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: asked.append(bool(kwargs.get("output_hidden_states"))), with_kwargs=True
    )
    return asked


def test_without_the_option_the_model_is_unchanged() -> None:
    """Default None: no new weights, the tower is not asked for hidden states, and the sketch reads the
    last map's tokens (the embedding is the head of `token_embeds`, as before)."""
    torch.manual_seed(0)
    model = tiny_model()
    assert model.config.sketch_vision_feature_layers is None and model.sketch_feature_layers == ()
    assert not any(key.startswith("sketch_vision") for key in model.state_dict())
    asked = _calls_with_hidden_states(model)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=_pixels())
        embeds, _, sketch = model.embed_tokens(out.token_embeds, out.token_mask)
    assert asked == [False] and out.sketch_token_embeds is None and out.hidden_states is None
    assert torch.equal(out.pooler_output, embeds) and torch.equal(out.sketch, sketch)


def test_the_sketch_reads_the_last_and_the_extra_maps_tokens_and_only_the_sketch() -> None:
    """The sketch's token set is L_last + L_extra tokens; the global part and `token_embeds` are those
    of the model without the option (same weights); gradients reach the extra projection."""
    torch.manual_seed(0)
    plain = tiny_model()
    model = tiny_model(sketch_vision_feature_layers=LAYER)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["sketch_vision_projections.0.weight"] and not unexpected
    asked = _calls_with_hidden_states(model)
    pixels = _pixels()
    out = model.get_image_features(pixel_values=pixels)
    with torch.no_grad():
        reference = plain.get_image_features(pixel_values=pixels)
    assert asked == [True] and out.hidden_states is None  # asked for internally, not returned
    assert out.token_embeds.shape == (3, 17, 16) and out.sketch_token_embeds.shape == (3, 17 + 17, 16)
    assert out.sketch_token_mask.shape == (3, 34) and bool(out.sketch_token_mask.all())
    torch.testing.assert_close(out.token_embeds, reference.token_embeds)
    torch.testing.assert_close(out.global_embeds, reference.global_embeds)
    assert not torch.allclose(out.sketch, reference.sketch)  # the extra tokens change the histogram
    out.sketch.square().sum().backward()
    grad = model.sketch_vision_projections[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # the caller's own request for hidden states is still answered
    assert len(model.get_image_features(pixel_values=pixels, output_hidden_states=True).hidden_states) == 2
    # with `token_layer_norm` each extra map gets its own LayerNorm (its channels' scale is its own)
    normed = tiny_model(sketch_vision_feature_layers=LAYER, token_layer_norm=True)
    assert normed.sketch_vision_token_norms[0].normalized_shape == (32,)
    assert normed.get_image_features(pixel_values=pixels).sketch_token_embeds.shape == (3, 34, 16)


def test_efficientnet_lite0_index_11_is_the_14x14_stage() -> None:
    """EfficientNet-Lite0 (stem, 16 blocks, head): index 11 is the last block of the 14 × 14 stage,
    112 channels; at 224 px the sketch reads 49 + 196 tokens."""
    vision = EfficientNetLiteConfig()
    _, text = tiny_tower_configs()
    config = TemdeConfig(vision_config=vision, text_config=text, projection_dim=16, n_sketches=2,
                         n_hyperplanes=2, sketch_vision_feature_layers=[11])  # fmt: skip
    torch.manual_seed(0)
    model = TemdeModel(config).eval()
    assert model.sketch_feature_layers == (11,) and model.sketch_vision_projections[0].in_features == 112
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.randn(1, 3, 224, 224))
    assert out.token_embeds.shape == (1, 49, 16) and out.sketch_token_embeds.shape == (1, 49 + 196, 16)
    # -7 counts from the end of the 18 hidden states: the same state
    assert TemdeModel(
        TemdeConfig(**{**config.to_dict(), "sketch_vision_feature_layers": [-7]})
    ).sketch_feature_layers == (11,)


def test_bad_settings_are_refused_with_one_clear_line() -> None:
    with pytest.raises(ValueError, match="sketch_fusion='none' has no sketch"):
        tiny_config(sketch_fusion="none", sketch_vision_feature_layers=LAYER)
    for bad in ([], [0, 0], ["a"], [True]):
        with pytest.raises(ValueError, match="non-empty list of distinct integers"):
            tiny_config(sketch_vision_feature_layers=bad)
    assert tiny_config(sketch_vision_feature_layers=1).sketch_vision_feature_layers == [1]  # LLaVA's int form
    with pytest.raises(ValueError, match=r"\[5\] out of range .* 2 hidden states"):
        tiny_model(sketch_vision_feature_layers=[5])
    with pytest.raises(ValueError, match="names one hidden state twice"):
        tiny_model(sketch_vision_feature_layers=[0, -2])
    model = tiny_model(sketch_vision_feature_layers=LAYER)
    hidden = model.vision_model(pixel_values=_pixels(), return_dict=True).last_hidden_state
    with pytest.raises(ValueError, match="needs the vision tower's hidden_states"):
        model.get_image_features(vision_outputs=(hidden,))


def test_save_load_round_trip_and_the_encode_path(tmp_path: Path) -> None:
    """The option and the extra projection survive save/`from_pretrained` (and Auto remote-code loading),
    and the one encode path embeds like `get_image_features`."""
    folder = save_tiny_checkpoint(tmp_path / "ckpt", seed=0, sketch_vision_feature_layers=LAYER)
    assert json.loads((folder / "config.json").read_text())["sketch_vision_feature_layers"] == LAYER
    model = TemdeModel.from_pretrained(folder).eval()
    auto = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.sketch_feature_layers == (0,) and auto.sketch_feature_layers == (0,)
    images = sorted(make_colour_gallery(tmp_path / "images").values())[:3]
    processor = tiny_processor()
    embeds = encode_images(model, processor, images, batch_size=2, progress=False)
    pixels = processor(images=[open_image(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model.get_image_features(pixel_values=pixels)
        torch.testing.assert_close(
            auto.get_image_features(pixel_values=pixels).pooler_output, direct.pooler_output
        )
    torch.testing.assert_close(embeds, direct.pooler_output, atol=1e-5, rtol=1e-5)
    assert direct.sketch_token_embeds.shape[1] == 2 * direct.token_embeds.shape[1]


class Pixels:
    def __call__(self, rows):
        images = [torch.randn(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(r))
                  for r in rows]  # fmt: skip
        return {"pixel_values": torch.stack(images)}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_cache_holds_the_extra_maps_and_the_cached_forward_equals_the_live_one(
    tmp_path: Path, backend: str
) -> None:
    """The frozen vision tower's cache stores hidden state 0 beside its outputs (eager or ONNX pass);
    a batch of cached rows embeds like pixels."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = tiny_model(sketch_vision_feature_layers=LAYER)
    cache = build_tower_cache(tmp_path / "v", "k", model.vision_model, Pixels(), 10, batch_size=4,
                              dtype="float32", backend=backend, layers=model.sketch_feature_layers)  # fmt: skip
    assert cache.plan.layers == [[0, 17, 32]] and (tmp_path / "v" / "layer0.bin").is_file()
    if backend == "onnx":
        assert list((tmp_path / "graphs").glob("*-l0.onnx"))  # the graph with the extra output was used
    with pytest.raises(StaleCacheError, match=r"extra hidden states \[0\], but \[\] were asked for"):
        build_tower_cache(
            tmp_path / "v", "k", model.vision_model, Pixels(), 10, batch_size=4, dtype="float32"
        )
    rows = [7, 2, 5]
    hidden, pooled, _ = cache.rows(torch.tensor(rows))
    layers = {f"vision_layer{i}": value for i, value in cache.layer_rows(torch.tensor(rows)).items()}
    batch = {"vision_hidden": hidden, "vision_pooled": pooled, **layers}  # as `ImageInputs` gives them
    assert batch["vision_layer0"].shape == (3, 17, 32)
    with torch.no_grad():
        cached = model.get_image_features(**model_inputs(batch))
        live = model.get_image_features(**Pixels()(rows))
    torch.testing.assert_close(cached.pooler_output, live.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.sketch_token_embeds, live.sketch_token_embeds, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    vision, text = save_tiny_towers(root / "towers", dropout=0.1)
    data = make_synthetic_karpathy(root / "data", n_images=24, seed=0)
    return {"vision": vision, "text": text, "data": data}


def _argv(setup: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return tiny_trainer_argv(
        setup["vision"], setup["text"], output_dir,
        "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "1",
        "--logging_steps", "1", "--max_steps", "3", "--max_eval_images", "4", "--eval_steps", "3",
        "--feature_cache_backend", "torch", "--feature_cache_dtype", "float32", "--seed", "7",
        "--freeze_vision_tower", "true", "--freeze_text_tower", "true", "--sketch_init_batches", "1",
        "--sketch_vision_feature_layers", "0", *extra, data=setup["data"],
    )  # fmt: skip


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((list_checkpoints(output_dir)[-1] / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_training_on_the_cached_towers_equals_running_them(setup: dict[str, Path], tmp_path: Path) -> None:
    """`--sketch_vision_feature_layers 0` with frozen towers: the cache holds the extra map (in another
    cache than the plain run's), and training on it equals running the towers every step."""
    torch.set_num_threads(1)
    cached, direct, plain = tmp_path / "cached", tmp_path / "direct", tmp_path / "plain"
    a = main(_argv(setup, cached))
    b = main(_argv(setup, direct, "--cache_tower_outputs", "false"))
    vision_caches = [p.parent for p in (cached / "feature_cache").glob("vision-*/header.json")]
    assert len(vision_caches) == 1 and (vision_caches[0] / "layer0.bin").is_file()
    losses_a, losses_b = _losses(cached), _losses(direct)
    assert sorted(losses_a) == [1, 2, 3]
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_b[step], abs=1e-5), step
    assert a["eval_rsum"] == pytest.approx(b["eval_rsum"])
    weights = [AutoModel.from_pretrained(out / "final").state_dict() for out in (cached, direct)]
    assert "sketch_vision_projections.0.weight" in weights[0]
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], atol=1e-5, rtol=1e-4, msg=key)
    # a run without the option into the same cache folder: its own vision cache, not the one with the map
    flags = _argv(setup, plain, "--feature_cache_dir", str(cached / "feature_cache"), "--max_steps", "1")
    main(
        flags[: flags.index("--sketch_vision_feature_layers")]
        + flags[flags.index("--sketch_vision_feature_layers") + 2 :]
    )
    names = sorted(p.parent.name for p in (cached / "feature_cache").glob("vision-*/header.json"))
    assert len(names) == 2


def test_the_trainer_flag_and_the_partly_trained_tower_error(tmp_path: Path) -> None:
    base = ["--model_config", "cfg.json", "--synthetic_images", "4", "--output_dir", str(tmp_path)]
    model_args, _, _ = parse_args([*base, "--sketch_vision_feature_layers", "11"])
    assert model_args.config_overrides() == {"sketch_vision_feature_layers": [11]}
    assert parse_args([*base, "--sketch_vision_feature_layers", "9", "11"])[
        0
    ].sketch_vision_feature_layers == [9, 11]
    with pytest.raises(ValueError, match="--sketch_vision_feature_layers with --vision_trainable_layers N"):
        parse_args([*base, "--sketch_vision_feature_layers", "11", "--vision_trainable_layers", "2"])
    # without the cache the whole tower runs every step: supported
    parse_args([*base, "--sketch_vision_feature_layers", "11", "--vision_trainable_layers", "2",
                "--cache_tower_outputs", "false"])  # fmt: skip


def test_the_exported_image_graph_includes_the_extra_maps(tmp_path: Path) -> None:
    """`temde-hf export-onnx` of a model with the option: onnxruntime reproduces the eager embeddings."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from temde_hf.export.onnx_export import export_onnx

    folder = save_tiny_checkpoint(tmp_path / "ckpt", seed=1, sketch_vision_feature_layers=LAYER)
    meta = export_onnx(folder)
    assert max(meta["max_abs_diff"].values()) < 1e-5


def test_the_sketch_initialisation_sees_the_extra_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DLSH (median) initialisation draws from the tokens the sketch reads: the extra map's too."""
    from temde_hf.training.initialization import initialize_sketch_from_batches

    torch.manual_seed(0)
    model = tiny_model(sketch_vision_feature_layers=LAYER)
    seen = []
    monkeypatch.setattr(model, "initialize_sketch", lambda tokens, generator=None: seen.append(tokens.shape))
    batch = tiny_batch(4)
    initialize_sketch_from_batches(model, [batch], device=torch.device("cpu"), seed=0)
    n_text = int(batch["attention_mask"].sum())
    assert seen == [(4 * (17 + 17) + n_text, 16)]


def test_a_saved_model_with_the_option_and_a_cached_partly_trained_tower_is_refused(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """The option set in the model's config (no flag to check up front): the trainer refuses the cached
    lower part of a partly trained vision tower with the same line, before any step."""
    vision, text = save_tiny_towers(tmp_path / "towers", num_hidden_layers=2)
    model = TemdeModel.from_vision_text_pretrained(vision, text, projection_dim=16, n_sketches=4, n_hyperplanes=3,
                                                   sketch_vision_feature_layers=LAYER)  # fmt: skip
    model.save_pretrained(tmp_path / "ckpt")
    tiny_processor().save_pretrained(tmp_path / "ckpt")
    argv = ["--init_from", str(tmp_path / "ckpt"), "--data", str(setup["data"]), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "1", "--vision_trainable_layers", "1",
            "--feature_cache_backend", "torch"]  # fmt: skip
    with pytest.raises(ValueError, match="--sketch_vision_feature_layers with --vision_trainable_layers N"):
        main(argv)
