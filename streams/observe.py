"""The worker's metrics endpoint, readiness, and consumer lag per partition (coldstart.metrics holds the metrics).

Ready means: every agent of the worker's role has loaded its models, the last
broker check (streams.broker_watch) reached the broker, and the online store
answers a PING now. Consumer lag is the partition's high watermark as this
worker's consumer last saw it, minus the group's committed offset; on the
embedded tansu broker high watermarks after multi-record batches are not
exact (shared/notes/kafka-broker.md), so there lag is a guide, not a count.
"""

from __future__ import annotations

import asyncio
import logging

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from coldstart import metrics
from coldstart import store as feast_store
from streams.sinks import describe

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0


def register(app) -> None:
    """Start the endpoint (COLDSTART_METRICS_PORT; 0: none) and the lag timer on the app (streams.app.ColdstartApp)."""
    settings = app.settings
    if not settings.metrics_port:
        return
    metrics.serve_endpoints(settings.metrics_port, lambda: readiness(app))
    log.info("metrics, health and readiness on port %d", settings.metrics_port)
    committed = CommittedOffsets(settings)

    @app.timer(interval=LAG_INTERVAL_S)
    async def measure_lag() -> None:
        held = {tp for tp in app.consumer.assignment() if tp.topic in ("item-uploads", "user-actions")}
        try:
            offsets = await asyncio.to_thread(committed.read)
        except KafkaError as err:
            log.warning("consumer lag: %s", describe(err))
            return
        metrics.CONSUMER_LAG.clear()  # partitions this worker no longer holds drop out
        for tp in held:
            highwater = app.consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - offsets.get((tp.topic, tp.partition), 0)))


class CommittedOffsets:
    """The consumer group's committed offsets, read with the admin client (blocking: run it in a thread)."""

    def __init__(self, settings):
        self.settings = settings
        self.admin: KafkaAdminClient | None = None

    def read(self) -> dict[tuple[str, int], int]:
        if self.admin is None:
            self.admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap, request_timeout_ms=5000,
                                          **self.settings.kafka_client_options())
        group = self.settings.consumer_group
        offsets = self.admin.list_group_offsets(group)[group]
        return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def readiness(app) -> dict[str, bool]:
    """Named checks (run in the endpoint's thread): models loaded per agent, broker reached, online store answers."""
    checks = {f"{role}_models_loaded": role in app.loaded_models for role in app.agent_roles}
    checks["broker_reachable"] = app.broker_reachable
    stores = [models.store for models in app.loaded_models.values()]
    checks["online_store_reachable"] = bool(stores) and feast_store.online_store_reachable(stores[0])
    return checks
