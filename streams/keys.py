"""The producer contract for keys: every event of one entity on one partition, the one its key hashes to.

An item upload is keyed by its item_id, a user action by its user_id, and lands on
the partition Kafka's default partitioner picks for that key (murmur2 of the key
bytes, as the Java client, kafka-python, aiokafka and faust do it). The worker relies
on it: one entity's events are read in order by one worker, and a user's history
lives in the table partition of its user_id, on the worker that reads that partition.

An event that arrives elsewhere (no key, another key, or a producer with another
partitioner: librdkafka's default hashes with CRC32) is not processed where it is,
and not lost: it is forwarded to its entity's partition with the entity id as key,
value and headers unchanged, and processed there. Its offset is acknowledged only
once the forwarded copy is in the broker (README, "Producer contract"). An event
the broker refuses to take again (larger than the producer's or the broker's
message limit: a 10 MB upload) is processed where it is instead, with a warning:
its order against the entity's other events is then not guaranteed.
"""

from __future__ import annotations

import logging
import time

from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from kafka.partitioner import murmur2

from streams.sinks import describe

log = logging.getLogger(__name__)

REPORT_EVERY_S = 60.0  # a producer that never keys its records would otherwise log every event


def home_partition(entity_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for this entity's key."""
    return (murmur2(entity_id.encode()) & 0x7FFFFFFF) % partitions


class Forwarder:
    """Sends events that arrived off their entity's partition to it, and says so now and then."""

    def __init__(self, topic, id_field: str, partitions: int):
        self.topic = topic
        self.id_field = id_field
        self.partitions = partitions
        self.pending: list[tuple] = []  # (event, entity id, why, record) to forward
        self.since_report = 0
        self.last_report = -REPORT_EVERY_S

    def misplaced(self, event, entity_id: str, record) -> bool:
        """Whether the event is off its entity's partition: then it waits for forward_pending(), not processed here."""
        why = self._why_misplaced(event, entity_id)
        if why:
            self.pending.append((event, entity_id, why, record))
        return why is not None

    def _why_misplaced(self, event, entity_id: str) -> str | None:
        message = event.message
        if message.key is None:
            return "no key"
        if message.key != entity_id.encode():
            return f"key {message.key[:60]!r} is not its {self.id_field}"
        home = home_partition(entity_id, self.partitions)
        if message.partition != home:
            return f"on partition {message.partition}, not {home} (a partitioner other than murmur2?)"
        return None

    async def forward_pending(self) -> list:
        """Send every misplaced event to its partition and wait until every copy is in the broker.

        Returns the records of the events the broker would not take (too large): process those here.
        """
        misplaced, self.pending = self.pending, []
        unsent = []
        for event, entity_id, why, record in misplaced:
            message = event.message
            try:
                delivery = await self.topic.send(key=entity_id.encode(), value=message.value,
                                                 partition=home_partition(entity_id, self.partitions),
                                                 headers=list(message.headers or ()))
                await delivery
            except (KafkaError, ProducerSendError) as err:  # faust wraps the client's refusal
                log.warning("could not forward %s[%d]@%d (%s; %s): processing it on this partition",
                            message.topic, message.partition, message.offset, why, describe(err))
                unsent.append(record)
        self._report(misplaced, len(misplaced) - len(unsent))
        return unsent

    def _report(self, misplaced: list, forwarded: int) -> None:
        self.since_report += forwarded
        if forwarded and time.monotonic() - self.last_report >= REPORT_EVERY_S:
            event, entity_id, why, _ = misplaced[0]
            message = event.message
            log.warning(
                "forwarded %d event(s) to the partition of their %s since the last report, e.g. %s[%d]@%d: %s. "
                "Key records by %s, partitioned by murmur2 (README, 'Producer contract'): forwarding costs a write",
                self.since_report, self.id_field, message.topic, message.partition, message.offset, why,
                self.id_field,
            )
            self.since_report, self.last_report = 0, time.monotonic()
