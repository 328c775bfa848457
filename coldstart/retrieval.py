"""Candidate retrieval: the top k items for a user over the whole catalogue, from an in-process ANN index.

    from coldstart.config import Settings
    from coldstart.retrieval import Retriever

    retriever = Retriever(Settings.from_env()).start().wait_ready()   # once per process
    retriever.retrieve("u42", k=100, exclude_seen=True, filter={"category": "Comedy"})

(`coldstart.retrieve(user_id, ...)` does the same with a process-wide retriever built from the environment.)

Feast has no vector search on a Redis online store, and Debian's Redis 7 has
none either, so each serving process keeps its own index: one usearch HNSW
graph (cosine) per model version. At start it is rebuilt completely from the
online store (coldstart.store.scan_items), then kept current from the
item-embeddings topic, which every replica reads whole (no consumer group):
Kafka is the replication. It reports ready once the rebuild is done and the
topic has been read up to its end once.

Newest event time wins per item, as in the online store: an upload older than
what the index holds, or than the item's removal, changes nothing; a removal
takes the item out of every version's index. A user is answered from the one
index whose towers made their vector: no answer mixes versions.

Model versions (coldstart.rollout): a user is read from the active version's
Feast project and answered from that version's index, both chosen by one read
of the rollout state, and the answer names the version. The index of a version
being rolled out is built while it is backfilled (standby) — from the
item-embeddings records the workers and the backfill publish under its name,
and from its project at start — so reads switch at once with the state.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from array import array
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from coldstart import store as feast_store
from coldstart.config import USER_VIEW, Settings
from coldstart.ranking import UnknownUser
from coldstart.rollout import DEFAULT, ServedStores, read_state

log = logging.getLogger(__name__)

MAX_K = 1000
FILTERS = ("category",)
# Up to this many items (a catalogue, or the items a filter keeps) a scan is about as fast as the graph
# and exact, so it is scanned; above, the graph is searched (BENCHMARKS.md, retrieve).
EXACT_LIMIT = 10_000
# A filter keeping at most this many items is answered from their vectors alone; a broader one by
# searching for more neighbours than asked and keeping the matching ones.
EXACT_FILTER_LIMIT = 4_096
# HNSW build beam (BENCHMARKS.md, retrieve); the links per node and the search beam are settings.
EXPANSION_ADD = 64
TOPIC = "item-embeddings"
# How far before the start the topic is read again: covers producers' clock skew. Re-reading is harmless.
REPLAY_MARGIN_S = 60.0


class NotReady(RuntimeError):
    """The index is still being rebuilt, or has no item of the user's model version."""


@dataclass(frozen=True)
class Retrieved:
    item_id: str
    score: float  # cosine of the user and item vectors


@dataclass(frozen=True)
class Retrieval:
    user_id: str
    model_version: str  # the item vectors' version (encoder + towers)
    items: list[Retrieved]  # best first
    version: str = DEFAULT  # the served model version (coldstart.rollout) whose vectors answered


def categories_of(category: str) -> tuple[str, ...]:
    """An item's categories: its `category` field split on commas ("Animation, Comedy" is two)."""
    return tuple(part.strip() for part in category.split(",") if part.strip())


def towers_version(item_version: str) -> str:
    """The towers part of an item vector's version ("<encoder>+<towers>"): what a user vector's version names."""
    return item_version.rsplit("+", 1)[-1]


