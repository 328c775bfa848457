"""`coldstart bench retrieve`: the retrieval index at scale, then retrieval and lookups through the running service.

Index: N item vectors of the served dimension, made from the real ones: the
1,682 MovieLens-100K films through the served encoder and item tower, each
copied N/1,682 times with Gaussian noise of norm NOISE added (then
re-normalised: a copy keeps a cosine of about 1/sqrt(1+NOISE²) to its film).
Queries are made the same way from random films (a user near a film). Recall
is against exact search (numpy, float32) over the same vectors.

Service: a local stack (broker, Redis, worker) and `coldstart serve`; items
uploaded at RATE/s, each with a category of its own, are polled through
POST /retrieve (filtered by the pending items' categories) until each is
returned. Then, in one interleaved run: raw redis-py reading the keys of
1 user + 100 items, our POST /ranking-features and POST /retrieve (k=100), and
Feast's POST /get-online-features for the same lookup.
"""

from __future__ import annotations

import http.client
import json
import os
import time

import click
import numpy as np
from tqdm import tqdm

from coldstart.config import RANKING_SERVICE, Settings
from coldstart.dev.bench.common import emit, machine, timed_side_by_side
from coldstart.dev.bench.lookup import raw_redis_reader
from coldstart.dev.load import new_producer, send_action, upload_at_rate
from coldstart.dev.stack import FeatureServerProcess, fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher
from coldstart.retrieval import VersionIndex

K = 100


@click.command()
@click.option("--items", "count", type=int, default=1_000_000, show_default=True, help="Item vectors in the index.")
@click.option("--noise", type=float, default=0.5, show_default=True, help="Norm of the noise added to each copy.")
@click.option("--queries", type=int, default=2000, show_default=True, help="Single queries timed.")
@click.option("--recall-queries", type=int, default=200, show_default=True, help="Queries checked against exact search.")
@click.option("--rate", type=float, default=50.0, show_default=True, help="Uploads per second through the service.")
@click.option("--uploads", type=int, default=500, show_default=True, help="Items uploaded through the service.")
@click.option("--repeats", type=int, default=300, show_default=True, help="HTTP and raw-Redis reads timed.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def retrieve(settings: Settings, count: int, noise: float, queries: int, recall_queries: int, rate: float,
             uploads: int, repeats: int, as_json: bool) -> None:
    """Retrieval: index build, memory, top-100 latency, recall, queries/s; upload → retrievable; HTTP vs raw Redis."""
    films = _films(settings)
    base = _served_vectors(settings, films)
    index_row = run_index_bench(settings, base, count, noise, queries, recall_queries)
    service = run_service_bench(settings, films, rate, uploads, repeats)
    summary = {"benchmark": "retrieve", "machine": machine(), "load_average": [round(x, 2) for x in os.getloadavg()],
               **index_row, **service["summary"], "http": service["http"]}
    emit([index_row], {}, False)
    emit([{key: value for key, value in service["summary"].items() if "ratio" not in key}], {}, False)
    emit(service["http"], summary, as_json)


def _films(settings: Settings) -> list[dict]:
    from encoders.training.datasets import fetch_ml100k, ml100k_films

    return ml100k_films(fetch_ml100k(settings.data_dir / "datasets" / "ml-100k"))


def _served_vectors(settings: Settings, films: list[dict]) -> np.ndarray:
    """The films' vectors as the worker serves them: content encoder, then item tower."""
    from encoders.content import OnnxContentEncoder
    from encoders.text import item_text
    from encoders.towers import load_towers

    encoder = OnnxContentEncoder(settings.encoder_export_dir, precision=settings.encoder_precision,
                                 threads=settings.onnx_threads)
    towers = load_towers(settings.towers_dir, settings.encoder_name, settings.onnx_threads)
    texts = [item_text(title=film["title"], category=film["category"]) for film in films]
    content = np.concatenate([encoder.encode(texts[start : start + 64])
                              for start in tqdm(range(0, len(texts), 64), desc="encoding the films", unit="batch")])
    return towers.item_vectors(content).astype(np.float32)


def _copies(base: np.ndarray, rows: np.ndarray, noise: float, rng) -> np.ndarray:
    dim = base.shape[1]
    vectors = base[rows % len(base)] + noise * rng.normal(size=(len(rows), dim)).astype(np.float32) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def run_index_bench(settings: Settings, base: np.ndarray, count: int, noise: float, queries: int,
                    recall_queries: int, chunk: int = 10_000) -> dict:
    import psutil

    rng = np.random.default_rng(0)
    vectors = np.empty((count, base.shape[1]), dtype=np.float32)
    for start in range(0, count, chunk):
        vectors[start : start + chunk] = _copies(base, np.arange(start, min(start + chunk, count)), noise, rng)
    query_vectors = _copies(base, rng.integers(0, len(base), queries), noise, rng)

    process = psutil.Process()
    rss_before = process.memory_info().rss
    index = VersionIndex("bench", base.shape[1], settings.index_dtype, settings.index_expansion_search,
                         settings.index_connectivity)
    started = time.perf_counter()
    with tqdm(total=count, desc="building the index", unit="item") as progress:
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            index.put([f"item-{n}" for n in range(start, stop)], vectors[start:stop], [""] * (stop - start),
                      [0.0] * (stop - start))
            progress.update(stop - start)
    build_s = time.perf_counter() - started
    bytes_per_item = (process.memory_info().rss - rss_before) / count

    timings = []
    for query in query_vectors:
        start = time.perf_counter()
        index.search(query, K, set(), None)
        timings.append((time.perf_counter() - start) * 1000)
    started = time.perf_counter()
    index.graph.search(query_vectors, K, threads=os.cpu_count() or 1)
    queries_per_s = len(query_vectors) / (time.perf_counter() - started)

    recalls = []
    for query in tqdm(query_vectors[:recall_queries], desc="exact search for recall", unit="query"):
        exact = np.argpartition(-(vectors @ query), K)[:K]
        found = {int(r.item_id[5:]) for r in index.search(query, K, set(), None)}
        recalls.append(len(found & set(exact.tolist())) / K)
    return {
        "items": count, "dim": int(base.shape[1]), "dtype": settings.index_dtype,
        "expansion_search": settings.index_expansion_search, "noise": noise,
        "build_s": round(build_s, 1), "bytes_per_item": round(bytes_per_item),
        "index_bytes_per_item": round(index.graph.serialized_length / count),
        "p50_ms": round(float(np.percentile(timings, 50)), 3), "p99_ms": round(float(np.percentile(timings, 99)), 3),
        "queries_per_s": round(queries_per_s), "recall_at_100": round(float(np.mean(recalls)), 4),
    }


