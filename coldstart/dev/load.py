"""Load generators: Kafka producers of item uploads and user actions, paced or as fast as possible."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from kafka import KafkaProducer

from coldstart.config import Settings


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


def upload_at_rate(settings: Settings, items: list[dict], rate: float, watcher, progress=None) -> None:
    """Send items paced to `rate` per second, telling the watcher (coldstart.dev.watchers) when each left."""
    producer = new_producer(settings)
    start = time.monotonic()
    for n, item in enumerate(items):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        watcher.sent(item["item_id"], time.monotonic())
        send_item(producer, item_event(item))
        if progress is not None:
            progress.update(1)
    producer.flush()
    producer.close()
