"""Model versions through the real broker, worker, Redis, Feast and HTTP server: train on the service's own
topics, promote under live upload and action traffic, roll back, abort, clean up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from coldstart import rollout
from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, USER_VIEW
from coldstart.dev.bench.rollout import LiveTraffic, item_model_version, post_json
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.load import item_event, send_action, send_item
from coldstart.dev.stack import FeatureServerProcess, LocalStack
from encoders import versions
from tests.conftest import SETTINGS, stack_producer, unique_id, wait_readable
from tests.test_own_data import run_coldstart


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("rollout")
    settings = replace(SETTINGS, data_dir=root / "data", redis_url=redis_url, feast_project="coldstart_rollout",
                       offline_flush_seconds=1.0, registry_path=str(root / "registry"))
    with LocalStack(settings) as running:
        running.wait_until_serving()
        yield running


@pytest.fixture(scope="module")
def seeded(stack):
    """24 items and 10 users with 5 clicks each, through Kafka; returns {user: [item, …]}."""
    items = [{**item, "item_id": unique_id("film")} for item in load_catalogue()[:24]]
    histories = {unique_id("viewer"): [items[(u + 3 * k) % len(items)]["item_id"] for k in range(5)]
                 for u in range(10)}
    with stack_producer(stack) as producer:
        for item in items:
            send_item(producer, item_event(item))
        producer.flush()
        wait_readable(stack.store, [i["item_id"] for i in items], timeout=120)
        for user_id, liked in histories.items():
            for item_id in liked:
                send_action(producer, user_id, item_id)
        producer.flush()
    wait_users(stack.store, histories)
    return histories


@pytest.fixture(scope="module")
def trained(stack, seeded, tmp_path_factory):
    """Towers of the smoke config trained on data exported from the service's own topics, registered twice:
    with the int8 encoder the workers run (A) and with the fp32 one (B: another encoder, so re-encoded)."""
    root = tmp_path_factory.mktemp("trained")
    env = {**stack.settings.as_env(), "COLDSTART_DATA_DIR": str(root / "data")}
    steps = [("data", "export", "--from", "topics", "--out", str(root / "own"), "--idle-seconds", "1"),
             ("train", "--data", str(root / "own"), "--config", "learn-minilm-smoke", "--protocol", "loo"),
             ("export-towers", "--data", str(root / "own"), "--config", "learn-minilm-smoke", "--out",
              str(root / "towers"))]
    for step in steps:
        done = run_coldstart(*step, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "model version learn-minilm-smoke@" in done.stdout and "registered" in done.stdout
    done = run_coldstart("model", "register", "--towers", str(root / "towers"),
                         env={**env, "COLDSTART_ENCODER_PRECISION": "fp32"})
    assert done.returncode == 0, done.stderr[-3000:]
    (a, b) = versions.list_versions(stack.settings.registry_dir)
    assert a.encoder_precision == "int8" and b.encoder_precision == "fp32" and a.metadata["data_digest"]
    return a.name, b.name


def wait_users(store, histories: dict[str, list[str]], timeout: float = 60) -> None:
    """Until every user's stored history holds the items they acted on."""
    deadline = time.monotonic() + timeout
    view = feast_store.stored_view(store, USER_VIEW, ["seen_item_ids"])
    while time.monotonic() < deadline:
        seen = feast_store.online_read(store, view, list(histories))["seen_item_ids"]
        if all(s is not None and set(h) <= set(s) for h, s in zip(histories.values(), seen)):
            return
        time.sleep(0.2)
    raise AssertionError(f"user histories incomplete after {timeout}s")


def project_store(stack, version: str):
    return feast_store.open_store(rollout.version_settings(stack.settings, version))


def stamps(store, view: str, join_key: str, ids: list[str]) -> list:
    return feast_store.online_read(store, feast_store.stored_view(store, view, ["model_version"]), ids)["model_version"]


