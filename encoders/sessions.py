"""ONNX Runtime sessions, made once per model: execution providers and thread options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

# Batches of up to this many rows run on a second session of the same model with one intra-op thread. A parallel
# run waits for its slowest thread: on a 2-core machine shared with other work, the default pool (a thread per
# core) made the worker's upload -> published p99 at 50 uploads/s, where batches hold one or two items, several
# times that of one thread (BENCHMARKS.md, retrieve). On idle cores one thread is ~3 ms slower per item; larger
# batches (a backlog) keep the pool and its throughput.
SMALL_BATCH_ROWS = 8


def pick_providers() -> list[str]:
    """CUDA when ONNX Runtime has it (onnxruntime-gpu on a GPU machine), else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Session:
    """A model's session with `threads` intra-op threads and, on the CPU, a one-thread session for small batches.

    `run` as ort.InferenceSession.run; the batch is the first dimension of the first input."""

    def __init__(self, model_path: Path, threads: int = 0):
        self.pool = _inference_session(model_path, threads)
        cpu = self.pool.get_providers()[0] == "CPUExecutionProvider"
        self.single = _inference_session(model_path, 1) if cpu and threads != 1 else self.pool

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        return (self.single if rows <= SMALL_BATCH_ROWS else self.pool).run(outputs, feeds)

    def get_providers(self) -> list[str]:
        return self.pool.get_providers()


def open_session(model_path: Path, threads: int = 0) -> Session:
    """A session with every graph optimisation; `threads` intra-op threads (0: ORT's default, one per core) for
    batches of more than SMALL_BATCH_ROWS rows, one thread below."""
    return Session(model_path, threads)


def _inference_session(model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=pick_providers())
