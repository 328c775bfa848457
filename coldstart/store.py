"""The Feast adapter: configuration, apply, writes, reads. The only module that touches Feast internals.

Every use of a Feast internal (the Redis key and field layout, the online
store's client, the feature server's app factory) is here, and
tests/test_library_internals.py pins each one's name and signature, so an
upgrade of Feast fails there, naming this module, instead of somewhere
downstream.

Online writes go through Feast (push → Redis), into NewestWinsRedisOnlineStore:
Feast's Redis (or Redis Cluster) store whose write compares event times and
writes in one Redis script per entity, so newest-wins holds across writers. Offline writes do not use
Feast's file-store push, which re-reads and rewrites one whole parquet file on
every call (O(size) per write, and a crash mid-write corrupts the file);
instead each flush writes one new parquet part file atomically into the batch
source's folder, which `feast materialize` reads as one dataset.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import pkgutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import Entity, FeatureService, FeatureStore, FeatureView, FileSource, OnDemandFeatureView, PushSource
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from google.protobuf.timestamp_pb2 import Timestamp
from feast.repo_config import RepoConfig
from feast.type_map import python_values_to_proto_values
from feast.types import Array, Bool, Float32, Float64, Int64, String

import feature_repo
from coldstart.config import ITEM_VIEW, Settings, parse_redis_url

FEATURE_REPO = Path(feature_repo.__file__).resolve().parent
ENTITY_KEY_SERIALIZATION = 3


def redis_connection_string(redis_url: str) -> str:
    """REDIS_URL → Feast's "host:port[,host:port…],db=N,username=…,password=…,ssl=true"."""
    target = parse_redis_url(redis_url)
    parts = [f"{host}:{port}" for host, port in target.nodes]
    if not target.cluster:
        parts.append(f"db={target.db}")  # a cluster node refuses SELECT
    parts += [f"{name}={value}" for name, value in (("username", target.username), ("password", target.password))
              if value]
    if target.ssl:
        parts.append("ssl=true")
    return ",".join(parts)


def redis_client(redis_url: str, **options):
    """A redis-py client for REDIS_URL: a Redis, or a RedisCluster that routes each key to its node."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    target = parse_redis_url(redis_url)
    options.update(username=target.username, password=target.password, ssl=target.ssl)
    if target.cluster:
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], **options)
    (host, port), = target.nodes
    return redis.Redis(host=host, port=port, db=target.db, **options)


def repo_config(settings: Settings) -> RepoConfig:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        # The registry changes only on apply; re-reading it every few seconds would
        # stall the write path, so readers refresh it every 10 minutes.
        registry={"path": str(settings.data_dir / "registry.db"), "cache_ttl_seconds": 600},
        online_store={"type": NEWEST_WINS_STORE, "connection_string": redis_connection_string(settings.redis_url),
                      "redis_type": "redis_cluster" if parse_redis_url(settings.redis_url).cluster else "redis"},
        offline_store={"type": "file"},
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION,
        # The batch sources' relative paths (feature_repo/data_sources.py) resolve against this:
        # the offline store lives under the data folder.
        repo_path=settings.data_dir,
    )


def open_store(settings: Settings) -> FeatureStore:
    return FeatureStore(config=repo_config(settings))


FEAST_KINDS = (Entity, FileSource, PushSource, FeatureView, OnDemandFeatureView, FeatureService)


def feature_objects() -> list:
    """Every Feast object declared in feature_repo/, found by importing its modules (as `feast apply` does)."""
    found: dict[int, object] = {}
    for module in pkgutil.iter_modules([str(FEATURE_REPO)]):
        for value in vars(importlib.import_module(f"feature_repo.{module.name}")).values():
            if isinstance(value, FEAST_KINDS):
                found[id(value)] = value
    return list(found.values())


def apply(settings: Settings) -> FeatureStore:
    """`feast apply` with the project's settings; returns the store."""
    store = open_store(settings)
    objects = feature_objects()
    store.apply(objects)
    for view in (o for o in objects if isinstance(o, FeatureView)):
        table = offline_table(store, view.name)
        if not any(table.path.glob("*.parquet")):
            table.write(table.schema.empty_table().to_pandas())  # materialize reads a view with no rows yet
    return store


