"""Deployment formats of a checkpoint: ONNX graphs of both encoders (and of a frozen tower, for the trainer).

``temde-hf export-onnx CKPT`` (`temde_hf.export.onnx_export.main`) writes the graphs beside the weights;
`temde_hf.inference.encoder.load_encoder` runs them through onnxruntime (the ``onnx`` extra) when they
are there. Modules are imported on use: importing this package needs neither onnx nor onnxruntime.
"""
