"""`coldstart bench rollout`: promote a model version under live upload and action traffic.

On a fresh stack (broker, Redis, worker, `coldstart serve`) with a registry of
its own: two versions of the same towers (COLDSTART_TOWERS_DIR's if exported,
else untrained towers of the default config: speed does not depend on
training) — A with the int8 encoder the worker runs, B with the fp32 one (so
its rollout re-encodes every item). The catalogue is either MovieLens-100K
(1,682 films uploaded through Kafka, the last --history clicks of each of the
943 users replayed) or --items N synthetic items (and --users synthetic users)
written straight into the service's Feast project (Kafka at ~70 items/s would
take longer than the benchmark).

While uploads and clicks flow (--rate uploads/s, each with a click on it and
one on a known item) and a reader thread asks the server for lookups and
retrievals in a loop: promote A (towers only), promote B (encoder and towers),
roll back to A (the standby: one compare-and-set). Figures: backfill items/s
and users/s, switch_s = promote called → first lookup answered by the new
version (retrieval_switch_s: first retrieval), rollback_s likewise; mixed_version_responses = answers whose vectors
are not all of the version they name (lookups: the user's and the items'
dimensions disagree; retrievals: the index's model_version is not that
version's); lost_events = uploads and clicks not in the active version's
project once the traffic stopped (after a wait for the worker to catch up).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from coldstart import rollout
from coldstart import store as feast_store
from coldstart.config import ITEM_PUSH_SOURCE, USER_PUSH_SOURCE, USER_VIEW, Settings
from coldstart.dev.bench.common import emit, machine
from coldstart.dev.load import item_event, new_producer, send_action, send_item
from coldstart.dev.stack import FeatureServerProcess, fresh_stack
from encoders import versions
from encoders.export_format import TOWERS_METADATA, read_encoder_metadata

log = logging.getLogger(__name__)


@click.command("rollout")
@click.option("--items", "count", type=int, default=0,
              help="Synthetic items written straight into the store (0: the MovieLens-100K films, through Kafka).")
@click.option("--users", type=int, default=10_000, show_default=True, help="Synthetic users (with --items).")
@click.option("--history", type=int, default=20, show_default=True, help="Clicks per user (the last N).")
@click.option("--rate", type=float, default=5.0, show_default=True, help="Live uploads per second during rollouts.")
@click.option("--page", type=int, default=500, show_default=True, help="The backfill's page (entities per step).")
@click.option("--reencode/--no-reencode", default=True, show_default=True,
              help="Also promote the fp32-encoder version (every item re-encoded: ~100 items/s on 2 cores).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object on the last line.")
@click.pass_obj
def rollout_bench(settings: Settings, count: int, users: int, history: int, rate: float, page: int, reencode: bool,
                  as_json: bool) -> None:
    """Promote a model version under live uploads, clicks, lookups and retrievals: backfill items/s (towers
    only, with the encoder), users/s, promote → switched reads, rollback, mixed answers and lost events."""
    summary = run_rollout_bench(settings, count, users, history, rate, page, reencode)
    emit([{k: v for k, v in summary.items() if not isinstance(v, (dict, list))}], summary, as_json)


def run_rollout_bench(settings: Settings, count: int, users: int, history: int, rate: float, page: int,
                      reencode: bool) -> dict:
    import psutil

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    client_process = psutil.Process()
    cpu_before, started = sum(client_process.cpu_times()[:2]), time.monotonic()
    films = None if count else _films(settings.data_dir / "datasets" / "ml-100k", history)  # the project's data
    with tempfile.TemporaryDirectory(prefix="coldstart-registry-") as registry, \
            fresh_stack(replace(settings, registry_path=registry), "bench_rollout") as stack:
        settings = stack.settings
        a, b = _versions(settings, Path(registry))
        histories = _seed_synthetic(stack, count, users, history) if count else _seed_films(stack, *films)
        expected = {name: item_model_version(settings, name) for name in (rollout.DEFAULT, a, b)}
        with FeatureServerProcess(settings) as server:
            server.wait_ready(timeout=600)
            with LiveTraffic(settings, server.url, histories, rate, expected) as traffic:
                time.sleep(3)
                towers_only, switch_s = _timed_promote(settings, traffic, a, page)
                with_encoder = _timed_promote(settings, traffic, b, page)[0] if reencode else None
                rollback, rollback_s = _timed_promote(settings, traffic, None, page)
                time.sleep(2)
            lost = traffic.lost(feast_store.open_store(rollout.version_settings(settings, rollback.target)))
    seconds = time.monotonic() - started
    return {
        "benchmark": "rollout", "machine": machine(), "catalogue": f"{count} synthetic" if count else "ml-100k",
        "load_average_at_start": load_at_start, "load_average": [round(x, 2) for x in os.getloadavg()],
        "client_cpu_cores": round((sum(client_process.cpu_times()[:2]) - cpu_before) / seconds, 2),
        "items": towers_only.items, "users": towers_only.users,
        "backfill_items_per_s": round(towers_only.items_per_s, 1),
        "backfill_items_per_s_with_encoder": round(with_encoder.items_per_s, 1) if with_encoder else None,
        "users_per_s": round(towers_only.users_per_s, 1),
        "users_per_s_with_encoder": round(with_encoder.users_per_s, 1) if with_encoder else None,
        "switch_s": switch_s["lookup"], "retrieval_switch_s": switch_s["retrieve"],
        "switch_cas_ms": round(towers_only.switch_seconds * 1000, 2),
        "rollback_s": rollback_s["lookup"], "retrieval_rollback_s": rollback_s["retrieve"],
        "rollback_instant": rollback.instant,
        "mixed_version_responses": len(traffic.mixed), "responses": len(traffic.responses),
        "responses_by_version": {v: sum(1 for r in traffic.responses if r == v) for v in set(traffic.responses)},
        "live_uploads": len(traffic.uploaded), "live_clicks": traffic.clicks, "lost_events": lost,
        "texts_from_store": with_encoder.texts_from_store if with_encoder else None, "seconds": round(seconds, 1),
    }


def _timed_promote(settings: Settings, traffic: "LiveTraffic", target: str | None, page: int):
    """promote(target), or a rollback for None; returns its report and the seconds from the call to the first
    lookup and retrieval the server answered with the new version."""
    from streams.rollout import promote, rollback

    called = time.monotonic()
    report = promote(settings, target, page=page) if target else rollback(settings, page=page)
    return report, {route: round(traffic.first_answer_of(report.target, called, route) - called, 3)
                    for route in ("lookup", "retrieve")}


def _versions(settings: Settings, registry: Path) -> tuple[str, str]:
    """A (the int8 encoder) and B (fp32) of the same towers."""
    towers_dir = settings.towers_dir
    if not (towers_dir / TOWERS_METADATA).exists():
        towers_dir = _untrained_towers(settings, registry.parent / f"{registry.name}-towers")
    names = []
    for precision in ("int8", "fp32"):
        version, _ = versions.register(registry, towers_dir, settings.encoder_export_dir, precision, None)
        names.append(version.name)
    return names[0], names[1]


def _untrained_towers(settings: Settings, out_dir: Path) -> Path:
    import torch

    from encoders.training.export_towers import export_towers
    from encoders.training.model import LEARN, LEARNConfig

    dim = read_encoder_metadata(settings.encoder_export_dir)["dim"]
    torch.manual_seed(0)
    model = LEARN(LEARNConfig(content_dim=dim), torch.nn.functional.normalize(torch.randn(16, dim), dim=1))
    return export_towers(model, out_dir, settings.encoder_name, "bench-untrained", "loo", item_ids=[])


def item_model_version(settings: Settings, name: str) -> str:
    """The model_version a version's item vectors carry (encoder + towers)."""
    served = rollout.version_settings(settings, name)
    encoder = read_encoder_metadata(served.encoder_export_dir)["versions"][served.encoder_precision]
    path = served.towers_dir / TOWERS_METADATA
    towers = json.loads(path.read_text())["version"] if path.exists() else "content-mean"
    return f"{encoder}+{towers}"


