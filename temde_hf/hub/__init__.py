"""Publishing and serving: model cards, Hub export/push, the Endpoints handler, gallery search.

Modules are imported on use (``temde_hf.hub.gallery`` needs faiss), so importing this package costs
nothing. The Gradio search demo is an application over these, in ``examples/space/app.py``.
"""