# ---- offline store ------------------------------------------------------------

_ARROW_TYPES = {Array(Float32): pa.list_(pa.float32()), Array(String): pa.list_(pa.string()), String: pa.string(),
                Int64: pa.int64(), Float32: pa.float32(), Float64: pa.float64(), Bool: pa.bool_()}


def offline_schema(view: FeatureView) -> pa.Schema:
    """The parquet schema of a view's batch source, derived from the view: join key, features, event time."""
    source = view.batch_source
    (entity,) = (o for o in feature_objects() if isinstance(o, Entity) and o.name == view.entities[0])
    columns = [(entity.join_key, pa.string())]
    columns += [(field.name, _ARROW_TYPES[field.dtype]) for field in view.schema if field.name not in dict(columns)]
    return pa.schema(columns + [(source.timestamp_field, pa.timestamp("us", tz="UTC"))])


@dataclass(frozen=True)
class OfflineTable:
    """A view's batch source folder: parquet part files, appended atomically."""

    path: Path
    schema: pa.Schema

    def write(self, frame: pd.DataFrame) -> Path:
        """Append one parquet part file (tmp + rename: a reader never sees half a file)."""
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        final = self.path / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{final.name}.tmp"  # dot-files are skipped by parquet readers
        pq.write_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False), tmp)
        tmp.replace(final)
        return final


def offline_table(store: FeatureStore, view_name: str) -> OfflineTable:
    view = next(o for o in feature_objects() if isinstance(o, FeatureView) and o.name == view_name)
    path = FileSource.get_uri_for_file_path(store.config.repo_path, view.batch_source.path)
    return OfflineTable(Path(path), offline_schema(view))


def read_offline(store: FeatureStore, view_name: str, columns: list[str]) -> pd.DataFrame:
    """These columns of every row in a view's offline table (all its part files; none yet: no rows)."""
    import pyarrow.dataset as ds

    table = offline_table(store, view_name)
    if not table.path.is_dir():
        return table.schema.empty_table().select(columns).to_pandas()
    # Files being written are dot-files, which a dataset skips.
    return ds.dataset(table.path, format="parquet", schema=table.schema).to_table(columns=columns).to_pandas()


# ---- writes ------------------------------------------------------------------

def item_embedding_frame(item_ids, vectors, content_vectors, titles, categories, model_version: str,
                         event_times) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": list(item_ids),
            # Rows as numpy arrays, not lists: Arrow copies them as blocks (Feast's protos come out the same).
            "item_embedding": list(np.asarray(vectors, dtype=np.float32)),
            "content_embedding": list(np.asarray(content_vectors, dtype=np.float32)),
            "title": list(titles),
            "model_version": model_version,
            "category": list(categories),
            "deleted": False,
            "event_timestamp": pd.to_datetime(list(event_times), utc=True),
        }
    )


def item_removal_frame(item_ids, model_version: str, event_times) -> pd.DataFrame:
    """Offline rows recording removals: no vectors, `deleted` true (materialize then writes no vector online)."""
    count = len(item_ids)
    return pd.DataFrame(
        {
            "item_id": list(item_ids), "item_embedding": [None] * count, "content_embedding": [None] * count,
            "title": [None] * count, "model_version": model_version, "category": [None] * count, "deleted": True,
            "event_timestamp": pd.to_datetime(list(event_times), utc=True),
        }
    )


def user_embedding_frame(user_ids, vectors, history_lengths, seen_item_ids, model_version: str,
                         event_times) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": list(user_ids),
            "user_embedding": [np.asarray(v, dtype="float32").tolist() for v in vectors],
            "history_length": list(history_lengths),
            "model_version": model_version,
            "seen_item_ids": [list(seen) for seen in seen_item_ids],
            "event_timestamp": pd.to_datetime(list(event_times), utc=True),
        }
    )


