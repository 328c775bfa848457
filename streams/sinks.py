"""Where an agent's results go: the feature store (retries with backoff, offline rows buffered until
flushed) and the topics the worker publishes on.

Delivery is at-least-once: an agent hands its events to an OfflineBuffer after
the online write and the publication, and the buffer acknowledges them (their
offsets may then be committed) only once their offline rows are in a parquet
part file.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pandas as pd
from aiokafka import AIOKafkaProducer

from coldstart import metrics
from coldstart.config import Settings
from coldstart.store import OfflineTable

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 5.0


async def retry_forever(what: str, call, *args):
    """Run a blocking call in a thread until it succeeds, backing off up to MAX_RETRY_DELAY_S.

    The agent waits here rather than skipping: un-acknowledged events are
    neither committed nor lost, and the consumer stops fetching (backpressure).
    """
    return await retry_until_done(what, lambda: asyncio.to_thread(call, *args))


async def retry_until_done(what: str, attempt):
    """Await `attempt()` (a new awaitable each call) until it succeeds, backing off up to MAX_RETRY_DELAY_S;
    each failure is logged and counted as a retry of `what`."""
    delay, failures, first_failure = 0.1, 0, 0.0
    while True:
        try:
            result = await attempt()
        except Exception as err:  # Redis down, disk full, broker gone…: wait and try again
            failures += 1
            metrics.WRITE_RETRIES.labels(what).inc()
            first_failure = first_failure or time.monotonic()
            log.warning("%s failed (attempt %d, %s); retrying in %.1fs", what, failures, describe(err), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
            continue
        if failures:
            log.info("%s recovered after %d failed attempts over %.1fs", what, failures, time.monotonic() - first_failure)
        return result


class TopicPublisher:
    """Records for one topic through a producer of the agent's own, sent a micro-batch at a time in multi-record
    batches, and waited for until the broker has them all.

    The app's producer sends single-record batches in the dev profile (tansu's end offsets need them for table
    changelogs, streams.app): one produce request per published vector; batched, the broker's CPU per item at
    saturation fell from 3.3 to 2.4 ms (BENCHMARKS.md, issue 19). A failed send is retried, backing off, until the broker has the
    batch (a record sent twice is harmless: its readers keep the newest per item)."""

    def __init__(self, settings: Settings, topic: str):
        self.settings = settings
        self.topic = topic
        self.producer: AIOKafkaProducer | None = None  # started at the first batch, again after a failed start

    async def publish(self, records: list[tuple[bytes, bytes]]) -> None:
        """(key, value) records, in order per key."""
        await retry_until_done(f"publish on {self.topic}", lambda: self._send(records))

    async def _send(self, records: list[tuple[bytes, bytes]]) -> None:
        if self.producer is None:
            self.producer = await self._started_producer()
        sent = [await self.producer.send(self.topic, value, key=key) for key, value in records]
        await asyncio.gather(*sent)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def _started_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap.split(","), enable_idempotence=False,  # tansu: no InitProducerId
            compression_type=self.settings.producer_compression_type, **self.settings.aiokafka_client_options())
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer


def describe(err: Exception, limit: int = 300) -> str:
    """An exception on one readable line: Redis pipeline errors quote binary keys."""
    text = "".join(c if c.isprintable() else "." for c in str(err))
    return f"{type(err).__name__}: {text[:limit]}"


class OfflineBuffer:
    """Offline rows and the events that produced them, flushed as one part file.

    Acknowledging the events only after the flush keeps at-least-once for the
    offline store too, without writing one small file per micro-batch. The write
    runs beside the agent, which goes on with its next batch (waiting for it put
    ~50 ms on the upload → online p99 every flush, BENCHMARKS.md, issue 19); one
    write at a time, so an offline store that fails holds the agent back
    (backpressure) instead of rows piling up in memory.
    """

    def __init__(self, stream, table: OfflineTable, flush_seconds: float):
        self.stream = stream
        self.table = table
        self.flush_seconds = flush_seconds
        self.frames: list[tuple[OfflineTable, pd.DataFrame]] = []
        self.events: list = []
        self.oldest = time.monotonic()
        self.lock = asyncio.Lock()
        self.writing: asyncio.Future | None = None  # the part files being written, then their events acknowledged

    def add(self, frame: pd.DataFrame | None, events: list, table: OfflineTable | None = None) -> None:
        """Rows for `table` (default: the buffer's own; another model version's during a rollout)."""
        if not self.events:
            self.oldest = time.monotonic()
        if frame is not None and len(frame):
            self.frames.append((table or self.table, frame))
        self.events.extend(events)

    async def flush(self, force: bool = False) -> None:
        """Start writing what is buffered once it is `flush_seconds` old (force: now, and wait for it)."""
        async with self.lock:
            if not self.events or (not force and time.monotonic() - self.oldest < self.flush_seconds):
                return
            if self.writing is not None:
                await self.writing  # one write at a time: acknowledgements in order, and backpressure
            frames, events = self.frames, self.events
            self.frames, self.events = [], []
            self.writing = writing = asyncio.ensure_future(self._write(frames, events))
        if force:
            await writing

    async def _write(self, frames: list[tuple[OfflineTable, pd.DataFrame]], events: list) -> None:
        tables = {id(table): table for table, _ in frames}  # one part file per table
        for key, table in tables.items():
            await retry_forever("offline write", _concat_and_write, table, [f for t, f in frames if id(t) == key])
        for event in events:
            await self.stream.ack(event)


def _concat_and_write(table: OfflineTable, frames: list[pd.DataFrame]) -> None:
    table.write(pd.concat(frames))
