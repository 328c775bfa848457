"""Dead letters: an event that cannot be processed, with its original bytes and the reason."""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import datetime, timezone

from coldstart import metrics
from streams.records import DeadLetter
from streams.validation import InvalidEvent

log = logging.getLogger(__name__)

# A dead letter must always fit in a Kafka message (1 MB by default) even when its
# event did not, or the send fails and the event blocks its partition: the original
# is kept up to this size, with the size and sha256 of the whole.
MAX_ORIGINAL_BYTES = 64 * 1024
MAX_KEY_BYTES = 1024


class DeadLetters:
    """The dead-letters topic, as the agents write to it."""

    def __init__(self, topic):
        self.topic = topic

    async def send(self, topic: str, partition: int, offset: int, key, original: bytes | None, reason: str,
                   headers=None) -> None:
        """Publish a dead letter and wait until it is durable (before its event may be acknowledged).

        The original's record headers (tracing ids, producer names…) ride on the dead letter's record.
        """
        log.info("dead letter %s[%d]@%d: %s", topic, partition, offset, reason)
        metrics.DEAD_LETTERS.labels(topic, metrics.dead_letter_reason(reason)).inc()
        key_bytes = (key if isinstance(key, bytes) else key.encode())[:MAX_KEY_BYTES] if key else None
        original = original or b""
        delivery = await self.topic.send(
            key=key_bytes,
            headers=list(headers or ()),
            value=DeadLetter(
                topic=topic, partition=partition, offset=offset, reason=reason,
                original_base64=base64.b64encode(original[:MAX_ORIGINAL_BYTES]).decode("ascii"),
                original_size=len(original), original_sha256=hashlib.sha256(original).hexdigest(),
                key=key_bytes.decode("utf-8", "replace") if key_bytes else None,
                received_at=datetime.now(timezone.utc),
            ),
        )
        await delivery

    async def send_event(self, event, reason: str) -> None:
        """The event being processed, as received."""
        message = event.message
        await self.send(message.topic, message.partition, message.offset, message.key, message.value, reason,
                        message.headers)

    async def parse_each(self, events, parse) -> list[tuple[object, object]]:
        """(event, parse(event.value)) for each event that parses; the others are dead-lettered with the
        reason `parse` raised (streams.validation.InvalidEvent)."""
        parsed = []
        for event in events:
            try:
                parsed.append((event, parse(event.value)))
            except InvalidEvent as reason:
                await self.send_event(event, str(reason))
        return parsed
