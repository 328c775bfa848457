"""The service's own history as training data: what it has seen on its topics, or kept in its offline store.

`coldstart data export` writes it as a data folder (encoders.training.own_data),
so a team trains on what the service has seen.

From the topics (the full record): item-uploads and user-actions are read from
the earliest offset the broker still holds to their end, without a consumer
group (nothing is committed, the workers are not disturbed), decoded with the
worker's own client and codecs (aiokafka; streams.patches checks them) and
validated by the worker's own parser (streams.validation); what the worker
dead-letters is left out and counted. Per item the newest event wins, as in the
online store (an equal event time: the first one read); an item whose newest
event is its removal is left out, with the actions on it and on items never
uploaded. An action repeated exactly (a replay) is kept once.

From the offline store (when the topics no longer hold the beginning): what the
workers wrote to the parquet part files. It keeps less: per item its title and
category (not description, brand, tags or price, so the item text differs from
the one the worker encoded), and per user the item ids of the history after
each update, not the actions. Each update's new items become `click`s at the
time of that update (when the service recorded them, not when they happened:
a late action comes after those recorded before it); an item's repeat that
replaces an older occurrence of the same item at the front of a full history
is not seen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_VIEW, Settings
from streams.patches import DEV_FETCH_MAX_WAIT_MS, check_codecs
from streams.validation import InvalidEvent, parse_item_upload, parse_user_action

log = logging.getLogger(__name__)

ITEM_TOPIC, ACTION_TOPIC = "item-uploads", "user-actions"


class HistoryError(RuntimeError):
    """The history cannot be read (a topic that does not exist, …); the message says why."""


@dataclass
class History:
    """Rows in the training-data format: items (the item-uploads fields) and interactions, and what was
    left out, counted."""

    items: list[dict] = field(default_factory=list)  # oldest upload first
    interactions: list[dict] = field(default_factory=list)  # in time order
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in sorted(self.counts.items()))


# ---- from the topics -----------------------------------------------------------------------------


def from_topics(settings: Settings, idle_seconds: float = 2.0, patience_seconds: float = 30.0) -> History:
    """Everything the broker still holds on item-uploads and user-actions, as training rows.

    A topic is read until every partition has reached the end offset the broker reported at the start
    and nothing more arrived for idle_seconds (0: at once, what is read of a topic still being written to
    is what it held at the start); or, if a partition stays short of its end (a broker that misreports end
    offsets), once nothing arrived for patience_seconds.
    """
    check_codecs()  # the worker refuses to start without every codec; so does this
    uploads = asyncio.run(_read_topic(settings, ITEM_TOPIC, idle_seconds, patience_seconds))
    actions = asyncio.run(_read_topic(settings, ACTION_TOPIC, idle_seconds, patience_seconds))
    history = History()
    counts = history.counts

    newest = {}  # item_id → its newest ItemUpload (or removal)
    for value in uploads:
        counts["item_events"] += 1
        try:
            item = parse_item_upload(value)
        except InvalidEvent:
            counts["invalid_item_events"] += 1
            continue
        held = newest.get(item.item_id)
        if held is None or item.uploaded_at > held.uploaded_at:
            newest[item.item_id] = item
    catalogue = {item_id: item for item_id, item in newest.items() if not item.deleted}
    counts["removed_items"] = len(newest) - len(catalogue)
    for item in sorted(catalogue.values(), key=lambda i: (i.uploaded_at, i.item_id)):
        history.items.append({"item_id": item.item_id, "title": item.title, "description": item.description,
                              "category": item.category, "brand": item.brand, "price": item.price,
                              "tags": list(item.tags), "uploaded_at": item.uploaded_at})

    seen = set()
    for value in actions:
        counts["action_events"] += 1
        try:
            action = parse_user_action(value)
        except InvalidEvent:
            counts["invalid_action_events"] += 1
            continue
        key = (action.user_id, action.item_id, action.action, action.occurred_at)
        if key in seen:
            counts["repeated_actions"] += 1
        elif action.item_id not in catalogue:
            counts["actions_on_removed_or_unknown_items"] += 1
        else:
            seen.add(key)
            history.interactions.append({"user_id": action.user_id, "item_id": action.item_id,
                                         "action": action.action, "occurred_at": action.occurred_at})
    history.interactions.sort(key=lambda row: row["occurred_at"])  # stable: a user's ties stay in topic order
    return history


async def _read_topic(settings: Settings, topic: str, idle_seconds: float, patience_seconds: float) -> list:
    """The values of every record on the topic, partition by partition in offset order."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap.split(","), group_id=None, enable_auto_commit=False,
        # tansu does not wake a waiting fetch on new data (shared/notes/kafka-broker.md): wait briefly.
        fetch_max_wait_ms=DEV_FETCH_MAX_WAIT_MS if settings.dev else 500, **settings.aiokafka_client_options(),
    )
    try:
        await consumer.start()
        await consumer.topics()  # metadata
        numbers = consumer.partitions_for_topic(topic)
        if not numbers:
            raise HistoryError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}")
        records = await _read_to_end(consumer, topic, sorted(numbers), idle_seconds, patience_seconds)
    except KafkaError as err:
        raise HistoryError(f"cannot read {topic} from {settings.kafka_bootstrap}: {err}") from None
    finally:
        await consumer.stop()
    log.info("%s: %d records from %d partitions", topic, sum(map(len, records)), len(records))
    return [m.value for messages in records for m in sorted(messages, key=lambda m: m.offset)]


