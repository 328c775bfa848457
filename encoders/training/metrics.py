"""Full-ranking HR@k and NDCG@k: the one scorer every model goes through.

Each evaluated user has one held-out target. All items are ranked by the
model's score; items already in the user's history are excluded (except the
target itself, should the user have acted on it before). Ties are broken
by one seeded random order of the items, so a model that gives many items
the same score (popularity on never-seen items) gets neither the best nor
the worst place for its target.
"""

from __future__ import annotations

import numpy as np

KS = (10, 50, 200)


def target_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: list[np.ndarray], seed: int = 0
) -> np.ndarray:
    """(U, I) scores, (U,) target items, U history arrays → (U,) 0-based ranks of the targets."""
    U, I = scores.shape
    assert targets.shape == (U,) and len(histories) == U and (targets >= 0).all()
    tie_order = np.random.default_rng(seed).permutation(I)  # (I,)
    ranks = np.empty(U, dtype=np.int64)
    for u in range(U):
        row, target = scores[u], targets[u]
        counted = np.ones(I, dtype=bool)
        counted[histories[u]] = False
        counted[target] = False  # the target is what is ranked, never a competitor
        above = row > row[target]
        tied_before = (row == row[target]) & (tie_order < tie_order[target])
        ranks[u] = np.count_nonzero(counted & (above | tied_before))
    return ranks


def rank_metrics(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    """HR@k and NDCG@k (one relevant item per user: IDCG = 1) from 0-based ranks."""
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(ranks < k)) if len(ranks) else float("nan")
    for k in ks:
        gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(np.mean(gains)) if len(ranks) else float("nan")
    return out
