"""`coldstart demo`: upload the shipped catalogue to a fresh local stack and watch it become readable.

Latency is upload-to-readable: from just before the producer sends an item to the
moment `get_online_features` first returns its vector.
"""

from __future__ import annotations

import json
import random
import threading
import time
from importlib import resources

import numpy as np
from tqdm import tqdm

from coldstart import feature_store
from coldstart.stack import LocalStack, item_event, new_producer, send_item


def load_catalogue(limit: int = 0) -> list[dict]:
    """The shipped catalogue in a fixed shuffled order, so any prefix mixes categories."""
    text = resources.files("coldstart").joinpath("data/catalogue.jsonl").read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    random.Random(0).shuffle(items)
    return items[:limit] if limit else items


class ReadabilityWatcher(threading.Thread):
    """Polls Feast for items sent but not yet readable; records when each first appears."""

    def __init__(self, store, poll_interval: float = 0.01, max_per_poll: int = 256):
        super().__init__(daemon=True)
        self.store = store
        self.poll_interval = poll_interval
        self.max_per_poll = max_per_poll  # oldest first: a backlog must not make each poll slow
        self.sent_at: dict[str, float] = {}
        self.readable_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def sent(self, item_id: str, at: float) -> None:
        with self.lock:
            self.sent_at[item_id] = at

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                pending = [i for i in self.sent_at if i not in self.readable_at][: self.max_per_poll]
            if pending:
                found = feature_store.read_item_features(self.store, pending)
                now = time.monotonic()
                with self.lock:
                    for item_id in found:
                        self.readable_at[item_id] = now
            time.sleep(self.poll_interval)

    def latencies_ms(self, item_ids=None) -> np.ndarray:
        with self.lock:
            ids = [i for i in (item_ids or self.readable_at) if i in self.readable_at]
            return np.array([(self.readable_at[i] - self.sent_at[i]) * 1000 for i in ids])

    def wait_all(self, timeout: float) -> bool:
        """Wait until everything sent so far is readable; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.readable_at) >= len(self.sent_at):
                    return True
            time.sleep(0.05)
        return False


def upload_at_rate(stack: LocalStack, items: list[dict], rate: float, watcher: ReadabilityWatcher, progress=None) -> None:
    """Send items paced to `rate` per second, telling the watcher when each left."""
    producer = new_producer(stack.settings)
    start = time.monotonic()
    for n, item in enumerate(items):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        watcher.sent(item["item_id"], time.monotonic())
        send_item(producer, item_event(item))
        if progress is not None:
            progress.update(1)
    producer.flush()
    producer.close()


def nearest_neighbours(store, items: list[dict], queries: list[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Cosine neighbours among the catalogue, from the vectors as served by Feast."""
    found = feature_store.read_item_features(store, [i["item_id"] for i in items])
    ids = [i["item_id"] for i in items if i["item_id"] in found]
    titles = {i["item_id"]: i["title"] for i in items}
    matrix = np.array([found[i]["item_embedding"] for i in ids], dtype=np.float32)  # (N, D), unit rows
    result = {}
    for query in queries:
        scores = matrix @ matrix[ids.index(query)]
        order = [j for j in np.argsort(-scores) if ids[j] != query][:k]
        result[titles[query]] = [(titles[ids[j]], float(scores[j])) for j in order]
    return result


def pick_queries(items: list[dict], count: int = 3) -> list[str]:
    """One item from each of a few different categories, the newest uploads first."""
    seen, queries = set(), []
    for item in reversed(items):
        if item.get("category") not in seen:
            seen.add(item.get("category"))
            queries.append(item["item_id"])
        if len(queries) == count:
            break
    return queries


def run_demo(rate: float = 50.0, limit: int = 0, timeout: float = 60.0, as_json: bool = False) -> bool:
    items = load_catalogue(limit)
    say = (lambda *a: None) if as_json else print
    say(f"starting the local stack (Redis, embedded Kafka-protocol broker, Feast, worker)…")
    with LocalStack() as stack:
        warmup_s = stack.wait_until_serving()
        say(f"worker serving after {warmup_s:.1f}s warm-up; uploading {len(items)} items at {rate:g}/s")
        watcher = ReadabilityWatcher(stack.store)
        watcher.start()
        with tqdm(total=len(items), desc="uploaded", unit="item", disable=as_json) as progress:
            upload_at_rate(stack, items, rate, watcher, progress)
        watcher.wait_all(timeout)
        watcher.stopping.set()
        watcher.join()
        latencies = watcher.latencies_ms()
        arrived = len(latencies)
        summary = {
            "arrived": arrived,
            "expected": len(items),
            "rate_per_s": rate,
            "p50_ms": round(float(np.percentile(latencies, 50)), 1) if arrived else None,
            "p95_ms": round(float(np.percentile(latencies, 95)), 1) if arrived else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 1) if arrived else None,
            "max_ms": round(float(latencies.max()), 1) if arrived else None,
            "warmup_s": round(warmup_s, 1),
        }
        neighbours = nearest_neighbours(stack.store, items, pick_queries(items)) if arrived == len(items) else {}
        if not as_json:
            _print_report(summary, neighbours)
            if arrived < len(items):
                print(f"worker log (tail):\n{stack.worker.log_tail()}")
        else:
            print(json.dumps({**summary, "neighbours": neighbours}))
    return arrived == len(items)


def _print_report(summary: dict, neighbours: dict) -> None:
    print(f"\narrived: {summary['arrived']}/{summary['expected']} items readable through Feast")
    if summary["arrived"]:
        print(
            f"upload-to-readable latency at {summary['rate_per_s']:g}/s: p50 {summary['p50_ms']} ms, "
            f"p95 {summary['p95_ms']} ms, p99 {summary['p99_ms']} ms, max {summary['max_ms']} ms"
        )
    for title, rows in neighbours.items():
        print(f"\nnearest to “{title}”:")
        for other, score in rows:
            print(f"  {score:.3f}  {other}")
