"""Notice a broker that lost its data, and stop with a clear message instead of skipping events.

A broker restarted on memory storage (tansu's memory://) comes back without its
topics, their logs and the group's committed offsets. The consumer would carry on
from its old positions in new, empty logs — silently skipping every new event
below them — or wait on topics that no longer exist. Every topic has an id that
survives a restart of a durable broker (tansu's s3://, Apache Kafka) and changes
when the topic is created anew, so the worker checks the ids of the topics it
reads. On a change it writes out what it holds and exits non-zero, saying why.
What the broker lost is lost; events sent to it between its restart and the
check may have been skipped (the check runs every CHECK_INTERVAL_S, offsets are
committed every second) and must be sent again.
"""

from __future__ import annotations

import asyncio
import logging
import os

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from coldstart.config import Settings
from streams.sinks import describe

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 5.0
WATCHED_TOPICS = ("item-uploads", "user-actions")


class BrokerDataLost(RuntimeError):
    """The broker no longer has the topics this worker was reading."""


class TopicMissing(RuntimeError):
    """A topic this worker reads has not been created (yet)."""


class TopicIds:
    """The ids of WATCHED_TOPICS as first seen, compared with the broker's on every check."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.first_seen: dict[str, str] = {}
        self.admin: KafkaAdminClient | None = None

    def check(self) -> None:
        """Blocking (kafka-python): run it in a thread. Raises BrokerDataLost, TopicMissing, or KafkaError."""
        if self.admin is None:
            self.admin = KafkaAdminClient(
                bootstrap_servers=self.settings.kafka_bootstrap, request_timeout_ms=5000,
                **self.settings.kafka_client_options(),
            )
        now = {t["name"]: t["topic_id"] for t in self.admin.describe_topics() if t["name"] in WATCHED_TOPICS}
        for topic in WATCHED_TOPICS:
            before, current = self.first_seen.get(topic), now.get(topic)
            if before is not None and current != before:
                raise BrokerDataLost(f"topic {topic!r} " + (
                    "no longer exists on the broker" if current is None
                    else f"was created anew on the broker (id {before} → {current})"))
            if current is None:
                raise TopicMissing(f"topic {topic!r} does not exist on the broker: create the topics "
                                   "(README, 'Pointing it at a real Kafka')")
        if not self.first_seen:
            log.info("watching topic ids: %s", ", ".join(f"{t} {now[t]}" for t in WATCHED_TOPICS))
        self.first_seen.update(now)


def register(app) -> None:
    """Declare the broker check on the app (streams.app.ColdstartApp)."""
    settings = app.settings
    topic_ids = TopicIds(settings)

    @app.timer(interval=CHECK_INTERVAL_S)
    async def watch_broker() -> None:
        await check(app, topic_ids)


async def check(app, topic_ids: TopicIds) -> None:
    settings = app.settings
    try:
        await asyncio.to_thread(topic_ids.check)
        app.broker_reachable = True
    except (KafkaError, TopicMissing) as err:  # the consumer waits and reconnects by itself; keep watching
        app.broker_reachable = False
        log.warning("broker check at %s: %s; waiting", settings.kafka_bootstrap, describe(err))
    except BrokerDataLost as lost:
        log.critical(
            "%s: the broker at %s lost its data (tansu's memory:// storage does not survive a restart; use "
            "s3:// or Apache Kafka). Events it held that this worker had not processed are gone, and events "
            "sent to it in the last %.0fs may have been skipped: send them again. Writing out what this worker "
            "holds and stopping, so that nothing more is skipped silently; a restarted worker carries on "
            "with the broker's new logs.", lost, settings.kafka_bootstrap, CHECK_INTERVAL_S + 1,
        )
        for offline in app.offline_buffers:
            await offline.flush(force=True)
        # Not faust's graceful stop: it would commit to, and can hang on, a broker that is not the
        # one this worker was reading. Nothing else is worth saving.
        logging.shutdown()
        os._exit(1)
