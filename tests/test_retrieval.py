"""Retrieval over the whole catalogue, through the real broker, worker, Redis, usearch index and HTTP server.

The films (and the helpers that make users like some of them) are test_users'.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.dataset as ds
import pytest

from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, Settings
from coldstart.dev.load import item_event, send_item
from coldstart.dev.stack import FeatureServerProcess
from coldstart.ranking import UnknownUser, ranking_features
from coldstart.retrieval import MAX_K, Retriever, VersionIndex
from tests.conftest import serving_stack, stack_producer, unique_id, upload, wait_readable
from tests.test_users import act, films, items, towers, user_vector  # noqa: F401 (fixtures)

RETRIEVABLE_WITHIN_S = 10  # a functional deadline, generous on a shared machine: the benchmark measures the latency


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    """A stack of this module's own: retrieval answers over the whole catalogue, which in the shared
    stack holds every other module's items too (thousands from the burst test)."""
    with serving_stack(tmp_path_factory, redis_url, "coldstart_retrieval") as running:
        yield running


@pytest.fixture(scope="module")
def producer(stack):
    with stack_producer(stack) as p:
        yield p


@pytest.fixture(scope="module")
def server(stack):
    with FeatureServerProcess(stack.settings) as running:
        running.wait_ready()
        yield running


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def retrieved(server, user_id: str, **options) -> list[str]:
    status, body = post(server, "/retrieve", {"user_id": user_id, **options})
    assert status == 200, body
    return [item["item_id"] for item in body["items"]]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.fixture(scope="module")
def kids_user(stack, producer, films):
    user_id = unique_id("kids-retrieval")
    act(producer, user_id, films["Children's"][:6])
    user_vector(stack, user_id, min_history=6)
    return user_id


# ---- the index alone ----------------------------------------------------------------------

def served_index(dim: int) -> VersionIndex:
    """An empty index with the default settings' parameters: the graph that is served."""
    defaults = Settings.from_env({})
    return VersionIndex("v", dim, defaults.index_dtype, defaults.index_expansion_search, defaults.index_connectivity)


