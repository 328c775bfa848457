"""The user agent: user-actions → rolling history (faust table) → user tower (ONNX) → Feast.

Each positive action (click, like, share, purchase) enters the user's history,
a faust Table with a changelog topic, so a restarted worker resumes with the
same histories. Skips are valid but change nothing. Every micro-batch then
recomputes the touched users' vectors in one tower call over the content
embeddings of their last N items.

An action on an item the service has not seen yet is kept in the history and
waits up to COLDSTART_UNKNOWN_ITEM_WAIT_SECONDS for the item's upload (the
user's vector is recomputed as soon as it arrives); after that it is removed
from the history and sent to dead-letters with the reason. The deadlines are
kept in a second table (waiting-items, wall-clock times), so they survive a
restart or a rebalance: whichever worker holds the user's partition then
gives up on time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from coldstart import metrics
from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_PUSH_SOURCE
from streams import patches
from streams.keys import Forwarder
from streams.models import ServedVersions, VersionModels
from streams.records import HistoryEntry, UserAction, UserHistory, WaitingItems
from streams.sinks import OfflineBuffer, retry_forever
from streams.validation import POSITIVE_ACTIONS, parse_user_action

log = logging.getLogger(__name__)


class ContentEmbeddings:
    """Item content embeddings read from the online store, cached briefly (items rarely change)."""

    def __init__(self, store, ttl_seconds: float = 60, max_items: int = 50_000):
        self.store = store
        self.view = feast_store.stored_view(store, ITEM_VIEW, ["content_embedding"])  # read raw: a worker's hot path
        self.ttl_seconds = ttl_seconds
        self.max_items = max_items
        self.cache: dict[str, tuple[float, np.ndarray]] = {}

    def get(self, item_ids: set[str]) -> dict[str, np.ndarray]:
        now = time.monotonic()
        found = {i: v for i, (at, v) in ((i, self.cache[i]) for i in item_ids if i in self.cache) if now - at < self.ttl_seconds}
        missing = [i for i in item_ids if i not in found]
        if missing:
            read = feast_store.online_read(self.store, self.view, missing)["content_embedding"]
            rows = {i: v for i, v in zip(missing, read) if v is not None}  # None: never uploaded, or removed
            if len(self.cache) + len(rows) > self.max_items:
                self.cache.clear()
            for item_id, vector in rows.items():
                self.cache[item_id] = (now, vector)
                found[item_id] = vector
        return found


def user_vectors(version: VersionModels, histories: dict[str, list[HistoryEntry]], found: dict[str, np.ndarray]):
    """One version's vectors for users with at least one known item; and, per user, the item ids still unknown.

    found: the content embeddings of the histories' items the version's online store has (ContentEmbeddings.get).
    """
    users, inputs, input_ids, unknown = [], [], [], {}
    for user_id, entries in histories.items():
        missing = {e.item_id for e in entries if e.item_id not in found}
        if missing:
            unknown[user_id] = missing
        known = [e.item_id for e in entries if e.item_id in found]
        if known:
            users.append(user_id)
            inputs.append(np.stack([found[i] for i in known]))  # (n, D_content), oldest first
            input_ids.append(known)
    with metrics.TOWER_SECONDS.labels("user").time():
        vectors = version.towers.user_vectors(inputs, input_ids) if inputs else np.zeros((0, 0), np.float32)
    return users, [len(i) for i in inputs], vectors, unknown


def register(app) -> None:
    """Declare the user agent, its two tables and the timer that rechecks waiting actions on the app."""
    settings = app.settings
    # Keyed by user_id, partitioned like user-actions (the producer's key hash), so each
    # worker holds the histories (and waiting deadlines) of the users on its partitions.
    user_histories = app.Table(
        "user-histories", default=UserHistory, partitions=settings.topic_partitions,
        key_type=str, value_type=UserHistory, use_partitioner=True,
    )
    waiting_items = app.Table(
        "waiting-items", default=None, partitions=settings.topic_partitions,
        key_type=str, value_type=WaitingItems, use_partitioner=True,
    )
    for table in (user_histories, waiting_items):
        patches.key_changelog_like_the_input(table)
    served = ServedVersions(settings, with_encoder=False)
    contents: dict[str, ContentEmbeddings] = {}  # per version: its own content embeddings (its encoder's)
    loaded: list[VersionModels] = []  # the active version once loaded (the timer waits for it)

    def content_of(version: VersionModels) -> ContentEmbeddings:
        return contents.setdefault(version.name, ContentEmbeddings(version.store))

    forwarder = Forwarder(app.user_actions_topic, "user_id", settings.topic_partitions)

    def record_action(action: UserAction) -> None:
        """Add a positive action to the user's history, unless it is already there (a replay)."""
        entry = HistoryEntry(item_id=action.item_id, action=action.action, occurred_at=action.occurred_at)
        entries = list(user_histories[action.user_id].entries)
        if any((e.item_id, e.action, e.occurred_at) == (entry.item_id, entry.action, entry.occurred_at) for e in entries):
            return
        entries.append(entry)
        entries.sort(key=lambda e: e.occurred_at)  # a late, older action takes its place in time
        user_histories[action.user_id] = UserHistory(entries=entries[-settings.user_history_length :])

    def update_waiting(unknown: dict[str, set[str]], recomputed: set[str]) -> None:
        """Keep each recomputed user's waiting items and their deadlines (first seen + the wait) in the table."""
        for user_id in recomputed:
            before = waiting_items.get(user_id)
            deadlines = before.deadlines if before is not None else {}
            now = {item_id: deadlines.get(item_id, time.time() + settings.unknown_item_wait_seconds)
                   for item_id in unknown.get(user_id, ())}
            if now and now != deadlines:
                waiting_items[user_id] = WaitingItems(deadlines=now)
            elif not now and before is not None:
                del waiting_items[user_id]

    async def recompute(user_ids: set[str]) -> list[tuple]:
        """New vectors for these users in every version the state names for users, pushed online; returns the
        offline rows as (table, frame) pairs. A version the state gains meanwhile gets them too (streams.models).

        In micro-batches of COLDSTART_BATCH_SIZE users: a film that arrives can make hundreds of waiting users
        due at once, and one tower call and push for all of them held the model thread (which the item agent
        shares) for up to a second, so fresh items waited behind it. Between micro-batches, item batches go first.
        """
        ordered = sorted(user_ids)
        rows, written = [], []
        versions = await asyncio.to_thread(served.current, True)
        while versions:
            for version in versions:
                frames = [frame for start in range(0, len(ordered), settings.batch_size)
                          if (frame := await recompute_batch(version, ordered[start : start + settings.batch_size],
                                                             track_waiting=not written and version is versions[0]))
                          is not None]
                if frames:
                    rows.append((version.user_offline, pd.concat(frames, ignore_index=True)))
            written += versions
            versions = await retry_forever("rollout state read", served.added_since, written, True)
        return rows

    async def recompute_batch(version: VersionModels, user_ids: list[str], track_waiting: bool):
        histories = {u: list(user_histories[u].entries) for u in user_ids}
        # An online store (or a cluster master) down: wait and retry, as writes do, rather than crash the agent.
        found = await retry_forever("content read", content_of(version).get,
                                    {e.item_id for entries in histories.values() for e in entries})
        users, lengths, vectors, unknown = await asyncio.get_running_loop().run_in_executor(
            app.model_executor, user_vectors, version, histories, found
        )
        if track_waiting:  # the active version's view of which items are still unknown
            update_waiting(unknown, set(user_ids))
        if not users:
            return None
        # Stamped with the time of computation: the table holds the whole history in event-time
        # order, so a later computation always knows at least as much as an earlier one.
        now = datetime.now(timezone.utc)
        seen = [[e.item_id for e in histories[u]] for u in users]  # retrieval leaves these out
        frame = feast_store.user_embedding_frame(users, vectors, lengths, seen, version.towers.version,
                                                 [now] * len(users))
        await retry_forever("online write", feast_store.push_online, version.store, USER_PUSH_SOURCE, frame)
        return frame

    @app.agent(app.user_actions_topic)
    async def update_users(stream):
        (active, *_) = await asyncio.to_thread(served.current, True)
        loaded.append(active)
        app.models_loaded("users", active, active.towers.version, active.towers.provider)
        log.info("user agent ready: towers %s, history of %d", active.towers.version, settings.user_history_length)
        offline = OfflineBuffer(stream, active.user_offline, settings.offline_flush_seconds)
        app.offline_buffers.append(offline)
        async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_ms / 1000):
            metrics.MICRO_BATCH_EVENTS.labels("users").observe(len(events))
            here: list[UserAction] = []
            sent_at: list[float] = []  # the positive actions' record timestamps (action → user vector latency)
            for event, action in await app.dead_letters.parse_each(events, parse_user_action):
                # off its user's partition: forwarded there (the history may live on another worker)
                if not forwarder.misplaced(event, action.user_id, action):
                    here.append(action)
                    sent_at.append(event.message.timestamp if action.action in POSITIVE_ACTIONS else None)
            here += await forwarder.forward_pending()  # the ones too large to forward stay here
            positive = [a for a in here if a.action in POSITIVE_ACTIONS]
            for action in positive:
                record_action(action)
            # A replayed action recomputes its user too: the worker that recorded it (the changelog has it) may
            # have stopped before pushing the vector, and the history alone would then never reach the store.
            touched = {a.user_id for a in positive}
            for table, frame in (await recompute(touched) if touched else []):
                offline.add(frame, [], table)
            metrics.observe_since(metrics.ACTION_TO_USER_VECTOR, sent_at)
            offline.add(None, list(events))
            await offline.flush()

    @app.timer(interval=1.0)
    async def recheck_waiting_users():
        """Recompute users whose unknown items have arrived; give up on items past their deadline."""
        if not loaded:
            return
        waiting = {user_id: value.deadlines for user_id, value in list(waiting_items.items()) if value is not None}
        if not waiting:
            return
        (active, *_) = await asyncio.to_thread(served.current, True)
        now = time.time()
        still_unknown = {i for items in waiting.values() for i in items}
        arrived = set(await asyncio.to_thread(content_of(active).get, still_unknown))
        ready = set()
        for user_id, deadlines in waiting.items():
            expired = {i for i, deadline in deadlines.items() if deadline <= now and i not in arrived}
            if expired:
                await give_up_on(user_id, expired)
            if expired or arrived & set(deadlines):
                ready.add(user_id)
        if ready:
            for table, frame in await recompute(ready):
                await retry_forever("offline write", table.write, frame)

    async def give_up_on(user_id: str, item_ids: set[str]) -> None:
        """Remove actions on never-uploaded items from the history, each with a dead letter."""
        entries = user_histories[user_id].entries
        for entry in (e for e in entries if e.item_id in item_ids):
            original = json.dumps({"user_id": user_id, "item_id": entry.item_id, "action": entry.action,
                                   "occurred_at": entry.occurred_at.isoformat()}).encode()
            await app.dead_letters.send("user-actions", -1, -1, user_id, original,
                                        f"item_id {entry.item_id!r} was never uploaded within "
                                        f"{settings.unknown_item_wait_seconds:g}s; action removed from the history")
        user_histories[user_id] = UserHistory(entries=[e for e in entries if e.item_id not in item_ids])
