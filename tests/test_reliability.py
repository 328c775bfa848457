"""Nothing is lost under faults: worker crashes, Redis outages, broker restarts, duplicates, late events.

Every test injects one fault into the real stack (tansu broker, redis-server, Feast,
`coldstart worker` processes) and checks the data, not the logs alone. README.md,
"Guarantees", says which promise each test proves.
"""

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import redis
from kafka import KafkaAdminClient

from coldstart.config import ITEM_VIEW
from coldstart.store import offline_table, read_item_features
from coldstart.ranking import known_item_ids
from coldstart.dev.services import EmbeddedBroker
from streams.topics import create_topics
from coldstart.dev.load import item_event, new_producer, send_action
from coldstart.dev.stack import LocalStack, WorkerProcess
from tests.conftest import read_topic, restart_worker, unique_id, upload, upload_batch, wait_readable
from tests.test_users import user_vector

pytestmark = pytest.mark.reliability

def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def log_since(worker: WorkerProcess, start: int) -> str:
    return worker.log_path.read_text(errors="replace")[start:]


def wait_for_log(worker: WorkerProcess, start: int, text: str, timeout: float = 60) -> str:
    """The worker's log since `start` once it contains `text`; if it never does, the failure shows the log's tail."""
    try:
        return wait_until(lambda: text in (log := log_since(worker, start)) and log, timeout, f"log line {text!r}")
    except AssertionError as missing:
        tail = "\n".join(line[:300] for line in log_since(worker, start).splitlines()[-40:])
        raise AssertionError(f"{missing}; the worker's log since then ({worker.log_path}) ends:\n{tail}") from None


def log_size(worker: WorkerProcess) -> int:
    return len(worker.log_path.read_text(errors="replace"))


def wait_offline(stack, item_ids: list[str], timeout: float = 60) -> None:
    wait_until(lambda: set(item_ids) <= set(known_item_ids(stack.store)), timeout, "items in the offline store")


def upload_items(producer, items: list[dict]) -> list[str]:
    for item in items:
        upload(producer, item)
    return [i["item_id"] for i in items]


# ---- 1. worker crash ---------------------------------------------------------

def test_worker_killed_mid_batch_loses_nothing(stack, producer):
    acknowledged = upload_batch(producer, "acked", 20)
    wait_offline(stack, acknowledged)  # online and offline written: these offsets may be committed
    # Seconds of work even on a fast CPU: 300 were all online before the first poll returned on an AMX Xeon.
    in_flight = [unique_id("in-flight") for _ in range(3000)]
    for item_id in in_flight:
        producer.send("item-uploads", key=item_id.encode(),
                      value=json.dumps(item_event({"item_id": item_id, "title": f"Gardening {item_id}"})).encode())
    producer.flush()
    readable = wait_until(lambda: read_item_features(stack.store, in_flight), 60, "the first in-flight item")
    restart_worker(stack, crash=True)  # SIGKILL: nothing flushed, nothing committed on the way out
    assert len(readable) < len(in_flight), "the kill must land in the middle of the work"
    after = upload_batch(producer, "after-kill", 10)
    everything = acknowledged + in_flight + after
    wait_readable(stack.store, everything, timeout=120)
    wait_offline(stack, everything)


def test_user_histories_survive_a_worker_crash(stack, producer):
    items = [{"item_id": unique_id("crash-item"), "title": title} for title in
             ("Sourdough at home", "Knife skills", "The pasta book", "Fermentation", "Braising", "Spice blends",
              "Street food")]
    upload_items(producer, items)
    wait_readable(stack.store, [i["item_id"] for i in items])
    users = [unique_id("crash-user") for _ in range(4)]
    start = datetime(2026, 5, 1, tzinfo=timezone.utc)
    actions = [(item["item_id"], start + timedelta(minutes=n)) for n, item in enumerate(items)]

    def act(part):
        for user_id in users:
            for item_id, at in part:
                send_action(producer, user_id, item_id, occurred_at=at)
        producer.flush()

    act(actions[:3])
    for user_id in users:
        user_vector(stack, user_id, min_history=3)
    act(actions[3:6])
    restart_worker(stack, crash=True)  # while the second part is being processed, or before it is
    act(actions[6:])  # after the redelivered ones on each user's partition: seen last
    want = expected_user_vector(stack, [i["item_id"] for i in items])
    for user_id in users:
        got = user_vector(stack, user_id, min_history=len(items), timeout=120)
        # Every action exactly once, in event-time order: none lost, none doubled by the redelivery.
        assert got["history_length"] == len(items)
        assert float(np.dot(got["user_embedding"], want)) > 0.9999


