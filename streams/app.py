"""The faust app and its topics. `coldstart worker` runs it; agents live in streams.items.

Settings come from the environment (coldstart.settings). In the dev profile the
app applies the tansu broker workarounds of shared/notes/kafka-broker.md: short
session timeouts, a 10 ms fetch wait (tansu does not wake a waiting fetch when
data arrives) and no idempotent producer.
"""

from __future__ import annotations

import ssl

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver

from coldstart.settings import Settings

settings = Settings.from_env()

DEV_FETCH_MAX_WAIT_MS = 10


class _ShortFetchWaitThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = DEV_FETCH_MAX_WAIT_MS  # faust hard-codes 1500 ms
        return consumer


class _SeekSafeConsumer(aiokafka_driver.Consumer):
    """faust's consumer, with a seek after a rebalance that cannot lose events.

    faust 0.15.3 finishes table recovery (tables/recovery.py, on_recovery_completed) by
    resuming the stream partitions, seeking them to their committed offsets and then
    resuming flow control, which clears every stream buffer (clear_on_resume). Recovery
    had already resumed the consumer's flow to read the changelog and never stopped it,
    so while the seek is awaited the fetcher keeps delivering stream events into those
    buffers; the clear then throws them away, although the consumer's position is past
    them. They are never processed nor acknowledged: the partition's commit stays stuck
    on them, and a partition with no committed offset yet (aiokafka's seek_to_committed
    leaves it where it is) never sees them again. A worker started after a crash, with
    a backlog and a non-empty changelog, hit this (README, "Guarantees").

    So: stop the consumer's flow before seeking (faust resumes it right after the
    buffers are cleared, so nothing is delivered in between), and seek partitions
    without a committed offset to their beginning (auto_offset_reset=earliest) rather
    than leave them past events that were thrown away. Events handed over before the
    seek come again: a replay, which the sinks write idempotently.
    """

    async def perform_seek(self) -> None:
        self.stop_flow()
        await super().perform_seek()
        uncommitted = [tp for tp in self.assignment()
                       if not self._is_changelog_tp(tp) and not self._committed_offset.get(tp)]
        if uncommitted:
            earliest = await self.earliest_offsets(*uncommitted)
            await self.seek_wait({tp: earliest.get(tp) or 0 for tp in uncommitted})


class _ShortFetchWaitConsumer(_SeekSafeConsumer):
    def _new_consumer_thread(self):
        return _ShortFetchWaitThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(aiokafka_driver.Transport):
    Consumer = _SeekSafeConsumer


class _DevTransport(aiokafka_driver.Transport):
    Consumer = _ShortFetchWaitConsumer


class ColdstartApp(faust.App):
    def _new_transport(self):
        return (_DevTransport if settings.dev else _Transport)(self.conf.broker_consumer, self)


def _broker_credentials():
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


_dev_options = (
    dict(broker_session_timeout=6, broker_heartbeat_interval=1, broker_rebalance_timeout=10,
         # tansu misreports end offsets after multi-record batches; single-record
         # changelog batches keep table recovery exact.
         producer_max_batch_size=1)
    if settings.dev else {}
)

app = ColdstartApp(
    settings.consumer_group,
    broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
    broker_credentials=_broker_credentials(),
    topic_partitions=settings.topic_partitions,
    consumer_auto_offset_reset="earliest",
    broker_commit_interval=1.0,
    web_enabled=False,
    producer_linger=0.0,
    # Backpressure: at most this many events wait in an agent's buffer; beyond it the
    # consumer stops fetching, so a burst waits in Kafka, not in the worker's memory.
    stream_buffer_maxsize=4 * settings.batch_size,
    # Stop without waiting for every fetched event to be acknowledged: events still in a
    # micro-batch buffer never will be, so faust would wait out its timeout and be killed.
    # They are not committed, so the next worker gets them again (at-least-once).
    stream_wait_empty=False,
    **_dev_options,
)

# Raw bytes in: a malformed event must reach dead-letters exactly as received.
item_uploads_topic = app.topic("item-uploads", key_serializer="raw", value_serializer="raw")
user_actions_topic = app.topic("user-actions", key_serializer="raw", value_serializer="raw")
item_embeddings_topic = app.topic("item-embeddings", key_serializer="raw")
dead_letters_topic = app.topic("dead-letters", key_serializer="raw")



@app.timer(interval=1.0)
async def flush_offline_rows():
    """Flush offline rows when the streams are quiet too, so acknowledgements never wait for traffic."""
    from streams.sinks import offline_buffers

    for offline in offline_buffers:
        await offline.flush()


import streams.items  # noqa: E402,F401  (registers the item agent on `app`)
import streams.users  # noqa: E402,F401  (registers the user agent and its table)
import streams.broker_watch  # noqa: E402,F401  (stops the worker if the broker lost its data)
