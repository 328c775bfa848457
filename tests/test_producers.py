"""Real producers: every client and compression codec through the real broker, and the producer contract.

Events are produced by the clients teams plug in (kafka-python, aiokafka, and
librdkafka through confluent-kafka, each with its own defaults: librdkafka's
partitioner is not Kafka's murmur2), read by a `coldstart worker` process, and
checked in Feast. README.md, "Producer contract" and "Interoperability", names
the test for each promise.
"""

import asyncio
import json
import re
from dataclasses import replace
from datetime import datetime, timezone

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer as ConfluentProducer
from kafka import KafkaProducer
from kafka.record import default_records

from coldstart.config import COMPRESSION_CODECS
from coldstart.dev.stack import LocalStack, WorkerProcess
from streams.keys import home_partition
from streams.patches import EXIT_UNDECODABLE_BATCH
from streams.validation import ITEM_TOMBSTONE
from tests.conftest import SETTINGS, read_topic, unique_id, wait_readable
from tests.test_reliability import wait_until
from tests.test_users import user_vector

CODECS = ("none", *COMPRESSION_CODECS)
# Clients send a batch uncompressed when the codec does not shrink it: text that every codec does.
DESCRIPTION = "A description long and repetitive enough that every codec shrinks the batch. " * 20


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---- the clients: send [(topic, key, value, headers)] and wait until the broker has them ----

def send_kafka_python(bootstrap: str, codec: str, records: list[tuple]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20,
                             compression_type=None if codec == "none" else codec)
    try:
        for topic, key, value, headers in records:
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush(timeout=30)
    finally:
        producer.close()


def send_aiokafka(bootstrap: str, codec: str, records: list[tuple]) -> None:
    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20,
                                    compression_type=None if codec == "none" else codec)
        await producer.start()
        try:
            for topic, key, value, headers in records:
                await producer.send(topic, key=key, value=value, headers=headers)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def send_confluent(bootstrap: str, codec: str, records: list[tuple]) -> None:
    # librdkafka's defaults otherwise (partitioner consistent_random: CRC32, not murmur2); tansu
    # rejects idempotent producers (shared/notes/kafka-broker.md).
    producer = ConfluentProducer({"bootstrap.servers": bootstrap, "enable.idempotence": False, "linger.ms": 20,
                                  "compression.type": codec})
    for topic, key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0, "librdkafka did not deliver every record"


CLIENTS = {"kafka-python": send_kafka_python, "aiokafka": send_aiokafka, "confluent-kafka": send_confluent}


BY_ID = object()  # key a record by its entity id, as the contract says


def item_record(item: dict, key=BY_ID, headers=()) -> tuple:
    return ("item-uploads", item["item_id"].encode() if key is BY_ID else key, json.dumps(item).encode(), list(headers))


def action_record(user_id: str, item_id: str, key=BY_ID) -> tuple:
    action = {"user_id": user_id, "item_id": item_id, "action": "click", "occurred_at": now()}
    return ("user-actions", user_id.encode() if key is BY_ID else key, json.dumps(action).encode(), [])


def new_items(prefix: str, count: int) -> list[dict]:
    return [{"item_id": unique_id(prefix), "title": f"Interop {prefix} {n}", "description": DESCRIPTION,
             "uploaded_at": now()} for n in range(count)]


# ---- every client, every codec, both input topics ------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("client", CLIENTS)
def test_every_client_and_codec_reaches_both_topics(stack, client, codec):
    send = CLIENTS[client]
    items = new_items(f"{client}-{codec}", 4)  # in one batch (linger): the codec compresses them together
    send(stack.settings.kafka_bootstrap, codec, [item_record(i) for i in items])
    wait_readable(stack.store, [i["item_id"] for i in items])
    user_id = unique_id(f"{client}-{codec}-user")
    send(stack.settings.kafka_bootstrap, codec, [action_record(user_id, i["item_id"]) for i in items])
    assert user_vector(stack, user_id, min_history=len(items))["history_length"] == len(items)


# ---- keys, partitions, headers, tombstones -------------------------------------

