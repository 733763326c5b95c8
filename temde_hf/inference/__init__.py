"""Inference: a checkpoint as an encoder (eager PyTorch or onnxruntime), batched embeddings, stored token
sets and the second-stage rerank scorers with their defaults.

The layer every application reads a model through: `evaluation`, `gallery`, `export`, the Endpoints
handler's callers and the Space sit above it; it imports only `models`, `data` and `loading`.
Modules: `encoder` (`load_encoder`, `BACKENDS`), `encode` (the one encode path), `tokens` (`TokenSet`),
`rerank` (`RERANKERS`, defaults), `onnx_runtime` + `onnx_layout` (the exported graphs), `fingerprint`
(a checkpoint's identity). Modules are imported on use (no onnxruntime needed to import this package).
"""