def push_online(store: FeatureStore, push_source: str, frame: pd.DataFrame) -> None:
    """Write a push source's rows to the online store, each only where its event time is newer than the stored
    one (write_newest: atomic per entity). The keys and values are Feast's, so Feast reads them as its own.

    Not through Feast's push: it re-read and parsed the registry file after every write, and its
    write_to_online_store rebuilt every feature view from the registry (running the on-demand view's
    source code again) and converted the frame through Arrow — together a third of a core in a worker
    writing two model versions (BENCHMARKS.md, rollout).
    """
    views = [view for view in store.list_feature_views(allow_cache=True)
             if isinstance(view.stream_source, PushSource) and view.stream_source.name == push_source]
    if not views:
        raise ValueError(f"no feature view is fed by the push source {push_source!r} in project {store.project!r}")
    for view in views:
        features = [f for f in view.features if f.name in frame.columns]
        values = [python_values_to_proto_values(frame[f.name].tolist(), f.dtype.to_value_type()) for f in features]
        rows = [RawRow({f.name: column[row].SerializeToString() for f, column in zip(features, values)},
                       timestamp_proto(event_time).SerializeToString())
                for row, event_time in enumerate(frame[view.batch_source.timestamp_field])]
        join_key = view.entity_columns[0].name
        write_raw_if_newer(store, view.name, join_key, list(frame[join_key]), rows)


def delete_online(store: FeatureStore, view_name: str, join_key: str, ids: list[str], event_times) -> list[bool]:
    """Remove entities' features from the online store, newest event time winning as for pushes.

    The features' fields go (HDEL) and the event-time field stays, set to the removal's time, so an
    older upload replayed later is refused, and a newer one writes again: the same atomic
    compare-and-set as a push (write_newest). Returns, per entity, whether the removal was newer
    than what was stored (and so applied).
    """
    view = store.get_feature_view(view_name, allow_registry_cache=True)
    client = store._get_provider().online_store._get_client(store.config.online_store)
    feature_fields = [_mmh3(f"{view_name}:{feature.name}") for feature in view.features]
    writes = []
    for entity_id, event_time in zip(ids, event_times):
        key = _redis_key(store.config.project, _entity_key(join_key, entity_id), ENTITY_KEY_SERIALIZATION)
        writes.append(NewestWrite(key, f"_ts:{view_name}", timestamp_proto(event_time), feature_fields, {}))
    return write_newest(client, writes)


def timestamp_proto(event_time) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(pd.Timestamp(event_time).to_pydatetime())
    return stamp


