"""Hugging Face Space entry point: the T-EMDE search demo (`temde_hf.hub.space_app`).

Put a checkpoint, a gallery index (``temde-hf index --model checkpoint --images photos --out gallery_index``)
and a ``captions.txt`` beside this file, or point the environment variables below at them.
"""

import os

from temde_hf.hub.space_app import build_demo

demo = build_demo(
    os.environ.get("TEMDE_CHECKPOINT", "checkpoint"),
    os.environ.get("TEMDE_GALLERY_INDEX", "gallery_index"),
    os.environ.get("TEMDE_CAPTIONS", "captions.txt"),
)

if __name__ == "__main__":
    demo.launch(ssr_mode=False)
