"""`coldstart bench …`: where the time goes, measured side by side in one run.

Each sub-benchmark prints a table and, with --json, one JSON object on its last
line. Absolute times drift on shared machines; read the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from coldstart import PROJECT_ROOT
from coldstart.settings import Settings

PLOTS_DIR = PROJECT_ROOT / "docs"


def machine() -> str:
    import onnxruntime as ort

    from encoders.runtime import pick_providers

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, ORT {ort.__version__} {pick_providers()[0]}"


def catalogue_texts(count: int) -> list[str]:
    from coldstart.demo import load_catalogue
    from encoders.text import item_text

    items = load_catalogue()
    texts = [item_text(i["title"], i["description"], i["category"], i["brand"], i["tags"], i["price"]) for i in items]
    return [texts[i % len(texts)] for i in range(count)]


def emit(table: list[dict], summary: dict, as_json: bool) -> None:
    if table:
        columns = list(table[0])
        widths = [max(len(c), *(len(_fmt(r[c])) for r in table)) for c in columns]
        click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in table:
            click.echo("  ".join(_fmt(row[c]).ljust(w) for c, w in zip(columns, widths)))
    if as_json:
        click.echo(json.dumps(summary))


def _fmt(value) -> str:
    return "-" if value is None else str(value)


@click.group()
def bench() -> None:
    """Benchmarks: encoder, pipeline, lookup. Results go in BENCHMARKS.md."""


# ---- encoder ---------------------------------------------------------------

def _items_per_s(encode, batches: list[list[str]]) -> tuple[float, np.ndarray]:
    encode(batches[0][:2])  # warm-up: first-call allocations
    start = time.perf_counter()
    vectors = np.concatenate([encode(b) for b in batches])
    return sum(map(len, batches)) / (time.perf_counter() - start), vectors


@bench.command()
@click.option("--items", "count", type=int, default=200, show_default=True, help="Texts per configuration.")
@click.option("--batch-sizes", default="1,8,64", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def encoder(count: int, batch_sizes: str, as_json: bool) -> None:
    """Items/s of the frozen encoder: torch eager fp32 vs ONNX Runtime fp32 vs int8, by batching."""
    summary = run_encoder_bench(count, [int(b) for b in batch_sizes.split(",")])
    emit(summary["configs"], summary, as_json)


def run_encoder_bench(count: int, batch_sizes: list[int]) -> dict:
    from encoders.ceg import CEGConfig, FrozenContentEncoder, encode_with_torch, load_tokenizer, quantize_int8
    from encoders.runtime import OnnxContentEncoder, ensure_exported

    settings = Settings.from_env()
    export_dir = ensure_exported(settings.encoder_export_dir, settings.encoder_model_path)
    texts = catalogue_texts(count)
    config = CEGConfig(model_path=settings.encoder_model_path, name=settings.encoder_name)
    torch_encoder, tokenizer = FrozenContentEncoder(config), load_tokenizer(config)

    # int8 everywhere (no layer kept fp32), to show what the service default trades
    all_int8_dir = Path(tempfile.mkdtemp(prefix="int8-all-"))
    for name in os.listdir(export_dir):
        if name != "model.int8.onnx":
            os.symlink(export_dir / name, all_int8_dir / name)
    quantize_int8(export_dir / "model.onnx", all_int8_dir / "model.int8.onnx", keep_down_projections_fp32=False)

    runtimes = {
        "torch-fp32": lambda b: lambda t: encode_with_torch(torch_encoder, tokenizer, t, batch_size=b).numpy(),
        "onnx-fp32": lambda b: OnnxContentEncoder(export_dir, "fp32", max_batch_tokens=10**9, max_batch_items=b).encode,
        "onnx-int8 (service)": lambda b: OnnxContentEncoder(export_dir, "int8", max_batch_tokens=10**9, max_batch_items=b).encode,
        "onnx-int8-all": lambda b: OnnxContentEncoder(all_int8_dir, "int8", max_batch_tokens=10**9, max_batch_items=b).encode,
    }
    reference = None
    rows = []
    for batch_size in batch_sizes:
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]  # arrival order
        for name, make in runtimes.items():
            rate, vectors = _items_per_s(make(batch_size), batches)
            if reference is None:
                reference = vectors  # torch fp32, the first configuration run
            cosines = (vectors * reference).sum(axis=1)
            rows.append({"runtime": name, "batching": f"fixed {batch_size}", "items_per_s": round(rate, 1),
                         "min_cos": round(float(cosines.min()), 4), "mean_cos": round(float(cosines.mean()), 4)})
    for name in ("onnx-fp32", "onnx-int8 (service)", "onnx-int8-all"):  # token budget: sorted by length
        precision_dir = all_int8_dir if name == "onnx-int8-all" else export_dir
        encoder = OnnxContentEncoder(precision_dir, "fp32" if name == "onnx-fp32" else "int8")
        rate, vectors = _items_per_s(encoder.encode, [texts])
        cosines = (vectors * reference).sum(axis=1)
        rows.append({"runtime": name, "batching": f"token budget {encoder.max_batch_tokens}",
                     "items_per_s": round(rate, 1), "min_cos": round(float(cosines.min()), 4),
                     "mean_cos": round(float(cosines.mean()), 4)})
    torch_best = max(r["items_per_s"] for r in rows if r["runtime"] == "torch-fp32")
    for row in rows:
        row["x_torch"] = round(row["items_per_s"] / torch_best, 2)
    eligible = [r for r in rows if r["min_cos"] >= 0.99 and r["runtime"] != "torch-fp32"]
    best = max(eligible, key=lambda r: r["items_per_s"])
    return {"benchmark": "encoder", "machine": machine(), "items": count, "configs": rows,
            "fastest_with_cos_0.99": best, "best_items_per_s": best["items_per_s"]}


# ---- pipeline --------------------------------------------------------------

@bench.command()
@click.option("--rates", default="10,25,50,100,200", show_default=True, help="Offered uploads/s, each for --seconds.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="How long each rate is offered.")
@click.option("--saturation-items", type=int, default=1500, show_default=True,
              help="Items sent as fast as possible to measure sustained throughput (0: skip).")
@click.option("--plot/--no-plot", default=True, show_default=True, help=f"Write {PLOTS_DIR.name}/bench_pipeline.png.")
@click.option("--json", "as_json", is_flag=True)
def pipeline(rates: str, seconds: float, saturation_items: int, plot: bool, as_json: bool) -> None:
    """Upload-to-readable latency under fixed loads, and throughput at saturation vs the encoder ceiling."""
    summary = run_pipeline_bench([float(r) for r in rates.split(",")], seconds, saturation_items)
    emit(summary["rates"], summary, as_json)
    if plot:
        click.echo(f"plot: {plot_pipeline(summary)}")


def run_pipeline_bench(rates: list[float], seconds: float, saturation_items: int) -> dict:
    from coldstart.demo import ReadabilityWatcher, load_catalogue, upload_at_rate
    from coldstart.services import LocalRedis
    from coldstart.stack import LocalStack
    from encoders.runtime import load_content_encoder

    catalogue = load_catalogue()
    settings = Settings.from_env(data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")), feast_project="bench")
    with LocalRedis() as redis_server, LocalStack(replace(settings, redis_url=redis_server.url)) as stack:
        stack.wait_until_serving()
        # The encoder's ceiling on the same texts, same precision and batching, while the worker idles.
        encoder = load_content_encoder(stack.settings.encoder_export_dir, precision=stack.settings.encoder_precision)
        ceiling, _ = _items_per_s(encoder.encode, [catalogue_texts(len(catalogue))])
        del encoder
        watcher = ReadabilityWatcher(stack.store)
        watcher.start()
        rows = []
        for rate in rates:
            items = _unique_items(catalogue, f"r{rate:g}", int(rate * seconds))
            upload_at_rate(stack, items, rate, watcher)
            drained = watcher.wait_all(timeout=120 + len(items) / 20)
            rows.append(_phase_row(rate, items, watcher, drained))
        if saturation_items:
            items = _unique_items(catalogue, "max", saturation_items)
            upload_at_rate(stack, items, float("inf"), watcher)
            drained = watcher.wait_all(timeout=120 + saturation_items / 20)
            rows.append(_phase_row(None, items, watcher, drained))
        watcher.stopping.set()
    saturated = rows[-1]["sustained_per_s"] if saturation_items else max(r["sustained_per_s"] for r in rows)
    at_50 = next((r for r in rows if r["offered_per_s"] == 50), None)
    return {
        "benchmark": "pipeline", "machine": machine(), "seconds_per_rate": seconds,
        "encoder_items_per_s": round(ceiling, 1), "saturated_items_per_s": saturated,
        "efficiency": round(saturated / ceiling, 3),
        "p99_ms_at_50": at_50["p99_ms"] if at_50 else None,
        "rates": rows,
    }


def _unique_items(catalogue: list[dict], tag: str, count: int) -> list[dict]:
    return [{**catalogue[n % len(catalogue)], "item_id": f"bench-{tag}-{n}"} for n in range(count)]


def _phase_row(rate: float | None, items: list[dict], watcher, drained: bool) -> dict:
    ids = [i["item_id"] for i in items]
    latencies = watcher.latencies_ms(ids)
    first_sent = min(watcher.sent_at[i] for i in ids)
    last_readable = max((watcher.readable_at[i] for i in ids if i in watcher.readable_at), default=first_sent)
    pct = (lambda q: round(float(np.percentile(latencies, q)), 1)) if len(latencies) else (lambda q: None)
    return {
        "offered_per_s": rate if rate is not None else "max",
        "items": len(ids), "arrived": len(latencies),
        "sustained_per_s": round(len(latencies) / max(last_readable - first_sent, 1e-9), 1),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "drained": drained,
    }


def plot_pipeline(summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rates"] if r["offered_per_s"] != "max" and r["arrived"]]
    offered = [r["offered_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-")):
        ax.plot(offered, [r[key] for r in rows], style, label=key.replace("_ms", ""))
    ax.axhline(1000, color="grey", lw=0.8, ls=":")
    ax.axvline(summary["encoder_items_per_s"], color="tab:red", lw=0.8, ls="--", label="encoder ceiling")
    ax.set(xlabel="offered uploads/s", ylabel="upload → readable in Feast (ms)", yscale="log",
           title=f"Pipeline latency vs load (efficiency at saturation {summary['efficiency']:.2f})")
    ax.legend()
    fig.tight_layout()
    PLOTS_DIR.mkdir(exist_ok=True)
    path = PLOTS_DIR / "bench_pipeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- lookup ----------------------------------------------------------------

SDK_PATH = "feast-sdk (ranking_features: online_read, numpy affinity)"  # the Python read path of coldstart.ranking
HTTP_PATH = "feast-http (ranking_v1 + affinity)"


def _raw_redis_reader(settings: Settings, user_id: str, item_ids: list[str]):
    """HMGET of exactly the keys and fields Feast reads for ranking_v1, pipelined, nothing decoded."""
    import redis
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    def key(join_key: str, value: str) -> bytes:
        return _redis_key(settings.feast_project, EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)]), 3)

    client = redis.Redis.from_url(settings.redis_url)
    user_fields = [_mmh3("user_embedding:user_embedding"), _mmh3("user_embedding:history_length"), "_ts:user_embedding"]
    item_fields = [_mmh3("item_embedding:item_embedding"), _mmh3("item_embedding:title"), "_ts:item_embedding"]
    requests = [(key("user_id", user_id), user_fields)] + [(key("item_id", i), item_fields) for i in item_ids]

    def read():
        with client.pipeline(transaction=False) as pipe:
            for redis_key, fields in requests:
                pipe.hmget(redis_key, fields)
            return pipe.execute()

    return read


def _http_reader(port: int, user_id: str, item_ids: list[str]):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # kept alive across calls
    body = json.dumps({"feature_service": "ranking_v1",
                       "entities": {"user_id": [user_id] * len(item_ids), "item_id": item_ids}})

    def read():
        connection.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload[:300]
        return payload

    return read


@bench.command()
@click.option("--sizes", default="1,10,100,500", show_default=True, help="Candidate items per lookup (plus 1 user).")
@click.option("--repeats", type=int, default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lookup(sizes: str, repeats: int, as_json: bool) -> None:
    """Ranking reads (1 user + N items): Feast SDK and HTTP feature server against raw redis-py, in one run."""
    summary = run_lookup_bench([int(s) for s in sizes.split(",")], repeats)
    emit(summary["results"], summary, as_json)


def run_lookup_bench(sizes: list[int], repeats: int) -> dict:
    import subprocess
    import sys
    import urllib.request
    from datetime import datetime, timezone

    from coldstart import feature_store
    from coldstart.ranking import ranking_features
    from coldstart.services import LocalRedis, die_with_parent, free_port

    rng = np.random.default_rng(0)
    unit = lambda n, d: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, d)).astype(np.float32))
    settings = Settings.from_env(data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")), feast_project="bench_lookup")
    item_ids = [f"item-{n}" for n in range(max(sizes))]
    now = datetime.now(timezone.utc)
    with LocalRedis() as redis_server:
        settings = replace(settings, redis_url=redis_server.url)
        os.environ["COLDSTART_DATA_DIR"] = str(settings.data_dir)
        store = feature_store.apply(settings)
        dim = 64
        feature_store.push_online(store, "item_embeddings_push_source", feature_store.item_embedding_frame(
            item_ids, unit(len(item_ids), dim), unit(len(item_ids), 384), item_ids, "bench", [now] * len(item_ids)))
        feature_store.push_online(store, "user_embeddings_push_source", feature_store.user_embedding_frame(
            ["user-0"], unit(1, dim), [10], "bench", [now]))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "coldstart.cli", "serve", "--port", str(port)],
                                  env={**os.environ, **settings.as_env()}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        try:
            _wait_http(port)
            results = []
            service = store.get_feature_service("ranking_v1", allow_cache=True)
            for size in sizes:
                ids = item_ids[:size]
                rows = {"user_id": ["user-0"] * size, "item_id": ids}
                readers = {
                    SDK_PATH: lambda ids=ids: ranking_features("user-0", ids, store),
                    # the same service read whole, affinity from its on-demand view: what the SDK path replaced
                    "feast-sdk (ranking_v1, on-demand affinity)":
                        lambda rows=rows: store.get_online_features(features=service, entity_rows=rows).to_dict(),
                    HTTP_PATH: _http_reader(port, "user-0", ids),
                    "raw-redis (same keys)": _raw_redis_reader(settings, "user-0", ids),
                }
                timings = {name: [] for name in readers}
                for _ in range(repeats):  # interleaved: every method sees the same machine state
                    for name, read in readers.items():
                        start = time.perf_counter()
                        read()
                        timings[name].append((time.perf_counter() - start) * 1000)
                raw_p99 = float(np.percentile(timings["raw-redis (same keys)"], 99))
                for name, ms in timings.items():
                    p99 = float(np.percentile(ms, 99))
                    results.append({"items": size, "path": name, "p50_ms": round(float(np.percentile(ms, 50)), 3),
                                    "p99_ms": round(p99, 3), "p99_ratio_to_raw": round(p99 / raw_p99, 2)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    at_100 = {r["path"]: r for r in results if r["items"] == 100}
    return {
        "benchmark": "lookup", "machine": machine(), "repeats": repeats, "results": results,
        "ratio_to_raw_p99_100": at_100[SDK_PATH]["p99_ratio_to_raw"] if at_100 else None,
        "http_ratio_to_raw_p99_100": at_100[HTTP_PATH]["p99_ratio_to_raw"] if at_100 else None,
    }


def _wait_http(port: int, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"feature server on port {port} did not answer within {timeout:.0f}s")


# ---- actions ---------------------------------------------------------------

class UserVectorWatcher:
    """Polls Feast for users whose vector should reflect more actions; records when it does."""

    def __init__(self, store, poll_interval: float = 0.01):
        import threading

        self.store = store
        self.poll_interval = poll_interval
        self.expected: dict[str, int] = {}  # user → history length the last sent action leads to
        self.pending: list[tuple[str, int, float]] = []  # (user, length, sent at)
        self.latencies_ms: list[float] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sent(self, user_id: str) -> None:
        with self.lock:
            self.expected[user_id] = self.expected.get(user_id, 0) + 1
            self.pending.append((user_id, self.expected[user_id], time.monotonic()))

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                users = sorted({u for u, _, _ in self.pending})[:256]
            if users:
                lengths = self.store.get_online_features(
                    features=["user_embedding:history_length"], entity_rows=[{"user_id": u} for u in users]
                ).to_dict()["history_length"]
                seen = dict(zip(users, lengths))
                now = time.monotonic()
                with self.lock:
                    still = []
                    for user_id, length, sent_at in self.pending:
                        if (seen.get(user_id) or 0) >= length:
                            self.latencies_ms.append((now - sent_at) * 1000)
                        else:
                            still.append((user_id, length, sent_at))
                    self.pending = still
            time.sleep(self.poll_interval)

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending:
                    return True
            time.sleep(0.05)
        return False


@bench.command()
@click.option("--rate", type=float, default=100.0, show_default=True, help="Actions per second.")
@click.option("--seconds", type=float, default=10.0, show_default=True)
@click.option("--users", type=int, default=200, show_default=True, help="Distinct users acting (max history 50 each).")
@click.option("--json", "as_json", is_flag=True)
def actions(rate: float, seconds: float, users: int, as_json: bool) -> None:
    """Action-to-updated-user-vector latency at a fixed action rate (clicks on known items)."""
    summary = run_actions_bench(rate, seconds, users)
    emit([summary["row"]], summary, as_json)


def run_actions_bench(rate: float, seconds: float, users: int) -> dict:
    from coldstart.demo import ReadabilityWatcher, load_catalogue, upload_at_rate
    from coldstart.services import LocalRedis
    from coldstart.stack import LocalStack, new_producer, send_action

    catalogue = load_catalogue()
    settings = Settings.from_env(data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")), feast_project="bench_actions")
    with LocalRedis() as redis_server, LocalStack(replace(settings, redis_url=redis_server.url)) as stack:
        stack.wait_until_serving()
        items = ReadabilityWatcher(stack.store)
        items.start()
        upload_at_rate(stack, catalogue, float("inf"), items)  # every item known before the actions start
        items.wait_all(timeout=120)
        items.stopping.set()
        watcher = UserVectorWatcher(stack.store)
        watcher.thread.start()
        producer = new_producer(stack.settings)
        rng = np.random.default_rng(0)
        count = int(rate * seconds)
        start = time.monotonic()
        for n in range(count):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            user_id = f"bench-user-{rng.integers(users)}"
            watcher.sent(user_id)
            send_action(producer, user_id, catalogue[rng.integers(len(catalogue))]["item_id"], "click")
        producer.flush()
        drained = watcher.wait_all(timeout=120)
        watcher.stopping.set()
        producer.close()
    latencies = np.array(watcher.latencies_ms)
    pct = lambda q: round(float(np.percentile(latencies, q)), 1) if len(latencies) else None
    row = {"rate_per_s": rate, "actions": count, "updated": len(latencies), "p50_ms": pct(50), "p95_ms": pct(95),
           "p99_ms": pct(99), "drained": drained}
    from encoders.tower_runtime import load_towers

    towers = load_towers(settings.onnx_dir, settings.encoder_name).version  # what the worker served
    return {"benchmark": "actions", "machine": machine(), "towers": towers, "row": row,
            f"action_to_vector_p99_ms_at_{rate:g}": pct(99)}


# ---- burst -----------------------------------------------------------------

@bench.command()
@click.option("--factor", type=float, default=10.0, show_default=True, help="Burst rate as a multiple of the sustainable rate.")
@click.option("--burst-seconds", type=float, default=10.0, show_default=True, help="How long the burst lasts.")
@click.option("--probe-rate", type=float, default=5.0, show_default=True, help="Probe uploads/s throughout, for latency.")
@click.option("--saturation-items", type=int, default=1000, show_default=True,
              help="Items sent at once first, to measure the sustainable rate.")
@click.option("--padding-kb", type=int, default=0, show_default=True,
              help="An ignored field of this size on each burst event, so a backlog held in memory would show.")
@click.option("--json", "as_json", is_flag=True)
def burst(factor: float, burst_seconds: float, probe_rate: float, saturation_items: int, padding_kb: int,
          as_json: bool) -> None:
    """A burst of FACTOR x the sustainable rate: peak worker memory, drain and latency recovery, nothing lost."""
    from coldstart.services import LocalRedis
    from coldstart.stack import LocalStack

    settings = Settings.from_env(data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")), feast_project="bench")
    with LocalRedis() as redis_server, LocalStack(replace(settings, redis_url=redis_server.url)) as stack:
        stack.wait_until_serving()
        summary = run_burst(stack, factor, burst_seconds, probe_rate, saturation_items, padding_kb)
    emit([summary["phases"]], summary, as_json)


def run_burst(stack, factor: float, burst_seconds: float, probe_rate: float, saturation_items: int,
              padding_kb: int, baseline_seconds: float = 5.0, recovery_timeout: float = 300.0) -> dict:
    """Measure on a running stack (also used by the reliability test, which asserts no timing)."""
    from coldstart.demo import ReadabilityWatcher, load_catalogue, upload_at_rate

    catalogue = load_catalogue()
    backlog = ReadabilityWatcher(stack.store, poll_interval=0.1)
    backlog.start()
    saturation = _unique_items(catalogue, f"sat-{time.time_ns()}", saturation_items)
    upload_at_rate(stack, saturation, float("inf"), backlog)
    backlog.wait_all(timeout=120 + saturation_items / 10)
    sustainable = _phase_row(None, saturation, backlog, True)["sustained_per_s"]

    memory = _RssSampler(stack.worker.process.pid)
    probes = _Prober(stack, catalogue, probe_rate)
    memory.start()
    probes.start()
    time.sleep(baseline_seconds)
    baseline_ms = probes.latencies_ms()
    rss_before = memory.peak_mb()

    padding = "x" * (padding_kb * 1024)
    burst_items = [{**item, "padding": padding} for item in
                   _unique_items(catalogue, f"burst-{time.time_ns()}", int(sustainable * factor * burst_seconds))]
    burst_start = time.monotonic()
    upload_at_rate(stack, burst_items, sustainable * factor, backlog)
    burst_end = time.monotonic()
    backlog_at_end = len(burst_items) - len(backlog.latencies_ms([i["item_id"] for i in burst_items]))
    drained = backlog.wait_all(timeout=recovery_timeout)
    drain_s = max(backlog.readable_at.values()) - burst_end
    threshold_ms = max(2 * float(np.percentile(baseline_ms, 99)), 100.0)
    recovery_s = probes.recovered_after(burst_end, threshold_ms, timeout=recovery_timeout)
    probes.stop()
    memory.stopping.set()
    lost = len(burst_items) - len(backlog.latencies_ms([i["item_id"] for i in burst_items]))
    backlog.stopping.set()
    return {
        "benchmark": "burst", "machine": machine(), "sustainable_per_s": sustainable, "factor": factor,
        "burst_per_s": round(sustainable * factor, 1), "burst_items": len(burst_items),
        "backlog_at_burst_end": backlog_at_end,
        "backlog_mb": round(backlog_at_end * (padding_kb * 1024 + 400) / 2**20),
        "burst_sent_s": round(burst_end - burst_start, 1), "drained": drained, "lost": lost,
        "drain_s": round(drain_s, 1),
        "baseline_p99_ms": round(float(np.percentile(baseline_ms, 99)), 1),
        "latency_recovered_s": round(recovery_s, 1) if recovery_s is not None else None,
        "worker_rss_before_mb": round(rss_before), "worker_rss_peak_mb": round(memory.peak_mb()),
        "phases": {"sustainable_per_s": sustainable, "burst_items": len(burst_items), "drain_s": round(drain_s, 1),
                   "latency_recovered_s": round(recovery_s, 1) if recovery_s is not None else None,
                   "rss_before_mb": round(rss_before), "rss_peak_mb": round(memory.peak_mb()), "lost": lost},
    }


class _RssSampler(threading.Thread):
    """The worker process's resident memory, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(self.process.memory_info().rss)
            time.sleep(0.2)

    def peak_mb(self) -> float:
        while not self.samples:
            time.sleep(0.05)
        return max(self.samples) / 2**20


