"""The PCH towers as the stream workers run them: ONNX Runtime, no torch.

`load_towers` returns the trained towers exported by `coldstart export-towers`
(onnx/towers/: item_tower.onnx, user_tower.onnx, towers.json, and for hybrid
towers id_parts.npz) when they exist,
and otherwise the untrained content baseline — item vector = content embedding,
user vector = mean of the history's content embeddings — saying so in the log.
Both give L2-normalised vectors in one space, so user·item is a cosine.

Every call names the items (the item ids of the vectors asked for, or of each
history): hybrid towers add the learned ID part of items seen in training; an
item id they never trained on gets none, so its vector is content-only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from encoders.export_format import ID_PARTS, ITEM_TOWER_ONNX, TOWERS_METADATA, USER_TOWER_ONNX
from encoders.sessions import open_session

log = logging.getLogger(__name__)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


class ContentTowers:
    """No training: the raw frozen-embedding baseline of EVALUATION.md."""

    version = "content-mean"
    max_history = 50
    provider = "numpy"  # what runs it (OnnxTowers: the ONNX Runtime execution provider)

    def item_vectors(self, content: np.ndarray, item_ids: list[str]) -> np.ndarray:
        return _normalise(content.astype(np.float32))  # (B, D)

    def user_vectors(self, histories: list[np.ndarray], history_ids: list[list[str]]) -> np.ndarray:
        return _normalise(np.stack([h[-self.max_history :].mean(axis=0) for h in histories]).astype(np.float32))


class IdParts:
    """The hybrid towers' ID parts by item id, each table ending in a zero row: the part of
    every item never trained on (and of padding)."""

    def __init__(self, path: Path):
        saved = np.load(path)
        self.row = {item_id: row for row, item_id in enumerate(saved["item_ids"].tolist())}
        self.item = _with_zero_row(saved["item_parts"])  # (W + 1, H): the item tower's
        self.history = _with_zero_row(saved["history_parts"])  # (W + 1, H'): the user tower's, per history item

    def rows(self, item_ids: list[str]) -> np.ndarray:
        return np.array([self.row.get(i, -1) for i in item_ids], dtype=np.int64)  # -1: the zero row


def _with_zero_row(table: np.ndarray) -> np.ndarray:
    return np.vstack([table, np.zeros((1, table.shape[1]))]).astype(np.float32)


class OnnxTowers:
    """Trained PCH towers exported by encoders.training.export_towers (the interface is described there).
    User tower input: history (B, N, D) oldest first, right-padded, with a mask (and the
    history's ID parts for hybrid towers)."""

    def __init__(self, towers_dir: Path, threads: int = 0):
        self.metadata = json.loads((towers_dir / TOWERS_METADATA).read_text())
        self.version: str = self.metadata["version"]
        self.max_history: int = self.metadata["max_history"]
        self.content_dim: int = self.metadata["content_dim"]
        self.item_session = open_session(towers_dir / ITEM_TOWER_ONNX, threads)
        self.user_session = open_session(towers_dir / USER_TOWER_ONNX, threads)
        self.id_parts = IdParts(towers_dir / ID_PARTS) if self.metadata.get("id_parts") else None
        self.provider: str = self.user_session.get_providers()[0]

    def item_vectors(self, content: np.ndarray, item_ids: list[str]) -> np.ndarray:
        feeds = {"content_embedding": content.astype(np.float32)}
        if self.id_parts is not None:
            feeds["item_id_parts"] = self.id_parts.item[self.id_parts.rows(item_ids)]  # (B, H)
        (vectors,) = self.item_session.run(["item_embedding"], feeds)
        return vectors  # (B, D_out)

    def user_vectors(self, histories: list[np.ndarray], history_ids: list[list[str]]) -> np.ndarray:
        batch = np.zeros((len(histories), self.max_history, self.content_dim), dtype=np.float32)  # (B, N, D)
        mask = np.zeros((len(histories), self.max_history), dtype=np.int64)
        rows = np.full((len(histories), self.max_history), -1, dtype=np.int64)
        for row, (history, ids) in enumerate(zip(histories, history_ids, strict=True)):
            recent = history[-self.max_history :]
            batch[row, : len(recent)] = recent
            mask[row, : len(recent)] = 1
            if self.id_parts is not None:
                rows[row, : len(recent)] = self.id_parts.rows(ids[-self.max_history :])
        feeds = {"history": batch, "history_mask": mask}
        if self.id_parts is not None:
            feeds["history_id_parts"] = self.id_parts.history[rows]  # (B, N, W); padding reads the zero row (-1)
        (vectors,) = self.user_session.run(["user_embedding"], feeds)
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
