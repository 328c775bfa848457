"""Rolling user embeddings and the ranking read path, through the real broker, worker, Redis and Feast."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from coldstart.demo import load_catalogue
from coldstart.ranking import UnknownUser, ranking_features, recommend
from coldstart.services import free_port
from coldstart.stack import WorkerProcess, send_action
from tests.conftest import read_topic, unique_id, upload, wait_readable


@pytest.fixture(scope="module")
def catalogue(stack, producer):
    """Cookbooks, science fiction and board games from the demo catalogue, uploaded once."""
    by_category = {}
    for item in load_catalogue():
        by_category.setdefault(item["category"], []).append(item)
    items = by_category["cookbooks"][:12] + by_category["science fiction"][:12] + by_category["board games"][:12]
    items = [{**i, "item_id": f"{i['item_id']}-{unique_id('u')}"} for i in items]
    for item in items:
        upload(producer, item)
    wait_readable(stack.store, [i["item_id"] for i in items], timeout=60)
    return items


def user_vector(stack, user_id: str, min_history: int, timeout: float = 30) -> dict:
    """Wait until the user's vector reflects at least min_history positive actions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = stack.store.get_online_features(
            features=["user_embedding:user_embedding", "user_embedding:history_length"],
            entity_rows=[{"user_id": user_id}],
        ).to_dict()
        if row["history_length"][0] is not None and row["history_length"][0] >= min_history:
            return {"user_embedding": row["user_embedding"][0], "history_length": row["history_length"][0]}
        time.sleep(0.1)
    raise AssertionError(f"user {user_id} has no vector with {min_history} actions after {timeout}s")


def act(producer, user_id: str, items: list[dict], action: str = "click") -> None:
    for item in items:
        send_action(producer, user_id, item["item_id"], action)
    producer.flush()


def categories(stack, user_id: str, candidates: list[str], k: int) -> list[str]:
    return [c.title for c in recommend(user_id, candidates, k=k, store=stack.store, settings=stack.settings)]


def test_clicks_on_cookbooks_bring_cookbooks_including_a_fresh_one(stack, producer, catalogue):
    cookbooks = [i for i in catalogue if i["category"] == "cookbooks"]
    user_id = unique_id("cook-lover")
    act(producer, user_id, cookbooks[:5])
    user_vector(stack, user_id, min_history=5)
    fresh = {"item_id": unique_id("fresh-cookbook"), "title": "The Complete Book of Home Baking and Bread",
             "description": "A new cookbook of recipes for breads, cakes, pastries and everyday baking at home.",
             "category": "cookbooks", "brand": "A new author", "tags": ["baking", "recipes"]}
    upload(producer, fresh)
    wait_readable(stack.store, [fresh["item_id"]])

    candidates = [i["item_id"] for i in catalogue[5:]] + [fresh["item_id"]]  # exclude the clicked ones
    top = recommend(user_id, candidates, k=8, store=stack.store, settings=stack.settings)
    cookbook_ids = {i["item_id"] for i in cookbooks} | {fresh["item_id"]}
    assert sum(c.item_id in cookbook_ids for c in top[:5]) >= 4, [c.title for c in top]
    assert fresh["item_id"] in [c.item_id for c in top], "a fresh item with no interactions must be rankable"


def test_new_actions_move_the_user_towards_what_they_now_like(stack, producer, catalogue):
    scifi = [i for i in catalogue if i["category"] == "science fiction"]
    games = [i for i in catalogue if i["category"] == "board games"]
    user_id = unique_id("switcher")
    candidates = [i["item_id"] for i in scifi[6:] + games[6:]]
    act(producer, user_id, scifi[:4])
    before = user_vector(stack, user_id, min_history=4)
    top_before = recommend(user_id, candidates, k=3, store=stack.store, settings=stack.settings)
    act(producer, user_id, games[:6], action="purchase")
    after = user_vector(stack, user_id, min_history=10)
    top_after = recommend(user_id, candidates, k=3, store=stack.store, settings=stack.settings)
    game_ids = {i["item_id"] for i in games}
    assert after["user_embedding"] != before["user_embedding"]
    assert sum(c.item_id in game_ids for c in top_after) > sum(c.item_id in game_ids for c in top_before)


