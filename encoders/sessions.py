"""ONNX Runtime sessions, made once per model: execution providers and thread options."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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

    `run` as ort.InferenceSession.run; the batch is the first dimension of the first input. `run_each` runs
    several batches: on the CPU as `threads` one-thread runs at a time, one per core."""

    def __init__(self, model_path: Path, threads: int = 0):
        self.pool = _inference_session(model_path, threads)
        self.on_cpu = self.pool.get_providers()[0] == "CPUExecutionProvider"
        self.single = _inference_session(model_path, 1) if self.on_cpu and threads != 1 else self.pool
        self.parallel_runs = (threads or len(os.sched_getaffinity(0))) if self.on_cpu else 1
        # Threads that call the one-thread session side by side (ORT releases the GIL while it runs).
        self.callers = ThreadPoolExecutor(self.parallel_runs, "onnx-run") if self.parallel_runs > 1 else None

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        return (self.single if rows <= SMALL_BATCH_ROWS else self.pool).run(outputs, feeds)

    def run_each(self, outputs: list[str], batches: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """`run` on each batch, in order. On the CPU each is one-thread, `parallel_runs` at a time: small
        batches side by side keep every core busy without an intra-op pool's synchronisation, which on 2 cores
        did 1.2–1.5x the items/s of one two-thread run per batch (BENCHMARKS.md, issue 19)."""
        if self.callers is None or len(batches) == 1:
            return [self.run(outputs, feeds) for feeds in batches]
        return list(self.callers.map(lambda feeds: self.single.run(outputs, feeds), batches))

    def get_providers(self) -> list[str]:
        return self.pool.get_providers()


def open_session(model_path: Path, threads: int = 0) -> Session:
    """A session with every graph optimisation; `threads` intra-op threads (0: ORT's default, one per core) for
    batches of more than SMALL_BATCH_ROWS rows, one thread below; `threads` one-thread runs side by side in
    `run_each`."""
    return Session(model_path, threads)


def _inference_session(model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    # Idle pool threads sleep instead of spinning for the next run: spinning after each tower call took 0.15 of
    # the worker's 2 cores from the encoder's one-thread runs at saturation (BENCHMARKS.md, issue 19, session 12).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=pick_providers())
