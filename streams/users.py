"""The user agent: user-actions → rolling history (faust table) → user tower (ONNX) → Feast.

Each positive action (click, like, share, purchase) enters the user's history,
a faust Table with a changelog topic, so a restarted worker resumes with the
same histories. Skips are valid but change nothing. Every micro-batch then
recomputes the touched users' vectors in one tower call over the content
embeddings of their last N items.

An action on an item the service has not seen yet is kept in the history and
waits up to COLDSTART_UNKNOWN_ITEM_WAIT_SECONDS for the item's upload (the
user's vector is recomputed as soon as it arrives); after that it is removed
from the history and sent to dead-letters with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone

import numpy as np

from coldstart import feature_store
from encoders.tower_runtime import load_towers
from streams.app import app, settings, user_actions_topic
from streams.dead_letters import dead_letter_event, send_dead_letter
from streams.items import model_executor
from streams.records import HistoryEntry, UserAction, UserHistory
from streams.sinks import OfflineBuffer, offline_buffers, retry_forever
from streams.validation import POSITIVE_ACTIONS, InvalidEvent, parse_user_action

log = logging.getLogger(__name__)

# Keyed by user_id, partitioned like user-actions (the producer's key hash), so each
# worker holds the histories of the users on its partitions.
user_histories = app.Table(
    "user-histories", default=UserHistory, partitions=settings.topic_partitions,
    key_type=str, value_type=UserHistory, use_partitioner=True,
)


class ContentEmbeddings:
    """Item content embeddings read from the online store, cached briefly (items rarely change)."""

    def __init__(self, store, ttl_seconds: float = 60, max_items: int = 50_000):
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.max_items = max_items
        self.cache: dict[str, tuple[float, np.ndarray]] = {}

    def get(self, item_ids: set[str]) -> dict[str, np.ndarray]:
        now = time.monotonic()
        found = {i: v for i, (at, v) in ((i, self.cache[i]) for i in item_ids if i in self.cache) if now - at < self.ttl_seconds}
        missing = [i for i in item_ids if i not in found]
        if missing:
            rows = feature_store.read_item_features(self.store, missing, features=("content_embedding",))
            if len(self.cache) + len(rows) > self.max_items:
                self.cache.clear()
            for item_id, row in rows.items():
                vector = np.asarray(row["content_embedding"], dtype=np.float32)
                self.cache[item_id] = (now, vector)
                found[item_id] = vector
        return found


class UserModels:
    def __init__(self):
        self.towers = load_towers(settings.onnx_dir, settings.encoder_name)
        self.store = feature_store.open_store(settings)
        self.content = ContentEmbeddings(self.store)
        from feature_repo.data_sources import user_embeddings_source

        self.offline_path = user_embeddings_source.path
        log.info("user agent ready: towers %s, history of %d", self.towers.version, settings.user_history_length)

    def user_vectors(self, histories: dict[str, list[HistoryEntry]]):
        """Vectors for users with at least one known item; and, per user, the item ids still unknown."""
        content = self.content.get({e.item_id for entries in histories.values() for e in entries})
        users, inputs, unknown = [], [], {}
        for user_id, entries in histories.items():
            missing = {e.item_id for e in entries if e.item_id not in content}
            if missing:
                unknown[user_id] = missing
            known = [content[e.item_id] for e in entries if e.item_id in content]
            if known:
                users.append(user_id)
                inputs.append(np.stack(known))  # (n, D_content), oldest first
        vectors = self.towers.user_vectors(inputs) if inputs else np.zeros((0, 0), np.float32)
        return users, [len(i) for i in inputs], vectors, unknown


class WaitingUsers:
    """Users whose history holds items not uploaded yet, with the deadline of each such item."""

    def __init__(self):
        self.deadlines: dict[str, dict[str, float]] = {}

    def update(self, unknown: dict[str, set[str]], recomputed: set[str]) -> None:
        for user_id in recomputed - set(unknown):
            self.deadlines.pop(user_id, None)
        for user_id, items in unknown.items():
            waiting = self.deadlines.setdefault(user_id, {})
            for item_id in items:
                waiting.setdefault(item_id, time.monotonic() + settings.unknown_item_wait_seconds)
            for item_id in set(waiting) - items:
                del waiting[item_id]


models_ready: asyncio.Future | None = None
waiting_users = WaitingUsers()


def record_action(action: UserAction) -> bool:
    """Add a positive action to the user's history; False if it is already there (a replay)."""
    entry = HistoryEntry(item_id=action.item_id, action=action.action, occurred_at=action.occurred_at)
    entries = list(user_histories[action.user_id].entries)
    if any((e.item_id, e.action, e.occurred_at) == (entry.item_id, entry.action, entry.occurred_at) for e in entries):
        return False
    entries.append(entry)
    entries.sort(key=lambda e: e.occurred_at)  # a late, older action takes its place in time
    user_histories[action.user_id] = UserHistory(entries=entries[-settings.user_history_length :])
    return True