# ---- seeding -------------------------------------------------------------------------------------


def _films(folder: Path, history: int) -> tuple[list[dict], dict[str, list[str]]]:
    """MovieLens-100K's films as uploads, and each user's last `history` films."""
    from encoders.training.datasets import fetch_ml100k, load_ml100k, ml100k_films

    films = ml100k_films(fetch_ml100k(folder))
    data = load_ml100k(folder)
    return films, {f"ml-{user_id}": [data.item_ids[i] for i in sequence[-history:]]
                   for user_id, sequence in zip(data.user_ids, data.sequences)}


def _seed_films(stack, films: list[dict], histories: dict[str, list[str]]) -> dict[str, list[str]]:
    """The films uploaded through Kafka, then the histories as clicks."""
    producer = new_producer(stack.settings)
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    for film in films:
        send_item(producer, item_event(film, start))
    producer.flush()
    _wait_count(stack.store, "item_id", len(films) + 1, "films uploaded")  # and the stack's probe item
    for user_id, liked in histories.items():
        for k, item_id in enumerate(liked):
            send_action(producer, user_id, item_id, occurred_at=start + timedelta(seconds=k))
    producer.flush()
    producer.close()
    _wait_count(stack.store, "user_id", len(histories), "users replayed")
    return histories


def _seed_synthetic(stack, count: int, users: int, history: int) -> dict[str, list[str]]:
    """count items (random unit content embeddings) and users (random histories) pushed into the store."""
    from encoders.towers import load_towers

    settings = stack.settings
    towers = load_towers(settings.towers_dir, settings.encoder_name, settings.onnx_session_threads)
    dim = read_encoder_metadata(settings.encoder_export_dir)["dim"]
    stamp = item_model_version(settings, rollout.DEFAULT)
    rng = np.random.default_rng(0)
    ids = [f"synthetic-{n}" for n in range(count)]
    now = datetime.now(timezone.utc) - timedelta(hours=1)
    for start in tqdm(range(0, count, 2000), desc="synthetic items", unit="page"):
        page = ids[start : start + 2000]
        content = rng.normal(size=(len(page), dim)).astype(np.float32)
        content /= np.linalg.norm(content, axis=1, keepdims=True)
        frame = feast_store.item_embedding_frame(page, towers.item_vectors(content, page), content,
                                                 [f"Synthetic item {i}" for i in page], ["synthetic"] * len(page),
                                                 stamp, [now] * len(page))
        feast_store.push_online(stack.store, ITEM_PUSH_SOURCE, frame)
    histories = {f"synthetic-user-{u}": [ids[i] for i in rng.integers(0, count, size=history)] for u in range(users)}
    user_ids = list(histories)
    for start in tqdm(range(0, users, 1000), desc="synthetic users", unit="page"):
        page = user_ids[start : start + 1000]
        content = _content(stack.store, {i for u in page for i in histories[u]})
        vectors = towers.user_vectors([np.stack([content[i] for i in histories[u]]) for u in page],
                                      [histories[u] for u in page])
        frame = feast_store.user_embedding_frame(page, vectors, [history] * len(page), [histories[u] for u in page],
                                                 towers.version, [now] * len(page))
        feast_store.push_online(stack.store, USER_PUSH_SOURCE, frame)
    # The worker's user histories (faust table) know nothing of these users: live traffic clicks as users of
    # its own, each starting with three clicks sent through Kafka (what the lost-events check expects them to hold).
    live = {f"live-user-{u}": [ids[i] for i in rng.integers(0, count, size=3)] for u in range(20)}
    producer = new_producer(settings)
    for user_id, liked in live.items():
        for k, item_id in enumerate(liked):
            send_action(producer, user_id, item_id, occurred_at=now + timedelta(seconds=k))
    producer.flush()
    producer.close()
    return live