def expected_user_vector(stack, item_ids_oldest_first: list[str]) -> np.ndarray:
    """The user tower over these items' served content embeddings, computed here."""
    from encoders.towers import load_towers

    content = read_item_features(stack.store, item_ids_oldest_first, features=("content_embedding",))
    history = np.array([content[i]["content_embedding"] for i in item_ids_oldest_first], dtype=np.float32)
    return load_towers(stack.settings.towers_dir, stack.settings.encoder_name).user_vectors([history], [item_ids_oldest_first])[0]


# ---- 2. online store outages -------------------------------------------------

@pytest.fixture
def own_redis(redis_server):
    if redis_server is None:
        pytest.skip("needs a redis-server of the tests' own to stop and start (none on PATH)")
    return redis_server


@contextmanager
def redis_stopped(server):
    """Redis down, then back on the same port (empty: the tests' Redis keeps nothing on disk)."""
    server.stop()
    try:
        yield
    finally:
        server.start()


@contextmanager
def redis_refusing_writes(server):
    """Redis up but every write fails with OOM: Feast's push raises, reads still work."""
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)


RETRIED = "failed (attempt"  # what streams.sinks.retry_forever logs for each failed attempt


@pytest.mark.parametrize("fault", [redis_stopped, redis_refusing_writes], ids=["redis-down", "writes-refused"])
def test_online_store_outage_is_retried_with_backoff_and_nothing_is_lost(stack, producer, own_redis, fault):
    start = log_size(stack.worker)
    with fault(own_redis):
        ids = upload_batch(producer, "outage", 5)
        # The first Redis call to fail may be a write, or the rollout-state re-read that ends a batch written
        # just before the outage (streams.models): either is retried (streams.sinks.retry_forever).
        wait_for_log(stack.worker, start, RETRIED)
        for _ in range(8):  # uploads keep coming for several seconds of outage
            ids += upload_batch(producer, "outage", 2)
            time.sleep(0.5)
        assert stack.worker.alive()
    wait_readable(stack.store, ids, timeout=90)
    log = wait_for_log(stack.worker, start, "recovered after")
    # Backoff (0.1 s doubling to 5 s): a handful of attempts in a few seconds. A retry loop
    # without backoff would log hundreds.
    assert 1 <= log.count(RETRIED) <= 20