async def recompute(models: UserModels, user_ids: set[str]):
    """New vectors for these users, pushed online; returns the offline frame (or None)."""
    histories = {u: list(user_histories[u].entries) for u in user_ids}
    users, lengths, vectors, unknown = await asyncio.get_running_loop().run_in_executor(
        model_executor, models.user_vectors, histories
    )
    waiting_users.update(unknown, set(user_ids))
    if not users:
        return None
    # Stamped with the time of computation: the table holds the whole history in event-time
    # order, so a later computation always knows at least as much as an earlier one.
    now = datetime.now(timezone.utc)
    frame = feature_store.user_embedding_frame(users, vectors, lengths, models.towers.version, [now] * len(users))
    await retry_forever("online write", feature_store.push_online, models.store, "user_embeddings_push_source", frame)
    return frame


@app.agent(user_actions_topic)
async def update_users(stream):
    global models_ready
    models_ready = asyncio.get_running_loop().run_in_executor(model_executor, UserModels)
    models = await models_ready
    offline = OfflineBuffer(stream, models.offline_path, feature_store.USER_EMBEDDING_SCHEMA, settings.offline_flush_seconds)
    offline_buffers.append(offline)
    async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_ms / 1000):
        touched: set[str] = set()
        for event in events:
            try:
                action = parse_user_action(event.value)
            except InvalidEvent as reason:
                await dead_letter_event(event, str(reason))
                continue
            if action.action in POSITIVE_ACTIONS and record_action(action):
                touched.add(action.user_id)
        frame = await recompute(models, touched) if touched else None
        offline.add(frame, list(events))
        await offline.flush()


@app.timer(interval=1.0)
async def recheck_waiting_users():
    """Recompute users whose unknown items have arrived; give up on items past their deadline."""
    if models_ready is None or not models_ready.done() or not waiting_users.deadlines:
        return
    models = models_ready.result()
    now = time.monotonic()
    still_unknown = {i for items in waiting_users.deadlines.values() for i in items}
    arrived = set(await asyncio.to_thread(models.content.get, still_unknown))
    ready = set()
    for user_id, items in list(waiting_users.deadlines.items()):
        expired = {i for i, deadline in items.items() if deadline <= now and i not in arrived}
        if expired:
            await give_up_on(user_id, expired)
        if expired or arrived & set(items):
            ready.add(user_id)
    if ready:
        frame = await recompute(models, ready)
        if frame is not None:
            await retry_forever("offline write", feature_store.write_offline, models.offline_path, frame,
                                feature_store.USER_EMBEDDING_SCHEMA)


async def give_up_on(user_id: str, item_ids: set[str]) -> None:
    """Remove actions on never-uploaded items from the history, each with a dead letter."""
    entries = user_histories[user_id].entries
    for entry in (e for e in entries if e.item_id in item_ids):
        original = json.dumps({"user_id": user_id, "item_id": entry.item_id, "action": entry.action,
                               "occurred_at": entry.occurred_at.isoformat()}).encode()
        await send_dead_letter("user-actions", -1, -1, user_id, original,
                               f"item_id {entry.item_id!r} was never uploaded within "
                               f"{settings.unknown_item_wait_seconds:g}s; action removed from the history")
    user_histories[user_id] = UserHistory(entries=[e for e in entries if e.item_id not in item_ids])
