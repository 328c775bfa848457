"""ONNX Runtime sessions, made once per model: execution providers and thread options."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def pick_providers() -> list[str]:
    """CUDA when ONNX Runtime has it (onnxruntime-gpu on a GPU machine), else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model_path: Path, threads: int = 0) -> ort.InferenceSession:
    """A session with every graph optimisation; `threads` intra-op threads (0: ORT's default, one per core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=pick_providers())
