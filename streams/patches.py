"""Where the service changes faust's and aiokafka's behaviour: the only module that touches their internals.

Each overridden method and attribute is pinned by tests/test_library_internals.py
(name and signature), so an upgrade of faust-streaming or aiokafka fails there,
naming this module, instead of losing events quietly.
"""

from __future__ import annotations

import logging
import os

from aiokafka import codec as aiokafka_codec
from aiokafka.consumer.fetcher import PartitionRecords
from faust.transport.drivers import aiokafka as aiokafka_driver

from streams.sinks import describe

log = logging.getLogger(__name__)

# tansu does not wake a waiting fetch when data arrives, so latency is about half the
# fetch wait; faust hard-codes 1500 ms. Dev profile only (shared/notes/kafka-broker.md).
DEV_FETCH_MAX_WAIT_MS = 10


# Every compression codec Kafka defines, with aiokafka's functions for it (codec.py): the
# consumer decodes batches with them, and they need `cramjam` for all but gzip.
CODECS = {
    "gzip": (aiokafka_codec.gzip_encode, aiokafka_codec.gzip_decode),
    "snappy": (aiokafka_codec.snappy_encode, aiokafka_codec.snappy_decode),
    "lz4": (aiokafka_codec.lz4_encode, aiokafka_codec.lz4_decode),
    "zstd": (aiokafka_codec.zstd_encode, aiokafka_codec.zstd_decode),
}
# The exit status of a worker stopped by a batch it cannot decode (README, "When paged").
EXIT_UNDECODABLE_BATCH = 3


class CodecsMissing(RuntimeError):
    """This process cannot decode some compression codec; the message says which, and what to install."""


def check_codecs() -> None:
    """Compress and decompress a sample with every codec, as the consumer will; CodecsMissing if any fails.

    Checked when the worker starts: a codec found missing only when a producer first uses it
    would stop the worker at that batch, its partition stuck until someone installs it.
    """
    sample = b'{"item_id": "codec-check", "title": "a sample compressed and decompressed"}' * 4
    failures = []
    for name, (encode, decode) in CODECS.items():
        try:
            if decode(encode(sample)) != sample:
                failures.append(f"{name}: a round trip changed the bytes")
        except Exception as err:  # NotImplementedError or AttributeError without cramjam, a broken build…
            failures.append(f"{name}: {describe(err)}")
    if failures:
        raise CodecsMissing(
            f"this worker cannot decode every compression codec producers may use ({'; '.join(failures)}). "
            "aiokafka needs the cramjam package for snappy, lz4 and zstd: install the service with its "
            "dependencies (`pip install coldstart` requires aiokafka[lz4,snappy,zstd]) or `pip install cramjam`")


def undecodable_batch(err: BaseException) -> tuple[str, int, int, int] | None:
    """(topic, partition, first offset, last offset) of the record batch whose decoding raised err, if it did.

    aiokafka decodes (checks the CRC of, decompresses) a fetched batch while it hands out the
    records, in PartitionRecords._unpack_records, whose frame holds the partition, the offset
    it has handed out records up to, and the batch; the exception itself names none of them.
    """
    traceback = err.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code is PartitionRecords._unpack_records.__code__ and "next_batch" in frame.f_locals:
            records, batch = frame.f_locals["self"], frame.f_locals["next_batch"]
            return records._tp.topic, records._tp.partition, records.next_fetch_offset, batch.next_offset - 1
        traceback = traceback.tb_next
    return None


class _StopOnUndecodableBatchThread(aiokafka_driver.AIOKafkaConsumerThread):
    """faust's consumer thread, stopping the worker on a record batch it cannot decode.

    Unchanged, the error crashes the worker with a traceback, and a restarted worker fetches
    the same batch and crashes again. Skipping the batch would lose its events silently. So:
    one CRITICAL line that says where and why, and a distinct exit status; nothing after the
    batch's offset on that partition is committed, so no event is lost (README, "When paged").
    """

    async def _fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
        try:
            return await super()._fetch_records(consumer, active_partitions, timeout=timeout, max_records=max_records)
        except Exception as err:
            where = undecodable_batch(err)
            if where is None:
                raise
            topic, partition, first, last = where
            log.critical(
                "cannot decode the record batch at %s[%d] offsets %d–%d (%s): stopping with exit status %d "
                "rather than skip its events; nothing from offset %d on is committed on that partition "
                "(README, 'When paged')",
                topic, partition, first, last, describe(err), EXIT_UNDECODABLE_BATCH, first,
            )
            # Not faust's graceful stop: it would log this error again as a crash, with its traceback.
            # Events processed and not yet committed are processed again by the next worker.
            logging.shutdown()
            os._exit(EXIT_UNDECODABLE_BATCH)


class _ShortFetchWaitThread(_StopOnUndecodableBatchThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = DEV_FETCH_MAX_WAIT_MS
        return consumer


class _SeekSafeConsumer(aiokafka_driver.Consumer):
    """faust's consumer, with a seek after a rebalance that cannot lose events, in a thread of ours.

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

    consumer_thread = _StopOnUndecodableBatchThread

    def _new_consumer_thread(self):
        return self.consumer_thread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        self.stop_flow()
        await super().perform_seek()
        uncommitted = [tp for tp in self.assignment()
                       if not self._is_changelog_tp(tp) and not self._committed_offset.get(tp)]
        if uncommitted:
            earliest = await self.earliest_offsets(*uncommitted)
            await self.seek_wait({tp: earliest.get(tp) or 0 for tp in uncommitted})


class _ShortFetchWaitConsumer(_SeekSafeConsumer):
    consumer_thread = _ShortFetchWaitThread


class Transport(aiokafka_driver.Transport):
    """The seek fix, and a stop on a batch the worker cannot decode."""

    Consumer = _SeekSafeConsumer


class DevTransport(aiokafka_driver.Transport):
    """For the embedded tansu broker: the same, and a short fetch wait."""

    Consumer = _ShortFetchWaitConsumer


def key_changelog_like_the_input(table) -> None:
    """Write the table's changelog keys as the raw UTF-8 bytes of its str keys, as producers key the input topic.

    faust serializes a str-keyed table's keys as JSON ('"u42"', quotes included), and with use_partitioner the
    producer picks the changelog partition by hashing those bytes: a user's history then lands on another changelog
    partition than the user's actions. One worker recovers every partition and never notices; with several, the
    worker that takes over a user's partition recovers a changelog partition that does not hold the user's history,
    and the history starts again from nothing (tests/test_scaleout.py). With raw keys both hash the same bytes.
    The table sends with its own key serializer and recovers through its changelog topic's (made with the table):
    both change. Recovered keys load back as str (the table's key_type).
    """
    table.key_serializer = "raw"
    table.changelog_topic.key_serializer = "raw"
