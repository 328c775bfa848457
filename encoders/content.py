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

# Rows per ONNX Runtime run (BENCHMARKS.md, issue 19): small on the CPU, where one-thread runs go side by side.
CPU_BATCH_ITEMS = 8
GPU_BATCH_ITEMS = 256


class OnnxContentEncoder:
    """Tokenize → batches of similar length → ONNX Runtime → (N, D) float32, L2-normalised.

    On the CPU a call's texts are cut into batches of at most `max_batch_items` rows (and `max_batch_tokens`
    padded tokens), sorted by length so padding is small, and spread evenly over `threads` one-thread runs side
    by side (encoders.sessions.Session.run_each): on 2 cores, batches of 2–16 rows as two one-thread runs did
    the most items/s, about twice one one-thread run and 1.2–1.5x one two-thread run of the whole micro-batch
    (BENCHMARKS.md, issue 19). Every row's vector is the same whatever shares its batch (static int8 scales), so
    how texts are cut changes the speed only. On a GPU one run takes up to 256 rows."""

    def __init__(self, export_dir: Path, precision: str = "fp32", max_batch_tokens: int = 8192,
                 max_batch_items: int | None = None, threads: int = 0):
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
        self.tokenizer = Tokenizer.from_file(str(self.export_dir / TOKENIZER_FILE))
        self.tokenizer.no_padding()  # batches are padded here, by length, after sorting
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.session = open_session(self.export_dir / ENCODER_ONNX[precision], threads)
        self.provider = self.session.get_providers()[0]
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items or (CPU_BATCH_ITEMS if self.session.on_cpu else GPU_BATCH_ITEMS)
        log.info("content encoder %s on %s", self.version, self.provider)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]
        batches = self._batches(token_ids)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        feeds = [self._feeds([token_ids[i] for i in batch]) for batch in batches]
        for batch, (embeddings,) in zip(batches, self.session.run_each(["sentence_embedding"], feeds)):
            out[batch] = embeddings
        return out

    def _batches(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Indices grouped by similar length so padding is small (order restored by the caller), as many
        batches as parallel runs at least, so a small call uses every core too."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        per_batch = min(self.max_batch_items, -(-len(order) // self.session.parallel_runs))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            padded_tokens = len(token_ids[i]) * (len(current) + 1)  # sorted: i is the longest
            if current and (padded_tokens > self.max_batch_tokens or len(current) >= per_batch):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _feeds(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = row
            attention_mask[j, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
