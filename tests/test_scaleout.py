"""Several workers in one consumer group, and what an operator sees: metrics, health and readiness.

Three `coldstart worker` processes share the embedded broker's group under
steady uploads and actions; one is SIGKILLed, another starts, one stops
gracefully. (They all run both agents: tansu 0.6 refuses a member whose
subscriptions differ from the group's with InconsistentGroupProtocol, so the
item and user roles in one group need Apache Kafka; README, "Operating".) Nothing may be lost and every user's
history must come out whole; the pause each change causes is measured and
printed (the figures go in BENCHMARKS.md through `coldstart bench scale`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coldstart.dev.bench.common import unique_items
from coldstart.dev.bench.scale import (
    SteadyLoad,
    rebalance_pauses,
    served_history_lengths,
    start_workers,
    warm_group,
)
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import item_event, new_producer, send_action, send_item, upload_at_rate
from coldstart.dev.services import LocalRedis
from coldstart.dev.stack import FeatureServerProcess, LocalStack, WorkerProcess
from coldstart.dev.watchers import ReadabilityWatcher
from tests.conftest import SETTINGS, unique_id, wait_readable
from tests.test_reliability import expected_user_vector, wait_until
from tests.test_users import user_vector

pytestmark = pytest.mark.scaleout

ROLES = ["all", "all", "all"]


class Group:
    """A stack without a worker of its own, a redis-server of its own (the metrics test stops it), and workers."""

    def __init__(self, stack: LocalStack, redis: LocalRedis, workers: list[WorkerProcess]):
        self.stack, self.redis, self.workers = stack, redis, workers

    def replace(self, old: WorkerProcess, new: WorkerProcess) -> None:
        self.workers[self.workers.index(old)] = new


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    settings = replace(
        SETTINGS, data_dir=tmp_path_factory.mktemp("coldstart-scaleout"), feast_project="coldstart_scaleout",
        offline_flush_seconds=1.0, workers_per_host=len(ROLES), topic_partitions=6,  # two each
        unknown_item_wait_seconds=120,  # longer than any pause here: no action may give up on its item
    )
    with LocalRedis() as redis, LocalStack(replace(settings, redis_url=redis.url), worker=False) as stack:
        workers = start_workers(stack.settings, ROLES)
        group = Group(stack, redis, workers)
        try:
            watcher = ReadabilityWatcher(stack.store)
            watcher.start()
            warm_group(stack, load_catalogue(), watcher)
            watcher.stopping.set()
            yield group
        finally:
            for worker in group.workers:
                worker.stop()


def test_three_workers_lose_nothing_when_one_is_killed_one_joins_and_one_leaves(group, record_property):
    stack, catalogue = group.stack, load_catalogue()
    watcher = ReadabilityWatcher(stack.store, poll_interval=0.05)
    watcher.start()
    acted_on = unique_items(catalogue, unique_id("acted"), 30)
    upload_at_rate(stack.settings, acted_on, float("inf"), watcher)
    assert watcher.wait_all(60)
    users = [unique_id("group-user") for _ in range(30)]
    load = SteadyLoad(stack.settings, watcher, catalogue, [i["item_id"] for i in acted_on], users,
                      rate=5, action_rate=10, tag=unique_id("steady"))
    changes = []
    load.start()
    try:
        time.sleep(8)
        killed = next(w for w in group.workers if held_partitions(w))  # one with work to lose
        changes.append(("sigkill", time.monotonic()))
        killed.kill()  # its partitions wait out the session timeout, then go to the others
        time.sleep(10)
        changes.append(("join", time.monotonic()))
        joined = WorkerProcess(killed.settings, "all").start()
        group.replace(killed, joined)
        joined.wait_ready()
        time.sleep(6)
        leaving = next(w for w in group.workers if w is not joined and held_partitions(w))
        changes.append(("graceful_leave", time.monotonic()))
        leaving.stop()  # leaves the group at once: its partitions move to the other two
        group.workers.remove(leaving)
        time.sleep(8)
    finally:
        load.stop()

    # Nothing lost: every upload readable (within the drain timeout), online and on item-embeddings' heels.
    wait_readable(stack.store, load.uploaded, timeout=120)
    # Every user's history whole, in event-time order: each action exactly once, none lost to the kill,
    # none doubled by the redelivery of what the killed worker had not committed.
    users_sent = list(load.actions)
    served = dict(zip(users_sent, served_history_lengths(stack, users_sent, load.actions)))
    short = {u: (len(load.actions[u]), served[u], partition_of(u, stack.settings.topic_partitions))
             for u in users_sent if served[u] != len(load.actions[u])}
    wall = {name: time.strftime("%H:%M:%S", time.localtime(time.time() - time.monotonic() + at)) for name, at in changes}
    assert not short, f"(sent, served, partition) of {len(short)} users: {short}; changes at {wall}"
    for user_id, item_ids in load.actions.items():
        got = user_vector(stack, user_id, min_history=len(item_ids), timeout=10)
        assert got["history_length"] == len(item_ids), user_id
        assert float(np.dot(got["user_embedding"], expected_user_vector(stack, item_ids))) > 0.9999, user_id
    watcher.stopping.set()
    pauses, p99 = rebalance_pauses(watcher, changes)
    print(f"\nrebalance pauses (longest upload → readable around each change): {pauses}; p99 {p99} s")
    record_property("rebalance_pauses", json.dumps(pauses))
    assert all(row["uploads"] > 0 and row["pause_s"] is not None for row in pauses), pauses
    # The group recovers on its own: a SIGKILL is noticed after the 6 s session timeout (dev profile).
    assert max(row["pause_s"] for row in pauses) < 60, pauses
    assert len(group.workers) == 2 and all(w.alive() for w in group.workers)


# ---- metrics, health, readiness ------------------------------------------------------------------------------

def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics → {(sample name, sorted labels): value}."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def partition_of(key: str, partitions: int) -> int:
    """The partition a Kafka client's default partitioner (murmur2) puts this key on."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def held_partitions(worker: WorkerProcess) -> set[str]:
    """The input partitions the worker holds, as its consumer-lag series say (updated every 5 s)."""
    return {dict(labels)["topic"] + "/" + dict(labels)["partition"]
            for name, labels in scrape(worker.metrics_url) if name == "coldstart_consumer_lag"}


