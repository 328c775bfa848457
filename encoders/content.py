"""The service's content encoder: the exported CEG on ONNX Runtime, tokenized by `tokenizers` (no torch).

The export folder's layout is encoders.export_format; encoders.training.ceg
writes it and holds the torch reference this runtime is tested against.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from encoders.export_format import ENCODER_ONNX, TOKENIZER_FILE, read_encoder_metadata
from encoders.sessions import open_session

log = logging.getLogger(__name__)


class OnnxContentEncoder:
    """Tokenize → token-budget batches → ONNX Runtime → (N, D) float32, L2-normalised."""

    def __init__(self, export_dir: Path, precision: str = "fp32", max_batch_tokens: int = 8192,
                 max_batch_items: int = 256, threads: int = 0):
        if precision not in ENCODER_ONNX:
            raise ValueError(f"precision must be one of {sorted(ENCODER_ONNX)}, not {precision!r}")
        self.export_dir = Path(export_dir)
        self.metadata = read_encoder_metadata(self.export_dir)
        assert self.metadata["pooling"] == "mean", "the exported graph pools with a masked mean"
        self.max_tokens: int = self.metadata["max_tokens"]
        self.dim: int = self.metadata["dim"]
        self.pad_token_id: int = self.metadata["pad_token_id"]
        self.precision = precision
        self.version: str = self.metadata["versions"][precision]
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.tokenizer = Tokenizer.from_file(str(self.export_dir / TOKENIZER_FILE))
        self.tokenizer.no_padding()  # batches are padded here, by length, after sorting
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.session = open_session(self.export_dir / ENCODER_ONNX[precision], threads)
        self.provider = self.session.get_providers()[0]
        log.info("content encoder %s on %s", self.version, self.provider)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]
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
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = row
            attention_mask[j, : len(row)] = 1
        (embeddings,) = self.session.run(
            ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return embeddings
