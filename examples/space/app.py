"""The T-EMDE search demo (Gradio): type a caption -> top gallery images; drop an image -> best captions.

    python examples/space/app.py --model CHECKPOINT --index GALLERY_INDEX --captions captions.txt

The gallery is a `GalleryIndex` built by ``temde-hf index`` with the same checkpoint; the captions are a
list of sentences (or a text file, one per line) encoded once at start-up. As a Hugging Face Space
(``sdk: gradio``, this file as ``app.py``, ``temde_hf[index,demo]`` in ``requirements.txt``), put a
``checkpoint/`` folder, a ``gallery_index/`` folder and a ``captions.txt`` beside it, or point
``TEMDE_CHECKPOINT``, ``TEMDE_GALLERY_INDEX`` and ``TEMDE_CAPTIONS`` at them.

An application over the library, not part of it: everything it computes comes from `temde_hf`
(checkpoint loading, the encoders, the gallery index); this file only wires them to a UI.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from temde_hf.data.common import open_image
from temde_hf.data.errors import not_utf8
from temde_hf.data.text import is_visible_text
from temde_hf.evaluation.encode import encode_images, encode_texts
from temde_hf.hub.gallery import GalleryIndex, search
from temde_hf.loading import load_checkpoint

TITLE = "T-EMDE cross-modal search"
HERE = Path(__file__).resolve().parent  # a Space serves the files beside its app.py


def read_captions(captions: Sequence[str] | str | Path) -> list[str]:
    """A caption list from a sequence or a text file (one caption per line, blank lines ignored)."""
    if isinstance(captions, (str, Path)):
        path = Path(captions)
        if not path.is_file():
            raise ValueError(f"captions file {path} does not exist (expected one caption per line)")
        try:
            captions = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise not_utf8(path, exc) from exc
    captions = [c.strip() for c in captions if is_visible_text(c)]
    if not captions:
        raise ValueError("the caption list is empty")
    return captions


class SearchApp:
    """The demo's logic, independent of the UI (so it is testable without a browser).

    Args:
        checkpoint_dir: the T-EMDE checkpoint (must be the one that built the gallery index).
        gallery_index_dir: folder written by `GalleryIndex.save` / ``temde-hf index``.
        captions: sentences searched by the image -> captions tab.
    """

    def __init__(
        self, checkpoint_dir: str | Path, gallery_index_dir: str | Path, captions: Sequence[str] | str | Path
    ) -> None:
        self.model, self.processor = load_checkpoint(checkpoint_dir)
        self.gallery = GalleryIndex.load(gallery_index_dir)
        self.captions = read_captions(captions)
        self.caption_embeds = encode_texts(
            self.model, self.processor, self.captions
        ).numpy()  # (n_captions, E)
        scale = getattr(self.model, "logit_scale", None)
        # Caption confidences are a softmax of the model's own scaled similarities.
        self.logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 1.0

    def search_images(self, query: str, k: int = 6) -> tuple[list[tuple[Image.Image, str]], str]:
        """Top-``k`` gallery images for a caption: `(image, label)` pairs and a ranked Markdown list."""
        if not is_visible_text(query):
            return [], "Type a caption to search the gallery."
        hits = search(self.gallery, self.model, self.processor, texts=[query.strip()], k=int(k))[0]
        items = []
        for hit in hits:
            if hit.path and Path(hit.path).is_file():
                items.append((open_image(hit.path), f"{hit.rank}. {hit.id} ({hit.score:.3f})"))
        ranking = "\n".join(f"{hit.rank}. `{hit.id}` — {hit.score:.4f}" for hit in hits)
        return items, ranking

    def rank_captions(self, image: Image.Image | None, k: int = 5) -> dict[str, float]:
        """Best ``k`` captions for an image, with softmax confidences over the whole caption list."""
        if image is None:
            return {}
        query = encode_images(self.model, self.processor, [image], progress=False)[0].numpy()  # (E,)
        logits = self.logit_scale * (self.caption_embeds @ query)  # (n_captions,)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-logits, kind="stable")[: int(k)]
        return {self.captions[i]: float(probs[i]) for i in top}


def build_demo(
    checkpoint_dir: str | Path, gallery_index_dir: str | Path, captions: Sequence[str] | str | Path
) -> Any:
    """Build the Gradio Blocks app (not launched): `demo.launch()` serves it."""
    import gradio as gr

    app = SearchApp(checkpoint_dir, gallery_index_dir, captions)
    n_items = len(app.gallery)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\nA T-EMDE dual encoder ranks a gallery of {n_items} images by one inner product "
            f"of its fused (global + sketch) embeddings."
        )
        with gr.Tab("Caption → images"):
            query = gr.Textbox(label="Caption", placeholder="a dog runs on the beach", elem_id="query")
            top_k = gr.Slider(1, max(1, min(24, n_items)), value=min(6, n_items), step=1, label="Top k")
            search_btn = gr.Button("Search images", variant="primary", elem_id="search-images")
            images_out = gr.Gallery(label="Top images", columns=3, elem_id="image-results", format="png")
            ranking_out = gr.Markdown(elem_id="image-ranking")
        with gr.Tab("Image → captions"):
            image_in = gr.Image(type="pil", label="Image", elem_id="query-image")
            n_captions = gr.Slider(
                1, max(1, min(20, len(app.captions))), value=min(5, len(app.captions)), step=1
            )
            caption_btn = gr.Button("Find captions", variant="primary", elem_id="search-captions")
            captions_out = gr.Label(label="Best captions", elem_id="caption-results")
        search_btn.click(app.search_images, [query, top_k], [images_out, ranking_out])
        query.submit(app.search_images, [query, top_k], [images_out, ranking_out])
        caption_btn.click(app.rank_captions, [image_in, n_captions], captions_out)
    demo.search_app = app  # tests and callers reach the logic behind the UI
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    """Launch the demo (on a Space, with no arguments: the files beside this script)."""
    parser = argparse.ArgumentParser(prog="python examples/space/app.py", description=TITLE)
    parser.add_argument(
        "--model",
        default=os.environ.get("TEMDE_CHECKPOINT", str(HERE / "checkpoint")),
        help="checkpoint folder",
    )
    parser.add_argument(
        "--index",
        default=os.environ.get("TEMDE_GALLERY_INDEX", str(HERE / "gallery_index")),
        help="gallery index folder (temde-hf index)",
    )
    parser.add_argument(
        "--captions",
        default=os.environ.get("TEMDE_CAPTIONS", str(HERE / "captions.txt")),
        help="one caption per line",
    )
    # A Space sets GRADIO_SERVER_NAME=0.0.0.0; a local run stays on the loopback interface.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    build_demo(args.model, args.index, args.captions).launch(
        server_name=args.host, server_port=args.port, ssr_mode=False
    )


if __name__ == "__main__":
    main()
