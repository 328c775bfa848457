"""The item agent: item-uploads → validate → micro-batch → CEG (ONNX) → Feast → item-embeddings.

Delivery is at-least-once: an event is acknowledged (its offset may be
committed) only after its vector is in the online store and its offline row is
in a parquet part file; a replay writes the same value with the same event time,
which the online store ignores (it keeps the newest event time per item).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pandas as pd

from coldstart import feature_store
from encoders.runtime import load_content_encoder
from encoders.text import item_text
from streams.app import app, dead_letters_topic, item_embeddings_topic, item_uploads_topic, settings
from streams.records import DeadLetter, ItemEmbedding, ItemUpload
from streams.validation import InvalidEvent, parse_item_upload

log = logging.getLogger(__name__)

# One thread for the model: ONNX Runtime already uses every core per call.
model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
MAX_RETRY_DELAY_S = 5.0
DEAD_LETTER_ORIGINAL_BYTES = 64 * 1024
MAX_ID_BYTES = 1024  # a key longer than any valid item_id is cut in the dead letter


class ItemModels:
    """What the agent needs loaded once: the encoder and the feature store."""

    def __init__(self):
        self.encoder = load_content_encoder(
            settings.encoder_export_dir, settings.encoder_model_path, precision=settings.encoder_precision
        )
        self.store = feature_store.open_store(settings)
        from feature_repo.data_sources import item_embeddings_source

        self.offline_path = item_embeddings_source.path
        log.info("item agent ready: encoder %s on %s", self.encoder.version, self.encoder.provider)

    def encode(self, items: list[ItemUpload]):
        texts = [item_text(i.title, i.description, i.category, i.brand, i.tags, i.price) for i in items]
        return self.encoder.encode(texts)


async def retry_forever(what: str, call, *args):
    """Run a blocking call in a thread until it succeeds, backing off up to MAX_RETRY_DELAY_S.

    The agent waits here rather than skipping: un-acknowledged events are
    neither committed nor lost, and the consumer stops fetching (backpressure).
    """
    delay, failures, first_failure = 0.1, 0, 0.0
    while True:
        try:
            result = await asyncio.to_thread(call, *args)
        except Exception as err:  # Redis down, disk full…: wait and try again
            failures += 1
            first_failure = first_failure or time.monotonic()
            log.warning("%s failed (attempt %d, %s); retrying in %.1fs", what, failures, describe(err), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
            continue
        if failures:
            log.info("%s recovered after %d failed attempts over %.1fs", what, failures, time.monotonic() - first_failure)
        return result


def describe(err: Exception, limit: int = 300) -> str:
    """An exception on one readable line: Redis pipeline errors quote binary keys."""
    text = "".join(c if c.isprintable() else "." for c in str(err))
    return f"{type(err).__name__}: {text[:limit]}"


class OfflineBuffer:
    """Offline rows and the events that produced them, flushed as one part file.

    Acknowledging the events only after the flush keeps at-least-once for the
    offline store too, without writing one small file per micro-batch.
    """

    def __init__(self, stream, path: str):
        self.stream = stream
        self.path = path
        self.frames: list[pd.DataFrame] = []
        self.events: list = []
        self.oldest = time.monotonic()
        self.lock = asyncio.Lock()

    def add(self, frame: pd.DataFrame | None, events: list) -> None:
        if not self.events:
            self.oldest = time.monotonic()
        if frame is not None and len(frame):
            self.frames.append(frame)
        self.events.extend(events)

    async def flush(self, force: bool = False) -> None:
        async with self.lock:
            if not self.events or (not force and time.monotonic() - self.oldest < settings.offline_flush_seconds):
                return
            frames, events = self.frames, self.events
            self.frames, self.events = [], []
            if frames:
                await retry_forever(
                    "offline write", feature_store.write_offline, self.path, pd.concat(frames),
                    feature_store.ITEM_EMBEDDING_SCHEMA,
                )
            for event in events:
                await self.stream.ack(event)


offline_buffers: list[OfflineBuffer] = []


@app.agent(item_uploads_topic)
async def encode_items(stream):
    models = await asyncio.get_running_loop().run_in_executor(model_executor, ItemModels)
    offline = OfflineBuffer(stream, models.offline_path)
    offline_buffers.append(offline)
    async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_ms / 1000):
        valid: list[ItemUpload] = []
        for event in events:
            try:
                valid.append(parse_item_upload(event.value))
            except InvalidEvent as reason:
                await send_dead_letter(event, str(reason))
        frame = await write_embeddings(models, valid) if valid else None
        offline.add(frame, list(events))
        await offline.flush()


@app.timer(interval=1.0)
async def flush_offline_rows():
    """Flush when the stream is quiet too, so acknowledgements never wait for traffic."""
    for offline in offline_buffers:
        await offline.flush()


async def write_embeddings(models: ItemModels, items: list[ItemUpload]) -> pd.DataFrame:
    vectors = await asyncio.get_running_loop().run_in_executor(model_executor, models.encode, items)
    frame = feature_store.item_embedding_frame(
        [i.item_id for i in items], vectors, models.encoder.version, [i.uploaded_at for i in items]
    )
    await retry_forever("online write", feature_store.push_item_embeddings_online, models.store, frame)
    for item, vector in zip(items, vectors):
        await item_embeddings_topic.send(
            key=item.item_id.encode(),
            value=ItemEmbedding(
                item_id=item.item_id, vector=vector.tolist(), model_version=models.encoder.version,
                event_time=item.uploaded_at,
            ),
        )
    return frame


async def send_dead_letter(event, reason: str) -> None:
    message = event.message
    log.info("dead letter %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason)
    key = message.key[:MAX_ID_BYTES] if isinstance(message.key, bytes) else None
    original = message.value or b""
    delivery = await dead_letters_topic.send(
        key=key,
        value=DeadLetter(
            topic=message.topic, partition=message.partition, offset=message.offset, reason=reason,
            # Cut, so that a dead letter always fits in a Kafka message (1 MB by default) even
            # when the event did not: otherwise the send fails and the event blocks its partition.
            original_base64=base64.b64encode(original[:DEAD_LETTER_ORIGINAL_BYTES]).decode("ascii"),
            original_size=len(original), original_sha256=hashlib.sha256(original).hexdigest(),
            key=key.decode("utf-8", "replace") if key is not None else None, received_at=datetime.now(timezone.utc),
        ),
    )
    await delivery  # the dead letter is durable before the event can be acknowledged