def _nanos(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


# ---- the online store: Feast's Redis store, writing newest-wins atomically ----------------

# Writes an entity's hash only if the event time is newer than the one stored (Feast's rule), checked in
# Redis with the write, so two writers can never interleave between the check and the write (Feast's
# own write reads every event time in one round trip and writes in the next).
# KEYS[1]: the entity's hash. ARGV: the view's event-time field; the new event time as seconds, nanos
# and its serialized Timestamp (the value Feast stores); N; N fields to delete; field, value pairs to set.
# Returns 1 if written, 0 if what is stored is as new or newer.
NEWEST_WINS_LUA = """
local function varint(s, i)
  local value, scale = 0, 1
  while true do
    local byte = string.byte(s, i)
    value = value + (byte % 128) * scale
    if byte < 128 then return value, i + 1 end
    i, scale = i + 1, scale * 128
  end
end
local function event_time(s)  -- a protobuf Timestamp: field 1 seconds, field 2 nanos, both varints
  local seconds, nanos, i, value = 0, 0, 1, 0
  while i <= #s do
    local tag = string.byte(s, i)
    value, i = varint(s, i + 1)
    if tag == 8 then seconds = value elseif tag == 16 then nanos = value end
  end
  if seconds >= 2^63 then seconds = seconds - 2^64 end  -- before 1970: two's complement
  return seconds, nanos
end
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local seconds, nanos = tonumber(ARGV[2]), tonumber(ARGV[3])
  local stored_seconds, stored_nanos = event_time(stored)
  if seconds < stored_seconds or (seconds == stored_seconds and nanos <= stored_nanos) then return 0 end
end
local deletes = tonumber(ARGV[5])
if deletes > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 6, 5 + deletes)) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4], unpack(ARGV, 6 + deletes))
return 1
"""


@dataclass(frozen=True)
class NewestWrite:
    """One entity's write: its hash key, the view's event-time field, the event time, fields to delete and to set."""

    key: bytes
    ts_field: str
    event_time: Timestamp
    delete: list
    set: dict


def write_newest(client, writes: list[NewestWrite]) -> list[bool]:
    """Apply each write whose event time is newer than the stored one, atomically per entity (one script
    call each, pipelined; on a cluster the pipeline sends each key to its node). Per write: applied?

    EVAL, not EVALSHA: redis-py's cluster pipeline refuses EVALSHA (and its eval() method; execute_command
    routes EVAL by its key), and a restarted node has lost its script cache; Redis caches the compiled
    script by its hash either way. An error raises (the first
    one): the caller retries the batch, which is idempotent (a write already applied is then as new as
    what is stored, so skipped).
    """
    with client.pipeline(transaction=False) as pipe:
        for write in writes:
            pairs = [part for field_value in write.set.items() for part in field_value]
            stamp = write.event_time
            pipe.execute_command("EVAL", NEWEST_WINS_LUA, 1, write.key, write.ts_field, stamp.seconds, stamp.nanos,
                                 stamp.SerializeToString(), len(write.delete), *write.delete, *pairs)
        return [bool(reply) for reply in pipe.execute()]


class NewestWinsRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis (or Redis Cluster) online store settings, for NewestWinsRedisOnlineStore."""

    type: Literal["coldstart.store.NewestWinsRedisOnlineStore"] = "coldstart.store.NewestWinsRedisOnlineStore"


NEWEST_WINS_STORE = "coldstart.store.NewestWinsRedisOnlineStore"


class NewestWinsRedisOnlineStore(RedisOnlineStore):
    """Feast's Redis online store with an atomic newest-wins write; the same keys and values, so Feast
    reads it as its own (get_online_features, the feature server) and `feast materialize` writes through it.

    Feast's write compares event times with a read, then writes: two writers of one entity (a
    producer's events for one item on two partitions, two workers, a materialize beside the stream)
    can both read the old time and let the older event's write land last. Here the compare and the
    write are one Redis script per entity (write_newest).
    """

    def online_write_batch(self, config: RepoConfig, table: FeatureView, data, progress) -> None:
        from feast import utils
        from feast.infra.online_stores.redis import _versioned_fv_name

        view_name = _versioned_fv_name(table, config)
        writes = []
        for entity_key, values, event_time, _ in data:
            stamp = Timestamp()
            stamp.FromDatetime(utils.make_tzaware(event_time))
            fields = {_mmh3(f"{view_name}:{name}"): value.SerializeToString() for name, value in values.items()}
            key = _redis_key(config.project, entity_key, config.entity_key_serialization_version)
            writes.append(NewestWrite(key, f"_ts:{view_name}", stamp, [], fields))
        write_newest(self._get_client(config.online_store), writes)
        if progress:
            progress(len(data))

    async def online_write_batch_async(self, config: RepoConfig, table: FeatureView, data, progress) -> None:
        await asyncio.to_thread(self.online_write_batch, config, table, data, progress)


# ---- reads -------------------------------------------------------------------

def read_item_features(store: FeatureStore, item_ids: list[str], features=("item_embedding", "model_version")) -> dict[str, dict]:
    """Online lookup: item_id → {feature: value} for the items that exist."""
    if not item_ids:
        return {}  # Feast fails on an empty entity list
    response = store.get_online_features(
        features=[f"item_embedding:{f}" for f in features],
        entity_rows=[{"item_id": i} for i in item_ids],
    ).to_dict()
    found = {}
    for row, item_id in enumerate(response["item_id"]):
        if response[features[0]][row] is not None:
            found[item_id] = {f: response[f][row] for f in features}
    return found


@dataclass(frozen=True)
class StoredView:
    """A stored feature view of a feature service, as the fast read path reads it."""

    view: FeatureView
    join_key: str
    features: tuple[str, ...]


def stored_views(store: FeatureStore, service_name: str) -> tuple[StoredView, ...]:
    """The service's stored (not on-demand) views with the features it asks of each."""
    service = store.get_feature_service(service_name, allow_cache=True)
    on_demand = {view.name for view in store.list_on_demand_feature_views(allow_cache=True)}
    return tuple(stored_view(store, projection.name, [f.name for f in projection.features])
                 for projection in service.feature_view_projections if projection.name not in on_demand)


def stored_view(store: FeatureStore, view_name: str, features) -> StoredView:
    """Some features of one stored view, for online_read."""
    view = store.get_feature_view(view_name, allow_registry_cache=True)
    return StoredView(view, view.entity_columns[0].name, tuple(features))


def online_read(store: FeatureStore, stored: StoredView, keys: list[str]) -> dict[str, list]:
    """feature → one decoded value per key (None where the entity has no row), in one pipelined round trip."""
    return online_read_views(store, [(stored, keys)])


def online_read_views(store: FeatureStore, requests: list[tuple[StoredView, list[str]]]) -> dict[str, list]:
    """online_read of several views (feature names must not repeat across them) in ONE pipelined round trip.

    An HMGET per entity of exactly the hash fields Feast writes, as Feast's own
    `online_read` does, without its per-entity Python work (entity-key
    serialization, Timestamp and dict per row) or `get_online_features`' (request
    context, response protos), which made a lookup of 1 user + 100 items 3.6x a
    raw Redis read (BENCHMARKS.md, lookup). Redis keys are cached per entity id.
    """
    client = store._get_provider().online_store._get_client(store.config.online_store)
    with client.pipeline(transaction=False) as pipe:
        for stored, keys in requests:
            fields = _hash_fields(stored.view.name, stored.features)
            for key in keys:
                pipe.hmget(_redis_key_of(store.config.project, stored.join_key, key), fields)
        rows = iter(pipe.execute())
    columns: dict[str, list] = {}
    for stored, keys in requests:
        values = [next(rows) for _ in keys]
        for position, feature in enumerate(stored.features):
            columns[feature] = [_decode_bytes(row[position]) for row in values]
    return columns


@functools.lru_cache(maxsize=64)
def _hash_fields(view_name: str, features: tuple[str, ...]) -> list:

    return [_mmh3(f"{view_name}:{feature}") for feature in features]


@functools.lru_cache(maxsize=200_000)
def _redis_key_of(project: str, join_key: str, value: str) -> bytes:

    return _redis_key(project, _entity_key(join_key, value), ENTITY_KEY_SERIALIZATION)


def _decode_bytes(raw: bytes | None):
    """A stored Value's bytes → as _decode; a float list straight from its packed bytes (the wire
    format ends with them), which is most of a lookup's decoding time."""
    if not raw:
        return None
    value = Value.FromString(raw)
    if value.WhichOneof("val") == "float_list_val":
        count = len(value.float_list_val.val)
        return np.frombuffer(raw, dtype="<f4", count=count, offset=len(raw) - 4 * count).copy()
    return _decode(value)


def item_titles(store: FeatureStore, item_ids: list[str]) -> dict[str, str]:
    """item_id → title for the items the online store has."""
    if not item_ids:
        return {}
    titles = online_read(store, stored_view(store, ITEM_VIEW, ["title"]), item_ids)["title"]
    return {item_id: title for item_id, title in zip(item_ids, titles) if title is not None}


def _entity_key(join_key: str, value: str) -> EntityKey:
    return EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])


