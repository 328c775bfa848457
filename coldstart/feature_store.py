"""The one place that talks to Feast: configuration, apply, writes, reads.

Online writes go through Feast (push → Redis). Offline writes do not use
Feast's file-store push, which re-reads and rewrites one whole parquet file on
every call (O(size) per write, and a crash mid-write corrupts the file);
instead each flush writes one new parquet part file atomically into the batch
source's folder, which `feast materialize` reads as one dataset.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coldstart.settings import Settings

log = logging.getLogger(__name__)

FEATURE_REPO = Path(__file__).resolve().parent.parent / "feature_repo"


def redis_connection_string(redis_url: str) -> str:
    """redis://[user:password@]host:port/db → Feast's "host:port,db=N,username=…,password=…,ssl=true"."""
    url = urlparse(redis_url)
    if url.scheme not in ("redis", "rediss"):
        raise ValueError(f"REDIS_URL must start with redis:// or rediss://, got {redis_url!r}")
    parts = [f"{url.hostname or '127.0.0.1'}:{url.port or 6379}"]
    db = (url.path or "/0").lstrip("/") or "0"
    parts.append(f"db={db}")
    for name, value in (("username", url.username), ("password", url.password)):
        if value:
            value = unquote(value)  # percent-encoded in the URL
            if "," in value:  # Feast splits its connection string on commas
                raise ValueError(f"the Redis {name} must not contain ','")
            parts.append(f"{name}={value}")
    if url.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def repo_config(settings: Settings):
    from feast.repo_config import RepoConfig

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        # The registry changes only on apply; re-reading it every few seconds would
        # stall the write path, so readers refresh it every 10 minutes.
        registry={"path": str(settings.data_dir / "registry.db"), "cache_ttl_seconds": 600},
        online_store={"type": "redis", "connection_string": redis_connection_string(settings.redis_url)},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=FEATURE_REPO,
    )


def open_store(settings: Settings):
    from feast import FeatureStore

    return FeatureStore(config=repo_config(settings))


def feature_objects() -> list:
    """Every object of feature_repo/, in apply order."""
    from feature_repo import data_sources, entities, feature_services, feature_views

    return [
        entities.item,
        entities.user,
        data_sources.item_embeddings_source,
        data_sources.item_embeddings_push_source,
        data_sources.user_embeddings_source,
        data_sources.user_embeddings_push_source,
        feature_views.item_embedding_fv,
        feature_views.user_embedding_fv,
        feature_views.user_item_affinity,
        feature_services.item_embeddings_v1,
        feature_services.ranking_v1,
    ]


def apply(settings: Settings):
    """`feast apply` with the project's settings; returns the store."""
    store = open_store(settings)
    store.apply(feature_objects())
    for source in (o for o in feature_objects() if hasattr(o, "path")):
        folder = Path(source.path)
        if not any(folder.glob("*.parquet")):
            # An empty part file with the schema: materialize reads a view with no rows yet.
            write_offline(folder, OFFLINE_SCHEMAS[source.name].empty_table().to_pandas(), OFFLINE_SCHEMAS[source.name])
    return store


# ---- writes ----------------------------------------------------------------

ITEM_EMBEDDING_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("item_embedding", pa.list_(pa.float32())),
        ("content_embedding", pa.list_(pa.float32())),
        ("title", pa.string()),
        ("model_version", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]
)
USER_EMBEDDING_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("user_embedding", pa.list_(pa.float32())),
        ("history_length", pa.int64()),
        ("model_version", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ]
)


OFFLINE_SCHEMAS = {"item_embeddings_source": ITEM_EMBEDDING_SCHEMA, "user_embeddings_source": USER_EMBEDDING_SCHEMA}


def item_embedding_frame(item_ids, vectors, content_vectors, titles, model_version: str, event_times) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": list(item_ids),
            "item_embedding": [v.astype("float32").tolist() for v in vectors],
            "content_embedding": [v.astype("float32").tolist() for v in content_vectors],
            "title": list(titles),
            "model_version": model_version,
            "event_timestamp": pd.to_datetime(list(event_times), utc=True),
        }
    )


def user_embedding_frame(user_ids, vectors, history_lengths, model_version: str, event_times) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": list(user_ids),
            "user_embedding": [v.astype("float32").tolist() for v in vectors],
            "history_length": list(history_lengths),
            "model_version": model_version,
            "event_timestamp": pd.to_datetime(list(event_times), utc=True),
        }
    )


def push_online(store, push_source: str, frame: pd.DataFrame) -> None:
    """Write to Redis through Feast; an older event time never overwrites a newer one."""
    from feast.data_source import PushMode

    store.push(push_source, frame, to=PushMode.ONLINE)


def write_offline(source_path: str | Path, frame: pd.DataFrame, schema: pa.Schema) -> Path:
    """Append one parquet part file to a batch source folder, atomically (tmp + rename)."""
    folder = Path(source_path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    final = folder / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = folder / f".{final.name}.tmp"  # dot-files are skipped by parquet readers
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), tmp)
    tmp.replace(final)
    return final


# ---- reads -----------------------------------------------------------------

def read_item_features(store, item_ids: list[str], features=("item_embedding", "model_version")) -> dict[str, dict]:
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