def test_skips_do_not_enter_the_history(stack, producer, catalogue):
    user_id = unique_id("skipper")
    act(producer, user_id, catalogue[:2])
    act(producer, user_id, catalogue[2:5], action="skip")
    act(producer, user_id, catalogue[5:6])
    assert user_vector(stack, user_id, min_history=3)["history_length"] == 3


def test_history_survives_a_worker_restart(stack, producer, catalogue):
    user_id = unique_id("restarted")
    act(producer, user_id, catalogue[:3])
    user_vector(stack, user_id, min_history=3)
    stack.worker.stop()
    stack.worker = WorkerProcess(stack.settings).start()
    act(producer, user_id, catalogue[3:4])
    # 4, not 1: the restarted worker recovered the first three actions from the table's changelog
    assert user_vector(stack, user_id, min_history=4, timeout=60)["history_length"] == 4


def test_action_on_an_unknown_item_waits_for_its_upload(stack, producer, catalogue):
    user_id = unique_id("early")
    late_item = {"item_id": unique_id("late"), "title": "A cookbook uploaded after it was clicked",
                 "category": "cookbooks"}
    act(producer, user_id, catalogue[:1])
    act(producer, user_id, [late_item])
    assert user_vector(stack, user_id, min_history=1)["history_length"] == 1  # only the known item so far
    upload(producer, late_item)
    assert user_vector(stack, user_id, min_history=2)["history_length"] == 2


def test_action_on_an_item_never_uploaded_is_dead_lettered_after_the_wait(stack, producer, catalogue):
    user_id = unique_id("ghost")
    ghost = unique_id("never-uploaded")
    act(producer, user_id, catalogue[:1])
    act(producer, user_id, [{"item_id": ghost}])
    letters = read_topic(stack.settings, "dead-letters", timeout=stack.settings.unknown_item_wait_seconds + 30,
                         until=lambda rs: any(ghost in r["reason"] for r in rs))
    letter = next(r for r in letters if ghost in r["reason"])
    assert letter["topic"] == "user-actions" and "never uploaded" in letter["reason"]


def test_bad_actions_go_to_dead_letters(stack, producer):
    bad = json.dumps({"user_id": unique_id(), "item_id": "x", "action": "teleport",
                      "occurred_at": "2026-01-01T00:00:00Z"}).encode()
    producer.send("user-actions", key=b"bad-action", value=bad)
    producer.flush()
    letters = read_topic(stack.settings, "dead-letters", until=lambda rs: any("teleport" in r["reason"] for r in rs))
    assert any(r["topic"] == "user-actions" and "action must be one of" in r["reason"] for r in letters)


def test_read_path_answers_unknown_user_unknown_item_and_empty_list_clearly(stack, catalogue):
    features = ranking_features(unique_id("nobody"), [catalogue[0]["item_id"], "no-such-item"], stack.store)
    assert features.user_embedding is None
    assert features.candidates[0].item_embedding is not None and features.candidates[0].affinity is None
    assert features.candidates[1].item_embedding is None and features.candidates[1].affinity is None
    with pytest.raises(UnknownUser, match="no vector yet"):
        recommend(unique_id("nobody"), [catalogue[0]["item_id"]], store=stack.store, settings=stack.settings)
    with pytest.raises(ValueError, match="candidate list is empty"):
        ranking_features("anyone", [], stack.store)


def test_http_feature_server_answers_a_ranking_lookup(stack, producer, catalogue):
    user_id = unique_id("http")
    act(producer, user_id, catalogue[:2])
    user_vector(stack, user_id, min_history=2)
    port = free_port()
    env = {**os.environ, **stack.settings.as_env()}
    server = subprocess.Popen([sys.executable, "-m", "coldstart.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"feature_service": "ranking_v1",
                           "entities": {"user_id": [user_id] * 3, "item_id": [i["item_id"] for i in catalogue[:3]]}})
        response = None
        deadline = time.monotonic() + 60
        while response is None and time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", body.encode(),
                                                 {"Content-Type": "application/json"})
                response = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(0.5)
        assert response is not None, "feature server did not answer"
        names = response["metadata"]["feature_names"]
        affinity = response["results"][names.index("affinity")]["values"]
        assert len(affinity) == 3 and all(isinstance(a, float) for a in affinity)
        # the Python API computes the affinity itself (numpy); it must agree with the on-demand view
        sdk = ranking_features(user_id, [i["item_id"] for i in catalogue[:3]], stack.store)
        assert [c.affinity for c in sdk.candidates] == pytest.approx(affinity, abs=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)
