"""Start the whole local stack — Redis, the embedded broker, Feast, worker processes — and stop it.

Used by `coldstart demo`, the benchmarks and the tests, so that all three run
the service exactly as deployed: the worker is a separate `coldstart worker`
process talking to a real broker and a real Redis.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from kafka import KafkaProducer

from coldstart import feature_store
from coldstart.services import EmbeddedBroker, LocalRedis, create_topics, die_with_parent, ensure_redis
from coldstart.settings import Settings
from encoders.runtime import ensure_exported

log = logging.getLogger(__name__)


class WorkerProcess:
    """`coldstart worker` as a child process with the given settings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="coldstart-worker-", suffix=".log")[1])

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **self.settings.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coldstart.cli", "worker"],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        return self

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM): faust commits acknowledged offsets and leaves the group."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, with nothing flushed or committed."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def item_event(item: dict, uploaded_at: datetime | None = None) -> dict:
    """A catalogue item as an item-uploads event."""
    return {**item, "uploaded_at": (uploaded_at or datetime.now(timezone.utc)).isoformat()}


def new_producer(settings: Settings, **options) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=0,
        acks=1,
        enable_idempotence=False,  # tansu rejects InitProducerId
        **settings.kafka_client_options(),
        **options,
    )


def send_item(producer: KafkaProducer, event: dict | bytes, key: str | None = None):
    value = event if isinstance(event, bytes) else json.dumps(event).encode()
    key = key if key is not None else (event.get("item_id") if isinstance(event, dict) else None)
    return producer.send("item-uploads", key=key.encode() if key else None, value=value)


def send_action(producer: KafkaProducer, user_id: str, item_id: str, action: str = "click",
                occurred_at: datetime | None = None):
    event = {"user_id": user_id, "item_id": item_id, "action": action,
             "occurred_at": (occurred_at or datetime.now(timezone.utc)).isoformat()}
    return producer.send("user-actions", key=user_id.encode(), value=json.dumps(event).encode())


class LocalStack:
    """Redis (the configured one, or a started one), an embedded broker, Feast and workers."""

    def __init__(self, settings: Settings | None = None, worker: bool = True, broker: EmbeddedBroker | None = None,
                 **overrides):
        self.settings = settings or Settings.from_env(**overrides)
        self.start_worker = worker
        self.redis: LocalRedis | None = None
        self.broker = broker  # None: a broker with memory storage
        self.worker: WorkerProcess | None = None
        self.store = None

    def start(self) -> "LocalStack":
        try:
            self.redis = ensure_redis(self.settings)
            if self.redis:
                self.settings = replace(self.settings, redis_url=self.redis.url)
            self.broker = (self.broker or EmbeddedBroker()).start()
            self.settings = replace(self.settings, kafka_bootstrap=self.broker.bootstrap)
            create_topics(self.settings)
            self.store = feature_store.apply(self.settings)
            ensure_exported(self.settings.encoder_export_dir, self.settings.encoder_model_path)
            if self.start_worker:
                self.worker = WorkerProcess(self.settings).start()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_serving(self, timeout: float = 90) -> float:
        """Upload a probe item and wait until Feast returns it; returns seconds waited."""
        probe_id = f"probe-{uuid.uuid4().hex[:8]}"
        producer = new_producer(self.settings)
        send_item(producer, item_event({"item_id": probe_id, "title": "warm-up probe"}))
        producer.flush()
        producer.close()
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.worker and not self.worker.alive():
                raise RuntimeError(f"worker exited:\n{self.worker.log_tail()}")
            if feature_store.read_item_features(self.store, [probe_id]):
                return time.monotonic() - start
            time.sleep(0.1)
        tail = self.worker.log_tail() if self.worker else ""
        raise TimeoutError(f"worker did not serve a probe item within {timeout:.0f}s\n{tail}")

    def stop(self) -> None:
        for part in (self.worker, self.broker, self.redis):
            if part is not None:
                part.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
