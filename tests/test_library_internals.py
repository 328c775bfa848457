"""Pins of the library internals the service relies on: after an upgrade these fail first, naming the module to revisit.

Each private name below is used in exactly one adapter module: faust's and
aiokafka's in streams/patches.py, Feast's in coldstart/store.py (and Feast's
optional torch import in coldstart/cli, `without_torch`).
"""

import inspect

PATCHES = "streams/patches.py"
STORE = "coldstart/store.py"


def pinned(module_to_revisit: str, what: str, holds: bool) -> None:
    assert holds, f"{what} changed: revisit {module_to_revisit} after this upgrade"


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_faust_consumer_internals_streams_patches_overrides():
    from faust.transport import consumer as base_consumer
    from faust.transport.drivers import aiokafka as driver

    pinned(PATCHES, "faust aiokafka driver's AIOKafkaConsumerThread._create_worker_consumer(transport)",
           parameters(driver.AIOKafkaConsumerThread._create_worker_consumer)[:2] == ["self", "transport"])
    pinned(PATCHES, "faust aiokafka Consumer._new_consumer_thread()",
           parameters(driver.Consumer._new_consumer_thread) == ["self"])
    pinned(PATCHES, "faust Consumer.perform_seek (async, no arguments)",
           inspect.iscoroutinefunction(base_consumer.Consumer.perform_seek)
           and parameters(base_consumer.Consumer.perform_seek) == ["self"])
    pinned(PATCHES, "faust's seek after recovery (perform_seek fills _committed_offset)",
           "_committed_offset" in inspect.getsource(base_consumer.Consumer.perform_seek))
    pinned(PATCHES, "faust Consumer._is_changelog_tp(tp)", parameters(base_consumer.Consumer._is_changelog_tp) == ["self", "tp"])
    pinned(PATCHES, "faust Consumer.stop_flow()", parameters(base_consumer.Consumer.stop_flow) == ["self"])
    pinned(PATCHES, "faust aiokafka Consumer.earliest_offsets(*partitions)",
           parameters(driver.Consumer.earliest_offsets) == ["self", "partitions"])
    pinned(PATCHES, "faust aiokafka Consumer.seek_wait(partitions)",
           parameters(driver.Consumer.seek_wait) == ["self", "partitions"])
    pinned(PATCHES, "faust aiokafka Transport.Consumer class attribute", driver.Transport.Consumer is driver.Consumer)
    pinned(PATCHES, "faust App._new_transport()", "_new_transport" in vars(__import__("faust").App))


