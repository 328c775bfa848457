"""Promote a model version: backfill its Feast project from the active one's, then switch reads at once.

    promote(settings, "learn-minilm@0123456789ab")   # `coldstart model promote`

1. A new rollout clears the target's Redis keys (a version promoted before
   holds stale vectors), applies its Feast project, and sets the state's target
   (coldstart.rollout, compare-and-set): from then on every worker writes each
   upload to the active AND the target version.
2. Items: every item key of the active project (Redis SCAN) is re-embedded with
   the target's item tower over its stored content embedding — no
   language-model call — or, when the target's encoder differs (or
   `reencode`), with the whole encoder over the item's text (its latest upload
   still on item-uploads; the stored title and category where the topic no
   longer holds it). Removed items are copied as removals.
3. The state moves to phase "users": workers now also write users to the
   target. Users: every user key of the active project is recomputed with the
   target's user tower over its stored history (seen_item_ids, oldest first)
   and the target's content embeddings.
4. The state's active becomes the target in one compare-and-set: every reader
   switches with its next request. The old version stays current as the
   standby (workers keep writing to it) until `coldstart model cleanup`.

Every backfill write keeps the source row's event time and goes through a
write-if-newer Lua script (coldstart.store.write_raw_if_newer), so a worker's
fresher write to the target is never overwritten. Nothing is lost in between:
a worker writes a batch to the versions the state names and re-reads the state
before committing its offsets (streams.models), so a write the scan might have
missed (made before the target appeared) is re-applied to the target; a write
made before the state changed is in the active project before the scan starts.
Applied item writes are published on item-embeddings with the target's name,
so every retrieval replica builds the target's index (standby) before the switch.

Resumable: the scan cursor and counts are kept in Redis after every page; a
rerun of the same promote continues from there. An entity the target already
holds as new as the source (a page redone, an upload the workers wrote to both
versions) is skipped before any encoder or tower work.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from coldstart import rollout
from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_VIEW, Settings
from encoders.content import OnnxContentEncoder
from encoders.text import item_text
from encoders.towers import load_towers
from streams import history

log = logging.getLogger(__name__)

ITEM_FEATURES = ("item_embedding", "content_embedding", "title", "model_version", "category", "deleted")
EMBEDDINGS_TOPIC = "item-embeddings"
USER_FEATURES = ("user_embedding", "history_length", "model_version", "seen_item_ids")


@dataclass
class PromoteReport:
    target: str
    source: str
    reencoded: bool = False
    items: int = 0  # item keys backfilled by this run (written or refused as older)
    users: int = 0
    items_seconds: float = 0.0
    users_seconds: float = 0.0
    switch_seconds: float = 0.0  # the final compare-and-set
    texts_from_store: int = 0  # re-encoded from the stored title and category (upload no longer on the topic)
    instant: bool = False  # a rollback to the standby: no backfill
    state: dict = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items / self.items_seconds if self.items_seconds else 0.0

    @property
    def users_per_s(self) -> float:
        return self.users / self.users_seconds if self.users_seconds else 0.0


class Backfill:
    """One rollout's backfill from the active version's project into the target's."""

    def __init__(self, settings: Settings, source: str, target: str, reencode: bool, page: int,
                 max_per_s: float, show_progress: bool):
        self.settings = settings
        self.client = rollout.redis_client(settings)
        self.source_settings = rollout.version_settings(settings, source)
        self.target_settings = rollout.version_settings(settings, target)
        self.source = feast_store.open_store(self.source_settings)
        self.target = feast_store.open_store(self.target_settings)
        self.target_name = target
        self.towers = load_towers(self.target_settings.towers_dir, self.target_settings.encoder_name,
                                  settings.onnx_session_threads)
        encoder_of = lambda s: (s.encoder_name, s.encoder_precision)  # noqa: E731
        self.reencode = reencode or encoder_of(self.source_settings) != encoder_of(self.target_settings)
        self.encoder = (OnnxContentEncoder(self.target_settings.encoder_export_dir,
                                           precision=self.target_settings.encoder_precision,
                                           threads=settings.onnx_session_threads) if self.reencode else None)
        self.item_version = f"{self._encoder_version()}+{self.towers.version}"
        self.page = page
        self.max_per_s = max_per_s
        self.show_progress = show_progress
        self.progress_key = f"{rollout.state_key(settings)}:progress:{target}"
        self.texts: dict[str, str] | None = None
        self.texts_from_store = 0
        self.item_offline = feast_store.offline_table(self.target, ITEM_VIEW)
        self.user_offline = feast_store.offline_table(self.target, USER_VIEW)
        self.producer = None

    def _encoder_version(self) -> str:
        if self.encoder is not None:
            return self.encoder.version
        from encoders.export_format import read_encoder_metadata

        return read_encoder_metadata(self.target_settings.encoder_export_dir)["versions"][
            self.target_settings.encoder_precision]

    # ---- the resumable scan --------------------------------------------------------------

    def run(self, kind: str, join_key: str, handle) -> tuple[int, float]:
        """Scan the source's entities of one kind page by page, handing each page to `handle`, saving the
        cursor after each; returns (entities handled by this run, seconds)."""
        saved = self.client.hgetall(self.progress_key)
        if saved.get(f"{kind}_done".encode()) == b"1":
            return 0, 0.0
        cursor = int(saved.get(f"{kind}_cursor".encode(), 0))
        done = int(saved.get(f"{kind}_count".encode(), 0))
        handled, started = 0, time.monotonic()
        with tqdm(desc=f"{self.target_name} {kind}", unit=kind[:-1] if kind.endswith("s") else kind, initial=done,
                  disable=not self.show_progress, dynamic_ncols=True) as bar:
            while True:
                cursor, ids = feast_store.scan_entity_ids(self.source, join_key, cursor, self.page)
                ids = list(dict.fromkeys(ids))
                if ids:
                    handle(ids)
                handled += len(ids)
                bar.update(len(ids))
                self.client.hset(self.progress_key, mapping={f"{kind}_cursor": cursor,
                                                             f"{kind}_count": done + handled})
                if self.max_per_s > 0:  # throttle: the backfill shares Redis and the cores with the workers
                    time.sleep(max(0.0, started + handled / self.max_per_s - time.monotonic()))
                if cursor == 0:
                    break
        self.client.hset(self.progress_key, f"{kind}_done", 1)
        return handled, time.monotonic() - started

    # ---- items ---------------------------------------------------------------------------

    def items(self, ids: list[str]) -> None:
        rows = feast_store.read_raw(self.source, ITEM_VIEW, "item_id", ids, ITEM_FEATURES)
        present = self._not_in_target(ITEM_VIEW, "item_id", ids, rows)
        uploads = [(i, r) for i, r in present if r.fields["content_embedding"]]
        removals = [(i, r) for i, r in present if not r.fields["content_embedding"]]
        out_ids, out_rows, vectors, contents = [], [], [], []
        if uploads:
            upload_ids = [i for i, _ in uploads]
            if self.reencode:
                content = self.encoder.encode([self._text(i, r) for i, r in uploads])
            else:
                content = np.stack([r.value("content_embedding") for _, r in uploads])
            item_vectors = self.towers.item_vectors(content, upload_ids)
            for (item_id, row), vector, item_content in zip(uploads, item_vectors, content):
                fields = dict(row.fields, item_embedding=feast_store.float_list_bytes(vector),
                              model_version=feast_store.string_bytes(self.item_version))
                if self.reencode:
                    fields["content_embedding"] = feast_store.float_list_bytes(item_content)
                out_ids.append(item_id)
                out_rows.append(feast_store.RawRow(fields, row.event_time))
                vectors.append(vector)
                contents.append(item_content)
        for item_id, row in removals:  # only the event time is stored: copy the removal
            out_ids.append(item_id)
            out_rows.append(feast_store.RawRow({f: None for f in ITEM_FEATURES}, row.event_time))
            vectors.append(None)
            contents.append(None)
        applied = feast_store.write_raw_if_newer(self.target, ITEM_VIEW, "item_id", out_ids, out_rows)
        self._publish_and_record(out_ids, out_rows, vectors, contents, applied)

    def _not_in_target(self, view: str, join_key: str, ids: list[str], rows: list) -> list[tuple]:
        """The (id, row) pairs the target lacks or holds older: what a worker has already written there (an
        upload during the rollout, a page redone) is neither re-embedded nor written again."""
        held = feast_store.read_raw(self.target, view, join_key, ids, ())
        return [(i, r) for i, r, t in zip(ids, rows, held)
                if r.event_time is not None and (t.event_time is None or _instant(t.event_time) < _instant(r.event_time))]

    def _text(self, item_id: str, row: feast_store.RawRow) -> str:
        """The item's text as the worker encoded it: its latest upload still on item-uploads, else the stored
        title and category (counted in texts_from_store)."""
        if self.texts is None:
            # What the topic held when the rollout began is enough: later uploads reach the target from the
            # workers, so the read stops at the end offsets of its start, however busy the topic.
            found = history.from_topics(self.settings, idle_seconds=0)
            self.texts = {i["item_id"]: item_text(i["title"], i.get("description", ""), i.get("category", ""),
                                                  i.get("brand", ""), i.get("tags", []), i.get("price"))
                          for i in found.items}
        if item_id in self.texts:
            return self.texts[item_id]
        self.texts_from_store += 1
        return item_text(row.value("title") or "", "", row.value("category") or "", "", [], None)

    def _publish_and_record(self, ids, rows, vectors, contents, applied) -> None:
        """Applied writes go on item-embeddings (the retrieval replicas' standby index) and into the target's
        offline store."""
        kept = [n for n, ok in enumerate(applied) if ok]
        if not kept:
            return
        if self.producer is None:
            from kafka import KafkaProducer

            self.producer = KafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap.split(","), linger_ms=5, enable_idempotence=False,
                compression_type=self.settings.producer_compression_type, **self.settings.kafka_client_options())
        for n in kept:  # the shape of streams.records.ItemEmbedding
            record = {"item_id": ids[n], "vector": [] if vectors[n] is None else vectors[n].tolist(),
                      "model_version": self.item_version, "event_time": _event_time(rows[n].event_time).isoformat(),
                      "category": rows[n].value("category") or "", "deleted": vectors[n] is None,
                      "version": self.target_name}
            self.producer.send(EMBEDDINGS_TOPIC, key=ids[n].encode(), value=json.dumps(record).encode())
        self.producer.flush()
        uploads = [n for n in kept if vectors[n] is not None]
        removals = [n for n in kept if vectors[n] is None]
        frames = []
        if uploads:
            frames.append(feast_store.item_embedding_frame(
                [ids[n] for n in uploads], [vectors[n] for n in uploads], [contents[n] for n in uploads],
                [rows[n].value("title") or "" for n in uploads], [rows[n].value("category") or "" for n in uploads],
                self.item_version, [_event_time(rows[n].event_time) for n in uploads]))
        if removals:
            frames.append(feast_store.item_removal_frame(
                [ids[n] for n in removals], self.item_version, [_event_time(rows[n].event_time) for n in removals]))
        self.item_offline.write(pd.concat(frames, ignore_index=True))

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()

    # ---- users ---------------------------------------------------------------------------

    def users(self, ids: list[str]) -> None:
        rows = feast_store.read_raw(self.source, USER_VIEW, "user_id", ids, USER_FEATURES)
        present = [(i, r) for i, r in self._not_in_target(USER_VIEW, "user_id", ids, rows) if r.fields["seen_item_ids"]]
        histories = {i: r.value("seen_item_ids") for i, r in present}
        wanted = sorted({item for seen in histories.values() for item in seen})
        content_rows = feast_store.read_raw(self.target, ITEM_VIEW, "item_id", wanted, ("content_embedding",))
        content = {i: r.value("content_embedding") for i, r in zip(wanted, content_rows)
                   if r.fields["content_embedding"]}
        users, inputs, input_ids = [], [], []
        for user_id, row in present:
            known = [i for i in histories[user_id] if i in content]  # as the worker: items it knows
            if known:
                users.append((user_id, row))
                inputs.append(np.stack([content[i] for i in known]))
                input_ids.append(known)
        if not users:
            return
        vectors = self.towers.user_vectors(inputs, input_ids)
        out_rows = [feast_store.RawRow(dict(row.fields, user_embedding=feast_store.float_list_bytes(vector),
                                            history_length=feast_store.int64_bytes(len(known)),
                                            model_version=feast_store.string_bytes(self.towers.version)),
                                       row.event_time)
                    for (_, row), vector, known in zip(users, vectors, input_ids)]
        user_ids = [u for u, _ in users]
        applied = feast_store.write_raw_if_newer(self.target, USER_VIEW, "user_id", user_ids, out_rows)
        kept = [n for n, ok in enumerate(applied) if ok]
        if kept:
            frame = feast_store.user_embedding_frame(
                [user_ids[n] for n in kept], [vectors[n] for n in kept], [len(input_ids[n]) for n in kept],
                [histories[user_ids[n]] for n in kept], self.towers.version,
                [_event_time(out_rows[n].event_time) for n in kept])
            self.user_offline.write(frame)


