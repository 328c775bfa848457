"""`coldstart bench burst`: a burst of many times the sustainable rate: memory, drain, latency recovery."""

from __future__ import annotations

import threading
import time

import click
import numpy as np

from coldstart.config import Settings
from coldstart.dev.bench.common import emit, machine, phase_row, unique_items
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import item_event, new_producer, send_item, upload_at_rate
from coldstart.dev.stack import fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher


@click.command()
@click.option("--factor", type=float, default=10.0, show_default=True, help="Burst rate as a multiple of the sustainable rate.")
@click.option("--burst-seconds", type=float, default=10.0, show_default=True, help="How long the burst lasts.")
@click.option("--probe-rate", type=float, default=5.0, show_default=True, help="Probe uploads/s throughout, for latency.")
@click.option("--saturation-items", type=int, default=1000, show_default=True,
              help="Items sent at once first, to measure the sustainable rate.")
@click.option("--padding-kb", type=int, default=0, show_default=True,
              help="An ignored field of this size on each burst event, so a backlog held in memory would show.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def burst(settings: Settings, factor: float, burst_seconds: float, probe_rate: float, saturation_items: int, padding_kb: int,
          as_json: bool) -> None:
    """A burst of FACTOR x the sustainable rate: peak worker memory, drain and latency recovery, nothing lost."""
    with fresh_stack(settings, "bench") as stack:
        summary = run_burst(stack, factor, burst_seconds, probe_rate, saturation_items, padding_kb)
    emit([summary["phases"]], summary, as_json)


def run_burst(stack, factor: float, burst_seconds: float, probe_rate: float, saturation_items: int,
              padding_kb: int, baseline_seconds: float = 5.0, recovery_timeout: float = 300.0) -> dict:
    """Measure on a running stack (also used by the reliability test, which asserts no timing)."""
    catalogue = load_catalogue()
    backlog = ReadabilityWatcher(stack.store, poll_interval=0.1)
    backlog.start()
    saturation = unique_items(catalogue, f"sat-{time.time_ns()}", saturation_items)
    upload_at_rate(stack.settings, saturation, float("inf"), backlog)
    backlog.wait_all(timeout=120 + saturation_items / 10)
    sustainable = phase_row(None, saturation, backlog, True)["sustained_per_s"]

    memory = _RssSampler(stack.worker.process.pid)
    probes = _Prober(stack, catalogue, probe_rate)
    memory.start()
    probes.start()
    time.sleep(baseline_seconds)
    baseline_ms = probes.latencies_ms()
    rss_before = memory.peak_mb()

    padding = "x" * (padding_kb * 1024)
    burst_items = [{**item, "padding": padding} for item in
                   unique_items(catalogue, f"burst-{time.time_ns()}", int(sustainable * factor * burst_seconds))]
    burst_start = time.monotonic()
    upload_at_rate(stack.settings, burst_items, sustainable * factor, backlog)
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
        super().__init__(daemon=True)
        self.stack, self.catalogue, self.rate = stack, catalogue, rate
        self.producer = new_producer(stack.settings)
        self.watcher = ReadabilityWatcher(stack.store, poll_interval=0.02)
        self.stopping = threading.Event()

    def run(self) -> None:
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