def test_the_home_partition_is_the_one_kafkas_default_partitioner_picks():
    """The worker's producers and faust's tables (aiokafka) pick partitions as streams.keys says."""
    from aiokafka.partitioner import DefaultPartitioner

    keys = ["u42", "book-1", "é-ü-😀", "x" * 300] + [unique_id() for _ in range(200)]
    for partitions in (1, 4, 12):
        every = list(range(partitions))
        assert [home_partition(k, partitions) for k in keys] == [DefaultPartitioner()(k.encode(), every, every)
                                                                  for k in keys]


def test_records_without_their_key_or_off_their_partition_are_forwarded_and_processed(stack):
    partitions = stack.settings.topic_partitions
    keyless, wrong_key, off_partition = new_items("keyless", 1)[0], new_items("wrong-key", 1)[0], new_items("off", 1)[0]
    home = home_partition(off_partition["item_id"], partitions)
    trace = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    send_kafka_python(stack.settings.kafka_bootstrap, "none", [
        item_record(keyless, key=None, headers=trace),
        item_record(wrong_key, key=b"tenant-7:" + wrong_key["item_id"].encode()),
    ])
    producer = KafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, enable_idempotence=False)
    producer.send("item-uploads", key=off_partition["item_id"].encode(), value=json.dumps(off_partition).encode(),
                  partition=(home + 1) % partitions).get(timeout=30)
    producer.close()
    ids = [keyless["item_id"], wrong_key["item_id"], off_partition["item_id"]]
    wait_readable(stack.store, ids)

    # Each is now also on its item's partition, keyed by its item_id, headers kept.
    def copies(records):
        return {r.key.decode(): r for r in records
                if r.key and r.key.decode() in ids and r.partition == home_partition(r.key.decode(), partitions)}

    found = copies(read_topic(stack.settings, "item-uploads", until=lambda rs: len(copies(rs)) == len(ids), raw=True))
    assert [(k, v) for k, v in found[keyless["item_id"]].headers] == trace
    assert json.loads(found[wrong_key["item_id"]].value) == wrong_key  # the value as sent

    # A user's actions without a key land anywhere; all of them reach the user's history.
    user_id = unique_id("keyless-user")
    send_kafka_python(stack.settings.kafka_bootstrap, "none",
                      [action_record(user_id, item_id, key=None) for item_id in ids])
    assert user_vector(stack, user_id, min_history=3)["history_length"] == 3


