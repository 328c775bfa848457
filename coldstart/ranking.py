"""The read path for ranking: one user and their candidate items, in one online-store round trip.

    from coldstart.config import Settings
    from coldstart.ranking import ranking_features, recommend
    from coldstart.store import open_store

    store = open_store(Settings.from_env())
    features = ranking_features(store, "u42", ["book-1", "book-2"])
    top = recommend(store, "u42", ["book-1", "book-2"], k=10)

Both read the stored features of the versioned feature service `ranking_v1`
(feature_repo/feature_services.py) from Feast's online store (coldstart.store),
and compute its affinity (the cosine of two unit vectors) with numpy. The HTTP
feature server serves the same service, affinity included, through its
on-demand view. Candidates over the whole catalogue come from coldstart.retrieval.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as ds

from coldstart import store as feast_store
from coldstart.config import ITEM_VIEW, RANKING_SERVICE

MAX_CANDIDATES = 1000  # one Feast call; above this, page the candidates


class UnknownUser(LookupError):
    """The user has no vector yet (no positive action on an item the service knows)."""


@dataclass
class CandidateFeatures:
    item_id: str
    item_embedding: np.ndarray | None  # None: the item is unknown to the service
    title: str | None
    affinity: float | None  # cosine of user and item vectors; None if either is unknown


@dataclass
class RankingFeatures:
    user_id: str
    user_embedding: np.ndarray | None  # None: unknown user
    history_length: int | None
    candidates: list[CandidateFeatures]


def ranking_features(store, user_id: str, item_ids: list[str]) -> RankingFeatures:
    """Features of one user and up to MAX_CANDIDATES items, with their affinities, in one call."""
    if not item_ids:
        raise ValueError("the candidate list is empty: pass at least one item_id")
    if len(item_ids) > MAX_CANDIDATES:
        raise ValueError(f"{len(item_ids)} candidates is more than {MAX_CANDIDATES} per call; split the list")
    columns = feast_store.online_read_views(
        store, [(stored, [user_id] if stored.join_key == "user_id" else item_ids) for stored in _stored_views(store)])
    user_vector = columns["user_embedding"][0]
    item_vectors, titles = columns["item_embedding"], columns["title"]
    known = [row for row, vector in enumerate(item_vectors) if vector is not None]
    affinities: list[float | None] = [None] * len(item_ids)
    if user_vector is not None and known:
        scores = np.stack([item_vectors[row] for row in known]) @ user_vector  # unit vectors: cosines
        for row, score in zip(known, scores.tolist()):
            affinities[row] = score
    candidates = [
        CandidateFeatures(item_id, item_vectors[row], titles[row], affinities[row])
        for row, item_id in enumerate(item_ids)
    ]
    return RankingFeatures(user_id, user_vector, columns["history_length"][0], candidates)


@functools.lru_cache(maxsize=16)
def _stored_views(store):
    """ranking_v1's stored feature views, resolved once per store. The on-demand affinity view is left
    out: numpy computes the same cosine from the raw vectors, and the HTTP server serves the view itself."""
    return feast_store.stored_views(store, RANKING_SERVICE)


def known_item_ids(store) -> list[str]:
    """Every item the service has written to the offline store, removed ones included."""
    folder = feast_store.offline_table(store, ITEM_VIEW).path
    if not any(folder.glob("*.parquet")):
        return []
    table = ds.dataset(folder, format="parquet").to_table(columns=["item_id"])
    return sorted(set(table.column("item_id").to_pylist()))


def recommend(store, user_id: str, candidates: list[str], k: int = 10) -> list[CandidateFeatures]:
    """The k candidates with the highest affinity to the user (the whole catalogue: coldstart.retrieval)."""
    if not candidates:
        raise ValueError("no candidates: pass some")
    scored: list[CandidateFeatures] = []
    for start in range(0, len(candidates), MAX_CANDIDATES):
        features = ranking_features(store, user_id, candidates[start : start + MAX_CANDIDATES])
        if features.user_embedding is None:
            raise UnknownUser(f"user {user_id!r} has no vector yet: no positive action on an item the service knows")
        scored += [c for c in features.candidates if c.affinity is not None]
    return sorted(scored, key=lambda c: c.affinity, reverse=True)[:k]