async def _read_to_end(consumer, topic: str, numbers: list[int], idle_seconds: float,
                       patience_seconds: float) -> list[list]:
    """Each partition's records, from its beginning to its end (from_topics says when that is)."""
    from aiokafka import TopicPartition

    partitions = [TopicPartition(topic, p) for p in numbers]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    ends = await consumer.end_offsets(partitions)
    records = {p: [] for p in partitions}
    quiet_since = time.monotonic()
    while True:
        batches = await consumer.getmany(*partitions, timeout_ms=200)
        for partition, messages in batches.items():
            records[partition] += messages
        if any(batches.values()):
            quiet_since = time.monotonic()
        quiet = time.monotonic() - quiet_since  # idle_seconds 0: stop at the ends, however busy the topic
        positions = {p: (await consumer.position(p), ends[p]) for p in partitions}
        short = {p: at for p, at in positions.items() if at[0] < at[1]}
        if not short and quiet >= idle_seconds:
            return list(records.values())
        if quiet >= patience_seconds:
            log.warning("%s: stopped short of the end offsets the broker reported (%s): nothing more came for %.0f s",
                        topic, ", ".join(f"[{p.partition}] at {a} of {b}" for p, (a, b) in short.items()), quiet)
            return list(records.values())


# ---- from the offline store -----------------------------------------------------------------------


def from_offline(settings: Settings) -> History:
    """What the offline store holds, as training rows (see the module's docstring for what it lacks)."""
    store = feast_store.open_store(settings)
    history = History()
    counts = history.counts
    item_rows = feast_store.read_offline(store, ITEM_VIEW, ["item_id", "title", "category", "deleted",
                                                            "event_timestamp"])
    counts["item_rows"] = len(item_rows)
    # Per item the newest row; at an equal time a removal wins.
    item_rows = item_rows.assign(deleted=item_rows["deleted"].fillna(False).astype(bool))
    newest = item_rows.sort_values(["event_timestamp", "deleted"], kind="stable").groupby("item_id").tail(1)
    catalogue = set()
    for row in newest.sort_values(["event_timestamp", "item_id"]).itertuples(index=False):
        if row.deleted:
            counts["removed_items"] += 1
        elif not (row.title or "").strip():
            counts["items_without_text_offline"] += 1  # its text was in the description, which is not kept
        else:
            catalogue.add(row.item_id)
            history.items.append({"item_id": row.item_id, "title": row.title, "category": row.category or "",
                                  "uploaded_at": row.event_timestamp.to_pydatetime()})

    user_rows = feast_store.read_offline(store, USER_VIEW, ["user_id", "seen_item_ids", "event_timestamp"])
    counts["user_rows"] = len(user_rows)
    user_rows = user_rows.sort_values(["user_id", "event_timestamp"], kind="stable")
    for user_id, rows in user_rows.groupby("user_id", sort=False):
        before: list[str] = []
        for seen, stamp in zip(rows["seen_item_ids"], rows["event_timestamp"]):
            after = list(seen if seen is not None else [])
            held = Counter(before)
            recorded = set()
            for item_id in after:  # the occurrences this update added, in history order
                if held[item_id] > 0:
                    held[item_id] -= 1
                elif item_id in recorded:
                    counts["repeated_actions"] += 1  # the same item twice at one time: one action
                elif item_id not in catalogue:
                    counts["actions_on_removed_or_unknown_items"] += 1
                else:
                    recorded.add(item_id)
                    history.interactions.append({"user_id": user_id, "item_id": item_id, "action": "click",
                                                 "occurred_at": stamp.to_pydatetime()})
            before = after
    history.interactions.sort(key=lambda row: row["occurred_at"])  # stable: a user's order stays
    return history