def run_service_bench(settings: Settings, films: list[dict], rate: float, uploads: int, repeats: int) -> dict:
    with fresh_stack(settings, "bench_retrieve") as stack, FeatureServerProcess(stack.settings) as server:
        server.wait_ready()
        tag = time.time_ns()
        catalogue = [{**film, "item_id": f"film-{tag}-{film['item_id']}"} for film in films]
        loaded = ReadabilityWatcher(stack.store, poll_interval=0.1)
        loaded.start()
        upload_at_rate(stack.settings, catalogue, float("inf"), loaded)
        loaded.wait_all(timeout=600)
        loaded.stopping.set()
        user_id = f"bench-user-{tag}"
        producer = new_producer(stack.settings)
        for film in catalogue[:20]:
            send_action(producer, user_id, film["item_id"])
        producer.flush()
        _wait_for_user(server, user_id)

        # upload → retrievable, each fresh item under a category of its own
        fresh = [{**films[n % len(films)], "item_id": f"fresh-{tag}-{n}", "category": f"fresh-{tag}-{n}"}
                 for n in range(uploads)]
        retrievable = ReadabilityWatcher(stack.store, poll_interval=0.005, find=_retrieval_finder(server, user_id))
        retrievable.start()
        upload_at_rate(stack.settings, fresh, rate, retrievable)
        arrived = retrievable.wait_all(timeout=120)
        retrievable.stopping.set()
        latencies = retrievable.latencies_ms([item["item_id"] for item in fresh])

        http_rows = _http_vs_raw(stack.settings, server, user_id, [film["item_id"] for film in catalogue[20:120]],
                                 repeats)
        producer.close()
    by_path = {row["path"]: row for row in http_rows}
    return {
        "summary": {
            "upload_rate_per_s": rate, "uploads": uploads, "uploads_retrievable": len(latencies), "all_arrived": arrived,
            "upload_to_retrievable_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
            "upload_to_retrievable_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
            "service_catalogue_items": len(catalogue) + uploads,
            "http_retrieve_p99_ratio_to_raw": by_path[RETRIEVE_PATH]["p99_ratio_to_raw"],
            "http_lookup_p99_ratio_to_raw": by_path[LOOKUP_PATH]["p99_ratio_to_raw"],
            "feast_http_lookup_p99_ratio_to_raw": by_path[FEAST_PATH]["p99_ratio_to_raw"],
        },
        "http": http_rows,
    }


def _wait_for_user(server, user_id: str, timeout: float = 60) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _post(connection, "/retrieve", {"user_id": user_id, "k": 1})[0] == 200:
            return
        time.sleep(0.1)
    raise TimeoutError(f"user {user_id} not answered by the server after {timeout}s")


def _post(connection, path: str, body: dict) -> tuple[int, bytes]:
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def _retrieval_finder(server, user_id: str):
    """Which pending items /retrieve returns, in one request: filtered by their own categories."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def find(pending: list[str]) -> list[str]:
        status, body = _post(connection, "/retrieve", {"user_id": user_id, "k": len(pending), "exclude_seen": False,
                                                       "filter": {"category": pending}})
        return [item["item_id"] for item in json.loads(body)["items"]] if status == 200 else []

    return find


RAW_PATH = "raw-redis (1 user + 100 items, same keys)"
LOOKUP_PATH = "coldstart-http POST /ranking-features (1 + 100)"
RETRIEVE_PATH = "coldstart-http POST /retrieve (k=100)"
FEAST_PATH = "feast-http POST /get-online-features (1 + 100, same server)"


def _http_vs_raw(settings: Settings, server, user_id: str, item_ids: list[str], repeats: int) -> list[dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # kept alive across calls

    def call(path: str, body: dict):
        def read():
            status, payload = _post(connection, path, body)
            assert status == 200, payload[:300]
        return read

    readers = {
        RAW_PATH: raw_redis_reader(settings, user_id, item_ids),
        LOOKUP_PATH: call("/ranking-features", {"user_id": user_id, "item_ids": item_ids}),
        RETRIEVE_PATH: call("/retrieve", {"user_id": user_id, "k": K}),
        FEAST_PATH: call("/get-online-features", {"feature_service": RANKING_SERVICE,
                                                  "entities": {"user_id": [user_id] * len(item_ids), "item_id": item_ids}}),
    }
    return timed_side_by_side(readers, repeats, RAW_PATH)
