"""Adding a part is one decorated class: the config accepts it, the model builds it, the trainer trains it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from temde_hf import LOSSES, POOLING_HEADS, SKETCH_CODERS, SketchCoder, TemdeModel
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


@pytest.fixture
def cosine_coder():
    @SKETCH_CODERS.register("cosine_test")
    class CosineCoder(SketchCoder):
        """`softmax_k(cos(x, a_nk) / τ)` over K learned anchors: only the contract's required methods."""

        width_is_power_of_two = True  # so the config derives n_hyperplanes from sketch_width
        initialize_calls = 0

        def __init__(self, config) -> None:
            super().__init__(config)
            self.anchors = torch.nn.Parameter(
                torch.empty(self.n_sketches, self.sketch_width, config.projection_dim)
            )
            self.reset_parameters()

        def reset_parameters(self) -> None:
            from transformers import initialization as init

            init.constant_(self.anchors, 0.5)

        def log_probs(self, x, temperature):
            x, anchors = (
                torch.nn.functional.normalize(x, dim=-1),
                torch.nn.functional.normalize(self.anchors, dim=-1),
            )
            cos = torch.einsum("...d,nkd->...nk", x, anchors.to(x.dtype))  # (..., N, K)
            return torch.log_softmax(cos / temperature, dim=-1)

        @torch.no_grad()
        def initialize(self, x, generator=None) -> None:
            type(self).initialize_calls += 1
            idx = torch.randint(0, x.shape[0], (self.anchors[..., 0].numel(),), generator=generator)
            self.anchors.copy_(x[idx].view_as(self.anchors))

    yield CosineCoder
    del SKETCH_CODERS["cosine_test"]


def test_a_registered_sketch_coder_is_configured_initialised_trained_saved_and_reloaded(
    cosine_coder, tmp_path: Path
) -> None:
    from temde_hf.data import make_synthetic_karpathy
    from temde_hf.training.train import main

    torch.set_num_threads(1)
    config = tiny_config(sketch_coder="cosine_test", n_hyperplanes=None, sketch_width=8)
    assert config.n_hyperplanes == 3  # K = 2^H, declared by the class, not by its name
    model = TemdeModel(config)
    coder = model.sketch.coder
    assert isinstance(coder, cosine_coder) and not model.sketch._use_triton(torch.zeros(1, 1, 16))
    tokens = torch.randn(2, 5, 16)
    torch.testing.assert_close(  # the default torch path is the log-space oracle
        model.sketch.histogram(tokens), coder.reference_histogram(tokens, torch.ones(2, 5), torch.ones(1), 64)
    )
    with torch.no_grad():
        coder.anchors.fill_(float("nan"))
    model._init_weights(coder)  # the model's re-initialisation reaches a coder it has never heard of
    assert torch.equal(coder.anchors, torch.full_like(coder.anchors, 0.5))

    vision, text = save_tiny_towers(tmp_path / "towers")
    out = tmp_path / "run"
    main([
        "--vision_model_path", str(vision), "--text_model_path", str(text), "--sketch_coder", "cosine_test",
        "--projection_dim", "16", "--n_sketches", "4", "--n_hyperplanes", "3", "--sketch_fusion", "concat",
        "--data", str(make_synthetic_karpathy(tmp_path / "data", n_images=12, seed=0)),
        "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2", "--max_eval_images", "0", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    assert cosine_coder.initialize_calls == 1  # the trainer's data-dependent initialisation ran
    loaded = TemdeModel.from_pretrained(out / "final")
    assert isinstance(loaded.sketch.coder, cosine_coder) and loaded.config.sketch_coder == "cosine_test"
    assert bool(loaded.sketch.initialized)  # saved as initialised: loading does not re-initialise it
    assert not torch.allclose(loaded.sketch.coder.anchors, torch.full_like(loaded.sketch.coder.anchors, 0.5))


def test_a_coder_must_implement_the_contract() -> None:
    class Incomplete(SketchCoder):
        def log_probs(self, x, temperature):
            return x

    with pytest.raises(TypeError, match=r"abstract.*initialize.*reset_parameters"):
        Incomplete(tiny_config())


def test_unknown_names_point_at_the_registry() -> None:
    with pytest.raises(
        ValueError, match=r"pooling='max'.*pooler, cls, mean, attention.*@POOLING_HEADS.register"
    ):
        tiny_config(pooling="max")
    with pytest.raises(ValueError, match="already registered"):
        POOLING_HEADS.register("mean")(PoolingHead)
    assert set(LOSSES) >= {"info_nce", "vse_hinge"}
