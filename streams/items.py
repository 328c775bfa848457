"""The item agent: item-uploads → validate → micro-batch → CEG (ONNX) → item tower → Feast → item-embeddings.

Delivery is at-least-once (streams.sinks): an event is acknowledged only after
its vector is in the online store and its offline row in a parquet part file; a
replay writes the same value with the same event time, which the online store
ignores (it keeps the newest event time per item).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from coldstart import feature_store
from encoders.runtime import load_content_encoder
from encoders.text import item_text
from encoders.tower_runtime import load_towers
from streams.app import app, item_embeddings_topic, item_uploads_topic, settings
from streams.dead_letters import dead_letter_event
from streams.records import ItemEmbedding, ItemUpload
from streams.sinks import OfflineBuffer, offline_buffers, retry_forever
from streams.validation import InvalidEvent, parse_item_upload

log = logging.getLogger(__name__)

# One thread for the models: ONNX Runtime already uses every core per call.
model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")


class ItemModels:
    """What the agent needs loaded once: the encoder, the towers and the feature store."""

    def __init__(self):
        self.encoder = load_content_encoder(
            settings.encoder_export_dir, settings.encoder_model_path, precision=settings.encoder_precision
        )
        self.towers = load_towers(settings.onnx_dir, settings.encoder_name)
        self.version = f"{self.encoder.version}+{self.towers.version}"
        self.store = feature_store.open_store(settings)
        from feature_repo.data_sources import item_embeddings_source

        self.offline_path = item_embeddings_source.path
        log.info("item agent ready: %s on %s", self.version, self.encoder.provider)

    def encode(self, items: list[ItemUpload]) -> tuple[np.ndarray, np.ndarray]:
        """(content embeddings (B, D_content), item vectors (B, D))."""
        texts = [item_text(i.title, i.description, i.category, i.brand, i.tags, i.price) for i in items]
        content = self.encoder.encode(texts)
        return content, self.towers.item_vectors(content)


@app.agent(item_uploads_topic)
async def encode_items(stream):
    models = await asyncio.get_running_loop().run_in_executor(model_executor, ItemModels)
    offline = OfflineBuffer(stream, models.offline_path, feature_store.ITEM_EMBEDDING_SCHEMA, settings.offline_flush_seconds)
    offline_buffers.append(offline)
    async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_ms / 1000):
        valid: list[ItemUpload] = []
        for event in events:
            try:
                valid.append(parse_item_upload(event.value))
            except InvalidEvent as reason:
                await dead_letter_event(event, str(reason))
        frame = await write_embeddings(models, valid) if valid else None
        offline.add(frame, list(events))
        await offline.flush()


async def write_embeddings(models: ItemModels, items: list[ItemUpload]):
    content, vectors = await asyncio.get_running_loop().run_in_executor(model_executor, models.encode, items)
    frame = feature_store.item_embedding_frame(
        [i.item_id for i in items], vectors, content, [i.title[:200] for i in items], models.version,
        [i.uploaded_at for i in items],
    )
    await retry_forever("online write", feature_store.push_online, models.store, "item_embeddings_push_source", frame)
    for item, vector in zip(items, vectors):
        await item_embeddings_topic.send(
            key=item.item_id.encode(),
            value=ItemEmbedding(item_id=item.item_id, vector=vector.tolist(), model_version=models.version,
                                event_time=item.uploaded_at),
        )
    return frame
