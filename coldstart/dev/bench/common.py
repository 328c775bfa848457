"""What the benchmarks share: the machine line, the table/JSON output, throughput and latency rows."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click
import numpy as np
import psutil

from coldstart.config import PROJECT_ROOT, Settings

PLOTS_DIR = PROJECT_ROOT / "docs"


def machine() -> str:
    import onnxruntime as ort

    from encoders.sessions import pick_providers

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, ORT {ort.__version__} {pick_providers()[0]}"


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


def items_per_s(encode, batches: list[list[str]]) -> tuple[float, np.ndarray]:
    encode(batches[0][:2])  # warm-up: first-call allocations
    start = time.perf_counter()
    vectors = np.concatenate([encode(b) for b in batches])
    return sum(map(len, batches)) / (time.perf_counter() - start), vectors


@contextmanager
def suspended(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block's duration, so a row measured alone has the cores alone."""
    process = psutil.Process(pid)
    process.suspend()
    try:
        yield
    finally:
        process.resume()


def unique_items(catalogue: list[dict], tag: str, count: int) -> list[dict]:
    return [{**catalogue[n % len(catalogue)], "item_id": f"bench-{tag}-{n}"} for n in range(count)]


def phase_row(rate: float | None, items: list[dict], watcher, drained: bool) -> dict:
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


def timed_side_by_side(readers: dict, repeats: int, raw: str) -> list[dict]:
    """p50/p99 of each reader and its p99 as a ratio to the `raw` reader's: the readers are called in turn,
    `repeats` times, so every path sees the same machine state."""
    timings = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            timings[name].append((time.perf_counter() - start) * 1000)
    raw_p99 = float(np.percentile(timings[raw], 99))
    return [{"path": name, "p50_ms": round(float(np.percentile(ms, 50)), 3),
             "p99_ms": round(float(np.percentile(ms, 99)), 3),
             "p99_ratio_to_raw": round(float(np.percentile(ms, 99)) / raw_p99, 2)} for name, ms in timings.items()]