def test_aiokafka_reads_its_fetch_wait_from_the_attribute_streams_patches_sets():
    from aiokafka import AIOKafkaConsumer

    pinned(PATCHES, "aiokafka AIOKafkaConsumer.start passing self._fetch_max_wait_ms to its fetcher",
           "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start))


def test_aiokafka_internals_streams_patches_reads_to_name_an_undecodable_batch():
    from aiokafka import codec
    from aiokafka.consumer.fetcher import PartitionRecords
    from faust.transport.drivers import aiokafka as driver

    pinned(PATCHES, "faust AIOKafkaConsumerThread._fetch_records(consumer, active_partitions, timeout, max_records)",
           parameters(driver.AIOKafkaConsumerThread._fetch_records)
           == ["self", "consumer", "active_partitions", "timeout", "max_records"])
    unpack = PartitionRecords._unpack_records
    pinned(PATCHES, "aiokafka PartitionRecords._unpack_records decoding each batch in its local next_batch",
           "next_batch" in unpack.__code__.co_varnames and "for record in next_batch" in inspect.getsource(unpack))
    pinned(PATCHES, "aiokafka PartitionRecords._tp and next_fetch_offset",
           {"self._tp", "self.next_fetch_offset"} <= set(inspect.getsource(PartitionRecords.__init__).split()))
    for name in ("gzip", "snappy", "lz4", "zstd"):
        pinned(PATCHES, f"aiokafka.codec.{name}_encode/{name}_decode",
               callable(getattr(codec, f"{name}_encode", None)) and callable(getattr(codec, f"{name}_decode", None)))


def test_a_tables_changelog_is_partitioned_like_its_input_with_raw_keys():
    """streams.patches.key_changelog_like_the_input: faust's table sends its changelog with its key_serializer and
    recovers through its changelog topic's; raw str keys hash like the producers' keys and load back as str."""
    import faust
    from kafka.partitioner.default import murmur2

    from streams.patches import key_changelog_like_the_input

    app = faust.App("pin-tables", broker="memory://")
    table = app.Table("histories", partitions=4, key_type=str, use_partitioner=True)
    key_changelog_like_the_input(table)
    pinned(PATCHES, "faust Table.send_changelog uses Table.key_serializer",
           "self.key_serializer" in inspect.getsource(type(table).send_changelog))
    sent = app.serializers.dumps_key(str, "u42", serializer=table.key_serializer)
    pinned(PATCHES, "faust's raw key serializer writes a str key as its UTF-8 bytes", sent == b"u42")
    assert murmur2(sent) == murmur2(b"u42")  # the changelog partition is the input partition
    pinned(PATCHES, "faust loads a raw changelog key back as the table's key_type (str)",
           app.serializers.loads_key(str, sent, serializer=table.changelog_topic.key_serializer) == "u42")


def test_the_patched_transports_build(stack):
    """The overrides still compose into a transport faust accepts (the worker in `stack` runs them for real)."""
    from streams.app import create_app
    from streams.patches import DevTransport, Transport

    app = create_app(stack.settings)
    pinned(PATCHES, "faust App.transport built by _new_transport", isinstance(app.transport, DevTransport))
    pinned(PATCHES, "faust Transport.Consumer", issubclass(Transport.Consumer, DevTransport.Consumer.__mro__[1]))


def _float_list_bytes_end_with_the_floats() -> bool:
    import numpy as np
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    floats = np.arange(64, dtype="<f4") / 7
    raw = Value(float_list_val=FloatList(val=floats.tolist())).SerializeToString()
    return raw.endswith(floats.tobytes())


def test_feast_internals_coldstart_store_uses():
    from feast import FeatureStore
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.infra.online_stores.redis import RedisOnlineStore

    pinned(STORE, "FeatureStore._get_provider()", parameters(FeatureStore._get_provider) == ["self"])
    pinned(STORE, "a float-list Value's bytes end with its packed floats (online_read_views decodes them so)",
           _float_list_bytes_end_with_the_floats())
    pinned(STORE, "feast.infra.online_stores.helpers._redis_key(project, entity_key, entity_key_serialization_version)",
           parameters(_redis_key)[:3] == ["project", "entity_key", "entity_key_serialization_version"])
    pinned(STORE, "feast.infra.online_stores.helpers._mmh3(key)", len(parameters(_mmh3)) == 1)
    pinned(STORE, "Redis event-time field '_ts:<view>'", "_ts:" in inspect.getsource(RedisOnlineStore))
    pinned(STORE, "the Redis online store's _get_client(online_store_config)",
           parameters(RedisOnlineStore._get_client) == ["self", "online_store_config"])
    pinned(STORE, "Redis keys end with the project name (scan_items matches on it)",
           "project.encode" in inspect.getsource(_redis_key))
    from feast.infra.key_encoding_utils import deserialize_entity_key

    pinned(STORE, "feast.infra.key_encoding_utils.deserialize_entity_key(serialized, version)",
           parameters(deserialize_entity_key)[:2] == ["serialized_entity_key", "entity_key_serialization_version"])


def test_feast_feature_server_factory_coldstart_store_uses():
    from feast.feature_server import get_app
    from feast.permissions.server import utils

    pinned(STORE, "feast.feature_server.get_app(store, ...)", parameters(get_app)[0] == "store")
    for name in ("ServerType", "init_auth_manager", "init_security_manager", "str_to_auth_manager_type"):
        pinned(STORE, f"feast.permissions.server.utils.{name}", hasattr(utils, name))


def test_feast_imports_without_torch_when_torch_cannot_be_imported():
    """coldstart.cli.without_torch relies on Feast treating torch as optional."""
    import feast.torch_wrapper as wrapper

    pinned("coldstart/cli/__init__.py (without_torch)", "feast.torch_wrapper catching a failed torch import",
           "except Exception" in inspect.getsource(wrapper._import_torch))


def test_feast_writes_the_redis_layout_the_raw_reader_reads(stack, producer):
    """coldstart.store.redis_layout names the keys and fields Feast writes (checked against a real write)."""
    import redis

    from coldstart.store import redis_layout
    from tests.conftest import unique_id, upload, wait_readable

    item_id = unique_id("layout")
    upload(producer, {"item_id": item_id, "title": "A layout probe"})
    wait_readable(stack.store, [item_id])
    keys, fields = redis_layout(stack.settings.feast_project, "item_id", [item_id], "item_embedding", ["title"])
    stored = redis.Redis.from_url(stack.settings.redis_url).hmget(keys[0], fields)
    pinned(STORE, "Feast's Redis key and field layout", all(value is not None for value in stored))
    assert stored[0].endswith(b"A layout probe")  # the title, as a serialised Feast Value


def test_feast_online_store_internals_the_newest_wins_store_overrides():
    from feast.infra.online_stores import redis as feast_redis
    from feast.repo_config import get_online_config_from_type

    from coldstart.store import NEWEST_WINS_STORE, NewestWinsRedisOnlineStoreConfig

    for name in ("online_write_batch", "online_write_batch_async"):
        pinned(STORE, f"RedisOnlineStore.{name}(config, table, data, progress)",
               parameters(getattr(feast_redis.RedisOnlineStore, name)) == ["self", "config", "table", "data", "progress"])
    pinned(STORE, "feast.infra.online_stores.redis._versioned_fv_name(table, config)",
           parameters(feast_redis._versioned_fv_name) == ["table", "config"])
    pinned(STORE, "a custom online store's config class found as '<class path>Config'",
           get_online_config_from_type(NEWEST_WINS_STORE) is NewestWinsRedisOnlineStoreConfig)
    pinned(STORE, "RedisOnlineStoreConfig.redis_type 'redis_cluster'",
           feast_redis.RedisType("redis_cluster") is feast_redis.RedisType.redis_cluster)


def test_the_newest_wins_script_reads_the_event_time_feasts_own_write_stores(stack):
    """Feast's stock write (and data written before this store existed) stores the event time the script compares."""
    from datetime import datetime, timedelta, timezone

    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from coldstart.store import NewestWinsRedisOnlineStore, NewestWrite, redis_layout, timestamp_proto, write_newest
    from tests.conftest import unique_id

    store = stack.store
    pinned(STORE, "Feast building our online store from the repo config",
           isinstance(store._get_provider().online_store, NewestWinsRedisOnlineStore))
    item_id, when = unique_id("stock-write"), datetime.now(timezone.utc)
    view = store.get_feature_view("item_embedding")
    entity_key = EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=item_id)])
    RedisOnlineStore().online_write_batch(store.config, view, [(entity_key, {"title": Value(string_val="stock")},
                                                                 when, None)], None)
    (key,), fields = redis_layout(store.config.project, "item_id", [item_id], "item_embedding", ["title"])
    client = store._get_provider().online_store._get_client(store.config.online_store)

    def write(at) -> bool:
        return write_newest(client, [NewestWrite(key, "_ts:item_embedding", timestamp_proto(at), [], {fields[0]: b""})])[0]

    pinned(STORE, "Feast's '_ts:<view>' field: a serialized protobuf Timestamp",
           not write(when - timedelta(microseconds=1)) and not write(when) and write(when + timedelta(microseconds=1)))

