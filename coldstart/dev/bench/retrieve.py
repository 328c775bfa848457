"""`coldstart bench retrieve`: the retrieval index at scale, then retrieval and lookups through the running service.

Index: N item vectors of the served dimension, made from the real ones: the
1,682 MovieLens-100K films through the served encoder and item tower, each
copied N/1,682 times with Gaussian noise of norm NOISE added (then
re-normalised: a copy keeps a cosine of about 1/sqrt(1+NOISE²) to its film).
Queries are made the same way from random films (a user near a film). Built
once (COLDSTART_INDEX_CONNECTIVITY links, COLDSTART_INDEX_DTYPE), then searched
with each search beam of --beams and the configured one
(COLDSTART_INDEX_EXPANSION_SEARCH, whose row is the summary's): single-query
top-100 latency, queries/s of one batch on every core, recall@100 against exact
search (numpy, float32) over the same vectors.

Service: a local stack (broker, Redis, worker) and `coldstart serve`; items
uploaded at RATE/s, each with a category of its own, are polled through
POST /retrieve (filtered by the pending items' categories) until each is
returned. Where the time goes: each item's vector's record on item-embeddings
(its CreateTime, stamped by the worker's producer) splits upload → retrievable
into the worker's part (upload → published) and the server's (published →
retrievable, including the polling). The bench process's CPU use over that
phase is reported (it shares the cores with the service). Then, in one
interleaved run: raw redis-py reading the keys of 1 user + 100 items, our
POST /ranking-features and POST /retrieve (k=100), and Feast's
POST /get-online-features for the same lookup.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
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
@click.option("--beams", default="64,128,256", show_default=True,
              help="Search beams to compare (comma-separated); COLDSTART_INDEX_EXPANSION_SEARCH is always one of them.")
@click.option("--rate", type=float, default=50.0, show_default=True, help="Uploads per second through the service.")
@click.option("--uploads", type=int, default=500, show_default=True, help="Items uploaded through the service.")
@click.option("--repeats", type=int, default=300, show_default=True, help="HTTP and raw-Redis reads timed.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def retrieve(settings: Settings, count: int, noise: float, queries: int, recall_queries: int, beams: str,
             rate: float, uploads: int, repeats: int, as_json: bool) -> None:
    """Retrieval: index build, memory, top-100 latency, recall and queries/s per search beam; upload → retrievable
    (worker and server parts); HTTP vs raw Redis."""
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    films = _films(settings)
    base = _served_vectors(settings, films)
    build_row, beam_rows = run_index_bench(settings, base, count, noise, queries, recall_queries,
                                           [int(b) for b in beams.split(",") if b.strip()])
    configured = next(row for row in beam_rows if row["expansion_search"] == settings.index_expansion_search)
    service = run_service_bench(settings, films, rate, uploads, repeats)
    summary = {"benchmark": "retrieve", "machine": machine(), "load_average_at_start": load_at_start,
               "load_average": [round(x, 2) for x in os.getloadavg()], **build_row, **configured, "beams": beam_rows,
               **service["summary"], "http": service["http"]}
    emit([build_row], {}, False)
    emit(beam_rows, {}, False)
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
                                 threads=settings.onnx_session_threads)
    towers = load_towers(settings.towers_dir, settings.encoder_name, settings.onnx_session_threads)
    texts = [item_text(title=film["title"], category=film["category"]) for film in films]
    content = np.concatenate([encoder.encode(texts[start : start + 64])
                              for start in tqdm(range(0, len(texts), 64), desc="encoding the films", unit="batch")])
    return towers.item_vectors(content, [film["item_id"] for film in films]).astype(np.float32)


def _copies(base: np.ndarray, rows: np.ndarray, noise: float, rng) -> np.ndarray:
    dim = base.shape[1]
    vectors = base[rows % len(base)] + noise * rng.normal(size=(len(rows), dim)).astype(np.float32) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def run_index_bench(settings: Settings, base: np.ndarray, count: int, noise: float, queries: int,
                    recall_queries: int, beams: list[int], chunk: int = 10_000) -> tuple[dict, list[dict]]:
    """(the build's row, one row per search beam: --beams and the configured one)."""
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

    exact = [set(np.argpartition(-(vectors @ query), K)[:K].tolist())
             for query in tqdm(query_vectors[:recall_queries], desc="exact search for recall", unit="query")]
    rows = []
    for beam in sorted({*beams, settings.index_expansion_search}):
        index.graph.expansion_search = beam
        timings = []
        for query in query_vectors:
            start = time.perf_counter()
            index.search(query, K, set(), None)
            timings.append((time.perf_counter() - start) * 1000)
        started = time.perf_counter()
        index.graph.search(query_vectors, K, threads=os.cpu_count() or 1)
        queries_per_s = len(query_vectors) / (time.perf_counter() - started)
        recalls = [len({int(r.item_id[5:]) for r in index.search(query, K, set(), None)} & top) / K
                   for query, top in zip(query_vectors, exact)]
        rows.append({
            "expansion_search": beam, "p50_ms": round(float(np.percentile(timings, 50)), 3),
            "p99_ms": round(float(np.percentile(timings, 99)), 3), "queries_per_s": round(queries_per_s),
            "recall_at_100": round(float(np.mean(recalls)), 4),
        })
    index.graph.expansion_search = settings.index_expansion_search
    return {
        "items": count, "dim": int(base.shape[1]), "dtype": settings.index_dtype,
        "connectivity": settings.index_connectivity, "noise": noise,
        "build_s": round(build_s, 1), "bytes_per_item": round(bytes_per_item),
        "index_bytes_per_item": round(index.graph.serialized_length / count),
    }, rows


def run_service_bench(settings: Settings, films: list[dict], rate: float, uploads: int, repeats: int) -> dict:
    import psutil

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
        published = PublishedTimes(stack.settings).start()
        retrievable = ReadabilityWatcher(stack.store, poll_interval=0.005, find=_retrieval_finder(server, user_id))
        retrievable.start()
        client, started = psutil.Process(), time.monotonic()
        cpu_before = sum(client.cpu_times()[:2])
        upload_at_rate(stack.settings, fresh, rate, retrievable)
        arrived = retrievable.wait_all(timeout=120)
        client_cpu = (sum(client.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
        retrievable.stopping.set()
        published.stop()
        ids = [item["item_id"] for item in fresh]
        latencies = retrievable.latencies_ms(ids)
        parts = published.split(retrievable, ids)

        http_rows = _http_vs_raw(stack.settings, server, user_id, [film["item_id"] for film in catalogue[20:120]],
                                 repeats)
        producer.close()
    by_path = {row["path"]: row for row in http_rows}
    return {
        "summary": {
            "upload_rate_per_s": rate, "uploads": uploads, "uploads_retrievable": len(latencies), "all_arrived": arrived,
            "upload_to_retrievable_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
            "upload_to_retrievable_p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
            **{f"{part}_{name}_ms": round(float(np.percentile(values, q)), 1) if len(values) else None
               for part, values in parts.items() for name, q in (("p50", 50), ("p99", 99))},
            "client_cpu_cores": round(client_cpu, 2),
            "service_catalogue_items": len(catalogue) + uploads,
            "http_retrieve_p99_ratio_to_raw": by_path[RETRIEVE_PATH]["p99_ratio_to_raw"],
            "http_lookup_p99_ratio_to_raw": by_path[LOOKUP_PATH]["p99_ratio_to_raw"],
            "feast_http_lookup_p99_ratio_to_raw": by_path[FEAST_PATH]["p99_ratio_to_raw"],
        },
        "http": http_rows,
    }


class PublishedTimes:
    """When each item's vector was published on item-embeddings: the record's CreateTime (the worker's clock,
    this machine's), read by a consumer of its own in a background thread."""

    def __init__(self, settings: Settings):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap.split(","), enable_auto_commit=False,
                                      fetch_max_wait_ms=10, **settings.kafka_client_options())
        partitions = [TopicPartition("item-embeddings", p) for p in range(settings.topic_partitions)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_end(*partitions)
        self.at: dict[str, float] = {}  # item id → epoch seconds
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "PublishedTimes":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopping.is_set():
            for messages in self.consumer.poll(timeout_ms=100).values():
                for message in messages:
                    self.at.setdefault(json.loads(message.value)["item_id"], message.timestamp / 1000)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.consumer.close()

    def split(self, watcher: ReadabilityWatcher, item_ids: list[str]) -> dict[str, np.ndarray]:
        """upload → published (the worker) and published → retrievable (the server, and the polling), in ms."""
        to_wall = time.time() - time.monotonic()  # the watcher's times are monotonic
        ids = [i for i in item_ids if i in self.at and i in watcher.readable_at]
        sent = np.array([watcher.sent_at[i] + to_wall for i in ids])
        out = np.array([self.at[i] for i in ids])
        found = np.array([watcher.readable_at[i] + to_wall for i in ids])
        return {"upload_to_published": (out - sent) * 1000, "published_to_retrievable": (found - out) * 1000}


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