def test_tombstones_and_invalid_events_are_dead_lettered_with_their_headers(stack, producer):
    item_id, user_id = unique_id("tombstone"), unique_id("tombstone-user")
    headers = [("producer", b"catalogue-service"), ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    producer.send("item-uploads", key=item_id.encode(), value=None, headers=headers)
    producer.send("user-actions", key=user_id.encode(), value=None)
    producer.send("item-uploads", key=item_id.encode(), value=b"{not json", headers=headers)
    producer.flush()

    def letters(records):
        return [r for r in records if r.key in (item_id.encode(), user_id.encode())]

    found = letters(read_topic(stack.settings, "dead-letters", until=lambda rs: len(letters(rs)) == 3, raw=True))
    by_reason = {json.loads(r.value)["reason"]: r for r in found}
    tombstone = by_reason[ITEM_TOMBSTONE]
    assert '"deleted": true' in ITEM_TOMBSTONE and json.loads(tombstone.value)["original_size"] == 0
    assert [(k, v) for k, v in tombstone.headers] == headers
    assert any(reason.startswith("null value (a tombstone)") and "user-actions" in reason for reason in by_reason)
    invalid = next(r for reason, r in by_reason.items() if reason.startswith("not valid JSON"))
    assert [(k, v) for k, v in invalid.headers] == headers
    assert stack.worker.alive()


# ---- the worker's own producers ------------------------------------------------

def test_an_unknown_producer_compression_is_refused_by_name():
    from coldstart.config import Settings

    with pytest.raises(ValueError, match="COLDSTART_PRODUCER_COMPRESSION must be none, gzip, snappy, lz4, zstd"):
        Settings.from_env({"COLDSTART_PRODUCER_COMPRESSION": "brotli"})


def test_the_workers_own_records_use_every_codec(stack):
    """One stack of its own: its worker restarted with each COLDSTART_PRODUCER_COMPRESSION, writing each
    output topic and its table's changelog in that codec, and reading the changelog back at each restart."""
    with LocalStack(replace(stack.settings, feast_project="coldstart_codecs"), worker=False) as own:
        for codec in COMPRESSION_CODECS:
            own.settings = replace(own.settings, producer_compression=codec)
            with WorkerProcess(own.settings) as worker:
                own.wait_until_serving()
                item, bad_key = new_items(f"own-{codec}", 1)[0], unique_id(f"own-{codec}-bad")
                send_kafka_python(own.settings.kafka_bootstrap, "none", [
                    item_record(item), ("item-uploads", bad_key.encode(), b"{broken", []),
                ])
                read_topic(own.settings, "item-embeddings", until=lambda rs: any(r["item_id"] == item["item_id"] for r in rs))
                read_topic(own.settings, "dead-letters", until=lambda rs: any(r.get("key") == bad_key for r in rs))
                user_id = unique_id(f"own-{codec}-user")
                send_kafka_python(own.settings.kafka_bootstrap, "none", [action_record(user_id, item["item_id"])])
                user_vector(own, user_id, min_history=1)
                assert worker.alive(), worker.log_tail()


# ---- batches the worker cannot read ---------------------------------------------

@pytest.mark.reliability
def test_a_worker_that_cannot_decode_every_codec_refuses_to_start(tmp_path, monkeypatch):
    # cramjam made unimportable in the worker's process only: a shadowing package on its PYTHONPATH
    # raises ImportError, as a missing install does (aiokafka then has gzip alone).
    (tmp_path / "cramjam").mkdir()
    (tmp_path / "cramjam" / "__init__.py").write_text('raise ImportError("cramjam is not installed here")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    worker = WorkerProcess(SETTINGS).start()  # it stops before it needs a broker
    try:
        wait_until(lambda: not worker.alive() and worker, 60, "the worker refusing to start")
        log = worker.log_path.read_text(errors="replace")
        assert "cannot decode every compression codec" in log and "cramjam" in log
        assert all(f"{codec}:" in log for codec in ("snappy", "lz4", "zstd")) and "gzip:" not in log
    finally:
        worker.stop()


def id_on_partition(prefix: str, partition: int, partitions: int) -> str:
    return next(i for i in (unique_id(prefix) for _ in range(10_000)) if home_partition(i, partitions) == partition)


@pytest.mark.reliability
def test_a_batch_the_worker_cannot_decode_stops_it_with_one_critical_line(stack, monkeypatch):
    """A truncated gzip stream in a batch whose CRC is right (a producer's bug, say): aiokafka cannot
    decompress it, and nothing can read the events in it. The worker stops, saying where and why,
    and so does the next one: never a skip."""
    with LocalStack(replace(stack.settings, feast_project="coldstart_undecodable")) as own:
        own.wait_until_serving()
        partitions, partition = own.settings.topic_partitions, 1
        before, *corrupt = new_items("batches", 4)  # all on one partition
        for item in (before, *corrupt):
            item["item_id"] = id_on_partition("batches", partition, partitions)
        send_kafka_python(own.settings.kafka_bootstrap, "none", [item_record(before)])
        wait_readable(own.store, [before["item_id"]])

        # The corrupt batch: kafka-python computes the CRC over what its gzip step returns.
        encode = default_records.gzip_encode
        monkeypatch.setattr(default_records, "gzip_encode", lambda data: encode(data)[:-12])
        send_kafka_python(own.settings.kafka_bootstrap, "gzip", [item_record(i) for i in corrupt])
        monkeypatch.setattr(default_records, "gzip_encode", encode)

        for attempt in range(2):  # a restarted worker stops at the same batch: it is never skipped
            worker = own.worker
            wait_until(lambda: not worker.alive() and worker, 60, "the worker stopping")
            log = worker.log_path.read_text(errors="replace")
            assert worker.process.returncode == EXIT_UNDECODABLE_BATCH, log[-3000:]
            critical = [line for line in log.splitlines() if "CRITICAL" in line]
            assert len(critical) == 1 and "Traceback" not in log, critical
            assert re.search(rf"item-uploads\[{partition}\] offsets \d+–\d+ \(EOFError: .+\)", critical[0]), critical[0]
            own.worker = WorkerProcess(own.settings).start() if attempt == 0 else None