def total(samples: dict, name: str, **labels) -> float:
    """The sum of a sample over the series whose labels include these."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def group_total(group: Group, name: str, **labels) -> float:
    return sum(total(scrape(w.metrics_url), name, **labels) for w in group.workers)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_worker_metrics_move_with_traffic(group):
    stack = group.stack
    for worker in group.workers:
        status, checks = get_json(f"{worker.metrics_url}/ready")
        assert status == 200 and all(checks.values()), (worker.role, checks)
        assert get_json(f"{worker.metrics_url}/health")[0] == 200
        served = scrape(worker.metrics_url)
        roles = {dict(labels)["role"] for name, labels in served if name == "coldstart_model"}
        assert roles == ({"items", "users"} if worker.role == "all" else {worker.role}), roles
        assert all(dict(labels)["provider"] for name, labels in served if name == "coldstart_model")

    counted = ("coldstart_upload_to_online_seconds_count", "coldstart_action_to_user_vector_seconds_count",
               "coldstart_encoder_seconds_count")
    before = {name: group_total(group, name) for name in counted}
    batches_before = group_total(group, "coldstart_micro_batch_events_count", agent="items")
    towers_before = group_total(group, "coldstart_tower_seconds_count", tower="user")
    dead_before = group_total(group, "coldstart_dead_letters_total", topic="item-uploads", reason="invalid_json")

    items = [{"item_id": unique_id("metered"), "title": f"Metered item {n} about sailing"} for n in range(10)]
    user_id = unique_id("metered-user")
    producer = new_producer(stack.settings)
    try:
        for item in items:
            send_item(producer, item_event(item))
        producer.send("item-uploads", key=b"broken", value=b"{not json")
        producer.flush()
        wait_readable(stack.store, [i["item_id"] for i in items], timeout=60)
        for item in items:
            send_action(producer, user_id, item["item_id"])
        producer.flush()
    finally:
        producer.close()
    user_vector(stack, user_id, min_history=len(items), timeout=60)

    def moved():
        return (group_total(group, "coldstart_upload_to_online_seconds_count") >= before[counted[0]] + len(items)
                and group_total(group, "coldstart_action_to_user_vector_seconds_count") >= before[counted[1]] + len(items)
                and group_total(group, "coldstart_encoder_seconds_count") > before[counted[2]]
                and group_total(group, "coldstart_micro_batch_events_count", agent="items") > batches_before
                and group_total(group, "coldstart_tower_seconds_count", tower="user") > towers_before
                and group_total(group, "coldstart_dead_letters_total", topic="item-uploads",
                                reason="invalid_json") == dead_before + 1)

    wait_until(moved, 30, "metrics moving with the traffic")
    # Lag per partition: every input partition is held by some worker, and each reports its own.
    held = set().union(*(held_partitions(w) for w in group.workers))
    assert any(h.startswith("item-uploads/") for h in held) and any(h.startswith("user-actions/") for h in held), held


def test_online_write_retries_and_readiness_follow_a_redis_outage(group):
    worker = next(w for w in group.workers if w.role in ("items", "all"))
    retries_before = total(scrape(worker.metrics_url), "coldstart_write_retries_total", write="online write")
    group.redis.stop()
    try:
        status, checks = get_json(f"{worker.metrics_url}/ready")
        assert status == 503 and checks["online_store_reachable"] is False, checks
        item = {"item_id": unique_id("during-outage"), "title": "Written once Redis is back"}
        producer = new_producer(group.stack.settings)
        send_item(producer, item_event(item))
        producer.flush()
        producer.close()
        wait_until(lambda: group_total(group, "coldstart_write_retries_total", write="online write") > retries_before,
                   60, "an online-write retry counted")
    finally:
        group.redis.start()
    wait_readable(group.stack.store, [item["item_id"]], timeout=90)
    assert get_json(f"{worker.metrics_url}/ready")[0] == 200


def test_http_server_metrics_and_readiness(group):
    stack = group.stack
    with FeatureServerProcess(stack.settings) as server:
        server.wait_ready()
        status, readiness = get_json(f"{server.url}/ready")
        assert status == 200 and readiness["online_store_reachable"] is True, readiness
        before = total(scrape(server.url), "coldstart_http_request_seconds_count", route="/retrieve")
        request = urllib.request.Request(f"{server.url}/retrieve", json.dumps({"user_id": "nobody-at-all"}).encode(),
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(request, timeout=10)
        assert unknown.value.code == 404
        samples = scrape(server.url)
        assert total(samples, "coldstart_http_request_seconds_count", route="/retrieve", status="404") == before + 1
        assert total(samples, "coldstart_index_items") >= 1  # the items uploaded by the tests above




def test_dashboard_and_scrape_config_name_what_the_service_exports():
    import re

    import yaml
    from prometheus_client import REGISTRY

    from coldstart import metrics  # noqa: F401  (registers the metrics)
    from coldstart.config import PROJECT_ROOT

    exported = {sample_name for family in REGISTRY.collect() if family.name.startswith("coldstart_")
                for sample_name in (family.name, f"{family.name}_total", f"{family.name}_bucket",
                                    f"{family.name}_count", f"{family.name}_sum")}
    dashboard = json.loads((PROJECT_ROOT / "docs/monitoring/grafana/dashboards/coldstart.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"coldstart_[a-z_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    assert all(word in titles for word in ("freshness", "lag", "dead letters")), titles

    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    scrape = yaml.safe_load((PROJECT_ROOT / "docs/monitoring/prometheus.yml").read_text())
    worker_port = int(compose["x-coldstart-env"]["COLDSTART_METRICS_PORT"])
    sd_jobs = {c["job_name"]: c["dns_sd_configs"][0] for c in scrape["scrape_configs"] if "dns_sd_configs" in c}
    assert {sd["names"][0] for sd in sd_jobs.values()} == {"item-worker", "user-worker"} <= set(compose["services"])
    assert all(sd["port"] == worker_port for sd in sd_jobs.values())
