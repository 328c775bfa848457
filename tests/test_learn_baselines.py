"""Baselines on the shared split: RecBole's input files for SASRec, popularity, raw content."""

import numpy as np
import pytest

from encoders.training.datasets import make_split
from encoders.training.evaluate import content_scores, popularity_scores, slices_of
from encoders.training.sasrec_baseline import MAX_LENGTH, sasrec_scores, write_benchmark
from tests.learn_fixtures import ml100k  # noqa: F401  (fixture)


def read_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id_list:token_seq\titem_id:token"
    return [(u, h.split(" "), t) for u, h, t in (line.split("\t") for line in lines[1:])]


def test_sasrec_files_match_recbole_leave_one_out(ml100k, tmp_path):
    split = make_split(ml100k, "loo")
    write_benchmark(ml100k, split, tmp_path)
    train = read_rows(tmp_path / "sasrec.train.inter")
    # RecBole's LS split + data augmentation: one sample per next item of each training sequence.
    assert len(train) == ml100k.num_interactions - 3 * len(ml100k.user_ids)
    assert max(len(h) for _, h, _ in train) == MAX_LENGTH
    test = {u: (h, t) for u, h, t in read_rows(tmp_path / "sasrec.test.inter")}
    user = ml100k.user_ids.index("1")
    sequence = [ml100k.item_ids[i] for i in ml100k.sequences[user]]
    assert test["1"] == (sequence[:-1][-MAX_LENGTH:], sequence[-1])
    assert len(read_rows(tmp_path / "sasrec.valid.inter")) == len(ml100k.user_ids)


def test_sasrec_files_hold_no_cold_training_interaction(ml100k, tmp_path):
    split = make_split(ml100k, "cold")
    write_benchmark(ml100k, split, tmp_path)
    cold = {ml100k.item_ids[i] for i in np.flatnonzero(split.cold)}
    for u, history, target in read_rows(tmp_path / "sasrec.train.inter"):
        assert target not in cold and not cold.intersection(history)
    assert not cold.intersection(t for _, _, t in read_rows(tmp_path / "sasrec.valid.inter"))
    assert cold.intersection(t for _, _, t in read_rows(tmp_path / "sasrec.test.inter"))


def test_popularity_counts_training_interactions_only(ml100k):
    split = make_split(ml100k, "cold")
    scores = popularity_scores(split, np.arange(3))
    assert scores.shape == (3, ml100k.num_items)
    assert (scores[:, split.cold] == 0).all()  # cold items were never trained on
    assert scores[0].sum() == sum(len(s) for s in split.train)


def test_content_baseline_is_cosine_to_mean_history():
    content = np.eye(4, dtype=np.float32)
    scores = content_scores(content, [np.array([0, 1]), np.array([2])])
    assert np.allclose(scores[0], [2 ** -0.5, 2 ** -0.5, 0, 0]) and np.allclose(scores[1], [0, 0, 1, 0])


def test_cold_slices_partition_the_test_users(ml100k):
    split = make_split(ml100k, "cold")
    targets = split.test[split.test >= 0]
    slices = slices_of(split, targets)
    assert slices["cold_overall"].sum() == slices["cold_cold"].sum() + slices["cold_warm"].sum() == len(targets)
    assert set(slices_of(make_split(ml100k, "loo"), targets)) == {"loo"}


def test_sasrec_cached_only_says_which_split_has_no_result(ml100k, tmp_path):
    split = make_split(ml100k, "cold", seed=0)
    with pytest.raises(FileNotFoundError, match=r"no cached SASRec result for \[cold\]"):
        sasrec_scores(ml100k, split, tmp_path, train=False)