class VersionIndex:
    """The item vectors of one model version: a usearch graph keyed by slot, and the slot ↔ item maps."""

    def __init__(self, version: str, ndim: int, dtype: str, expansion_search: int, connectivity: int):
        from usearch.index import Index

        self.version = version
        self.ndim = ndim
        self.stored_as = np.float16 if dtype == "f16" else np.float32
        self.graph = Index(ndim=ndim, metric="cos", dtype=dtype, connectivity=connectivity,
                           expansion_add=EXPANSION_ADD, expansion_search=expansion_search)
        self.slot_of: dict[str, int] = {}
        self.items: list[str | None] = []  # slot → item id (None: a freed slot)
        self.times = array("d")  # slot → event time of its vector (epoch seconds)
        self.categories: list[tuple[str, ...]] = []  # slot → the item's categories (shared tuples)
        self.members: dict[str, set[int]] = {}  # category → slots
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.slot_of)

    def event_time(self, item_id: str) -> float:
        slot = self.slot_of.get(item_id)
        return -math.inf if slot is None else self.times[slot]

    def put(self, item_ids: list[str], vectors: np.ndarray, categories: list[str], event_times: list[float]) -> None:
        """Add or replace items (the caller has checked their event times). A new vector gets a new slot:
        usearch removes lazily, and a fresh key never meets the removed one's graph links."""
        self.remove(item_ids)
        slots = np.arange(len(self.items), len(self.items) + len(item_ids), dtype=np.uint64)
        self.graph.add(slots, np.asarray(vectors, dtype=np.float32), threads=0)  # every core: a rebuild is the long part
        for slot, item_id, category, event_time in zip(slots.tolist(), item_ids, categories, event_times):
            cats = self._shared.setdefault(categories_of(category), categories_of(category))
            self.slot_of[item_id] = slot
            self.items.append(item_id)
            self.times.append(event_time)
            self.categories.append(cats)
            for cat in cats:
                self.members.setdefault(cat, set()).add(slot)

    def remove(self, item_ids) -> None:
        for item_id in item_ids:
            slot = self.slot_of.pop(item_id, None)
            if slot is None:
                continue
            self.graph.remove(slot)
            self.items[slot] = None
            for cat in self.categories[slot]:
                self.members[cat].discard(slot)
            self.categories[slot] = ()

    def search(self, query: np.ndarray, k: int, excluded: set[str], categories: tuple[str, ...] | None) -> list[Retrieved]:
        excluded_slots = {self.slot_of[i] for i in excluded if i in self.slot_of}
        allowed = None
        if categories is not None:
            allowed = set().union(*(self.members.get(c, set()) for c in categories)) - excluded_slots
            if len(allowed) <= EXACT_FILTER_LIMIT:
                return self._scan(query, k, np.fromiter(allowed, dtype=np.uint64, count=len(allowed)))
        size = len(self.slot_of)
        exact = size <= EXACT_LIMIT
        wanted = k + len(excluded_slots)
        count = wanted if allowed is None else math.ceil(wanted * size / max(len(allowed), 1))
        while True:
            count = min(count, size)
            matches = self.graph.search(query, count, exact=exact, threads=1)
            found = [Retrieved(self.items[slot], 1.0 - distance)
                     for slot, distance in zip(matches.keys.tolist(), matches.distances.tolist())
                     if slot not in excluded_slots and (allowed is None or slot in allowed)]
            if len(found) >= k or count >= size:
                return found[:k]
            count *= 2  # too many were left out by the filter: look further

    def _scan(self, query: np.ndarray, k: int, slots: np.ndarray) -> list[Retrieved]:
        """Exact top k among a few slots, from their stored vectors."""
        if not len(slots):
            return []
        vectors = np.vstack(self.graph.get(slots, dtype=np.float32)).reshape(len(slots), self.ndim)
        query = query.astype(self.stored_as).astype(np.float32)  # as the graph compares: the same scores either way
        norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(query)
        scores = vectors @ query / np.maximum(norms, 1e-12)
        top = np.argsort(-scores, kind="stable")[:k]
        return [Retrieved(self.items[int(slots[i])], float(scores[i])) for i in top]


