"""The read path for ranking: one user and their candidate items, in one online-store round trip.

    from coldstart import ranking_features, recommend
    features = ranking_features("u42", ["book-1", "book-2"])
    top = recommend("u42", k=10)

Both read the versioned feature service `ranking_v1` (feature_repo/feature_services.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds

from coldstart import feature_store
from coldstart.settings import Settings

FEATURE_SERVICE = "ranking_v1"
MAX_CANDIDATES = 1000  # one Feast call; above this, page the candidates


class UnknownUser(LookupError):
    """The user has no vector yet (no positive action on an item the service knows)."""


@dataclass
class CandidateFeatures:
    item_id: str
    item_embedding: list[float] | None  # None: the item is unknown to the service
    title: str | None
    affinity: float | None  # cosine of user and item vectors; None if either is unknown


@dataclass
class RankingFeatures:
    user_id: str
    user_embedding: list[float] | None  # None: unknown user
    history_length: int | None
    candidates: list[CandidateFeatures]


def ranking_features(user_id: str, item_ids: list[str], store=None) -> RankingFeatures:
    """Features of one user and up to MAX_CANDIDATES items, with their affinities, in one call."""
    if not item_ids:
        raise ValueError("the candidate list is empty: pass at least one item_id")
    if len(item_ids) > MAX_CANDIDATES:
        raise ValueError(f"{len(item_ids)} candidates is more than {MAX_CANDIDATES} per call; split the list")
    store = store or feature_store.open_store(Settings.from_env())
    response = store.get_online_features(
        features=_ranking_service(store),
        entity_rows=[{"user_id": user_id, "item_id": item_id} for item_id in item_ids],
    ).to_dict()
    candidates = [
        CandidateFeatures(item_id, response["item_embedding"][row], response["title"][row], response["affinity"][row])
        for row, item_id in enumerate(response["item_id"])
    ]
    return RankingFeatures(user_id, response["user_embedding"][0], response["history_length"][0], candidates)


@functools.lru_cache(maxsize=16)
def _ranking_service(store):
    """The feature service object, resolved once per store: looking it up re-reads and
    re-parses the registry, and a fresh registry read also empties Feast's request cache."""
    return store.get_feature_service(FEATURE_SERVICE, allow_cache=True)


def known_item_ids(settings: Settings) -> list[str]:
    """Every item the service has written to the offline store (the catalogue to rank)."""
    from feature_repo.data_sources import item_embeddings_source

    folder = Path(item_embeddings_source.path)
    if not any(folder.glob("*.parquet")):
        return []
    table = ds.dataset(folder, format="parquet").to_table(columns=["item_id"])
    return sorted(set(table.column("item_id").to_pylist()))


def recommend(user_id: str, candidates: list[str] | None = None, k: int = 10, store=None,
              settings: Settings | None = None) -> list[CandidateFeatures]:
    """The k candidates (default: the whole known catalogue) with the highest affinity to the user."""
    settings = settings or Settings.from_env()
    store = store or feature_store.open_store(settings)
    candidates = candidates if candidates is not None else known_item_ids(settings)
    if not candidates:
        raise ValueError("no candidates: pass some, or upload items first")
    scored: list[CandidateFeatures] = []
    for start in range(0, len(candidates), MAX_CANDIDATES):
        features = ranking_features(user_id, candidates[start : start + MAX_CANDIDATES], store)
        if features.user_embedding is None:
            raise UnknownUser(f"user {user_id!r} has no vector yet: no positive action on an item the service knows")
        scored += [c for c in features.candidates if c.affinity is not None]
    return sorted(scored, key=lambda c: c.affinity, reverse=True)[:k]
