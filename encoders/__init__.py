"""Encoders: the frozen content encoder (CEG) and its ONNX runtime."""