def test_promote_under_traffic_switches_every_vector_at_once_then_rollback_and_cleanup(stack, seeded, trained):
    a, b = trained
    client = rollout.redis_client(stack.settings)
    expected = {name: item_model_version(stack.settings, name) for name in (rollout.DEFAULT, a, b)}
    with FeatureServerProcess(stack.settings) as server:
        server.wait_ready()
        with LiveTraffic(stack.settings, server.url, seeded, rate=4, expected=expected) as traffic:
            time.sleep(2)
            done = run_coldstart("model", "promote", a, "--page", "7", "--json", env=stack.settings.as_env(),
                                 timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
            report = json.loads(done.stdout.strip().splitlines()[-1])
            time.sleep(2)
        assert rollout.read_state(client, stack.settings).active == a
        assert report["items"] >= 24 and report["users"] == 10 and not report["reencoded"]
        assert traffic.mixed == [] and set(traffic.responses) == {"default", a}
        for route in ("lookup", "retrieve"):  # each reader's requests are sequential: once switched, always
            seen = [version for _, r, version in traffic.answered_at if r == route]
            assert seen[0] == "default" and set(seen[seen.index(a):]) == {a}, f"a {route} went back after the switch"

        # Afterwards every item and user vector in the new version's project is of the new version; nothing lost.
        store = project_store(stack, a)
        version = versions.load(stack.settings.registry_dir, a)
        items = sorted({i for h in seeded.values() for i in h} | set(traffic.uploaded))
        wait_readable(store, items, timeout=60)
        assert {s.rsplit("+", 1)[1] for s in stamps(store, ITEM_VIEW, "item_id", items)} == {
            version.metadata["towers_version"]}
        wait_users(store, traffic.histories)
        assert set(stamps(store, USER_VIEW, "user_id", list(seeded))) == {version.metadata["towers_version"]}
        # the old version (the standby) is still complete too
        wait_users(project_store(stack, "default"), traffic.histories)

        # Another encoder: re-encoded; then roll back at once to the standby.
        done = run_coldstart("model", "promote", b, "--json", env=stack.settings.as_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["reencoded"] is True
        assert post_json(server.url, "/retrieve", {"user_id": next(iter(seeded)), "k": 5})["version"] == b
        done = run_coldstart("model", "rollback", "--json", env=stack.settings.as_env())
        assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["instant"] is True
        assert post_json(server.url, "/retrieve", {"user_id": next(iter(seeded)), "k": 5})["version"] == a
        done = run_coldstart("model", "list", "--json", env=stack.settings.as_env())
        roles = {row["version"]: row["role"] for row in json.loads(done.stdout.strip().splitlines()[-1])["versions"]}
        assert roles == {"default": "", a: "active", b: "standby"}

    # abort: a rollout dropped half-way; workers stop writing to its target
    promoting = subprocess.Popen([sys.executable, "-m", "coldstart.cli", "model", "promote", "default",
                                  "--max-items-per-s", "2"], env={**os.environ, **stack.settings.as_env()},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while rollout.read_state(client, stack.settings).target != "default" and time.monotonic() < deadline:
            time.sleep(0.2)
        done = run_coldstart("model", "abort", env=stack.settings.as_env())
        assert done.returncode == 0, done.stderr
    finally:
        promoting.kill()
        promoting.wait()
    state = rollout.read_state(client, stack.settings)
    assert state.active == a and state.target is None
    with stack_producer(stack) as producer:
        late = unique_id("late")
        send_item(producer, item_event({"item_id": late, "title": "After the abort"}))
        producer.flush()
    wait_readable(project_store(stack, a), [late])
    assert feast_store.read_item_features(project_store(stack, "default"), [late]) == {}

    # cleanup: the keys of every version no longer served go (and the standby stops being kept current)
    done = run_coldstart("model", "cleanup", env=stack.settings.as_env())
    assert done.returncode == 0, done.stderr
    assert feast_store.scan_entity_ids(project_store(stack, "default"), "item_id", 0, 10_000)[1] == []
    assert feast_store.scan_entity_ids(project_store(stack, b), "item_id", 0, 10_000)[1] == []
    assert rollout.read_state(client, stack.settings).serving == (a,)
