"""`coldstart demo`: films (the default, coldstart.dev.films_demo) or the shipped books catalogue.

Books (`--catalogue books`): the shipped catalogue uploaded to a fresh local
stack; latency is upload-to-readable: from just before the producer sends an
item to the moment `get_online_features` first returns its vector; then the
nearest neighbours of a few items by their served vectors.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from tqdm import tqdm

from coldstart import store as feast_store
from coldstart.config import Settings
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import upload_at_rate
from coldstart.dev.stack import fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher


def nearest_neighbours(store, items: list[dict], queries: list[str], k: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Cosine neighbours among the catalogue, from the vectors as served by Feast."""
    found = feast_store.read_item_features(store, [i["item_id"] for i in items])
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


def run_demo(settings: Settings, catalogue: str = "films", rate: float = 50.0, limit: int = 0, users: int = 0,
             timeout: float = 300.0, as_json: bool = False) -> bool:
    """The demo of one catalogue ("films" or "books"); whether every step completed.
    films_demo.ColdTowersMissing when the films demo has no towers trained on the cold protocol to serve."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # the report, not every client connection (-v: all)
        for name in ("kafka", "feast"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if catalogue == "films":
        from coldstart.dev.films_demo import run_films_demo

        return run_films_demo(settings, rate=rate, users=users, timeout=timeout, as_json=as_json)
    return run_books_demo(settings, rate=rate, limit=limit, timeout=timeout, as_json=as_json)


def run_books_demo(settings: Settings, rate: float = 50.0, limit: int = 0, timeout: float = 60.0,
                   as_json: bool = False) -> bool:
    items = load_catalogue(limit)
    say = (lambda *a: None) if as_json else print
    say("starting the local stack (Redis, embedded Kafka-protocol broker, Feast, worker)…")
    started = time.monotonic()
    with fresh_stack(settings, "coldstart_demo") as stack:
        warmup_s = time.monotonic() - started
        say(f"worker serving after {warmup_s:.1f}s; uploading {len(items)} items at {rate:g}/s")
        watcher = ReadabilityWatcher(stack.store)
        watcher.start()
        with tqdm(total=len(items), desc="uploaded", unit="item", disable=as_json) as progress:
            upload_at_rate(stack.settings, items, rate, watcher, progress)
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