def committed_offsets(settings) -> dict[int, int]:
    """The worker group's committed offsets on item-uploads, by partition, as the broker has them."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options())
    try:
        offsets = admin.list_group_offsets(settings.consumer_group)[settings.consumer_group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == "item-uploads"}


def test_events_unwritten_during_an_outage_are_not_committed(stack, producer, own_redis):
    start = log_size(stack.worker)
    with redis_stopped(own_redis):
        positions: dict[str, tuple[int, int]] = {}
        for _ in range(10):
            item_id = unique_id("uncommitted")
            sent = producer.send("item-uploads", key=item_id.encode(),
                                 value=json.dumps(item_event({"item_id": item_id, "title": "Unwritten"})).encode())
            metadata = sent.get(timeout=30)
            positions[item_id] = (metadata.partition, metadata.offset)
        wait_for_log(stack.worker, start, RETRIED)
        time.sleep(3)  # three commit intervals pass while the writes fail
        committed = committed_offsets(stack.settings)
        stack.worker.kill()
    first_unwritten = {p: min(o for q, o in positions.values() if q == p) for p, _ in positions.values()}
    assert all(committed.get(p, 0) <= offset for p, offset in first_unwritten.items()), (committed, first_unwritten)
    # And so a new worker gets them again.
    stack.worker = WorkerProcess(stack.settings).start()
    try:
        wait_readable(stack.store, list(positions), timeout=120)
    except AssertionError as missing:
        on_broker = read_topic(stack.settings, "item-uploads", until=lambda records: True)
        raise AssertionError(f"{missing}; (partition, offset) sent: {positions}; committed before the kill "
                             f"{committed}, now {committed_offsets(stack.settings)}; the broker returns "
                             f"{sum(r.get('item_id') in positions for r in on_broker)} of them "
                             f"to a plain consumer; log {stack.worker.log_path}")


def test_an_offline_store_failure_is_retried_while_the_online_path_goes_on(stack, producer):
    """The offline part file is written beside the agent (streams.sinks): while it cannot be written,
    uploads still become readable online, the write is retried, and once it can be written again every
    row arrives (their events are acknowledged only then)."""
    folder = offline_table(stack.store, ITEM_VIEW).path
    aside = folder.with_name(folder.name + ".aside")
    start = log_size(stack.worker)
    folder.mkdir(parents=True, exist_ok=True)
    folder.rename(aside)
    folder.write_text("a file where the offline folder should be: every part-file write fails")
    try:
        ids = upload_batch(producer, "offline-down", 10)
        producer.flush()
        wait_readable(stack.store, ids)  # the online path does not wait for the offline write
        wait_for_log(stack.worker, start, "offline write failed (attempt")
        assert not set(ids) & set(known_item_ids_in(aside)), "no offline rows while the folder is unwritable"
    finally:
        folder.unlink()
        aside.rename(folder)
    wait_for_log(stack.worker, start, "offline write recovered")
    wait_offline(stack, ids)


def known_item_ids_in(folder) -> set[str]:
    import pyarrow.dataset as ds

    parts = sorted(str(part) for part in folder.glob("*.parquet"))
    return set(ds.dataset(parts, format="parquet").to_table(columns=["item_id"]).column("item_id").to_pylist()
               if parts else [])


# ---- 3. broker restarts ------------------------------------------------------

def separate_stack(stack, name: str, broker: EmbeddedBroker | None = None) -> LocalStack:
    """A second stack with its own broker and worker, sharing Redis under its own Feast project."""
    return LocalStack(replace(stack.settings, feast_project=f"coldstart_{name}"), broker=broker)


def test_broker_restart_with_durable_storage_loses_nothing(stack, s3_storage):
    engine, env = s3_storage
    with separate_stack(stack, "s3", EmbeddedBroker(storage_engine=engine, env=env)) as durable:
        durable.wait_until_serving()
        wait_for_log(durable.worker, 0, "watching topic ids")
        producer = new_producer(durable.settings)
        try:
            before = upload_batch(producer, "before-restart", 20)  # some still unprocessed when it stops
            durable.broker.stop()
            time.sleep(3)  # the worker's fetches and commits fail meanwhile
            durable.broker.start()
            after = upload_batch(producer, "after-restart", 20)
            wait_readable(durable.store, before + after, timeout=120)
        finally:
            producer.close()
        assert durable.worker.alive()
        assert "lost its data" not in log_since(durable.worker, 0)


def test_broker_that_lost_its_data_stops_the_worker_with_a_clear_message(stack):
    with separate_stack(stack, "memory") as volatile:
        volatile.wait_until_serving()
        wait_for_log(volatile.worker, 0, "watching topic ids")
        volatile.broker.stop()
        volatile.broker.start()  # memory storage: topics, logs and committed offsets are gone
        create_topics(volatile.settings)
        producer = new_producer(volatile.settings)
        try:
            upload_batch(producer, "after-data-loss", 20)  # the old offsets may skip some: not promised
            worker = volatile.worker
            wait_until(lambda: worker.process.poll() is not None, 60, "the worker stopping")
            assert worker.process.returncode != 0
            assert "the broker at" in log_since(worker, 0) and "lost its data" in log_since(worker, 0)
            # Restarted (as a supervisor would), the pipeline works again on the new logs.
            volatile.worker = WorkerProcess(volatile.settings).start()
            resumed = upload_batch(producer, "resumed", 20)
            wait_readable(volatile.store, resumed, timeout=120)
        finally:
            producer.close()


# ---- 4. duplicates and order -------------------------------------------------

def test_the_same_item_event_delivered_twice_writes_once(stack, producer):
    item_id = unique_id("twice")
    event = json.dumps(item_event({"item_id": item_id, "title": "A book delivered twice"})).encode()
    upload(producer, event, key=item_id)
    wait_readable(stack.store, [item_id])
    client = redis.Redis.from_url(stack.settings.redis_url)
    client.config_resetstat()
    upload(producer, event, key=item_id)  # the duplicate
    marker = {"item_id": unique_id("marker"), "title": "sent after the duplicate"}
    upload(producer, marker, key=item_id)  # same key: same partition, processed after the duplicate
    wait_readable(stack.store, [marker["item_id"]])
    assert client.info("commandstats")["cmdstat_hset"]["calls"] == 1  # the marker's write, not the duplicate's


def test_an_older_item_event_never_overwrites_a_newer_one(stack, producer):
    t = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    titles = {t: "Gardening for beginners", t + timedelta(milliseconds=400): "Quantum field theory notes",
              t + timedelta(milliseconds=800): "Sourdough bread baking", t + timedelta(seconds=5): "Chess openings"}
    times = sorted(titles)
    newest = times[-1]
    orders = [times[::-1], times[1:3] + [newest] + times[:1], [newest] + times[:3] + [newest]]
    item_ids = [unique_id("order") for _ in orders]
    for item_id, order in zip(item_ids, orders):
        for at in order:  # back to back: several land in one micro-batch, some in the next
            upload(producer, json.dumps(item_event({"item_id": item_id, "title": titles[at]}, at)).encode(), key=item_id)
    sent = {item_id: len(order) for item_id, order in zip(item_ids, orders)}

    def all_processed(records):
        counts = {i: 0 for i in item_ids}
        for record in records:
            if record["item_id"] in counts:
                counts[record["item_id"]] += 1
        return counts == sent

    read_topic(stack.settings, "item-embeddings", until=all_processed, timeout=60)
    served = read_item_features(stack.store, item_ids, features=("title",))
    assert {item_id: row["title"] for item_id, row in served.items()} == {i: titles[newest] for i in item_ids}


def test_a_late_older_action_takes_its_place_in_the_users_history(stack, producer):
    items = [{"item_id": unique_id("late-item"), "title": title} for title in
             ("Board game strategy", "Tabletop role playing", "Cooperative card games")]
    upload_items(producer, items)
    wait_readable(stack.store, [i["item_id"] for i in items])
    start = datetime(2026, 4, 1, tzinfo=timezone.utc)
    actions = [(item["item_id"], start + timedelta(hours=n)) for n, item in enumerate(items)]
    in_order, late, twice = unique_id("in-order"), unique_id("late"), unique_id("twice")
    arrivals = {in_order: actions, late: [actions[2], actions[0], actions[1]],
                twice: [actions[0], actions[1], actions[1], actions[2], actions[0]]}
    for user_id, sequence in arrivals.items():
        for item_id, at in sequence:
            send_action(producer, user_id, item_id, occurred_at=at)
    producer.flush()
    want = expected_user_vector(stack, [i["item_id"] for i in items])
    for user_id in arrivals:
        got = user_vector(stack, user_id, min_history=3)
        assert got["history_length"] == 3
        assert float(np.dot(got["user_embedding"], want)) > 0.9999, user_id


# ---- 6. load burst -----------------------------------------------------------

def test_a_burst_of_ten_times_the_sustainable_rate_is_absorbed_in_bounded_memory(stack):
    from coldstart.dev.bench.burst import run_burst

    result = run_burst(stack, factor=10, burst_seconds=4, probe_rate=5, saturation_items=200, padding_kb=0)
    assert result["backlog_at_burst_end"] >= result["burst_items"] / 2, result  # the burst outran the worker
    assert result["lost"] == 0 and result["drained"], result
    assert stack.worker.alive()
    assert result["latency_recovered_s"] is not None, result  # probes came back to their pre-burst latency
    # Backpressure: at most 4 micro-batches wait in the worker (stream_buffer_maxsize); the rest of
    # the backlog waits in Kafka. BENCHMARKS.md has the figures for longer bursts.
    assert result["worker_rss_peak_mb"] - result["worker_rss_before_mb"] < 100, result