def _content(store, item_ids: set[str]) -> dict[str, np.ndarray]:
    ids = sorted(item_ids)
    rows = feast_store.read_raw(store, "item_embedding", "item_id", ids, ("content_embedding",))
    return {i: r.value("content_embedding") for i, r in zip(ids, rows)}


def _wait_count(store, join_key: str, wanted: int, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with tqdm(total=wanted, desc=what) as bar:
        while time.monotonic() < deadline:
            found, cursor = set(), 0
            while True:
                cursor, ids = feast_store.scan_entity_ids(store, join_key, cursor, 2000)
                found.update(ids)
                if cursor == 0:
                    break
            bar.update(len(found) - bar.n)
            if len(found) >= wanted:
                return
            time.sleep(1)
    raise TimeoutError(f"{what}: {bar.n} of {wanted} after {timeout:.0f}s")


# ---- live traffic ----------------------------------------------------------------------------------


class LiveTraffic:
    """Uploads (each with a click on it and one on a known item) at `rate`/s, and a reader asking the server
    for lookups and retrievals, checking each answer holds the vectors of one version: the one it names."""

    def __init__(self, settings: Settings, url: str, histories: dict[str, list[str]], rate: float,
                 expected: dict[str, str] | None = None):
        self.settings, self.url, self.rate = settings, url, rate
        self.histories = {u: list(h) for u, h in histories.items()}
        self.expected = expected or {}  # version → the model_version its item vectors carry
        self.uploaded: list[str] = []
        self.clicks = 0
        self.responses: list[str] = []  # the version of each answer
        self.answered_at: list[tuple[float, str, str]] = []  # (when, route, version)
        self.mixed: list[dict] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        # Lookups and retrievals in threads of their own: a retrieval waits while the server's index takes in
        # a backfill's records, a lookup does not.
        self.threads = [threading.Thread(target=self._write, daemon=True),
                        threading.Thread(target=self._read, args=("lookup",), daemon=True),
                        threading.Thread(target=self._read, args=("retrieve",), daemon=True)]

    def __enter__(self) -> "LiveTraffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def first_answer_of(self, version: str, after: float, route: str, timeout: float = 900) -> float:
        """When a reader first got an answer of `route` from `version` after `after` (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [at for at, r, v in self.answered_at if r == route and v == version and at >= after]
            if found:
                return found[0]
            time.sleep(0.01)
        raise TimeoutError(f"no {route} answer from {version} within {timeout:.0f}s")

    def _write(self) -> None:
        users = list(self.histories)
        producer = new_producer(self.settings)
        n = 0
        started = time.monotonic()
        while not self.stopping.is_set():
            item_id = f"live-{uuid.uuid4().hex[:10]}"
            user_id = users[n % len(users)]
            send_item(producer, item_event({"item_id": item_id, "title": f"Live item {n} about the sea",
                                            "category": "live"}))
            known = self.histories[user_id][n % 3]
            send_action(producer, user_id, known)  # a known item
            send_action(producer, user_id, item_id)  # the new one (it may arrive before its upload)
            producer.flush()
            with self.lock:
                self.uploaded.append(item_id)
                # Both clicks, in the order sent: the worker's history (and so the check's window) holds both.
                self.histories[user_id] += [known, item_id]
                self.clicks += 2
            n += 1
            time.sleep(max(0.0, started + n / self.rate - time.monotonic()))
        producer.close()

    def _read(self, route: str) -> None:
        users = list(self.histories)
        n = 0
        while not self.stopping.is_set():
            user_id = users[n % len(users)]
            n += 1
            if route == "lookup":
                with self.lock:
                    candidates = self.histories[user_id][:5]
                lookup = post_json(self.url, "/ranking-features", {"user_id": user_id, "item_ids": candidates})
                if lookup is not None and lookup["user_embedding"] is not None:  # None: no vector yet
                    dims = {len(i["item_embedding"]) for i in lookup["items"] if i["item_embedding"] is not None}
                    dims.add(len(lookup["user_embedding"]))
                    self._answer(route, lookup["version"], lookup if len(dims) != 1 else None)
            else:
                found = post_json(self.url, "/retrieve", {"user_id": user_id, "k": 10})
                if found is not None:
                    wrong = self.expected and self.expected.get(found["version"]) != found["model_version"]
                    self._answer(route, found["version"], found if wrong else None)
            time.sleep(0.01)

    def _answer(self, route: str, version: str, mixed: dict | None) -> None:
        with self.lock:
            self.responses.append(version)
            self.answered_at.append((time.monotonic(), route, version))
            if mixed is not None:
                self.mixed.append(mixed)

    def lost(self, store, timeout: float = 120) -> int:
        """Uploads not readable, and clicks not in their user's history, in this store once the worker caught up."""
        deadline = time.monotonic() + timeout
        view = feast_store.stored_view(store, USER_VIEW, ["seen_item_ids"])
        while True:
            missing_items = len(self.uploaded) - len(feast_store.read_item_features(store, self.uploaded))
            seen = feast_store.online_read(store, view, list(self.histories))["seen_item_ids"]
            missing_clicks = sum(len(set(h[-self.settings.user_history_length :]) - set(s or ()))
                                 for h, s in zip(self.histories.values(), seen))
            if missing_items + missing_clicks == 0 or time.monotonic() > deadline:
                if missing_items + missing_clicks:
                    log.warning("lost in %s: %d uploads, %d clicks (%s)", store.config.project, missing_items,
                                missing_clicks, {u: sorted(set(h[-self.settings.user_history_length :]) - set(s or ()))
                                                 for u, h, s in zip(self.histories, self.histories.values(), seen)
                                                 if set(h[-self.settings.user_history_length :]) - set(s or ())})
                return missing_items + missing_clicks
            time.sleep(1)


def post_json(url: str, path: str, body: dict, timeout: float = 30) -> dict | None:
    """The JSON answer, or None for a 404/503 (a user or index not there yet) or no answer in time (a reader
    keeps reading: a server busy taking in a backfill's records can be slow)."""
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        if err.code in (404, 503):
            return None
        raise
    except OSError:  # a timeout, a dropped connection
        return None
