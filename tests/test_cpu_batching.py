"""On a CPU, image towers run a few images per forward: in the cache pass and in the one encode path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from temde_hf.inference.cpu_batching import CPU_IMAGES_PER_FORWARD, images_per_forward, in_chunks
from temde_hf.inference.encode import encode_images
from temde_hf.models.temde.modeling_temde import TemdeEncoderOutput
from temde_hf.testing import TINY_IMAGE_SIZE, tiny_model, tiny_processor
from temde_hf.training.features import build_tower_cache


class Recorder:
    """A forward that records how many rows each call took; returns a tensor, a tuple or a ModelOutput."""

    def __init__(self, kind: str) -> None:
        self.kind, self.sizes = kind, []

    def __call__(self, x: torch.Tensor):
        self.sizes.append(len(x))
        doubled, summed = 2 * x, x.flatten(1).sum(1)
        if self.kind == "tensor":
            return doubled
        if self.kind == "tuple":
            return doubled, summed
        return TemdeEncoderOutput(last_hidden_state=doubled, pooler_output=summed)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "model_output"])
def test_in_chunks_equals_one_call(kind: str) -> None:
    x = torch.randn(11, 3, 2, 2)
    whole = Recorder(kind)(x)
    forward = Recorder(kind)
    chunked = in_chunks(forward, x, 4)
    assert forward.sizes == [4, 4, 3]
    if kind == "tensor":
        torch.testing.assert_close(chunked, whole)
    elif kind == "tuple":
        assert isinstance(chunked, tuple) and len(chunked) == 2
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b)
    else:
        assert isinstance(chunked, TemdeEncoderOutput)
        torch.testing.assert_close(chunked.last_hidden_state, whole.last_hidden_state)
        torch.testing.assert_close(chunked.pooler_output, whole.pooler_output)
    single = Recorder(kind)
    in_chunks(single, x, None)
    assert single.sizes == [11]


def test_images_per_forward_is_a_few_on_cpu_and_all_on_a_gpu() -> None:
    assert images_per_forward("cpu") == CPU_IMAGES_PER_FORWARD and CPU_IMAGES_PER_FORWARD <= 8
    assert images_per_forward("cuda") is None


def _sizes_of_forwards(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []

    def hook(_module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        sizes.append(len(pixels))

    return sizes, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_the_cache_pass_runs_a_few_images_per_forward_and_equals_the_whole_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = tiny_model().vision_model.eval()

    def pixels(rows):
        return {"pixel_values": torch.stack([
            torch.randn(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(r))
            for r in rows])}  # fmt: skip

    caches = {}
    for per_call in ("auto", None):
        sizes, handle = _sizes_of_forwards(tower)
        caches[per_call] = build_tower_cache(tmp_path / str(per_call), "k", tower, pixels, 13, batch_size=10,
                                             dtype="float32", backend="torch", images_per_call=per_call)  # fmt: skip
        handle.remove()
        # the first forward is the 4-item probe that learns the output shapes
        expected = [4, 4, 2, 3] if per_call == "auto" else [10, 3]
        assert sizes[1:] == expected
    a, b = caches["auto"].rows(torch.arange(13)), caches[None].rows(torch.arange(13))
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_encode_images_on_cpu_runs_a_few_images_per_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, processor = tiny_model().eval(), tiny_processor()
    generator = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 255, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy())
              for _ in range(9)]  # fmt: skip
    sizes, handle = _sizes_of_forwards(model.vision_model)
    embeds = encode_images(model, processor, images, batch_size=9, progress=False)
    handle.remove()
    assert sizes == [4, 4, 1]
    one_by_one = torch.cat([encode_images(model, processor, [image], progress=False) for image in images])
    torch.testing.assert_close(embeds, one_by_one, atol=1e-5, rtol=1e-5)
