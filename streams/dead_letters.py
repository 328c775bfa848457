"""Dead letters: an event that cannot be processed, with its original bytes and the reason."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone

from streams.app import dead_letters_topic
from streams.records import DeadLetter

log = logging.getLogger(__name__)


async def send_dead_letter(topic: str, partition: int, offset: int, key, original: bytes | None, reason: str) -> None:
    """Publish a dead letter and wait until it is durable (before its event may be acknowledged)."""
    log.info("dead letter %s[%d]@%d: %s", topic, partition, offset, reason)
    key_bytes = key if isinstance(key, bytes) else (key.encode() if key else None)
    delivery = await dead_letters_topic.send(
        key=key_bytes,
        value=DeadLetter(
            topic=topic, partition=partition, offset=offset, reason=reason,
            original_base64=base64.b64encode(original or b"").decode("ascii"),
            key=key_bytes.decode("utf-8", "replace") if key_bytes else None,
            received_at=datetime.now(timezone.utc),
        ),
    )
    await delivery


async def dead_letter_event(event, reason: str) -> None:
    message = event.message
    await send_dead_letter(message.topic, message.partition, message.offset, message.key, message.value, reason)
