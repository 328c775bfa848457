"""The one ranker every model is scored by: hand-built rankings with known HR and NDCG."""

import math

import numpy as np
import pytest

from encoders.training.metrics import rank_metrics, target_ranks


def test_hand_built_ranking():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.7, 0.3],  # target 2; item 0 is history (excluded), item 3 beats it → rank 1
        [0.1, 0.8, 0.2, 0.9, 0.3],  # target 1; item 3 is history → rank 0
        [0.5, 0.4, 0.3, 0.2, 0.1],  # target 4, no history → rank 4
    ])
    ranks = target_ranks(scores, np.array([2, 1, 4]), [np.array([0]), np.array([3]), np.array([], dtype=int)])
    assert ranks.tolist() == [1, 0, 4]
    metrics = rank_metrics(ranks, ks=(1, 2, 5))
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@2"] == pytest.approx(2 / 3)
    assert metrics["hr@5"] == pytest.approx(1.0)
    assert metrics["ndcg@1"] == pytest.approx(1 / 3)
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert metrics["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(6)) / 3)


def test_target_in_history_is_still_ranked():
    scores = np.array([[0.1, 0.9, 0.5]])
    assert target_ranks(scores, np.array([1]), [np.array([1, 2])]).tolist() == [0]


def test_ties_are_broken_by_one_seeded_order_neither_best_nor_worst():
    items = 40
    scores = np.zeros((items, items))  # a model that cannot tell items apart
    ranks = target_ranks(scores, np.arange(items), [np.array([], dtype=int)] * items, seed=3)
    assert sorted(ranks.tolist()) == list(range(items))  # each target takes a different place
    assert np.array_equal(ranks, target_ranks(scores, np.arange(items), [np.array([], dtype=int)] * items, seed=3))
