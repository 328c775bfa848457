"""A Redis Cluster as the online store (REDIS_URL=redis+cluster://…): the read path, materialize and retrieval
on a real local cluster of three masters, and a master's crash and restart (README, "Redis Cluster").

The pipeline's tests (test_item_pipeline) and the newest-wins tests run on the cluster too (conftest.ONLINE_STORES).
"""

import json
import urllib.error
import urllib.request

import pytest
from redis.exceptions import RedisError

from coldstart import store as feast_store
from coldstart.dev.stack import FeatureServerProcess
from coldstart.ranking import ranking_features
from coldstart.retrieval import MAX_K
from coldstart.config import Settings, parse_redis_url
from coldstart.store import redis_client, redis_connection_string, redis_layout
from tests.conftest import unique_id, upload, wait_readable
from tests.test_retrieval import post, retrieved, wait_for
from tests.test_retrieval import test_a_removal_survives_materialize as a_removal_survives_materialize
from tests.test_reliability import log_size, wait_for_log
from tests.test_users import act, user_vector

pytestmark = pytest.mark.scaleout


@pytest.fixture(scope="module")
def server(cluster_stack):
    with FeatureServerProcess(cluster_stack.settings) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def films(cluster_stack, cluster_producer) -> list[dict]:
    films = [{"item_id": unique_id("cluster-film"), "title": title, "category": category}
             for title, category in [("Toy Story (1995)", "Animation, Children's, Comedy"),
                                     ("Babe (1995)", "Children's, Comedy"), ("Heidi (1937)", "Children's"),
                                     ("Scream (1996)", "Horror, Thriller"), ("Alien (1979)", "Horror, Sci-Fi"),
                                     ("Heat (1995)", "Action, Crime")]]
    for film in films:
        upload(cluster_producer, film)
    wait_readable(cluster_stack.store, [film["item_id"] for film in films])
    return films


def test_redis_url_names_one_redis_or_a_cluster():
    assert redis_connection_string("redis://:secret@127.0.0.1:6380/2") == "127.0.0.1:6380,db=2,password=secret"
    assert redis_connection_string("rediss+cluster://app:secret@a:7000,b:7001") == (
        "a:7000,b:7001,username=app,password=secret,ssl=true")
    assert parse_redis_url("redis+cluster://a:7000,b:7001").cluster
    for bad, reason in [("redis://a:1,b:2", "redis\\+cluster://"), ("redis+cluster://a:1/3", "0 on a cluster"),
                        ("cluster://a:1", "must start with")]:
        with pytest.raises(ValueError, match=reason):
            parse_redis_url(bad)
        with pytest.raises(ValueError, match=reason):  # refused when the settings are read, not at first use
            Settings.from_env({"REDIS_URL": bad})


def test_items_spread_over_every_master(cluster_stack, redis_cluster, films):
    client = redis_client(cluster_stack.settings.redis_url)
    keys, _ = redis_layout(cluster_stack.settings.feast_project, "item_id", [f["item_id"] for f in films],
                           "item_embedding", [])
    assert len({client.get_node_from_key(key).port for key in keys}) > 1, "the films all hash to one master"


