"""Rolling user embeddings and the ranking read path, through the real broker, worker, Redis and Feast.

The worker serves the trained LEARN towers (`coldstart export-towers`; `make test` runs it first). They are
trained on MovieLens-100K films, so the taste tests upload films with the fields the training text was built
from (encoders.datasets.ml100k_films): the service then encodes exactly that text.
"""

import json
import time
from datetime import datetime
import urllib.request

import pytest

from coldstart.ranking import UnknownUser, ranking_features, recommend
from coldstart.dev.load import send_action
from coldstart.dev.stack import FeatureServerProcess, WorkerProcess
from encoders.training.datasets import fetch_ml100k, ml100k_films
from encoders.training.evaluate import Paths
from tests.conftest import PROJECT_DATA_DIR, exported_towers, read_topic, unique_id, upload, wait_readable

ML100K = Paths(PROJECT_DATA_DIR).ml100k
GENRES = ("Children's", "Horror", "Documentary")
FILMS_PER_GENRE = 14


@pytest.fixture(scope="module")
def towers() -> dict:
    return exported_towers()


@pytest.fixture(scope="module")
def films(stack, producer) -> dict[str, list[dict]]:
    """FILMS_PER_GENRE MovieLens films of each of GENRES (and of no other of them), uploaded once; by genre."""
    by_genre = {genre: [] for genre in GENRES}
    for film in ml100k_films(fetch_ml100k(ML100K)):
        genres = [genre for genre in GENRES if genre in film["category"].split(", ")]
        if len(genres) == 1 and len(by_genre[genres[0]]) < FILMS_PER_GENRE:
            by_genre[genres[0]].append({**film, "item_id": unique_id(f"film{film['item_id']}")})
    uploaded = [film for genre in GENRES for film in by_genre[genre]]
    for film in uploaded:
        upload(producer, film)
    wait_readable(stack.store, [film["item_id"] for film in uploaded], timeout=60)
    return by_genre


@pytest.fixture(scope="module")
def items(films) -> list[dict]:
    """The uploaded films in one list, for the tests where what the items are does not matter."""
    return [film for genre in GENRES for film in films[genre]]


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


def ranking(stack, user_id: str, candidates: list[str]) -> list[str]:
    """Every candidate's id, highest affinity to the user first."""
    return [c.item_id for c in recommend(stack.store, user_id, candidates, k=len(candidates))]


def test_workers_serve_the_trained_towers(stack, producer, films, towers):
    user_id, film = unique_id("versioned"), films["Horror"][0]
    act(producer, user_id, [film])
    user_vector(stack, user_id, min_history=1)
    user_version = stack.store.get_online_features(features=["user_embedding:model_version"],
                                                   entity_rows=[{"user_id": user_id}]).to_dict()["model_version"][0]
    item_version = wait_readable(stack.store, [film["item_id"]])[film["item_id"]]["model_version"]
    assert user_version.endswith(towers["version"]), (user_version, towers["version"])
    assert item_version.endswith(towers["version"]), (item_version, towers["version"])


@pytest.mark.usefixtures("towers")
def test_opposite_tastes_get_opposite_recommendations_and_a_fresh_film_follows_taste(stack, producer, films, items):
    kids_user, horror_user = unique_id("kids"), unique_id("horror")
    act(producer, kids_user, films["Children's"][:6])
    act(producer, horror_user, films["Horror"][:6])
    user_vector(stack, kids_user, min_history=6)
    user_vector(stack, horror_user, min_history=6)
    # Never interacted with, so ranked by its text alone: the sequel of a clicked film, from the training years
    # (the towers learnt the years of MovieLens-100K; a film of 2017 is out of their range).
    fresh = {"item_id": unique_id("fresh-film"), "title": "Babe: Pig in the City (1998)",
             "category": "Children's, Comedy"}
    upload(producer, fresh)
    wait_readable(stack.store, [fresh["item_id"]])

    unseen = {genre: [f["item_id"] for f in films[genre][6:]] for genre in GENRES}
    candidates = [item_id for genre in GENRES for item_id in unseen[genre]] + [fresh["item_id"]]
    kids_ranking, horror_ranking = ranking(stack, kids_user, candidates), ranking(stack, horror_user, candidates)

    def in_top(ranked: list[str], genre: str, k: int = 8) -> int:
        return len(set(ranked[:k]) & set(unseen[genre]))

    titles = {film["item_id"]: f"{film['title']} [{film['category']}]" for film in [fresh, *items]}
    rankings = "\n".join(f"{user}: {[titles[i] for i in ranked]}"
                         for user, ranked in (("children's user", kids_ranking), ("horror user", horror_ranking)))
    assert in_top(kids_ranking, "Children's") > in_top(horror_ranking, "Children's"), rankings
    assert in_top(horror_ranking, "Horror") > in_top(kids_ranking, "Horror"), rankings
    assert kids_ranking.index(fresh["item_id"]) < horror_ranking.index(fresh["item_id"]), rankings


@pytest.mark.usefixtures("towers")
def test_new_actions_move_the_user_towards_what_they_now_like(stack, producer, films):
    horror, kids = films["Horror"], films["Children's"]
    user_id = unique_id("switcher")
    candidates = [f["item_id"] for f in horror[6:] + kids[6:]]
    act(producer, user_id, horror[:4])
    before = user_vector(stack, user_id, min_history=4)
    top_before = recommend(stack.store, user_id, candidates, k=5)
    act(producer, user_id, kids[:6], action="purchase")
    after = user_vector(stack, user_id, min_history=10)
    top_after = recommend(stack.store, user_id, candidates, k=5)
    kids_ids = {f["item_id"] for f in kids}
    assert after["user_embedding"] != before["user_embedding"]
    assert sum(c.item_id in kids_ids for c in top_after) > sum(c.item_id in kids_ids for c in top_before), (
        [c.title for c in top_before], [c.title for c in top_after])


