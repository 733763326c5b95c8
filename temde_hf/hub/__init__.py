"""Publishing and serving: model cards, Hub export/push, the Endpoints handler, gallery search, the demo.

Modules are imported on use (``temde_hf.hub.gallery`` needs faiss, ``temde_hf.hub.space_app`` gradio),
so importing this package costs nothing.
"""
