"""coldstart: real-time cold-start embeddings (LEARN) served through Feast."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def ranking_features(user_id: str, item_ids: list[str], store=None):
    """One user's and their candidate items' features with affinities (see coldstart.ranking)."""
    from coldstart.ranking import ranking_features as read

    return read(user_id, item_ids, store)


def recommend(user_id: str, candidates: list[str] | None = None, k: int = 10, store=None):
    """The k items with the highest affinity to the user (see coldstart.ranking)."""
    from coldstart.ranking import recommend as rank

    return rank(user_id, candidates, k, store)
