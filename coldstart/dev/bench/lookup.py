"""`coldstart bench lookup`: ranking reads through Feast (SDK, HTTP) beside raw redis-py, in one run."""

from __future__ import annotations

import http.client
import json
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from coldstart import store as feast_store
from coldstart.config import ITEM_PUSH_SOURCE, RANKING_SERVICE, USER_PUSH_SOURCE, Settings
from coldstart.dev.bench.common import emit, machine, timed_side_by_side
from coldstart.dev.services import LocalRedis
from coldstart.dev.stack import FeatureServerProcess
from coldstart.ranking import ranking_features

SDK_PATH = "coldstart-sdk (ranking_features: one HMGET pipeline, numpy affinity)"  # coldstart.ranking
HTTP_PATH = "feast-http (ranking_v1 + affinity)"
OUR_HTTP_PATH = "coldstart-http (/ranking-features: the same read, orjson)"


def raw_redis_reader(settings: Settings, user_id: str, item_ids: list[str]):
    """HMGET of exactly the keys and fields Feast reads for ranking_v1, pipelined, nothing decoded."""
    client = feast_store.redis_client(settings.redis_url)  # one Redis or a cluster
    user_keys, user_fields = feast_store.redis_layout(settings.feast_project, "user_id", [user_id], "user_embedding",
                                                      ["user_embedding", "history_length"])
    item_keys, item_fields = feast_store.redis_layout(settings.feast_project, "item_id", item_ids, "item_embedding",
                                                      ["item_embedding", "title"])
    requests = [(user_keys[0], user_fields)] + [(key, item_fields) for key in item_keys]

    def read():
        with client.pipeline(transaction=False) as pipe:
            for redis_key, fields in requests:
                pipe.hmget(redis_key, fields)
            return pipe.execute()

    return read


def _http_reader(port: int, path: str, body: dict):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # kept alive across calls
    body = json.dumps(body)

    def read():
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload[:300]
        return payload

    return read


@click.command()
@click.option("--sizes", default="1,10,100,500", show_default=True, help="Candidate items per lookup (plus 1 user).")
@click.option("--repeats", type=int, default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def lookup(settings: Settings, sizes: str, repeats: int, as_json: bool) -> None:
    """Ranking reads (1 user + N items): Feast SDK, Feast's HTTP route and ours against raw redis-py, in one run."""
    summary = run_lookup_bench(settings, [int(s) for s in sizes.split(",")], repeats)
    emit(summary["results"], summary, as_json)


def run_lookup_bench(settings: Settings, sizes: list[int], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    unit = lambda n, d: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, d)).astype(np.float32))
    item_ids = [f"item-{n}" for n in range(max(sizes))]
    now = datetime.now(timezone.utc)
    with LocalRedis() as redis_server:
        settings = replace(settings, redis_url=redis_server.url, feast_project="bench_lookup",
                           data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")))
        store = feast_store.apply(settings)
        dim = 64
        feast_store.push_online(store, ITEM_PUSH_SOURCE, feast_store.item_embedding_frame(
            item_ids, unit(len(item_ids), dim), unit(len(item_ids), 384), item_ids, [""] * len(item_ids), "bench",
            [now] * len(item_ids)))
        feast_store.push_online(store, USER_PUSH_SOURCE, feast_store.user_embedding_frame(
            ["user-0"], unit(1, dim), [10], [[]], "bench", [now]))
        with FeatureServerProcess(settings) as server:
            results = []
            service = store.get_feature_service(RANKING_SERVICE, allow_cache=True)
            for size in sizes:
                ids = item_ids[:size]
                rows = {"user_id": ["user-0"] * size, "item_id": ids}
                readers = {
                    SDK_PATH: lambda ids=ids: ranking_features(store, "user-0", ids),
                    # the same service read whole, affinity from its on-demand view: what the SDK path replaced
                    "feast-sdk (ranking_v1, on-demand affinity)":
                        lambda rows=rows: store.get_online_features(features=service, entity_rows=rows).to_dict(),
                    HTTP_PATH: _http_reader(server.port, "/get-online-features", {
                        "feature_service": RANKING_SERVICE, "entities": {"user_id": ["user-0"] * size, "item_id": ids}}),
                    OUR_HTTP_PATH: _http_reader(server.port, "/ranking-features", {"user_id": "user-0", "item_ids": ids}),
                    "raw-redis (same keys)": raw_redis_reader(settings, "user-0", ids),
                }
                results += [{"items": size, **row}
                            for row in timed_side_by_side(readers, repeats, "raw-redis (same keys)")]
    at_100 = {r["path"]: r for r in results if r["items"] == 100}
    return {
        "benchmark": "lookup", "machine": machine(), "repeats": repeats, "results": results,
        "ratio_to_raw_p99_100": at_100[SDK_PATH]["p99_ratio_to_raw"] if at_100 else None,
        "http_ratio_to_raw_p99_100": at_100[HTTP_PATH]["p99_ratio_to_raw"] if at_100 else None,
        "coldstart_http_ratio_to_raw_p99_100": at_100[OUR_HTTP_PATH]["p99_ratio_to_raw"] if at_100 else None,
    }