class Retriever:
    """Every model version's index, rebuilt from the online store and kept current from item-embeddings.

    `start()` rebuilds and follows in a background thread; `ready` is set once the index is complete.
    """

    def __init__(self, settings: Settings, store=None):
        self.settings = settings
        self.store = store if store is not None else feast_store.open_store(settings)
        self.stores = ServedStores(settings, self.store)
        self.indexes: dict[tuple[str, str], VersionIndex] = {}  # (served version, item vectors' model_version)
        self.removed_at: dict[str, float] = {}  # item id → event time of its latest removal
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.applied = 0  # topic records applied since the start
        self.loaded_in_s: float | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._user_view = feast_store.stored_view(self.store, USER_VIEW, ("user_embedding", "model_version",
                                                                           "seen_item_ids"))

    # ---- keeping the index current -------------------------------------------------------

    def start(self) -> "Retriever":
        self._thread = threading.Thread(target=self._run, name="retrieval-index", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_ready(self, timeout: float = 600) -> "Retriever":
        if not self.ready.wait(timeout) or self.failure:
            raise NotReady(f"the retrieval index is not ready after {timeout:.0f}s: {self.failure or 'still loading'}")
        return self

    def _run(self) -> None:
        try:
            consumer = self._consumer()
            try:
                self._seek_to_start(consumer)  # before the rebuild: anything written meanwhile is on the topic after it
                self.load()
                self._follow(consumer)
            finally:
                consumer.close()
        except BaseException as err:  # reported by /ready and wait_ready
            log.exception("retrieval index stopped")
            self.failure = err

    def _consumer(self):
        from kafka import KafkaConsumer

        return KafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap.split(","), enable_auto_commit=False, group_id=None,
            # tansu does not wake a waiting fetch on new data (shared/notes/kafka-broker.md): wait briefly.
            fetch_max_wait_ms=10 if self.settings.dev else 100, **self.settings.kafka_client_options(),
        )

    def _seek_to_start(self, consumer) -> None:
        """Each partition from the earlier of its end and its first record since REPLAY_MARGIN_S ago."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        partitions = [TopicPartition(TOPIC, p) for p in range(self.settings.topic_partitions)]
        consumer.assign(partitions)
        ends = consumer.end_offsets(partitions)
        try:
            since = consumer.offsets_for_times({p: int((time.time() - REPLAY_MARGIN_S) * 1000) for p in partitions})
        except KafkaError:  # a broker without timestamp look-ups: the end alone (taken before the rebuild) is enough
            since = {}
        for partition in partitions:
            found = since.get(partition)
            consumer.seek(partition, min(ends[partition], found.offset) if found else ends[partition])

    def load(self) -> int:
        """Rebuild every index from the online store; returns the items loaded."""
        start, count = time.monotonic(), 0
        for served in read_state(self.stores.client, self.settings).serving:  # the target and standby too
            for page in feast_store.scan_items(self.stores.store_of(served)):
                self.apply_items(page.item_ids, page.vectors, page.model_versions, page.categories, page.event_times,
                                 [served] * len(page.item_ids))
                count += len(page.item_ids)
            if count // 100_000 != (count - len(page.item_ids)) // 100_000:
                log.info("retrieval index: %d items loaded from the online store", count)
        self.loaded_in_s = time.monotonic() - start
        log.info("retrieval index: %d items loaded in %.1fs (%s)", count, self.loaded_in_s, self.sizes())
        return count

    def _follow(self, consumer) -> None:
        while not self._stopping.is_set():
            batches = consumer.poll(timeout_ms=100, max_records=5000)
            records = [json.loads(m.value) for messages in batches.values() for m in messages]
            if records:
                self.apply_items(
                    [r["item_id"] for r in records],
                    [None if r.get("deleted") else np.asarray(r["vector"], dtype=np.float32) for r in records],
                    [r["model_version"] for r in records], [r.get("category", "") for r in records],
                    [datetime.fromisoformat(r["event_time"]).timestamp() for r in records],
                    [r.get("version", DEFAULT) for r in records],
                )
                self.applied += len(records)
            elif not self.ready.is_set():
                log.info("retrieval index ready: %s", self.sizes())
                self.ready.set()  # caught up with the topic once: complete

    def apply_items(self, item_ids, vectors, versions, categories, event_times, served=None) -> None:
        """Apply uploads (a vector) and removals (None), newest event time winning per item. served: each
        record's served model version (coldstart.rollout; default: DEFAULT)."""
        uploads: dict[tuple[str, str], dict[str, tuple]] = {}  # index key → item id → (vector, category, time)
        served = served or [DEFAULT] * len(item_ids)
        with self.lock:
            for item_id, vector, version, category, event_time, name in zip(item_ids, vectors, versions, categories,
                                                                            event_times, served):
                if vector is None:
                    self._remove(item_id, event_time, uploads)
                elif event_time > self.removed_at.get(item_id, -math.inf):
                    pending = uploads.setdefault((name, version), {})
                    index = self.indexes.get((name, version))
                    latest = max(index.event_time(item_id) if index else -math.inf,
                                 pending[item_id][2] if item_id in pending else -math.inf)
                    if event_time > latest:
                        pending[item_id] = (vector, category, event_time)
            for key, items in uploads.items():
                if items:
                    ids = list(items)
                    vectors = np.stack([items[i][0] for i in ids])
                    index = self.indexes.get(key)
                    if index is None:
                        index = self.indexes[key] = VersionIndex(
                            key[1], vectors.shape[1], self.settings.index_dtype, self.settings.index_expansion_search,
                            self.settings.index_connectivity)
                    index.put(ids, vectors, [items[i][1] for i in ids], [items[i][2] for i in ids])

    def _remove(self, item_id: str, event_time: float, pending: dict) -> None:
        if event_time <= self.removed_at.get(item_id, -math.inf):
            return
        self.removed_at[item_id] = event_time
        for index in self.indexes.values():
            if index.event_time(item_id) < event_time:
                index.remove([item_id])
        for items in pending.values():
            if item_id in items and items[item_id][2] < event_time:
                del items[item_id]

    def sizes(self) -> dict[str, int]:
        return {(version if name == DEFAULT else f"{name}/{version}"): len(index)
                for (name, version), index in self.indexes.items()}

    def indexed(self, item_ids) -> list[str]:
        """The given items some version's index holds: those a retrieval whose top k they belong to returns."""
        with self.lock:
            return [i for i in item_ids if any(i in index.slot_of for index in self.indexes.values())]

    # ---- answering -----------------------------------------------------------------------

    def retrieve(self, user_id: str, k: int = 100, exclude_seen: bool = True, filter: dict | None = None) -> Retrieval:
        """The k items nearest the user's vector (cosine), best first.

        exclude_seen leaves out the items of the user's history (their last COLDSTART_USER_HISTORY_LENGTH
        positive actions); filter={"category": "Comedy"} (or a list: any of them) keeps items of that
        category. ValueError for a bad k or filter, UnknownUser for a user with no vector, NotReady while
        the index is rebuilt or has no item of the user's version.
        """
        categories = check_request(k, filter)
        if not self.ready.is_set():
            raise NotReady(f"the retrieval index is still being rebuilt{f': {self.failure}' if self.failure else ''}")
        served, store = self.stores.active()  # one state read: the user and the index of one version
        columns = feast_store.online_read(store, self._user_view, [user_id])
        vector, user_version = columns["user_embedding"][0], columns["model_version"][0]
        if vector is None:
            raise UnknownUser(f"user {user_id!r} has no vector yet: no positive action on an item the service knows")
        excluded = set(columns["seen_item_ids"][0] or ()) if exclude_seen else set()
        with self.lock:
            index = self.index_for(served, user_version)
            items = index.search(np.asarray(vector, dtype=np.float32), k, excluded, categories)
        return Retrieval(user_id, index.version, items, served)

    def index_for(self, served: str, user_version: str) -> VersionIndex:
        """The served version's index of the item vectors made by the same towers as the user's vector (the
        fullest, if several)."""
        matching = [index for (name, _), index in self.indexes.items()
                    if name == served and towers_version(index.version) == user_version and len(index)]
        if not matching:
            raise NotReady(f"no item of model version {user_version!r} ({served}) is indexed "
                           f"(indexed: {self.sizes()})")
        return max(matching, key=len)


