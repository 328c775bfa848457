"""`coldstart bench actions`: action-to-updated-user-vector latency at a fixed action rate."""

from __future__ import annotations

import time

import click
import numpy as np

from coldstart.config import Settings
from coldstart.dev.bench.common import emit, machine
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import new_producer, send_action, upload_at_rate
from coldstart.dev.stack import fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher, UserVectorWatcher
from encoders.towers import load_towers


@click.command()
@click.option("--rate", type=float, default=100.0, show_default=True, help="Actions per second.")
@click.option("--seconds", type=float, default=10.0, show_default=True)
@click.option("--users", type=int, default=200, show_default=True, help="Distinct users acting (max history 50 each).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def actions(settings: Settings, rate: float, seconds: float, users: int, as_json: bool) -> None:
    """Action-to-updated-user-vector latency at a fixed action rate (clicks on known items)."""
    summary = run_actions_bench(settings, rate, seconds, users)
    emit([summary["row"]], summary, as_json)


def run_actions_bench(settings: Settings, rate: float, seconds: float, users: int) -> dict:
    catalogue = load_catalogue()
    with fresh_stack(settings, "bench_actions") as stack:
        items = ReadabilityWatcher(stack.store)
        items.start()
        upload_at_rate(stack.settings, catalogue, float("inf"), items)  # every item known before the actions start
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
    towers = load_towers(settings.towers_dir, settings.encoder_name).version  # what the worker served
    return {"benchmark": "actions", "machine": machine(), "towers": towers, "row": row,
            f"action_to_vector_p99_ms_at_{rate:g}": pct(99)}


