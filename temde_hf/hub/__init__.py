"""Publishing and serving on the Hub: model cards, Hub export/push, the Inference Endpoints handler.

Modules are imported on use, so importing this package costs nothing. Gallery search (FAISS) is
`temde_hf.gallery`; the Gradio search demo is an application over both, in ``examples/space/app.py``.
"""
