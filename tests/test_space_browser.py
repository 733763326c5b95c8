"""The Gradio search demo, driven end to end in a real headless Chromium (plus its logic without one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from temde_hf.evaluation.encode import encode_images, encode_texts
from temde_hf.hub.gallery import build_gallery_from_folder
from temde_hf.testing import (
    GALLERY_CAPTIONS,
    GALLERY_COLOURS,
    free_port,
    make_colour_gallery,
    save_tiny_checkpoint,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    pytest.importorskip("faiss", reason="the demo's gallery needs faiss-cpu (the `index` extra)")
    root = tmp_path_factory.mktemp("space")
    checkpoint = save_tiny_checkpoint(root / "tiny", seed=4)
    make_colour_gallery(root / "images")
    build_gallery_from_folder(checkpoint, root / "images", progress=False).save(root / "index")
    return checkpoint, root / "index", root / "images"


def _brute_force_top1(app, query: str) -> str:
    """The gallery image an exhaustive in-process search ranks first for ``query``."""
    gallery = app.gallery
    embeds = encode_images(app.model, app.processor, gallery.paths, progress=False)  # (n_images, E)
    scores = embeds @ encode_texts(app.model, app.processor, [query])[0]
    return gallery.ids[int(np.argmax(scores))]


def test_search_app_logic(space_app, demo_files, tmp_path: Path) -> None:
    checkpoint, index_dir, images = demo_files
    (tmp_path / "captions.txt").write_text("\n".join(GALLERY_CAPTIONS) + "\n\n")
    app = space_app.SearchApp(checkpoint, index_dir, tmp_path / "captions.txt")
    assert app.captions == GALLERY_CAPTIONS
    items, ranking = app.search_images(GALLERY_CAPTIONS[2], k=3)
    assert len(items) == 3 and ranking.startswith(f"1. `{_brute_force_top1(app, GALLERY_CAPTIONS[2])}`")
    assert app.search_images("   ")[0] == [] and app.search_images("\u200b")[0] == []  # nothing to embed
    best = app.rank_captions(Image.open(images / "blue.png"), k=4)
    scores = (
        encode_texts(app.model, app.processor, GALLERY_CAPTIONS)
        @ encode_images(app.model, app.processor, [images / "blue.png"], progress=False)[0]
    )
    assert list(best) == [GALLERY_CAPTIONS[i] for i in np.argsort(-scores, kind="stable")[:4]]
    assert list(best.values()) == sorted(best.values(), reverse=True) and 0 < sum(best.values()) <= 1 + 1e-6
    with pytest.raises(ValueError, match="does not exist"):
        space_app.read_captions(tmp_path / "missing.txt")


def _dominant_colour(png: bytes) -> tuple[int, int, int]:
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels // 16 * 16, axis=0, return_counts=True)
    return tuple(int(c) for c in colours[np.argmax(counts)])


def _close(colour: tuple[int, int, int], reference: tuple[int, int, int]) -> bool:
    return max(abs(a - b) for a, b in zip(colour, reference)) <= 24


@pytest.mark.browser
@pytest.mark.slow
def test_browser_caption_query_shows_the_brute_force_top_image_first(
    space_app, demo_files, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium is not installed (apt-get install -y chromium chromium-driver)")
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.fail(f"the browser test needs `pip install gradio playwright` ({err})")
    checkpoint, index_dir, _ = demo_files
    demo = space_app.build_demo(checkpoint, index_dir, GALLERY_CAPTIONS)
    app = demo.search_app
    # queries whose brute-force winners differ, so the page cannot pass by showing one fixed image
    expected: dict[str, str] = {}
    for caption in GALLERY_CAPTIONS:
        top = _brute_force_top1(app, caption)
        if top not in expected.values():
            expected[caption] = top
        if len(expected) == 2:
            break
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=60_000)
            for query, top_id in expected.items():
                page.fill("#query textarea", query)
                page.click("#search-images")
                first_item = f"#image-results img[alt^='1. {top_id} ']"
                page.wait_for_selector(first_item, timeout=60_000)
                ranking = page.inner_text("#image-ranking").strip().splitlines()
                assert ranking[0].startswith(top_id), (query, ranking)
                labels = page.eval_on_selector_all("#image-results img", "els => els.map(e => e.alt)")
                assert labels[0].startswith(f"1. {top_id} ") and len(labels) == min(6, len(GALLERY_COLOURS))
                # the first thumbnail really is that image: its dominant colour is the file's background
                thumbnail = page.locator("#image-results img").first.screenshot()
                assert _close(_dominant_colour(thumbnail), GALLERY_COLOURS[Path(top_id).stem]), top_id
            # second tab: drop an image, read the best caption (the in-process ranking's first)
            image_path = demo_files[2] / "purple.png"
            best_caption = next(iter(app.rank_captions(Image.open(image_path), k=1)))
            page.get_by_role("tab", name="Image → captions").click()
            page.locator("#query-image input[type=file]").set_input_files(str(image_path))
            page.wait_for_selector("#query-image img", timeout=60_000)
            page.click("#search-captions")
            page.wait_for_function(
                "c => (document.querySelector('#caption-results')?.innerText || '').includes(c)",
                arg=best_caption,
                timeout=60_000,
            )
            lines = [line for line in page.inner_text("#caption-results").splitlines() if line.strip()]
            assert lines[0] == "Best captions" and lines[1] == best_caption, lines  # block label, then top-1
            page.get_by_role("tab", name="Caption → images").click()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert shot.stat().st_size > 20_000 and image.shape[0] > 400 and image.shape[1] > 400
    colours = {tuple(c) for c in (image.reshape(-1, 3) // 32).tolist()}
    assert len(colours) >= 8, "screenshot looks blank"
    for name in expected.values():  # the top images' colours are on the page
        rgb = np.array(GALLERY_COLOURS[Path(name).stem])
        assert (np.abs(image.astype(int) - rgb).max(axis=-1) <= 24).sum() > 500, name