def _decode(value: Value):
    """A Feast Value → a float32 array for a float list, a list for another list, the Python value for a
    scalar, None for null."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    if kind == "float_list_val":
        return np.array(value.float_list_val.val, dtype=np.float32)
    if kind.endswith("_list_val"):
        return list(getattr(value, kind).val)
    return getattr(value, kind)


@dataclass
class StoredItems:
    """One page of the online store's items (scan_items): vectors, or removals (vector None)."""

    item_ids: list[str]
    vectors: list[np.ndarray | None]  # None: removed (only the event time is left)
    model_versions: list[str | None]
    categories: list[str]
    event_times: list[float]  # epoch seconds


def scan_items(store: FeatureStore, page: int = 2000):
    """Every item in the online store, page by page (Redis SCAN over the project's keys; on a cluster, over
    every master in turn): what a retrieval replica rebuilds its index from. Items written while the scan
    runs may be missed; the caller reads them from the item-embeddings topic."""
    from feast.infra.key_encoding_utils import deserialize_entity_key

    client = store._get_provider().online_store._get_client(store.config.online_store)
    suffix = store.config.project.encode()
    fields = [_mmh3(f"{ITEM_VIEW}:{f}") for f in ("item_embedding", "model_version", "category")]
    fields.append(f"_ts:{ITEM_VIEW}")
    pattern = b"*" + suffix  # Feast project names are letters, digits and underscores: no glob characters
    for keys in _pages(client.scan_iter(match=pattern, count=page), page):
        item_keys, item_ids = [], []
        for key in keys:
            try:
                entity = deserialize_entity_key(key[: -len(suffix)], ENTITY_KEY_SERIALIZATION)
            except Exception:  # another project whose name ends with ours: not an entity key of ours
                continue
            if list(entity.join_keys) == ["item_id"] and _redis_key(store.config.project, entity,
                                                                    ENTITY_KEY_SERIALIZATION) == key:
                item_keys.append(key)
                item_ids.append(entity.entity_values[0].string_val)
        if item_keys:
            with client.pipeline(transaction=False) as pipe:
                for key in item_keys:
                    pipe.hmget(key, fields)
                rows = pipe.execute()
            found = StoredItems([], [], [], [], [])
            for item_id, (vector, version, category, stamp) in zip(item_ids, rows):
                if stamp is None:
                    continue  # another view's hash under an item key
                found.item_ids.append(item_id)
                found.vectors.append(_decode(Value.FromString(vector)) if vector else None)
                found.model_versions.append(_decode(Value.FromString(version)) if version else None)
                found.categories.append((_decode(Value.FromString(category)) if category else None) or "")
                found.event_times.append(_nanos(Timestamp.FromString(stamp)) / 1e9)
            yield found