def catalogue(count: int = 3000, dim: int = 64):
    """Unit vectors in clusters, as item vectors are; every other item "even", one in fifty also "rare"."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(30, dim))
    vectors = (centres[rng.integers(0, len(centres), count)] + 0.7 * rng.normal(size=(count, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{n}" for n in range(count)]
    labels = [("even" if n % 2 == 0 else "odd") + (", rare" if n % 50 == 0 else "") for n in range(count)]
    queries = (centres[rng.integers(0, len(centres), 20)] + 0.7 * rng.normal(size=(20, dim))).astype(np.float32)
    return ids, vectors, labels, queries


def exact_top(ids, vectors, labels, query, k, excluded, categories) -> list[str]:
    """Brute force over the vectors as the index stores and compares them: f16, the query too (against f32
    vectors, items whose cosines differ by under ~1e-4 may swap places)."""
    stored = vectors.astype(np.float16).astype(np.float32)
    query = query.astype(np.float16).astype(np.float32)
    scores = stored @ query / (np.linalg.norm(stored, axis=1) * np.linalg.norm(query))
    allowed = [n for n in range(len(ids)) if ids[n] not in excluded
               and (categories is None or set(categories) & {c.strip() for c in labels[n].split(",")})]
    return [ids[n] for n in sorted(allowed, key=lambda n: -scores[n])[:k]]


@pytest.mark.parametrize("categories", [None, ("even",), ("rare",)], ids=["no-filter", "broad-filter", "narrow-filter"])
def test_index_top_k_equals_exact_brute_force_top_k_on_a_small_catalogue(categories, monkeypatch):
    ids, vectors, labels, queries = catalogue()
    monkeypatch.setattr("coldstart.retrieval.EXACT_FILTER_LIMIT", 100)  # "even" (1,500 items) is not scanned alone
    index = served_index(vectors.shape[1])
    index.put(ids, vectors, labels, [0.0] * len(ids))
    excluded = {f"i{n}" for n in range(0, len(ids), 7)}
    for query in queries:
        found = index.search(query, 100, excluded, categories)
        assert [r.item_id for r in found] == exact_top(ids, vectors, labels, query, 100, excluded, categories)


def test_the_graph_finds_the_exact_top_k_almost_always(monkeypatch):
    """Above EXACT_LIMIT the graph answers: approximate, recall@100 well above the 0.95 target."""
    ids, vectors, labels, queries = catalogue()
    monkeypatch.setattr("coldstart.retrieval.EXACT_LIMIT", 0)
    index = served_index(vectors.shape[1])
    index.put(ids, vectors, labels, [0.0] * len(ids))
    for categories in (None, ("even",)):
        recall = np.mean([len(set(r.item_id for r in index.search(q, 100, set(), categories))
                              & set(exact_top(ids, vectors, labels, q, 100, set(), categories))) / 100 for q in queries])
        assert recall >= 0.95, (categories, recall)


def test_replaced_and_removed_items_leave_the_index():
    ids, vectors, labels, queries = catalogue(200)
    index = served_index(vectors.shape[1])
    index.put(ids, vectors, labels, [0.0] * len(ids))
    index.put(["i0"], -queries[:1], ["odd"], [1.0])  # i0 now points away from query 0
    index.remove(["i1"])
    found = [r.item_id for r in index.search(queries[0], 200, set(), None)]
    assert len(index) == 199 and "i1" not in found and found[-1] == "i0"
    assert 0 not in index.members["even"] and index.slot_of["i0"] in index.members["odd"]


# ---- through the running service ----------------------------------------------------------

@pytest.mark.usefixtures("towers")
def test_a_fresh_film_is_retrieved_for_a_user_whose_taste_it_fits_soon_after_upload(stack, producer, server, films,
                                                                                   kids_user):
    horror_user = unique_id("horror-retrieval")
    act(producer, horror_user, films["Horror"][:6])
    user_vector(stack, horror_user, min_history=6)
    fresh = {"item_id": unique_id("fresh-film"), "title": "Babe: Pig in the City (1998)", "category": "Children's, Comedy"}
    sent = time.monotonic()
    upload(producer, fresh)
    wait_for(lambda: fresh["item_id"] in retrieved(server, kids_user, k=MAX_K), RETRIEVABLE_WITHIN_S,
             "the fresh film retrievable")
    print(f"fresh film retrievable {1000 * (time.monotonic() - sent):.0f} ms after its upload was sent")
    # Never interacted with, so placed by its text alone, against warm films that have ID parts too; the towers
    # place a fresh film largely by its year (README), so the test asks for its taste side, not first place:
    # higher for the children's user than for the horror user, and in the top two thirds of the ~40 films
    # here for them. (Where it lands moves from one trained model to the next: 21st for the children's user
    # and 30th for the horror user with session 13's towers, in the top 20 before.)
    kids_ranking, horror_ranking = (retrieved(server, user, k=MAX_K) for user in (kids_user, horror_user))
    titles = feast_store.item_titles(stack.store, kids_ranking)
    for_kids, for_horror = kids_ranking.index(fresh["item_id"]), horror_ranking.index(fresh["item_id"])
    assert for_kids < min(2 * len(kids_ranking) // 3, for_horror), (
        [titles.get(i) for i in kids_ranking], [titles.get(i) for i in horror_ranking])

    seen = {f["item_id"] for f in films["Children's"][:6]}
    assert not seen & set(kids_ranking)  # the user's own history is left out…
    assert seen <= set(retrieved(server, kids_user, k=MAX_K, exclude_seen=False))  # …unless asked for
    horror_only = retrieved(server, kids_user, k=5, filter={"category": "Horror"})
    assert len(horror_only) == 5 and set(horror_only) <= {f["item_id"] for f in films["Horror"]}


def test_a_deleted_item_is_never_returned_and_a_re_upload_replaces_it(stack, producer, server, films, kids_user):
    film = {**films["Children's"][7], "item_id": unique_id("doomed-film")}
    uploaded_at = datetime.now(timezone.utc)
    send_item(producer, item_event(film, uploaded_at))
    producer.flush()
    everything = dict(k=MAX_K, exclude_seen=False)
    wait_for(lambda: film["item_id"] in retrieved(server, kids_user, **everything), RETRIEVABLE_WITHIN_S, "upload")

    deleted_at = uploaded_at + timedelta(seconds=1)
    send_item(producer, {"item_id": film["item_id"], "deleted": True, "uploaded_at": deleted_at.isoformat()})
    producer.flush()
    wait_for(lambda: film["item_id"] not in retrieved(server, kids_user, **everything), RETRIEVABLE_WITHIN_S, "removal")
    assert not feast_store.read_item_features(stack.store, [film["item_id"]])  # gone from the online store

    # An older upload delivered late (a replay) changes nothing anywhere; a probe item sent after it with
    # the same key (same partition, so processed after it) says when it has been through.
    send_item(producer, item_event(film, uploaded_at))
    probe = {"item_id": unique_id("probe"), "title": "Heidi (1937)", "category": "Children's"}
    send_item(producer, item_event(probe), key=film["item_id"])
    producer.flush()
    wait_for(lambda: probe["item_id"] in retrieved(server, kids_user, **everything), RETRIEVABLE_WITHIN_S, "probe")
    for _ in range(20):
        assert film["item_id"] not in retrieved(server, kids_user, **everything)
        time.sleep(0.05)
    assert not feast_store.read_item_features(stack.store, [film["item_id"]])

    def offline_rows():
        folder = feast_store.offline_table(stack.store, ITEM_VIEW).path
        table = ds.dataset(folder, format="parquet").to_table(columns=["item_id", "deleted", "event_timestamp"])
        return [row for row in table.to_pylist() if row["item_id"] == film["item_id"]]

    wait_for(lambda: any(row["deleted"] for row in offline_rows()), 30, "the removal in the offline store")

    reuploaded = {**film, "title": "Babe (1995)"}
    send_item(producer, item_event(reuploaded, deleted_at + timedelta(seconds=1)))
    producer.flush()
    wait_for(lambda: film["item_id"] in retrieved(server, kids_user, **everything), RETRIEVABLE_WITHIN_S, "re-upload")
    assert wait_readable(stack.store, [film["item_id"]])
    assert feast_store.item_titles(stack.store, [film["item_id"]]) == {film["item_id"]: "Babe (1995)"}


def test_a_removal_survives_materialize(stack, producer):
    """`coldstart materialize` rebuilds the online store from the offline rows: the removal row wins there too."""
    item = {"item_id": unique_id("materialized"), "title": "Heidi (1937)", "category": "Children's"}
    uploaded_at = datetime.now(timezone.utc)
    send_item(producer, item_event(item, uploaded_at))
    send_item(producer, {"item_id": item["item_id"], "deleted": True,
                         "uploaded_at": (uploaded_at + timedelta(seconds=1)).isoformat()})
    producer.flush()
    folder = feast_store.offline_table(stack.store, ITEM_VIEW).path
    wait_for(lambda: any(row["item_id"] == item["item_id"] and row["deleted"] for row in ds.dataset(
        folder, format="parquet").to_table(columns=["item_id", "deleted"]).to_pylist()), 30, "the removal row offline")
    stack.store.materialize(start_date=uploaded_at - timedelta(minutes=1), end_date=datetime.now(timezone.utc))
    assert not feast_store.read_item_features(stack.store, [item["item_id"]])
    scanned = {i: v for page in feast_store.scan_items(stack.store) for i, v in zip(page.item_ids, page.vectors)}
    assert item["item_id"] in scanned and scanned[item["item_id"]] is None  # a removal for a rebuilding replica


def test_a_restarted_replica_answers_with_every_item(stack, producer, server, items, kids_user):
    before = set(retrieved(server, kids_user, k=MAX_K, exclude_seen=False))
    assert {i["item_id"] for i in items} <= before
    server.stop()
    while_down = {"item_id": unique_id("while-down"), "title": "Toy Story (1995)", "category": "Animation, Children's"}
    upload(producer, while_down)
    wait_readable(stack.store, [while_down["item_id"]])
    server.start()
    status, _ = post(server, "/retrieve", {"user_id": kids_user})
    assert status in (200, 503)  # 503 only while the index is rebuilt
    server.wait_ready()
    after = set(retrieved(server, kids_user, k=MAX_K, exclude_seen=False))
    assert before | {while_down["item_id"]} <= after


def test_bad_requests_get_clear_errors(server, kids_user):
    cases = [
        ({"user_id": unique_id("nobody")}, 404, "has no vector yet"),
        ({"user_id": kids_user, "k": 0}, 422, "k must be an integer from 1 to 1000"),
        ({"user_id": kids_user, "k": MAX_K + 1}, 422, "k must be an integer from 1 to 1000"),
        ({"user_id": kids_user, "k": "ten"}, 422, "k must be an integer"),
        ({"user_id": kids_user, "filter": {"colour": "red"}}, 422, "unknown filter 'colour'"),
        ({"user_id": kids_user, "filter": {"category": []}}, 422, "filter category must be"),
        ({"user_id": kids_user, "filter": "Comedy"}, 422, "filter must be an object"),
        ({"user_id": kids_user, "exclude_seen": "yes"}, 422, "exclude_seen must be true or false"),
        ({"k": 10}, 422, "user_id must be a non-empty string"),
    ]
    for body, status, detail in cases:
        got_status, got = post(server, "/retrieve", body)
        assert (got_status, detail in got["detail"]) == (status, True), (body, got_status, got)
    request = urllib.request.Request(f"{server.url}/retrieve", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 422


def test_the_python_api_and_the_lookup_route_answer_like_the_server(stack, server, items, kids_user):
    retriever = Retriever(stack.settings).start().wait_ready(timeout=120)
    try:
        found = retriever.retrieve(kids_user, k=5)
        assert [r.item_id for r in found.items] == retrieved(server, kids_user, k=5)
        with pytest.raises(UnknownUser, match="no vector yet"):
            retriever.retrieve(unique_id("nobody"))
        with pytest.raises(ValueError, match="k must be"):
            retriever.retrieve(kids_user, k=MAX_K + 1)
    finally:
        retriever.stop()
    # The package's entry point, in a process of its own (its index lives as long as the process):
    # importing coldstart loads no Feast; the first call reads the environment and builds the index.
    script = ("import sys, coldstart, coldstart.config; assert 'feast' not in sys.modules; "
              f"print([r.item_id for r in coldstart.retrieve({kids_user!r}, k=5).items])")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **stack.settings.as_env(), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str([r.item_id for r in found.items])

    ids = [r.item_id for r in found.items]
    status, body = post(server, "/ranking-features", {"user_id": kids_user, "item_ids": ids})
    assert status == 200, body
    sdk = ranking_features(stack.store, kids_user, ids)
    assert [i["affinity"] for i in body["items"]] == pytest.approx([c.affinity for c in sdk.candidates], abs=1e-5)
    # The index keeps vectors in f16 (the default COLDSTART_INDEX_DTYPE) and its score is their cosine; the affinity
    # is fp32. Rounding each component of two unit vectors to f16 (relative error u = 2**-11) moves their dot product
    # by at most ~2u (Cauchy-Schwarz) and each norm by at most u: the cosine by at most ~4u = 2**-9. On an AVX2-only
    # CPU they differed by 1.1e-4 (session 15), past the 1e-4 this test used to allow.
    assert stack.settings.index_dtype == "f16"
    assert [i["affinity"] for i in body["items"]] == pytest.approx([r.score for r in found.items], abs=2**-9)
    # …and the index's score is exactly that: the cosine of the two vectors as f16 stores them.
    user = sdk.user_embedding.astype(np.float16).astype(np.float64)
    items = np.stack([c.item_embedding for c in sdk.candidates]).astype(np.float16).astype(np.float64)
    f16_cosines = items @ user / (np.linalg.norm(items, axis=1) * np.linalg.norm(user))
    assert [r.score for r in found.items] == pytest.approx(list(f16_cosines), abs=1e-5)


def test_coldstart_recommend_prints_the_retrieved_items(stack, server, kids_user):
    env_settings = {**os.environ, **stack.settings.as_env(), "HF_HUB_OFFLINE": "1"}
    for where in (["--server", server.url], []):
        run = subprocess.run([sys.executable, "-m", "coldstart.cli", "recommend", kids_user, "-k", "3", "--json", *where],
                             capture_output=True, text=True, timeout=180, env=env_settings)
        assert run.returncode == 0, run.stderr[-2000:]
        answer = json.loads(run.stdout.strip().splitlines()[-1])
        assert [i["item_id"] for i in answer["items"]] == retrieved(server, kids_user, k=3)
        assert all(i["title"] for i in answer["items"])
    nobody = subprocess.run([sys.executable, "-m", "coldstart.cli", "recommend", unique_id("nobody"), "--server",
                             server.url], capture_output=True, text=True, timeout=60, env=env_settings)
    assert nobody.returncode == 1 and "has no vector yet" in nobody.stderr
