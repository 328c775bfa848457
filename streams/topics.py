"""The service's topics, created up front with their partition counts (`coldstart create-topics`)."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from coldstart.config import TOPICS, Settings

log = logging.getLogger(__name__)


def create_topics(settings: Settings, timeout: float = 15) -> None:
    """Create every topic up front with its partition count (idempotent)."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(timeout * 1000),
        **settings.kafka_client_options(),
    )
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1)
            for name in TOPICS
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: fine
            log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        admin.close()