def check_request(k, filter) -> tuple[str, ...] | None:
    """Validate k and filter; returns the categories to keep (None: no filter)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r:.40}")
    if filter is None:
        return None
    if not isinstance(filter, dict):
        raise ValueError(f"filter must be an object like {{\"category\": \"Comedy\"}}, got {type(filter).__name__}")
    unknown = sorted(set(filter) - set(FILTERS), key=str)
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r:.40}: filters are {', '.join(FILTERS)}")
    if "category" not in filter:
        return None
    wanted = filter["category"]
    wanted = [wanted] if isinstance(wanted, str) else wanted
    if not isinstance(wanted, list) or not wanted or not all(isinstance(c, str) and c.strip() for c in wanted):
        raise ValueError("filter category must be a non-empty string or a non-empty list of them")
    return tuple(c.strip() for c in wanted)


_default: Retriever | None = None
_default_lock = threading.Lock()


def retrieve(settings, user_id: str, k: int = 100, exclude_seen: bool = True, filter: dict | None = None) -> Retrieval:
    """`Retriever.retrieve` on a process-wide retriever, built on first use with `settings()` (a callable: the
    settings are made once) and waited for until its index is complete (`coldstart.retrieve`)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Retriever(settings()).start()
    return _default.wait_ready().retrieve(user_id, k, exclude_seen, filter)
