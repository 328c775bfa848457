"""The PCH towers as the stream workers run them: ONNX Runtime, no torch.

`load_towers` returns the trained towers exported by `coldstart export-towers`
(onnx/towers/: item_tower.onnx, user_tower.onnx, towers.json) when they exist,
and otherwise the untrained content baseline — item vector = content embedding,
user vector = mean of the history's content embeddings — saying so in the log.
Both give L2-normalised vectors in one space, so user·item is a cosine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from encoders.export_format import ITEM_TOWER_ONNX, TOWERS_METADATA, USER_TOWER_ONNX
from encoders.sessions import open_session

log = logging.getLogger(__name__)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


class ContentTowers:
    """No training: the raw frozen-embedding baseline of EVALUATION.md."""

    version = "content-mean"
    max_history = 50

    def item_vectors(self, content: np.ndarray) -> np.ndarray:
        return _normalise(content.astype(np.float32))  # (B, D)

    def user_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        return _normalise(np.stack([h[-self.max_history :].mean(axis=0) for h in histories]).astype(np.float32))


class OnnxTowers:
    """Trained PCH towers exported by encoders.training.export_towers (the interface is described there).
    User tower input: history (B, N, D) oldest first, right-padded, with a mask."""

    def __init__(self, towers_dir: Path, threads: int = 0):
        self.metadata = json.loads((towers_dir / TOWERS_METADATA).read_text())
        self.version: str = self.metadata["version"]
        self.max_history: int = self.metadata["max_history"]
        self.content_dim: int = self.metadata["content_dim"]
        self.item_session = open_session(towers_dir / ITEM_TOWER_ONNX, threads)
        self.user_session = open_session(towers_dir / USER_TOWER_ONNX, threads)

    def item_vectors(self, content: np.ndarray) -> np.ndarray:
        (vectors,) = self.item_session.run(["item_embedding"], {"content_embedding": content.astype(np.float32)})
        return vectors  # (B, D_out)

    def user_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        batch = np.zeros((len(histories), self.max_history, self.content_dim), dtype=np.float32)  # (B, N, D)
        mask = np.zeros((len(histories), self.max_history), dtype=np.int64)
        for row, history in enumerate(histories):
            recent = history[-self.max_history :]
            batch[row, : len(recent)] = recent
            mask[row, : len(recent)] = 1
        (vectors,) = self.user_session.run(["user_embedding"], {"history": batch, "history_mask": mask})
        return vectors  # (B, D_out)


def load_towers(towers_dir: Path, encoder_name: str, threads: int = 0):
    """The trained towers in towers_dir, or the content baseline if none were exported there."""
    towers_dir = Path(towers_dir)
    if (towers_dir / TOWERS_METADATA).exists():
        towers = OnnxTowers(towers_dir, threads)
        trained_on = towers.metadata.get("encoder")
        if trained_on != encoder_name:
            raise ValueError(f"towers in {towers_dir} were trained on encoder {trained_on!r}, the service runs {encoder_name!r}")
        log.info("PCH towers %s loaded from %s", towers.version, towers_dir)
        return towers
    log.warning("no trained towers in %s (run `coldstart export-towers`: it trains them first if needed); "
                "serving the content baseline: item = content embedding, user = mean of history", towers_dir)
    return ContentTowers()
