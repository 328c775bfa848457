"""The faust app: `create_app(settings)` builds it with its topics and registers the agents.

`coldstart worker` runs it. In the dev profile the app applies the tansu broker
workarounds of shared/notes/kafka-broker.md: short session timeouts, a 10 ms
fetch wait (streams.patches) and single-record changelog batches.

The agents live in their own modules (streams.items, streams.users,
streams.broker_watch, streams.observe); each has a `register(app)` that declares
its agents, tables and timers on the app it is given, so no agent module imports
this one.

Roles: a worker runs the item agent, the user agent or both (`coldstart worker
--role`), so each scales on its own. Every role joins the same consumer group
(the app id): faust's assignor gives each topic's partitions only to the members
that subscribe to it, and the user histories' changelog keeps its name whichever
role holds it.
"""

from __future__ import annotations

import gc
import ssl
from concurrent.futures import ThreadPoolExecutor

import faust

from coldstart.config import Settings
from coldstart import metrics
from streams import broker_watch, items, observe, patches, users
from streams.dead_letters import DeadLetters


# `coldstart worker --role` → the agents it runs.
ROLES = {"items": ("items",), "users": ("users",), "all": ("items", "users")}
AGENTS = {"items": items, "users": users}


class ColdstartApp(faust.App):
    """faust.App with what the agents share: the settings, the topics, the model thread, the offline buffers."""

    def __init__(self, settings: Settings, role: str = "all", **options):
        super().__init__(settings.consumer_group, **options)
        self.settings = settings
        self.agent_roles = ROLES[role]
        self.loaded_models: dict = {}  # agent role → its models, once loaded (readiness, streams.observe)
        self.broker_reachable = False  # the last broker check's outcome (streams.broker_watch)
        # Model calls off the event loop. Two threads: a micro-batch's encode can start while the one before it
        # runs, its one-thread ONNX runs queued behind the other's (encoders.sessions), so no core idles between
        # calls; ONNX Runtime sessions take concurrent calls.
        self.model_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="models")
        self.offline_buffers: list = []  # every agent's streams.sinks.OfflineBuffer, flushed by a timer
        # Raw bytes in: a malformed event must reach dead-letters exactly as received.
        self.item_uploads_topic = self.topic("item-uploads", key_serializer="raw", value_serializer="raw")
        self.user_actions_topic = self.topic("user-actions", key_serializer="raw", value_serializer="raw")
        self.dead_letters = DeadLetters(self.topic("dead-letters", key_serializer="raw"))

    def models_loaded(self, role: str, models, version: str, provider: str) -> None:
        """An agent has loaded its models (`models.store` is its feature store): ready, and say what it serves."""
        self.loaded_models[role] = models
        metrics.MODEL.labels(role, version, provider).set(1)
        # What is loaded by now (models, feature store, libraries) lives as long as the worker: frozen out of the
        # collector's reach, so a full collection scans only what came after. Scanning it all took 60–150 ms, a
        # pause in the agents' event loop that was the p99 of upload → online at 50 uploads/s (BENCHMARKS.md).
        gc.collect()
        gc.freeze()

    def _new_transport(self):
        transport = patches.DevTransport if self.settings.dev else patches.Transport
        return transport(self.conf.broker_consumer, self)


def create_app(settings: Settings, role: str = "all") -> ColdstartApp:
    """The worker's app with the agents of `role` (ROLES) registered; patches.CodecsMissing if it could not read
    every batch."""
    patches.check_codecs()
    dev_options = (
        dict(broker_session_timeout=6, broker_heartbeat_interval=1, broker_rebalance_timeout=10,
             # tansu misreports end offsets after multi-record batches; single-record
             # changelog batches keep table recovery exact.
             producer_max_batch_size=1)
        if settings.dev else {}
    )
    app = ColdstartApp(
        settings, role,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=_broker_credentials(settings),
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_enabled=False,
        producer_linger=0.0,
        producer_compression_type=settings.producer_compression_type,
        # Backpressure: at most this many events wait in an agent's buffer; beyond it the
        # consumer stops fetching, so a burst waits in Kafka, not in the worker's memory.
        stream_buffer_maxsize=4 * settings.batch_size,
        # Stop without waiting for every fetched event to be acknowledged: events still in a
        # micro-batch buffer never will be, so faust would wait out its timeout and be killed.
        # They are not committed, so the next worker gets them again (at-least-once).
        stream_wait_empty=False,
        # A member without the tables (the items role) must not hand out standby replicas when it leads the
        # group: faust leaves them out of the assignment it sends (it has no changelog topics) while the
        # members holding tables count them in, and faust's assignor stops on the mismatch.
        table_standby_replicas=1 if "users" in ROLES[role] else 0,
        **dev_options,
    )

    @app.timer(interval=1.0)
    async def flush_offline_rows():
        """Flush offline rows when the streams are quiet too, so acknowledgements never wait for traffic."""
        for offline in app.offline_buffers:
            await offline.flush()

    for agents in (*(AGENTS[r] for r in app.agent_roles), broker_watch, observe):
        agents.register(app)
    return app


def _broker_credentials(settings: Settings):
    options = settings.kafka_client_options()
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            mechanism=options["sasl_mechanism"],
            ssl_context=ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
            if "SSL" in settings.kafka_security_protocol else None,
        )
    if settings.kafka_security_protocol == "SSL":
        return ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    return None
