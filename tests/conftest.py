"""Fixtures that start real services: Redis, the tansu broker, Feast, worker processes.

Nothing here is a fake: the stack is the one `coldstart demo` runs. Each fixture
stops what it started. The tests' edge: SETTINGS is read from the environment
once, here, and every fixture passes its own copy down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace

import pytest
from kafka import KafkaConsumer, TopicPartition

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coldstart import store as feast_store  # noqa: E402
from coldstart.config import Settings  # noqa: E402
from coldstart.dev.load import item_event, new_producer, send_item  # noqa: E402
from coldstart.dev.services import LocalRedis, LocalRedisCluster, free_port, wait_for_port  # noqa: E402
from coldstart.dev.stack import LocalStack, WorkerProcess  # noqa: E402
from encoders.export_format import TOWERS_METADATA  # noqa: E402

SETTINGS = Settings.from_env()
# Where `coldstart data fetch` and `coldstart export-towers` keep data sets and checkpoints (the stack
# fixture gives the service a temporary data folder of its own).
PROJECT_DATA_DIR = SETTINGS.data_dir


def exported_towers() -> dict:
    """towers.json of the trained towers the workers serve; fails, saying how to export them, if there are none."""
    path = SETTINGS.towers_dir / TOWERS_METADATA
    assert path.exists(), f"no trained towers in {path.parent}: run `coldstart export-towers` (`make test` does)"
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server of the tests' own on a free port; None if there is no redis-server to start."""
    if shutil.which("redis-server"):
        with LocalRedis() as server:
            yield server
    else:
        yield None


@pytest.fixture(scope="session")
def redis_url(redis_server):
    """The tests' own Redis, or REDIS_URL if none can be started."""
    return redis_server.url if redis_server else os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def s3_storage():
    """Durable broker storage: a local S3-compatible server (moto) with a bucket; yields (engine URL, env)."""
    import boto3

    port = free_port()
    server = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 30, server)
        credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="tansu")
        yield "s3://tansu/", {**os.environ, **credentials, "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
                              "AWS_ALLOW_HTTP": "true"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def serving_stack(tmp_path_factory, redis_url: str, project: str):
    """Broker + Redis + Feast + one worker, serving, with a data folder and Feast project of its own."""
    settings = replace(
        SETTINGS, data_dir=tmp_path_factory.mktemp("coldstart-data"), redis_url=redis_url,
        feast_project=project, offline_flush_seconds=1.0, unknown_item_wait_seconds=5.0,
    )
    with LocalStack(settings) as running:
        running.wait_until_serving()
        yield running


@contextmanager
def stack_producer(stack):
    p = new_producer(stack.settings)
    yield p
    p.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_url):
    """The stack most tests share (a module that needs a catalogue of its own starts another: test_retrieval)."""
    with serving_stack(tmp_path_factory, redis_url, "coldstart_test") as running:
        yield running


@pytest.fixture(scope="session")
def producer(stack):
    with stack_producer(stack) as p:
        yield p


def unique_id(prefix: str = "item") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def restart_worker(stack, crash: bool) -> None:
    stack.worker.kill() if crash else stack.worker.stop()
    stack.worker = WorkerProcess(stack.settings).start()


def upload_batch(producer, prefix: str, count: int) -> list[str]:
    ids = [unique_id(prefix) for _ in range(count)]
    for item_id in ids:
        upload(producer, {"item_id": item_id, "title": f"Item {item_id} about gardening"})
    return ids


def upload(producer, item: dict | bytes, key: str | None = None) -> None:
    send_item(producer, item_event(item) if isinstance(item, dict) else item, key=key)
    producer.flush()


def wait_readable(store, item_ids: list[str], timeout: float = 30) -> dict:
    """Poll Feast until every item is readable; fail with the missing ones."""
    deadline = time.monotonic() + timeout
    found: dict = {}
    while time.monotonic() < deadline:
        found = feast_store.read_item_features(store, item_ids)
        if len(found) == len(item_ids):
            return found
        time.sleep(0.1)
    missing = sorted(set(item_ids) - set(found))
    raise AssertionError(f"{len(missing)} of {len(item_ids)} items not readable after {timeout}s: {missing[:5]}")


def read_topic(settings: Settings, topic: str, until, timeout: float = 30, raw: bool = False) -> list:
    """Read a topic from the beginning (no consumer group) until `until(records)` holds.

    Records are the JSON values, or with `raw` kafka-python's ConsumerRecords (key, partition, headers…).
    """
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=500, fetch_max_wait_ms=50)
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in consumer:
                records.append(message if raw else json.loads(message.value))
            if until(records):
                return records
        raise AssertionError(f"condition not met on {topic} after {timeout}s ({len(records)} records)")
    finally:
        consumer.close()


# ---- a Redis Cluster as the online store (issue 18; README, "Redis Cluster") ----------------------

# A test that takes `online_store` runs on a single Redis and on a Redis Cluster (that run marked scaleout).
ONLINE_STORES = ["redis", pytest.param("redis_cluster", marks=pytest.mark.scaleout)]


@pytest.fixture(params=ONLINE_STORES)
def online_store(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def redis_cluster():
    """A local Redis Cluster: three masters, no replicas, append-only files on; stopped after the session."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("a Redis Cluster needs redis-server and redis-cli on PATH")
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_stack(tmp_path_factory, redis_cluster):
    """Broker, worker and Feast, with the Redis Cluster as the online store."""
    with serving_stack(tmp_path_factory, redis_cluster.url, "coldstart_cluster") as running:
        yield running


@pytest.fixture(scope="session")
def cluster_producer(cluster_stack):
    with stack_producer(cluster_stack) as p:
        yield p


def stack_on(online_store: str, request):
    """(stack, producer) of the shared stack on this online store."""
    if online_store == "redis":
        return request.getfixturevalue("stack"), request.getfixturevalue("producer")
    return request.getfixturevalue("cluster_stack"), request.getfixturevalue("cluster_producer")
