"""Watchers that poll the online store for what was sent and record when each became readable.

They poll Feast, so they share the machine's cores with the worker they watch;
the benchmarks say so beside their figures.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from coldstart import store as feast_store


class ReadabilityWatcher(threading.Thread):
    """Polls for items sent but not yet readable (default: through Feast); records when each first appears.

    `find(pending ids) → the ids found` replaces the Feast read, e.g. by asking a retrieval server.
    """

    def __init__(self, store, poll_interval: float = 0.01, max_per_poll: int = 256, find=None):
        super().__init__(daemon=True)
        self.store = store
        self.find = find or (lambda pending: feast_store.read_item_features(self.store, pending))
        self.poll_interval = poll_interval
        self.max_per_poll = max_per_poll  # oldest first: a backlog must not make each poll slow
        self.sent_at: dict[str, float] = {}
        self.readable_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def sent(self, item_id: str, at: float) -> None:
        with self.lock:
            self.sent_at[item_id] = at

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                pending = [i for i in self.sent_at if i not in self.readable_at][: self.max_per_poll]
            if pending:
                found = self.find(pending)
                now = time.monotonic()
                with self.lock:
                    for item_id in found:
                        self.readable_at[item_id] = now
            time.sleep(self.poll_interval)

    def latencies_ms(self, item_ids=None) -> np.ndarray:
        with self.lock:
            ids = [i for i in (item_ids or self.readable_at) if i in self.readable_at]
            return np.array([(self.readable_at[i] - self.sent_at[i]) * 1000 for i in ids])

    def wait_all(self, timeout: float) -> bool:
        """Wait until everything sent so far is readable; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.readable_at) >= len(self.sent_at):
                    return True
            time.sleep(0.05)
        return False


class PublishedWatcher(ReadabilityWatcher):
    """Records when each item's record arrives on item-embeddings, which the worker publishes after the online
    store has the vector: upload → readable, plus the consumer's fetch wait (10 ms), for the CPU of one consumer
    rather than a Feast read per pending item every poll (which competed with the worker it measured). The
    consumer is librdkafka's (C) and reads only each record's key, the item id, so that the measuring process
    takes as little as it can of the cores it measures (plaintext brokers: the benchmarks' own local stack)."""

    def __init__(self, settings):
        from confluent_kafka import Consumer, TopicPartition

        super().__init__(store=None)
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "coldstart-bench-watcher",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        # From each partition's end now (resolved here, not at the first fetch, which may come after a record).
        ends = [self.consumer.get_watermark_offsets(TopicPartition("item-embeddings", p), timeout=30)[1]
                for p in range(settings.topic_partitions)]
        self.consumer.assign([TopicPartition("item-embeddings", p, end) for p, end in enumerate(ends)])

    def run(self) -> None:
        while not self.stopping.is_set():
            first = self.consumer.poll(0.1)  # returns at the first record; then whatever else has arrived
            messages = [first, *self.consumer.consume(num_messages=1000, timeout=0)] if first is not None else []
            now = time.monotonic()
            with self.lock:
                for message in messages:
                    item_id = message.key().decode() if message.error() is None and message.key() else None
                    if item_id in self.sent_at:
                        self.readable_at.setdefault(item_id, now)
        self.consumer.close()


class UserVectorWatcher:
    """Polls Feast for users whose vector should reflect more actions; records when it does."""

    def __init__(self, store, poll_interval: float = 0.01):
        self.store = store
        self.poll_interval = poll_interval
        self.expected: dict[str, int] = {}  # user → history length the last sent action leads to
        self.pending: list[tuple[str, int, float]] = []  # (user, length, sent at)
        self.latencies_ms: list[float] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sent(self, user_id: str) -> None:
        with self.lock:
            self.expected[user_id] = self.expected.get(user_id, 0) + 1
            self.pending.append((user_id, self.expected[user_id], time.monotonic()))

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                users = sorted({u for u, _, _ in self.pending})[:256]
            if users:
                lengths = self.store.get_online_features(
                    features=["user_embedding:history_length"], entity_rows=[{"user_id": u} for u in users]
                ).to_dict()["history_length"]
                seen = dict(zip(users, lengths))
                now = time.monotonic()
                with self.lock:
                    still = []
                    for user_id, length, sent_at in self.pending:
                        if (seen.get(user_id) or 0) >= length:
                            self.latencies_ms.append((now - sent_at) * 1000)
                        else:
                            still.append((user_id, length, sent_at))
                    self.pending = still
            time.sleep(self.poll_interval)

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending:
                    return True
            time.sleep(0.05)
        return False
