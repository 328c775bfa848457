"""Encoders at inference time: the frozen content encoder (CEG) and the PCH towers on ONNX Runtime.

Serving part (this package's modules): ONNX Runtime sessions, the content
encoder on the `tokenizers` library, the towers, item text, and the
export-folder contract. No torch, no transformers. The training part, with
torch, is `encoders.training`; nothing here imports it.
"""