def _pages(iterable, size: int):
    """Lists of up to `size` consecutive elements."""
    chunk = []
    for element in iterable:
        chunk.append(element)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def redis_layout(project: str, join_key: str, entity_ids: list[str], view: str, features: list[str]):
    """The Redis hash keys and fields Feast reads for these entities and features (for raw-read benchmarks)."""

    keys = [_redis_key(project, _entity_key(join_key, i), ENTITY_KEY_SERIALIZATION) for i in entity_ids]
    return keys, [_mmh3(f"{view}:{feature}") for feature in features] + [f"_ts:{view}"]


def feature_server_app(store: FeatureStore):
    """Feast's feature server ASGI app, with its auth set up as Feast's own `feast serve` does."""
    from feast.feature_server import get_app
    from feast.permissions.server.utils import (
        ServerType,
        init_auth_manager,
        init_security_manager,
        str_to_auth_manager_type,
    )

    auth_type = str_to_auth_manager_type(store.config.auth_config.type)
    init_security_manager(auth_type=auth_type, fs=store)
    init_auth_manager(auth_type=auth_type, server_type=ServerType.REST, auth_config=store.config.auth_config)
    return get_app(store)


_PINGS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-store-ping")


def online_store_reachable(store: FeatureStore, timeout_s: float = 2.0) -> bool:
    """Whether the online store answers a PING within timeout_s (readiness). Feast's client has no socket
    timeout and retries, so a PING to a Redis that just went away can hang: it is waited for here, not in it."""
    client = store._get_provider().online_store._get_client(store.config.online_store)
    try:
        return bool(_PINGS.submit(client.ping).result(timeout=timeout_s))
    except Exception:  # noqa: BLE001 — no answer in time, or any error: "not reachable"
        return False
# ---- model-version backfill (streams.rollout): raw copies between two versions' projects ------------------

