"""Where the service changes faust's and aiokafka's behaviour: the only module that touches their internals.

Each overridden method and attribute is pinned by tests/test_library_internals.py
(name and signature), so an upgrade of faust-streaming or aiokafka fails there,
naming this module, instead of losing events quietly.
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as aiokafka_driver

# tansu does not wake a waiting fetch when data arrives, so latency is about half the
# fetch wait; faust hard-codes 1500 ms. Dev profile only (shared/notes/kafka-broker.md).
DEV_FETCH_MAX_WAIT_MS = 10


class _ShortFetchWaitThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = DEV_FETCH_MAX_WAIT_MS
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


class Transport(aiokafka_driver.Transport):
    Consumer = _SeekSafeConsumer


class DevTransport(aiokafka_driver.Transport):
    """For the embedded tansu broker: the seek fix and a short fetch wait."""

    Consumer = _ShortFetchWaitConsumer
