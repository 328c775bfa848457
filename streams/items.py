"""The item agent: item-uploads → validate → micro-batch → CEG (ONNX) → item tower → Feast → item-embeddings.

A removal (`"deleted": true`) takes the item's features out of the online
store (newest event time wins, as for uploads), records a `deleted` row in the
offline store and is published on item-embeddings, so every retrieval replica
drops the item from its index.

Delivery is at-least-once (streams.sinks): an event is acknowledged only after
its vector is in the online store and its offline row in a parquet part file; a
replay writes the same value with the same event time, which the online store
ignores (it keeps the newest event time per item).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import numpy as np
import pandas as pd

from coldstart import metrics
from coldstart import store as feast_store
from coldstart.config import ITEM_PUSH_SOURCE, ITEM_VIEW
from encoders.export_format import read_encoder_metadata
from encoders.text import item_text
from streams.keys import Forwarder
from streams.models import ServedVersions, VersionModels
from streams.records import ItemEmbedding, ItemUpload
from streams.sinks import OfflineBuffer, TopicPublisher, retry_forever
from streams.validation import parse_item_upload

log = logging.getLogger(__name__)

# A batch being written, one being encoded and one queued behind it: enough to keep both cores busy at
# saturation (BENCHMARKS.md, issue 19), few enough that a stop leaves little to redo.
MAX_BATCHES_IN_FLIGHT = 3


def encode(version: VersionModels, items: list[ItemUpload], content: dict) -> np.ndarray:
    """Item vectors of one version; the content embeddings are computed once per encoder and kept in
    `content` (encoder id → (B, D_content)) for the batch's other versions."""
    if id(version.encoder) not in content:
        texts = [item_text(i.title, i.description, i.category, i.brand, i.tags, i.price) for i in items]
        with metrics.ENCODER_SECONDS.time():
            content[id(version.encoder)] = version.encoder.encode(texts)
    with metrics.TOWER_SECONDS.labels("item").time():
        return version.towers.item_vectors(content[id(version.encoder)], [i.item_id for i in items])


def register(app) -> None:
    """Declare the item agent on the app (streams.app.ColdstartApp)."""
    settings = app.settings
    read_encoder_metadata(settings.encoder_export_dir)  # no export: fail now, saying what to run
    forwarder = Forwarder(app.item_uploads_topic, "item_id", settings.topic_partitions)

    @app.agent(app.item_uploads_topic)
    async def encode_items(stream):
        # Loaded while the consumer joins its group; later, one Redis GET of the rollout state per batch.
        served = ServedVersions(settings)
        (active, *_) = await asyncio.to_thread(served.current)
        app.models_loaded("items", active, active.item_version, active.encoder.provider)
        log.info("item agent ready: %s on %s", active.item_version, active.encoder.provider)
        offline = OfflineBuffer(stream, active.item_offline, settings.offline_flush_seconds)
        app.offline_buffers.append(offline)
        published = TopicPublisher(settings, "item-embeddings")
        # Batches overlap: one is written while the next ones are encoded, and a batch's encode starts while the
        # one before it is still running, so its runs queue behind the other's and no core idles between calls
        # or through a write. Writes, and so acknowledgements, stay in arrival order.
        in_flight: deque[asyncio.Future] = deque()  # each batch's encode-then-write, oldest first
        try:
            async for events in stream.noack_take(settings.batch_size, within=settings.batch_window_ms / 1000):
                metrics.MICRO_BATCH_EVENTS.labels("items").observe(len(events))
                batch = ItemBatch(list(events))
                for event, item in await app.dead_letters.parse_each(events, parse_item_upload):
                    if not forwarder.misplaced(event, item.item_id, item):
                        batch.add(item, event.message.timestamp)
                for item in await forwarder.forward_pending():
                    batch.add(item, None)
                versions = await asyncio.to_thread(served.current)
                encoded = asyncio.ensure_future(batch.encode_all(app, versions))
                in_flight.append(asyncio.ensure_future(write_in_turn(
                    in_flight[-1] if in_flight else None, encoded, app, served, offline, published, batch, versions)))
                while in_flight and (in_flight[0].done() or len(in_flight) > MAX_BATCHES_IN_FLIGHT):
                    await in_flight.popleft()  # a failure surfaces here
        finally:
            for batch_done in in_flight:
                batch_done.cancel()  # stopping: their events are not acknowledged, so the next worker gets them again
            await published.stop()