def test_the_read_path_on_a_cluster(cluster_stack, cluster_producer, server, films):
    """Ranking features from the SDK, our HTTP route and Feast's own route agree; retrieval answers from an
    index rebuilt by scanning every master."""
    user_id = unique_id("cluster-user")
    act(cluster_producer, user_id, films[:3])
    user_vector(cluster_stack, user_id, min_history=3)
    ids = [f["item_id"] for f in films]
    sdk = ranking_features(cluster_stack.store, user_id, ids)
    assert all(c.item_embedding is not None and c.affinity is not None for c in sdk.candidates)

    status, ours = post(server, "/ranking-features", {"user_id": user_id, "item_ids": ids})
    assert status == 200, ours
    body = json.dumps({"feature_service": "ranking_v1", "entities": {"user_id": [user_id] * len(ids), "item_id": ids}})
    request = urllib.request.Request(f"{server.url}/get-online-features", body.encode(),
                                     {"Content-Type": "application/json"})
    feast = json.loads(urllib.request.urlopen(request, timeout=30).read())
    feast_affinity = feast["results"][feast["metadata"]["feature_names"].index("affinity")]["values"]
    assert [i["affinity"] for i in ours["items"]] == pytest.approx([c.affinity for c in sdk.candidates], abs=1e-5)
    assert feast_affinity == pytest.approx([c.affinity for c in sdk.candidates], abs=1e-5)

    assert set(ids) <= set(retrieved(server, user_id, k=MAX_K, exclude_seen=False))  # loaded by the scan…
    fresh = {"item_id": unique_id("cluster-fresh"), "title": "Pinocchio (1940)", "category": "Children's"}
    upload(cluster_producer, fresh)
    wait_readable(cluster_stack.store, [fresh["item_id"]])
    wait_for(lambda: fresh["item_id"] in retrieved(server, user_id, k=MAX_K), 30, "the fresh film retrievable")


def test_a_removal_survives_materialize_on_a_cluster(cluster_stack, cluster_producer):
    a_removal_survives_materialize(cluster_stack, cluster_producer)


def test_a_master_killed_and_restarted_keeps_its_data_and_the_service_resumes(cluster_stack, cluster_producer,
                                                                             redis_cluster, server, films):
    """SIGKILL a master (no replicas): reads of its keys fail, the others' are served; the worker's writes and
    reads of its slots are retried until it is back. Restarted with its append-only file, it has every
    acknowledged write."""
    settings, store = cluster_stack.settings, cluster_stack.store
    start = log_size(cluster_stack.worker)
    client = redis_client(settings.redis_url)

    def master_of(entity_id: str, join_key: str = "item_id") -> int:
        (key,), _ = redis_layout(settings.feast_project, join_key, [entity_id], "item_embedding", [])
        return client.get_node_from_key(key).port

    victim = master_of(films[0]["item_id"])
    on_victim = [f["item_id"] for f in films if master_of(f["item_id"]) == victim]
    elsewhere = [f["item_id"] for f in films if master_of(f["item_id"]) != victim]
    redis_cluster.kill(victim)
    try:
        with pytest.raises(RedisError) as failed:
            feast_store.read_item_features(store, on_victim)
        print(f"a read of a dead master's keys raises {type(failed.value).__name__}: {failed.value}")
        assert set(feast_store.read_item_features(store, elsewhere)) == set(elsewhere)
        user_elsewhere = next(u for u in (unique_id("user") for _ in range(100)) if master_of(u, "user_id") != victim)
        status, _ = post(server, "/ranking-features", {"user_id": user_elsewhere, "item_ids": elsewhere})
        assert status == 200
        request = urllib.request.Request(f"{server.url}/ranking-features", json.dumps(
            {"user_id": user_elsewhere, "item_ids": on_victim}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 500
        while_down = []
        while len(while_down) < 2 or all(master_of(i) != victim for i in while_down):
            while_down.append(unique_id("while-down"))
        for item_id in while_down:
            upload(cluster_producer, {"item_id": item_id, "title": "Written while a master was down"})
        user_id = unique_id("user-while-down")
        act(cluster_producer, user_id, [f for f in films if f["item_id"] in on_victim])  # the user agent reads them
        wait_for_log(cluster_stack.worker, start, "online write failed")
    finally:
        redis_cluster.restart(victim)
    found = wait_readable(store, on_victim + elsewhere + while_down, timeout=60)  # retried until it was back
    assert set(found) == set(on_victim + elsewhere + while_down)
    assert user_vector(cluster_stack, user_id, min_history=len(on_victim), timeout=60)
    wait_for_log(cluster_stack.worker, start, "online write recovered")
    assert cluster_stack.worker.alive()
