"""Every record schema on the topics, in one place."""

from __future__ import annotations

from datetime import datetime
from typing import Dict, List, Optional

import faust


class ItemUpload(faust.Record, serializer="json", isodates=True):
    """A new item on `item-uploads` (key: item_id), or its removal (`deleted`). Validated by streams.validation."""

    item_id: str
    title: str  # empty for a removal
    uploaded_at: datetime  # event time: a newer upload (or removal) of the same item_id replaces an older one
    deleted: bool = False  # take the item down: out of the online store, the index and every later result
    description: str = ""
    category: str = ""
    brand: str = ""
    price: Optional[float] = None
    tags: List[str] = []


class ItemEmbedding(faust.Record, serializer="json", isodates=True):
    """Published on `item-embeddings` once the online store has the vector (or the removal): what the
    retrieval index of every serving replica follows (coldstart.retrieval)."""

    item_id: str
    vector: List[float]  # empty for a removal
    model_version: str
    event_time: datetime
    category: str = ""  # for retrieval filters
    deleted: bool = False
    version: str = "default"  # the model version (coldstart.rollout) whose Feast project holds the vector


class DeadLetter(faust.Record, serializer="json", isodates=True):
    """An event that could not be processed, with the bytes as received (the first 64 KiB of them)."""

    topic: str
    partition: int
    offset: int
    reason: str
    original_base64: str  # the original value bytes, base64 (they may not be valid UTF-8), cut at 64 KiB
    original_size: int  # bytes of the whole original: more than the base64 holds if it was cut
    original_sha256: str  # of the whole original, to match it against a producer's records
    key: Optional[str] = None
    received_at: Optional[datetime] = None


class UserAction(faust.Record, serializer="json", isodates=True):
    """A user's action on an item, on `user-actions` (key: user_id). Validated by streams.validation."""

    user_id: str
    item_id: str
    action: str  # one of streams.validation.ACTIONS
    occurred_at: datetime  # event time


class HistoryEntry(faust.Record, serializer="json", isodates=True):
    """One positive action in a user's rolling history (faust table value)."""

    item_id: str
    action: str
    occurred_at: datetime


class UserHistory(faust.Record, serializer="json", isodates=True):
    """A user's last N positive actions, oldest first (value of the user-histories table)."""

    entries: List[HistoryEntry] = []


class WaitingItems(faust.Record, serializer="json"):
    """A user's actions on items not uploaded yet: item_id → deadline, epoch seconds (value of waiting-items)."""

    deadlines: Dict[str, float] = {}
