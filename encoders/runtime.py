"""Run the exported CEG with ONNX Runtime: the service's encoder (no torch needed)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

# What `encoders.ceg.export_onnx` writes into an export folder.
METADATA_FILE = "encoder.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
ONNX_FILE = ONNX_FILES["fp32"]  # written last by an export: its presence means the export is complete


def pick_providers() -> list[str]:
    """CUDA when ONNX Runtime has it (onnxruntime-gpu on a GPU machine), else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxContentEncoder:
    """Tokenize → token-budget batches → ONNX Runtime → (N, D) float32, L2-normalised."""

    def __init__(self, export_dir: Path, precision: str = "fp32", max_batch_tokens: int = 8192, max_batch_items: int = 256):
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.export_dir = Path(export_dir)
        self.metadata = json.loads((self.export_dir / METADATA_FILE).read_text())
        assert self.metadata["pooling"] == "mean", "the exported graph pools with a masked mean"
        self.max_tokens: int = self.metadata["max_tokens"]
        self.dim: int = self.metadata["dim"]
        if precision not in ONNX_FILES:
            raise ValueError(f"precision must be one of {sorted(ONNX_FILES)}, not {precision!r}")
        self.precision = precision
        self.version: str = self.metadata["versions"][precision]
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.tokenizer = AutoTokenizer.from_pretrained(self.export_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.export_dir / ONNX_FILES[precision]), options, providers=pick_providers()
        )
        self.provider = self.session.get_providers()[0]
        log.info("content encoder %s on %s", self.version, self.provider)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
        token_ids: list[list[int]] = encoded["input_ids"]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for batch in self._token_budget_batches(token_ids):
            out[batch] = self._run([token_ids[i] for i in batch])
        return out

    def _token_budget_batches(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped by similar length so padding is small; order restored by the caller."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            padded_tokens = len(token_ids[i]) * (len(current) + 1)  # sorted: i is the longest
            if current and (padded_tokens > self.max_batch_tokens or len(current) >= self.max_batch_items):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = row
            attention_mask[j, : len(row)] = 1
        (embeddings,) = self.session.run(
            ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return embeddings


def ensure_exported(export_dir: Path, model_path: str = "") -> Path:
    """Export the encoder into export_dir unless a complete export is already there."""
    export_dir = Path(export_dir)
    if not (export_dir / ONNX_FILE).exists():
        from encoders.ceg import CEGConfig, export_onnx  # torch: only needed to export

        log.warning("no exported encoder in %s; exporting it now (once)", export_dir)
        export_onnx(CEGConfig(model_path=model_path, name=export_dir.name), export_dir)
    return export_dir


def load_content_encoder(export_dir: Path, model_path: str = "", **options) -> OnnxContentEncoder:
    """The exported encoder in export_dir, exporting it first if it is not there yet."""
    return OnnxContentEncoder(ensure_exported(export_dir, model_path), **options)