def _instant(stamp: bytes) -> tuple[int, int]:
    parsed = Timestamp.FromString(stamp)
    return parsed.seconds, parsed.nanos


def _event_time(stamp: bytes) -> datetime:
    return Timestamp.FromString(stamp).ToDatetime(tzinfo=timezone.utc)


def promote(settings: Settings, target: str, page: int = 500, max_per_s: float = 0.0, reencode: bool = False,
            show_progress: bool = True, on_state=None) -> PromoteReport:
    """Roll `target` out (or continue an unfinished rollout of it) and switch reads to it; see the module
    docstring. A target that is the current standby is switched to at once. on_state(state) is called after
    each state change (the benchmark times the switch with it). rollout.RolloutConflict if another rollout
    is under way, encoders.versions.UnknownVersion for a name the registry lacks."""
    client = rollout.redis_client(settings)
    state = rollout.read_state(client, settings)
    on_state = on_state or (lambda state: None)
    if state.target is None and state.standby and state.previous == target:
        started = time.monotonic()
        state = rollout.swap_with_standby(client, settings)
        on_state(state)
        return PromoteReport(target, state.previous, instant=True, switch_seconds=time.monotonic() - started,
                             state=vars(state))
    if state.target not in (None, target):
        raise rollout.RolloutConflict(f"a rollout to {state.target} is under way: finish it or "
                                      "`coldstart model abort` it first")
    if state.active == target:
        raise rollout.RolloutConflict(f"{target} is already the active version")
    target_settings = rollout.version_settings(settings, target)  # UnknownVersion before anything changes
    if state.target is None:  # a new rollout: from an empty target project
        target_store = feast_store.apply(target_settings)
        deleted = feast_store.delete_project_keys(target_store)
        if deleted:
            log.info("cleared %d stale keys of %s", deleted, target)
        client.delete(f"{rollout.state_key(settings)}:progress:{target}")
        state = rollout.begin(client, settings, target)
        on_state(state)
    backfill = Backfill(settings, state.active, target, reencode, page, max_per_s, show_progress)
    report = PromoteReport(target, state.active, reencoded=backfill.reencode)
    try:
        if state.phase == "items":
            report.items, report.items_seconds = backfill.run("items", "item_id", backfill.items)
            state = rollout.items_done(client, settings, target)
            on_state(state)
        report.users, report.users_seconds = backfill.run("users", "user_id", backfill.users)
    finally:
        backfill.close()
    report.texts_from_store = backfill.texts_from_store
    started = time.monotonic()
    state = rollout.switch(client, settings, target)
    report.switch_seconds = time.monotonic() - started
    on_state(state)
    client.delete(backfill.progress_key)
    report.state = vars(state)
    return report


def rollback(settings: Settings, **options) -> PromoteReport:
    """Back to the version active before the last switch: at once if it is the standby, else by the same
    backfill as a promote."""
    state = rollout.read_state(rollout.redis_client(settings), settings)
    if state.previous is None:
        raise rollout.RolloutConflict("no earlier version to roll back to")
    return promote(settings, state.previous, **options)


def cleanup(settings: Settings, keep_standby: bool = False) -> dict[str, int]:
    """Delete the Redis keys of every version the workers no longer write to (the standby too, which the
    workers then stop keeping current, unless keep_standby); returns keys deleted per version."""
    from encoders import versions

    client = rollout.redis_client(settings)
    state = rollout.read_state(client, settings)
    if state.standby and not keep_standby:
        state = rollout.drop_standby(client, settings)
    served = set(state.serving)
    deleted = {}
    for name in [rollout.DEFAULT, *(v.name for v in versions.list_versions(settings.registry_dir))]:
        if name not in served:
            count = feast_store.delete_project_keys(feast_store.open_store(rollout.version_settings(settings, name)))
            if count:
                deleted[name] = count
    return deleted
