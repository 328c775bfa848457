"""`coldstart bench pipeline`: upload-to-readable latency under fixed loads, throughput at saturation, and the
per-event loop a user would build instead (torch, one text per call, one Feast push per item), in one run.

An item counts as readable when its record arrives on item-embeddings, which the worker publishes after the
online write (coldstart.dev.watchers.PublishedWatcher): one consumer in this process, whose CPU share is
reported, instead of a Feast read per pending item."""

from __future__ import annotations

import gc
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
import psutil

from coldstart.config import Settings
from coldstart.dev.bench.common import (
    PLOTS_DIR,
    emit,
    items_per_s,
    machine,
    phase_row,
    suspended,
    unique_items,
)
from coldstart.dev.catalogue import catalogue_texts, load_catalogue
from coldstart.dev.load import upload_at_rate
from coldstart.dev.stack import fresh_stack
from coldstart import store as feast_store
from coldstart.config import ITEM_PUSH_SOURCE
from coldstart.dev.watchers import PublishedWatcher
from encoders.content import OnnxContentEncoder
from encoders.text import item_text


@click.command()
@click.option("--rates", default="10,25,50,100,200", show_default=True, help="Offered uploads/s, each for --seconds.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="How long each rate is offered.")
@click.option("--saturation-items", type=int, default=1500, show_default=True,
              help="Items sent as fast as possible to measure sustained throughput (0: skip).")
@click.option("--naive-items", type=click.IntRange(1), default=200, show_default=True,
              help="Items through the naive per-event loop (torch, one text per call, one Feast push each).")
@click.option("--plot/--no-plot", default=True, show_default=True, help=f"Write {PLOTS_DIR.name}/bench_pipeline.png.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pipeline(settings: Settings, rates: str, seconds: float, saturation_items: int, naive_items: int, plot: bool,
             as_json: bool) -> None:
    """Upload-to-readable latency under fixed loads, throughput at saturation vs the encoder alone and vs the
    naive per-event loop."""
    summary = run_pipeline_bench(settings, [float(r) for r in rates.split(",")], seconds, saturation_items,
                                 naive_items)
    emit(summary["rates"], summary, as_json)
    if plot:
        click.echo(f"plot: {plot_pipeline(summary)}")


def run_pipeline_bench(settings: Settings, rates: list[float], seconds: float, saturation_items: int,
                       naive_items: int = 200) -> dict:
    catalogue = load_catalogue()
    with fresh_stack(settings, "bench") as stack:
        # The rows measured alone run with the worker stopped: idle, it still polls the broker every fetch wait,
        # which keeps the two of them busy (about a tenth of 2 cores) and would lower what the pipeline is
        # compared with.
        with suspended(stack.worker.process.pid):
            naive = naive_items_per_s(stack.settings, stack.store, unique_items(catalogue, "naive", naive_items))
            # The encoder's ceiling: the same texts, precision, threads and batching, in calls of a full
            # micro-batch (what the worker's encoder gets at saturation); the median of three passes.
            encoder = OnnxContentEncoder(stack.settings.encoder_export_dir,
                                         precision=stack.settings.encoder_precision,
                                         threads=stack.settings.onnx_session_threads)
            texts, size = catalogue_texts(len(catalogue)), stack.settings.batch_size
            batches = [texts[i : i + size] for i in range(0, len(texts), size)]
            ceiling = float(np.median([items_per_s(encoder.encode, batches)[0] for _ in range(3)]))
            del encoder
        stack.wait_until_serving()  # back in its consumer group (the pause may have cost it its membership)
        watcher = PublishedWatcher(stack.settings)
        watcher.start()
        # This process's own full collections (60–240 ms over the stack's objects) would hold up the watcher
        # and add their pauses to the latencies it measures: what is loaded by now stays out of their reach.
        gc.collect()
        gc.freeze()
        client, started = psutil.Process(), time.monotonic()
        cpu_before = sum(client.cpu_times()[:2])
        rows = []
        for rate in rates:
            items = unique_items(catalogue, f"r{rate:g}", int(rate * seconds))
            upload_at_rate(stack.settings, items, rate, watcher)
            drained = watcher.wait_all(timeout=120 + len(items) / 20)
            rows.append(phase_row(rate, items, watcher, drained))
        saturation_cpu = None
        if saturation_items:
            items = unique_items(catalogue, "max", saturation_items)
            # Who used the cores while the worker was saturated: what the encoder did not get.
            processes = {"worker": psutil.Process(stack.worker.process.pid),
                         "broker": psutil.Process(stack.broker.process.pid), "client": client}
            before, phase_start = {n: sum(p.cpu_times()[:2]) for n, p in processes.items()}, time.monotonic()
            upload_at_rate(stack.settings, items, float("inf"), watcher)
            drained = watcher.wait_all(timeout=120 + saturation_items / 20)
            rows.append(phase_row(None, items, watcher, drained))
            busy = time.monotonic() - phase_start
            saturation_cpu = {n: round((sum(p.cpu_times()[:2]) - before[n]) / busy, 2) for n, p in processes.items()}
        client_cpu = (sum(client.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
        watcher.stopping.set()
    saturated = rows[-1]["sustained_per_s"] if saturation_items else max(r["sustained_per_s"] for r in rows)
    at_50 = next((r for r in rows if r["offered_per_s"] == 50), None)
    return {
        "benchmark": "pipeline", "machine": machine(), "seconds_per_rate": seconds,
        "encoder_items_per_s": round(ceiling, 1), "saturated_items_per_s": saturated,
        "efficiency": round(saturated / ceiling, 3),
        "p99_ms_at_50": at_50["p99_ms"] if at_50 else None,
        "naive_items_per_s": round(naive, 1), "ratio_to_naive": round(saturated / naive, 2),
        "client_cpu_cores": round(client_cpu, 2),  # this process (producer + watcher) during the phases
        "saturation_cpu_cores": saturation_cpu,  # cores used by worker, broker and client at saturation
        "load_average_1m": round(psutil.getloadavg()[0], 2),
        "rates": rows,
    }


def naive_items_per_s(settings: Settings, store, items: list[dict]) -> float:
    """What a user would build instead of the service: for each upload, encode its text with the torch model
    (sentence-transformers style, one text per call) and push its one row to Feast's online store; no Kafka."""
    from encoders.training.ceg import FrozenContentEncoder, encode_with_torch, load_tokenizer
    from encoders.training.registry import encoder_config

    config = encoder_config(settings.encoder_name, settings.encoder_model_path)
    encoder, tokenizer = FrozenContentEncoder(config), load_tokenizer(config)

    def handle(item: dict) -> None:
        text = item_text(item["title"], item["description"], item["category"], item["brand"], item["tags"],
                         item["price"])
        vector = encode_with_torch(encoder, tokenizer, [text], batch_size=1).numpy()
        frame = feast_store.item_embedding_frame([item["item_id"]], vector, vector, [item["title"]],
                                                 [item["category"]], "naive", [datetime.now(timezone.utc)])
        feast_store.push_online(store, ITEM_PUSH_SOURCE, frame)

    handle(items[0])  # warm-up: first-call allocations
    start = time.perf_counter()
    for item in items:
        handle(item)
    return len(items) / (time.perf_counter() - start)


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


