"""Newest wins in the online store, whatever the Kafka key and however many writers race (issue 18).

The online write is one Redis script per entity that compares event times and writes together
(coldstart.store.NewestWinsRedisOnlineStore): each test runs on a single Redis and on a Redis Cluster.
"""

import json
import random
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from coldstart import store as feast_store
from coldstart.config import ITEM_PUSH_SOURCE, ITEM_VIEW
from coldstart.dev.load import item_event
from coldstart.dev.stack import WorkerProcess
from coldstart.store import NewestWrite, redis_client, write_newest
from streams.keys import home_partition
from tests.conftest import read_topic, stack_on, unique_id

pytestmark = pytest.mark.scaleout

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_the_write_script_orders_event_times_to_the_nanosecond_and_before_1970(online_store, request, redis_url):
    client = redis_client(redis_url if online_store == "redis" else request.getfixturevalue("redis_cluster").url)
    key = first = f"newest-wins-{uuid.uuid4().hex}".encode()

    def write(when: datetime, value: bytes) -> bool:
        stamp = feast_store.timestamp_proto(when)
        return write_newest(client, [NewestWrite(key, "_ts:view", stamp, [], {b"value": value})])[0]

    moment = datetime(2026, 12, 1, 12, 0, 0, 500_000, tzinfo=timezone.utc)
    assert write(moment, b"first")
    assert not write(moment, b"replay")  # as new as what is stored: a replay changes nothing
    assert write(moment + timedelta(microseconds=1), b"a microsecond later")
    assert not write(moment - timedelta(seconds=1, microseconds=-999_999), b"the same second, earlier nanos")
    assert not write(EPOCH - timedelta(days=1), b"before 1970")
    assert client.hget(key, b"value") == b"a microsecond later"

    key = f"before-1970-{uuid.uuid4().hex}".encode()
    assert write(EPOCH - timedelta(days=2), b"1969-12-30")
    assert not write(EPOCH - timedelta(days=3), b"1969-12-29")
    assert write(EPOCH + timedelta(seconds=1), b"1970")
    assert client.hget(key, b"value") == b"1970"
    for written in (first, key):
        client.delete(written)


def test_two_writers_racing_on_the_same_items_leave_each_ones_newest_event(online_store, request):
    """Two writers (two Feast stores, each with its own Redis client, as two workers have) push and remove
    the same items concurrently, in shuffled event-time order: what Feast then reads is each item's newest event."""
    stack, _ = stack_on(online_store, request)
    rng = random.Random(18)
    item_ids = [unique_id("race") for _ in range(40)]
    start = datetime.now(timezone.utc)
    offsets = iter(rng.sample(range(10_000_000), len(item_ids) * 8))  # distinct event times, in microseconds
    # (item, event time, title; None: a removal), eight per item, every item in both writers' halves
    events = [(item_id, start + timedelta(microseconds=next(offsets)), None if rng.random() < 0.25 else f"t{n}")
              for item_id in item_ids for n in range(8)]
    rng.shuffle(events)
    halves = [events[0::2], events[1::2]]
    ready = threading.Barrier(2)
    failures = []

    def writer(own_events):
        store = feast_store.open_store(stack.settings)  # a client of its own
        try:
            ready.wait()
            for position in range(0, len(own_events), 8):
                batch = own_events[position:position + 8]
                uploads = [event for event in batch if event[2] is not None]
                removals = [event for event in batch if event[2] is None]
                if uploads:
                    feast_store.push_online(store, ITEM_PUSH_SOURCE, upload_frame(uploads))
                if removals:
                    feast_store.delete_online(store, ITEM_VIEW, "item_id", [e[0] for e in removals],
                                              [e[1] for e in removals])
        except Exception as err:  # reported below: a thread's exception would be lost
            failures.append(err)

    threads = [threading.Thread(target=writer, args=(half,)) for half in halves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures

    newest = {}
    for item_id, when, title in events:
        if item_id not in newest or when > newest[item_id][0]:
            newest[item_id] = (when, title)
    read = feast_store.read_item_features(stack.store, item_ids, features=("title",))
    assert {i: row["title"] for i, row in read.items()} == {i: t for i, (_, t) in newest.items() if t is not None}


def test_a_push_reads_the_registry_from_its_cache(stack):
    """Feast's own push re-reads the registry file after every write; a worker writing several model versions
    fell behind on it (BENCHMARKS.md, rollout). The service's push keeps to the cached registry."""
    store = feast_store.open_store(stack.settings)
    now = datetime.now(timezone.utc)
    feast_store.push_online(store, ITEM_PUSH_SOURCE, upload_frame([(unique_id("cached"), now, "first")]))
    loaded_at = store.registry.cached_registry_proto_created
    for n in range(3):
        feast_store.push_online(store, ITEM_PUSH_SOURCE, upload_frame([(unique_id("cached"), now, f"t{n}")]))
    assert store.registry.cached_registry_proto_created == loaded_at


def upload_frame(uploads):
    count = len(uploads)
    return feast_store.item_embedding_frame(
        [e[0] for e in uploads], np.ones((count, 8), dtype=np.float32), np.ones((count, 8), dtype=np.float32),
        [e[2] for e in uploads], ["race"] * count, "newest-wins-test", [e[1] for e in uploads])


def test_uploads_of_one_item_spread_over_partitions_by_their_keys_leave_the_newest(online_store, request):
    """A producer's events for one item with no key, a wrong key, or sent to another partition, in shuffled
    event-time order, through the broker and two workers sharing the partitions: the newest title is what
    Feast serves."""
    stack, producer = stack_on(online_store, request)
    with WorkerProcess(stack.settings) as second:
        deadline = time.monotonic() + 120
        while not holds_item_partitions(second):
            assert second.alive() and time.monotonic() < deadline, second.log_tail()
            time.sleep(0.5)
        send_spread_and_check_the_newest_wins(stack, producer)
        assert second.alive()


def holds_item_partitions(worker: WorkerProcess) -> bool:
    """The worker has joined the group with item-uploads partitions (faust logs its assignment, then ready)."""
    log = worker.log_path.read_text(errors="replace")
    return "| item-uploads " in log and "Worker ready" in log


def send_spread_and_check_the_newest_wins(stack, producer):
    item_id = unique_id("spread")
    partitions = stack.settings.topic_partitions
    home = home_partition(item_id, partitions)
    start = datetime.now(timezone.utc)
    versions = [(start + timedelta(milliseconds=n), f"Version {n} of a spread item") for n in range(9)]
    random.Random(7).shuffle(versions)
    for n, (when, title) in enumerate(versions):
        value = json.dumps(item_event({"item_id": item_id, "title": title}, when)).encode()
        how = n % 3
        if how == 0:
            producer.send("item-uploads", key=None, value=value)
        elif how == 1:
            producer.send("item-uploads", key=f"not-{item_id}".encode(), value=value)
        else:
            producer.send("item-uploads", key=item_id.encode(), value=value, partition=(home + n) % partitions)
    producer.flush()
    read_topic(stack.settings, "item-embeddings", timeout=60,
               until=lambda records: sum(r["item_id"] == item_id for r in records) >= len(versions))
    newest_title = max(versions)[1]
    served = feast_store.read_item_features(stack.store, [item_id], features=("title",))
    assert served == {item_id: {"title": newest_title}}
