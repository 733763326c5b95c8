"""`open_image`, the one image decoder: what a model sees from unusual but valid files, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from temde_hf.data import CaptionPairs, DataError, LoadReport, load_karpathy, make_synthetic_karpathy
from temde_hf.data.common import open_image, verify_image
from temde_hf.testing import png_declaring_size, truncated_jpeg

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, red left / blue right, with "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF Orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    pixels = _pixels(open_image(tmp_path / "phone.png"))
    assert pixels.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert tuple(pixels[5, 10]) == RED and tuple(pixels[35, 10]) == BLUE  # left side is now the top


def test_16_bit_grey_png_keeps_its_range(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    pixels = _pixels(open_image(tmp_path / "deep.png"))
    expected = values.astype(float) * 255 / 65535
    assert np.abs(pixels[..., 0] - expected).max() <= 1.0  # not clipped to white
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(tmp_path: Path, mode: str) -> None:
    # Left half: fully transparent black (what a plain convert("RGB") would show); right half: opaque.
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    rgba.paste((204, 204, 204, 255), (10, 0, 20, 10))  # 204: in the web palette
    image = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").convert("P")
    if mode == "P":  # palette image whose black entry is the transparent one
        image.info["transparency"] = image.getpixel((0, 0))
    image.save(tmp_path / "alpha.png")
    pixels = _pixels(open_image(tmp_path / "alpha.png"))
    assert tuple(pixels[5, 2]) == WHITE
    assert np.abs(pixels[5, 15] - 204).max() <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # pure red in CMYK
    pixels = _pixels(open_image(tmp_path / "print.jpg"))
    assert pixels[8, 8, 0] > 200 and pixels[8, 8, 1] < 60 and pixels[8, 8, 2] < 60


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path) -> None:
    for side in (12000, 20000):  # over Pillow's warning limit, and over its hard limit
        bomb = tmp_path / f"bomb{side}.png"
        bomb.write_bytes(png_declaring_size(side, side))
        with pytest.raises(DataError, match=rf"bomb{side}\.png: image has|bomb{side}\.png: Image size"):
            open_image(bomb)
        assert "pixels" in verify_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 48)).save(small)
    with pytest.raises(DataError, match=r"small\.png: image has 2,304 pixels .* limit of 1,000.*downscale"):
        open_image(small, max_pixels=1000)
    assert open_image(small).size == (48, 48)


def test_truncated_jpeg_is_caught_by_verification_and_skipped(tmp_path: Path) -> None:
    json_path = make_synthetic_karpathy(tmp_path / "syn", n_images=5, seed=2)
    bad = truncated_jpeg(tmp_path / "syn" / "images" / "img_00003.png")
    with Image.open(bad) as header_only:
        header_only.verify()  # the header check alone (what verify_image used to do) passes
    assert "truncated" in verify_image(bad)
    with pytest.raises(DataError, match=r"img_00003\.png.*truncated.*--on-error skip"):
        load_karpathy(json_path, verify_images=True)
    report = LoadReport()
    dataset = load_karpathy(json_path, verify_images=True, on_error="skip", report=report)
    assert dataset["image_id"] == ["img_00000", "img_00001", "img_00002", "img_00004"]
    assert report.n_skipped == 1 and "img_00003.png" in report.skipped[0][0]
    pairs = CaptionPairs(load_karpathy(json_path))  # unverified: the decode at use names the file
    with pytest.raises(DataError, match=r"img_00003\.png: image cannot be decoded.*truncated"):
        pairs[3 * 5]