def test_skips_do_not_enter_the_history(stack, producer, items):
    user_id = unique_id("skipper")
    act(producer, user_id, items[:2])
    act(producer, user_id, items[2:5], action="skip")
    act(producer, user_id, items[5:6])
    assert user_vector(stack, user_id, min_history=3)["history_length"] == 3


def test_history_survives_a_worker_restart(stack, producer, items):
    user_id = unique_id("restarted")
    act(producer, user_id, items[:3])
    user_vector(stack, user_id, min_history=3)
    stack.worker.stop()
    stack.worker = WorkerProcess(stack.settings).start()
    act(producer, user_id, items[3:4])
    # 4, not 1: the restarted worker recovered the first three actions from the table's changelog
    assert user_vector(stack, user_id, min_history=4, timeout=60)["history_length"] == 4


def test_action_on_an_unknown_item_waits_for_its_upload(stack, producer, items):
    user_id = unique_id("early")
    late_item = {"item_id": unique_id("late"), "title": "A film uploaded after it was clicked (2026)",
                 "category": "Drama"}
    act(producer, user_id, items[:1])
    act(producer, user_id, [late_item])
    assert user_vector(stack, user_id, min_history=1)["history_length"] == 1  # only the known item so far
    upload(producer, late_item)
    assert user_vector(stack, user_id, min_history=2)["history_length"] == 2


def test_action_on_an_item_never_uploaded_is_dead_lettered_after_the_wait(stack, producer, items):
    user_id = unique_id("ghost")
    ghost = unique_id("never-uploaded")
    act(producer, user_id, items[:1])
    act(producer, user_id, [{"item_id": ghost}])
    letters = read_topic(stack.settings, "dead-letters", timeout=stack.settings.unknown_item_wait_seconds + 30,
                         until=lambda rs: any(ghost in r["reason"] for r in rs))
    letter = next(r for r in letters if ghost in r["reason"])
    assert letter["topic"] == "user-actions" and "never uploaded" in letter["reason"]


def test_the_wait_for_a_never_uploaded_item_survives_a_worker_restart(stack, producer, items):
    """The deadline lives in the waiting-items table: the restarted worker gives up on time, with no new action."""
    user_id, ghost = unique_id("ghost-restart"), unique_id("never-uploaded")
    act(producer, user_id, items[:1])
    sent_at = time.time()
    act(producer, user_id, [{"item_id": ghost}])
    user_vector(stack, user_id, min_history=1)
    time.sleep(1.5)  # the action is in the history, its deadline in the table's changelog
    stack.worker.stop()
    assert time.time() - sent_at < stack.settings.unknown_item_wait_seconds  # stopped before the deadline
    stack.worker = WorkerProcess(stack.settings).start()
    letters = read_topic(stack.settings, "dead-letters", timeout=stack.settings.unknown_item_wait_seconds + 60,
                         until=lambda rs: any(ghost in r["reason"] for r in rs))
    letter = next(r for r in letters if ghost in r["reason"])
    assert letter["topic"] == "user-actions" and "never uploaded" in letter["reason"]
    given_up_after = datetime.fromisoformat(letter["received_at"]).timestamp() - sent_at
    assert given_up_after < stack.settings.unknown_item_wait_seconds + 30, given_up_after  # the restart's delay at most


def test_bad_actions_go_to_dead_letters(stack, producer):
    bad = json.dumps({"user_id": unique_id(), "item_id": "x", "action": "teleport",
                      "occurred_at": "2026-01-01T00:00:00Z"}).encode()
    producer.send("user-actions", key=b"bad-action", value=bad)
    producer.flush()
    letters = read_topic(stack.settings, "dead-letters", until=lambda rs: any("teleport" in r["reason"] for r in rs))
    assert any(r["topic"] == "user-actions" and "action must be one of" in r["reason"] for r in letters)


def test_read_path_answers_unknown_user_unknown_item_and_empty_list_clearly(stack, items):
    features = ranking_features(stack.store, unique_id("nobody"), [items[0]["item_id"], "no-such-item"])
    assert features.user_embedding is None
    assert features.candidates[0].item_embedding is not None and features.candidates[0].affinity is None
    assert features.candidates[1].item_embedding is None and features.candidates[1].affinity is None
    with pytest.raises(UnknownUser, match="no vector yet"):
        recommend(stack.store, unique_id("nobody"), [items[0]["item_id"]])
    with pytest.raises(ValueError, match="candidate list is empty"):
        ranking_features(stack.store, "anyone", [])


def test_http_feature_server_answers_a_ranking_lookup(stack, producer, items):
    user_id = unique_id("http")
    act(producer, user_id, items[:2])
    user_vector(stack, user_id, min_history=2)
    with FeatureServerProcess(stack.settings) as server:
        body = json.dumps({"feature_service": "ranking_v1",
                           "entities": {"user_id": [user_id] * 3, "item_id": [i["item_id"] for i in items[:3]]}})
        request = urllib.request.Request(f"{server.url}/get-online-features", body.encode(),
                                         {"Content-Type": "application/json"})
        response = json.loads(urllib.request.urlopen(request, timeout=30).read())
        names = response["metadata"]["feature_names"]
        affinity = response["results"][names.index("affinity")]["values"]
        assert len(affinity) == 3 and all(isinstance(a, float) for a in affinity)
        # the Python API computes the affinity itself (numpy); it must agree with the on-demand view
        sdk = ranking_features(stack.store, user_id, [i["item_id"] for i in items[:3]])
        assert [c.affinity for c in sdk.candidates] == pytest.approx(affinity, abs=1e-5)