def scan_entity_ids(store: FeatureStore, join_key: str, cursor: int = 0, page: int = 1000) -> tuple[int, list[str]]:
    """One SCAN step over the project's entity keys of this join key: (next cursor, ids); cursor 0 back: done.
    A saved cursor resumes the scan (Redis SCAN keeps no state on the server); an id may come twice."""
    client = store._get_provider().online_store._get_client(store.config.online_store)
    cursor, keys = client.scan(cursor, match=b"*" + store.config.project.encode(), count=page)
    entities = (_entity_of(key, store.config.project) for key in keys)
    return cursor, [e.entity_values[0].string_val for e in entities if e is not None and list(e.join_keys) == [join_key]]


@dataclass
class RawRow:
    """An entity's stored fields as Feast wrote them: feature → Value bytes (None: absent), and its event time."""

    fields: dict[str, bytes | None]
    event_time: bytes | None  # Timestamp bytes; None: the entity has no row of this view

    def value(self, feature: str):
        raw = self.fields.get(feature)
        return _decode_bytes(raw) if raw else None


def read_raw(store: FeatureStore, view_name: str, join_key: str, ids: list[str], features: tuple[str, ...]) -> list[RawRow]:
    """The stored bytes of these features (and the event time) of each entity, in one pipelined round trip."""
    client = store._get_provider().online_store._get_client(store.config.online_store)
    fields = [*_hash_fields(view_name, features), f"_ts:{view_name}"]
    with client.pipeline(transaction=False) as pipe:
        for entity_id in ids:
            pipe.hmget(_redis_key_of(store.config.project, join_key, entity_id), fields)
        rows = pipe.execute()
    return [RawRow(dict(zip(features, row[:-1])), row[-1]) for row in rows]


def write_raw_if_newer(store: FeatureStore, view_name: str, join_key: str, ids: list[str],
                       rows: list[RawRow]) -> list[bool]:
    """Write each row (fields with bytes are set, fields with None deleted) where the stored event time is
    older or absent, atomically per entity (write_newest); returns, per entity, whether it was written."""
    client = store._get_provider().online_store._get_client(store.config.online_store)
    writes = []
    for entity_id, row in zip(ids, rows):
        hashed = dict(zip(row.fields, _hash_fields(view_name, tuple(row.fields))))
        writes.append(NewestWrite(
            _redis_key_of(store.config.project, join_key, entity_id), f"_ts:{view_name}",
            Timestamp.FromString(row.event_time),
            delete=[hashed[f] for f, v in row.fields.items() if v is None],
            set={hashed[f]: v for f, v in row.fields.items() if v is not None}))
    return write_newest(client, writes)


def float_list_bytes(vector: np.ndarray) -> bytes:
    """A vector as the Value bytes Feast stores for an Array(Float32) feature."""
    return Value(float_list_val={"val": np.asarray(vector, dtype=np.float32).tolist()}).SerializeToString()


def string_bytes(text: str) -> bytes:
    return Value(string_val=text).SerializeToString()


def int64_bytes(number: int) -> bytes:
    return Value(int64_val=number).SerializeToString()


def delete_project_keys(store: FeatureStore, page: int = 1000) -> int:
    """Delete every Redis key of the store's project (a version no longer served); returns how many."""
    client = store._get_provider().online_store._get_client(store.config.online_store)
    suffix = store.config.project.encode()
    deleted, cursor = 0, 0
    while True:
        cursor, keys = client.scan(cursor, match=b"*" + suffix, count=page)
        # Only keys that end in exactly our project after a serialized entity key: another project's name may end
        # with ours, and deserializing tells them apart.
        ours = [key for key in keys if _entity_of(key, store.config.project) is not None]
        if ours:
            deleted += client.delete(*ours)
        if cursor == 0:
            return deleted


def _entity_of(key: bytes, project: str) -> EntityKey | None:
    """The entity of a Redis key of this project; None for a key of another project whose name ends with ours."""
    from feast.infra.key_encoding_utils import deserialize_entity_key
    from feast.infra.online_stores.helpers import _redis_key

    try:
        entity = deserialize_entity_key(key[: -len(project.encode())], ENTITY_KEY_SERIALIZATION)
    except Exception:
        return None
    return entity if _redis_key(project, entity, ENTITY_KEY_SERIALIZATION) == key else None