class _Prober(threading.Thread):
    """Uploads one probe item every 1/rate seconds and watches when each becomes readable."""

    def __init__(self, stack, catalogue: list[dict], rate: float):
        from coldstart.demo import ReadabilityWatcher
        from coldstart.stack import new_producer

        super().__init__(daemon=True)
        self.stack, self.catalogue, self.rate = stack, catalogue, rate
        self.producer = new_producer(stack.settings)
        self.watcher = ReadabilityWatcher(stack.store, poll_interval=0.02)
        self.stopping = threading.Event()

    def run(self) -> None:
        from coldstart.stack import item_event, send_item

        self.watcher.start()
        n = 0
        while not self.stopping.wait(1 / self.rate):
            item = {**self.catalogue[n % len(self.catalogue)], "item_id": f"probe-{time.time_ns()}"}
            self.watcher.sent(item["item_id"], time.monotonic())
            send_item(self.producer, item_event(item))
            self.producer.flush()
            n += 1

    def latencies_ms(self) -> np.ndarray:
        return self.watcher.latencies_ms()

    def recovered_after(self, since: float, threshold_ms: float, timeout: float, settle: int = 10) -> float | None:
        """Seconds from `since` to the first probe after which `settle` probes in a row are under threshold."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.watcher.lock:
                probes = sorted((at, self.watcher.readable_at.get(i)) for i, at in self.watcher.sent_at.items()
                                if at >= since)
            for start in range(len(probes) - settle + 1):
                window = probes[start : start + settle]
                if all(ready is not None and (ready - sent) * 1000 <= threshold_ms for sent, ready in window):
                    return window[0][0] - since
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.watcher.stopping.set()
        self.producer.close()