class ItemBatch:
    """One micro-batch: its events, its valid uploads and removals, and the vectors of each version so far."""

    def __init__(self, events: list):
        self.events = events
        self.uploads: list[ItemUpload] = []
        self.removals: list[ItemUpload] = []
        self.sent_at: list[float] = []  # record timestamps of the batch's own valid events (upload → online latency)
        self.content: dict = {}  # encoder id → content embeddings of the uploads (shared by versions)
        self.vectors: dict[str, np.ndarray] = {}  # version name → item vectors of the uploads

    def add(self, item: ItemUpload, sent_at: float | None) -> None:
        (self.removals if item.deleted else self.uploads).append(item)
        if sent_at is not None:
            self.sent_at.append(sent_at)

    async def encode_all(self, app, versions: list[VersionModels]) -> None:
        for version in versions:
            await self.encode(app, version)

    async def encode(self, app, version: VersionModels) -> None:
        if self.uploads and version.name not in self.vectors:
            self.vectors[version.name] = await asyncio.get_running_loop().run_in_executor(
                app.model_executor, encode, version, self.uploads, self.content)


async def write_in_turn(before: asyncio.Future | None, encoded: asyncio.Future, app, served: ServedVersions,
                        offline: OfflineBuffer, published: TopicPublisher, batch: ItemBatch,
                        versions: list[VersionModels]) -> None:
    """write_batch once the batch is encoded and the batch before it is written."""
    await encoded
    if before is not None:
        await asyncio.shield(before)  # its own failure is raised where it is awaited in the agent
    await write_batch(app, served, offline, published, batch, versions)


async def write_batch(app, served: ServedVersions, offline: OfflineBuffer, published: TopicPublisher,
                      batch: ItemBatch, versions: list[VersionModels]) -> None:
    """Write a batch to every version the state names and publish it on item-embeddings, then hand its events
    to the offline buffer (which acknowledges them once their offline rows are on disk)."""
    written = []
    while versions:  # a version the state gained while this batch was written gets it too (streams.models)
        for version in versions:
            await batch.encode(app, version)
            # Either order is right: the online store keeps whichever of an upload and a removal is newer.
            frames = ([await write_embeddings(published, version, batch)] if batch.uploads else []) + (
                [await write_removals(published, version, batch.removals)] if batch.removals else [])
            offline.add(pd.concat(frames) if frames else None, [], version.item_offline)
        written += versions
        versions = await retry_forever("rollout state read", served.added_since, written)
    metrics.observe_since(metrics.UPLOAD_TO_ONLINE, batch.sent_at)
    offline.add(None, batch.events)
    await offline.flush()


async def write_embeddings(published: TopicPublisher, version: VersionModels, batch: ItemBatch):
    items, vectors = batch.uploads, batch.vectors[version.name]
    frame = feast_store.item_embedding_frame(
        [i.item_id for i in items], vectors, batch.content[id(version.encoder)], [i.title[:200] for i in items],
        [i.category for i in items], version.item_version, [i.uploaded_at for i in items],
    )
    await retry_forever("online write", feast_store.push_online, version.store, ITEM_PUSH_SOURCE, frame)
    await published.publish([
        (item.item_id.encode(), ItemEmbedding(item_id=item.item_id, vector=vector.tolist(),
                                              model_version=version.item_version, event_time=item.uploaded_at,
                                              category=item.category, version=version.name).dumps())
        for item, vector in zip(items, vectors)])
    return frame


async def write_removals(published: TopicPublisher, version: VersionModels, items: list[ItemUpload]):
    ids, times = [i.item_id for i in items], [i.uploaded_at for i in items]
    await retry_forever("online removal", feast_store.delete_online, version.store, ITEM_VIEW, "item_id", ids, times)
    # Published even where an upload was newer: each replica applies newest-wins itself.
    await published.publish([
        (item.item_id.encode(), ItemEmbedding(item_id=item.item_id, vector=[], model_version=version.item_version,
                                              event_time=item.uploaded_at, deleted=True,
                                              version=version.name).dumps())
        for item in items])
    return feast_store.item_removal_frame(ids, version.item_version, times)
