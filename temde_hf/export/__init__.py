"""Deployment formats of a checkpoint: ONNX graphs of both encoders and their onnxruntime runner.

``temde-hf export-onnx CKPT`` (`temde_hf.export.onnx_export.main`) writes the graphs beside the weights;
`temde_hf.evaluation.encode.load_encoder` runs them through onnxruntime (the ``onnx`` extra) when they
are there. Modules are imported on use: importing this package needs neither onnx nor onnxruntime.
"""

from .fingerprint import checkpoint_fingerprint

__all__ = ["checkpoint_fingerprint"]
