"""`coldstart bench scale`: saturated items/s with 1 and 2 workers, CPU per item, and the pause a rebalance causes.

Also what tests/test_scaleout.py drives: `SteadyLoad` (uploads and actions at
fixed rates while workers come and go) and `rebalance_pauses` (how long the
uploads sent around each membership change waited).

Per-core figures come from CPU accounting, not from the core count: the
workers' CPU seconds (user + system, from /proc) over the items they made
readable. On a shared machine that is the figure that carries to another host;
items/s alone depends on what else ran.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import click
import numpy as np

from coldstart.config import Settings
from coldstart.dev.bench.common import emit, machine, phase_row, unique_items
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import item_event, new_producer, send_action, send_item, upload_at_rate
from coldstart.dev.services import free_port
from coldstart.dev.stack import WorkerProcess, fresh_stack
from coldstart.dev.watchers import ReadabilityWatcher

# Items sent from this long before a membership change to WINDOW_S after it count as the change's:
# a SIGKILLed worker's unprocessed events wait out the session timeout (6 s in the dev profile).
BEFORE_S, WINDOW_S = 2.0, 15.0


@click.command()
@click.option("--saturation-items", type=int, default=600, show_default=True,
              help="Items sent at once for each saturated run (1 worker, then 2).")
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="Uploads/s (and as many actions/s) while workers are killed, added and stopped.")
@click.option("--step-seconds", type=float, default=12.0, show_default=True,
              help="Seconds between membership changes (kill one, start one, stop one).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def scale(settings: Settings, saturation_items: int, rate: float, step_seconds: float, as_json: bool) -> None:
    """Saturated items/s with 1 and 2 workers on this machine, CPU per item, and the rebalance pause under load."""
    summary = run_scale_bench(settings, saturation_items, rate, step_seconds)
    emit(summary["runs"], summary, as_json)


def run_scale_bench(settings: Settings, saturation_items: int, rate: float, step_seconds: float) -> dict:
    catalogue = load_catalogue()
    runs = []
    load_before = os.getloadavg()
    with fresh_stack(replace(settings, workers_per_host=1), "bench") as stack:
        watcher = ReadabilityWatcher(stack.store)
        watcher.start()
        runs.append(saturated_run(stack, [stack.worker], catalogue, saturation_items, watcher, "1w"))
        stack.worker.stop()
        # Two workers on this host: each takes half its cores for ONNX Runtime (COLDSTART_WORKERS_PER_HOST).
        two = start_workers(replace(stack.settings, workers_per_host=2), ["all", "all"])
        try:
            warm_group(stack, catalogue, watcher)
            runs.append(saturated_run(stack, two, catalogue, saturation_items, watcher, "2w"))
            actions = saturated_actions_run(stack, two, catalogue, 4 * saturation_items, watcher)
            rebalance = rebalance_run(stack, two, catalogue, watcher, rate, step_seconds)
        finally:
            for worker in two:
                worker.stop()
        watcher.stopping.set()
    one, both = runs
    return {
        "benchmark": "scale", "machine": machine(), "cores": len(os.sched_getaffinity(0)),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workers": 2, "items_per_s": both["items_per_s"], "items_per_s_1_worker": one["items_per_s"],
        "scaling_2_over_1": round(both["items_per_s"] / one["items_per_s"], 2),
        "items_per_worker_core_s": both["items_per_worker_core_s"],
        "items_per_worker_core_s_1_worker": one["items_per_worker_core_s"],
        "actions_per_s": actions["actions_per_s"], "actions_per_worker_core_s": actions["actions_per_worker_core_s"],
        "lost": one["lost"] + both["lost"] + actions["lost"] + rebalance["lost"],
        "rebalance_p99_s": rebalance["rebalance_p99_s"], "rebalance": rebalance,
        "runs": runs, "actions_run": actions,
    }


def start_workers(settings: Settings, roles: list[str], ready_timeout: float = 180) -> list[WorkerProcess]:
    """Worker processes of these roles, each with a metrics port of its own, started one after the other once the
    one before is ready: first joins at the same instant make the embedded tansu broker answer one of them
    InconsistentGroupProtocol, which aiokafka takes as fatal (the worker then never gets partitions)."""
    workers = []
    try:
        for role in roles:
            workers.append(WorkerProcess(replace(settings, metrics_port=free_port()), role).start())
            workers[-1].wait_ready(ready_timeout)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def warm_group(stack, catalogue: list[dict], watcher, probes: int = 16, timeout: float = 180) -> None:
    """Wait until the group has settled: probes on every partition readable (each worker has its share)."""
    items = unique_items(catalogue, f"warm-{time.time_ns()}", probes)
    upload_at_rate(stack.settings, items, float("inf"), watcher)
    if not watcher.wait_all(timeout):
        raise TimeoutError(f"the worker group did not serve {probes} probe items within {timeout:.0f}s")


def saturated_run(stack, workers: list[WorkerProcess], catalogue: list[dict], count: int, watcher, tag: str) -> dict:
    """Send `count` items at once; readable items/s, and the workers' and this client's CPU over the run."""
    import psutil

    processes = [psutil.Process(w.process.pid) for w in workers]
    client = psutil.Process()
    cpu_before = [_cpu_s(p) for p in processes]
    client_before, wall_before = _cpu_s(client), time.monotonic()
    items = unique_items(catalogue, f"sat-{tag}-{time.time_ns()}", count)
    upload_at_rate(stack.settings, items, float("inf"), watcher)
    drained = watcher.wait_all(timeout=120 + count / 5)
    wall = time.monotonic() - wall_before
    worker_cpu = sum(_cpu_s(p) - before for p, before in zip(processes, cpu_before))
    row = phase_row(None, items, watcher, drained)
    return {
        "workers": len(workers), "items": count, "items_per_s": row["sustained_per_s"], "p99_ms": row["p99_ms"],
        "worker_cores_busy": round(worker_cpu / wall, 2),
        "items_per_worker_core_s": round(row["arrived"] / worker_cpu, 1),
        "client_cpu_share": round((_cpu_s(client) - client_before) / wall / len(os.sched_getaffinity(0)), 3),
        "lost": count - row["arrived"],
    }


def saturated_actions_run(stack, workers: list[WorkerProcess], catalogue: list[dict], count: int, watcher,
                          users: int = 200) -> dict:
    """Send `count` actions at once (by `users` users, on items already readable); applied actions/s (until every
    user's served history covers them) and the workers' CPU per action."""
    import psutil

    warm = unique_items(catalogue, f"acted-sat-{time.time_ns()}", 30)
    upload_at_rate(stack.settings, warm, float("inf"), watcher)
    watcher.wait_all(60)
    user_ids = [f"sat-user-{time.time_ns()}-{n}" for n in range(users)]
    sent: dict[str, list[str]] = {u: [] for u in user_ids}
    processes = [psutil.Process(w.process.pid) for w in workers]
    cpu_before, start = [_cpu_s(p) for p in processes], time.monotonic()
    producer = new_producer(stack.settings)
    first = datetime.now(timezone.utc)
    for n in range(count):
        user = user_ids[n % users]
        item_id = warm[len(sent[user]) % len(warm)]["item_id"]
        send_action(producer, user, item_id, occurred_at=first + timedelta(milliseconds=n))
        sent[user].append(item_id)
    producer.flush()
    producer.close()
    served = served_history_lengths(stack, user_ids, sent, timeout=120 + count / 20)
    wall = time.monotonic() - start
    worker_cpu = sum(_cpu_s(p) - before for p, before in zip(processes, cpu_before))
    kept = stack.settings.user_history_length
    lost = sum(min(len(sent[u]), kept) - n for u, n in zip(user_ids, served))
    return {"actions": count, "users": users, "actions_per_s": round(count / wall, 1),
            "actions_per_worker_core_s": round(count / worker_cpu, 1), "lost": lost}


def _cpu_s(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class SteadyLoad(threading.Thread):
    """Uploads at `rate`/s (each told to `watcher`) and actions at `action_rate`/s by `users` users on `warm_ids`
    (items already readable, so no action waits for its item), each user's actions in event-time order.
    `actions[user]` is what each user sent, oldest first."""

    def __init__(self, settings: Settings, watcher, catalogue: list[dict], warm_ids: list[str], users: list[str],
                 rate: float, action_rate: float, tag: str):
        super().__init__(daemon=True)
        self.settings, self.watcher, self.catalogue = settings, watcher, catalogue
        self.warm_ids, self.users, self.rate, self.action_rate, self.tag = warm_ids, users, rate, action_rate, tag
        self.actions: dict[str, list[str]] = {u: [] for u in users}
        self.uploaded: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        producer = new_producer(self.settings)
        first_action_at = datetime.now(timezone.utc)
        start, uploads, actions = time.monotonic(), 0, 0
        try:
            while not self.stopping.is_set():
                elapsed = time.monotonic() - start
                while uploads < elapsed * self.rate:
                    item = {**self.catalogue[uploads % len(self.catalogue)], "item_id": f"{self.tag}-{uploads}"}
                    self.watcher.sent(item["item_id"], time.monotonic())
                    send_item(producer, item_event(item))
                    self.uploaded.append(item["item_id"])
                    uploads += 1
                while actions < elapsed * self.action_rate:
                    user = self.users[actions % len(self.users)]
                    item_id = self.warm_ids[len(self.actions[user]) % len(self.warm_ids)]
                    send_action(producer, user, item_id, occurred_at=first_action_at + timedelta(milliseconds=actions))
                    self.actions[user].append(item_id)
                    actions += 1
                producer.flush()
                time.sleep(0.02)
        finally:
            producer.flush()
            producer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def rebalance_pauses(watcher, changes: list[tuple[str, float]]) -> tuple[list[dict], float | None]:
    """Per membership change (name, monotonic time): the longest upload → readable wait of the uploads sent from
    BEFORE_S before it to WINDOW_S after (the pause it caused); and the p99 wait over all those uploads, seconds."""
    rows, waits = [], []
    with watcher.lock:
        sent = dict(watcher.sent_at)
        readable = dict(watcher.readable_at)
    for name, at in changes:
        ids = [i for i, s in sent.items() if at - BEFORE_S <= s <= at + WINDOW_S and i in readable]
        latencies = [readable[i] - sent[i] for i in ids]
        waits += latencies
        rows.append({"change": name, "uploads": len(ids),
                     "pause_s": round(max(latencies), 2) if latencies else None})
    return rows, round(float(np.percentile(waits, 99)), 2) if waits else None


def rebalance_run(stack, workers: list[WorkerProcess], catalogue: list[dict], watcher, rate: float,
                  step_seconds: float) -> dict:
    """Under steady uploads and actions: SIGKILL a worker, start another, stop one gracefully; what waited, what
    was lost (uploads never readable; actions missing from their user's served history)."""
    from coldstart.store import read_item_features

    warm = unique_items(catalogue, f"acted-{time.time_ns()}", 30)
    upload_at_rate(stack.settings, warm, float("inf"), watcher)
    watcher.wait_all(60)
    # Enough users that none acts more often than the history keeps, so a lost action shows in its length.
    users = [f"scale-user-{time.time_ns()}-{n}" for n in range(40)]
    load = SteadyLoad(stack.settings, watcher, catalogue, [i["item_id"] for i in warm], users, rate, rate,
                      f"steady-{time.time_ns()}")
    changes = []
    load.start()
    time.sleep(step_seconds)
    changes.append(("sigkill", time.monotonic()))
    workers[0].kill()
    time.sleep(step_seconds)
    changes.append(("join", time.monotonic()))
    workers[0] = WorkerProcess(workers[0].settings).start()  # on the killed one's metrics port, free again
    time.sleep(step_seconds)
    changes.append(("graceful_leave", time.monotonic()))
    workers[1].stop()
    time.sleep(step_seconds)
    load.stop()
    drained = watcher.wait_all(timeout=120)
    lost_uploads = len(load.uploaded) - len(read_item_features(stack.store, load.uploaded, features=("model_version",)))
    kept = stack.settings.user_history_length
    lost_actions = sum(min(len(load.actions[u]), kept) - served
                       for u, served in zip(users, served_history_lengths(stack, users, load.actions)))
    rows, p99 = rebalance_pauses(watcher, changes)
    return {"uploads": len(load.uploaded), "actions": sum(map(len, load.actions.values())), "drained": drained,
            "lost": lost_uploads + lost_actions, "lost_uploads": lost_uploads, "lost_actions": lost_actions,
            "changes": rows, "rebalance_p99_s": p99}


def served_history_lengths(stack, users: list[str], actions: dict[str, list[str]], timeout: float = 120) -> list[int]:
    """Each user's served history length, once it covers every action sent (or at the timeout)."""
    want = [min(len(actions[u]), stack.settings.user_history_length) for u in users]
    deadline = time.monotonic() + timeout
    while True:
        lengths = stack.store.get_online_features(
            features=["user_embedding:history_length"], entity_rows=[{"user_id": u} for u in users]
        ).to_dict()["history_length"]
        lengths = [n or 0 for n in lengths]
        if lengths == want or time.monotonic() > deadline:
            return lengths
        time.sleep(0.5)
