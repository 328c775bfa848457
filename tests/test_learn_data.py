"""Data loaders (real ML-100K files, a written Amazon 2014 sample), splits and the content cache."""

import csv
import gzip
import json
from dataclasses import asdict

import numpy as np
import pandas as pd

from encoders.text import item_text
from encoders.training.ceg import CEGConfig
from encoders.training.datasets import (Interactions, amazon2014_to_data, content_cache_key, content_embeddings,
                                        fetch_ml100k, make_split, ml100k_films, prepare_ml100k)
from encoders.training.own_data import read_data
from encoders.training.registry import encoder_config
from tests.conftest import PROJECT_DATA_DIR
from tests.learn_fixtures import ml100k  # noqa: F401  (fixture)

ML100K = PROJECT_DATA_DIR / "datasets" / "ml-100k"
# The cache file of ML-100K's MiniLM embeddings (data/cache/content/): its texts must not change, or
# every evaluation figure would be computed on new embeddings.
ML100K_MINILM_CACHE_KEY = "all-minilm-l6-v2-46b3dbeec6fc9102"


def test_ml100k_real_files(ml100k):
    assert (len(ml100k.user_ids), ml100k.num_items, ml100k.num_interactions) == (943, 1682, 100_000)
    assert min(len(s) for s in ml100k.sequences) >= 20  # ML-100K: every user rated at least 20 movies
    assert ml100k.item_texts[ml100k.item_ids.index("1")] == "Toy Story (1995) Category: Animation, Children's, Comedy."
    # Each user's sequence is in time order, ties in file order: check against the raw file.
    with open(ML100K / "ml-100k.inter") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    user = "1"
    expected = [item for _, item, _, _ in sorted(
        (r for r in rows if r[0] == user), key=lambda r: float(r[3]))]  # sorted() is stable
    got = [ml100k.item_ids[i] for i in ml100k.sequences[ml100k.user_ids.index(user)]]
    assert got == expected


def test_ml100k_through_the_data_format_is_the_data_set_the_figures_were_made_on(ml100k):
    """Read from its converted data folder, ML-100K has the items in the same order with the same texts
    (so the cached content embeddings stay valid) and the same users and sequences as read from RecBole's
    files directly (the loader before the format)."""
    films = ml100k_films(ML100K)
    assert ml100k.item_ids == [film["item_id"] for film in films]
    assert ml100k.item_texts == [item_text(title=film["title"], category=film["category"]) for film in films]
    config = encoder_config("all-minilm-l6-v2")
    settings = {k: v for k, v in asdict(config).items() if k not in ("name", "model_path")}
    assert content_cache_key(config.name, ml100k.item_texts, **settings) == ML100K_MINILM_CACHE_KEY
    inter = pd.read_csv(ML100K / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    inter["timestamp"] = inter["timestamp"].astype(float)
    index = {item: i for i, item in enumerate(ml100k.item_ids)}
    inter["item"] = inter["item_id"].map(index)
    expected = inter.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id", sort=True)["item"]
    assert ml100k.user_ids == list(expected.groups)
    assert all(np.array_equal(got, want.to_numpy()) for got, (_, want) in zip(ml100k.sequences, expected))
    assert sorted(p.name for p in ML100K.glob("*.parquet")) == ["interactions.parquet", "items.parquet"]


def test_ml100k_is_converted_again_when_its_conversion_is_not_current(tmp_path):
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):  # checksum-verified: no download
        (tmp_path / name).write_bytes((ML100K / name).read_bytes())
    folder = prepare_ml100k(tmp_path)
    first = (folder / "items.parquet").stat().st_mtime_ns
    assert prepare_ml100k(tmp_path) == folder and (folder / "items.parquet").stat().st_mtime_ns == first
    pd.DataFrame({"item_id": ["1"], "title": ["stale"]}).to_parquet(folder / "items.parquet")  # no stamp
    assert read_data(prepare_ml100k(tmp_path))[0].num_items == 1682


def test_fetch_is_idempotent_and_repairs_a_changed_file(tmp_path):
    folder = fetch_ml100k(tmp_path)
    (folder / "ml-100k.item").write_text("tampered")
    fetch_ml100k(tmp_path)  # checksum mismatch → fetched again
    assert (folder / "ml-100k.item").read_text().startswith("item_id:token")


def write_amazon_sample(folder):
    reviews = [  # strict JSON, one per line (reviews_*_5.json.gz)
        {"reviewerID": "U1", "asin": "B2", "overall": 4.0, "unixReviewTime": 200},
        {"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 100},
        {"reviewerID": "U1", "asin": "B4", "overall": 3.0, "unixReviewTime": 200},  # tie: stays after B2
        {"reviewerID": "U1", "asin": "B3", "overall": 3.0, "unixReviewTime": 300},  # no metadata: dropped
        {"reviewerID": "U2", "asin": "B1", "overall": 2.0, "unixReviewTime": 50},
        {"reviewerID": "U2", "asin": "B2", "overall": 2.0, "unixReviewTime": 60},
    ]
    metas = [  # Python literals, as McAuley's 2014 meta files are written (single quotes)
        "{'asin': 'B1', 'title': 'Dune', 'price': 9.99, 'brand': 'Ace', 'description': 'A desert planet.', "
        "'categories': [['Books', 'Science Fiction'], ['Kindle Store', 'Books']]}",
        "{'asin': 'B2', 'title': \"Ender's Game\", 'categories': [['Books']]}",
        "{'asin': 'B4', 'description': 'No title, only a description.'}",
        "{'asin': 'B9', 'title': 'Never reviewed'}",
    ]
    with gzip.open(folder / "reviews_Test_5.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    with gzip.open(folder / "meta_Test.json.gz", "wt") as f:
        f.writelines(m + "\n" for m in metas)
    return folder / "reviews_Test_5.json.gz", folder / "meta_Test.json.gz"


def test_amazon2014_sample(tmp_path):
    amazon2014_to_data(*write_amazon_sample(tmp_path), tmp_path / "Test")
    data, read = read_data(tmp_path / "Test")
    assert data.name == "Test" and read.bad_rows == 0
    assert data.item_ids == ["B1", "B2", "B4"]  # B3 has no metadata, B9 no review
    texts = dict(zip(data.item_ids, data.item_texts))
    assert texts["B1"] == "Dune Category: Books > Science Fiction. By Ace. Tags: Kindle Store. Price: 9.99. A desert planet."
    assert texts["B2"] == "Ender's Game Category: Books."
    assert texts["B4"] == "No title, only a description."
    sequences = {u: [data.item_ids[i] for i in s] for u, s in zip(data.user_ids, data.sequences)}
    assert sequences == {"U1": ["B1", "B2", "B4"], "U2": ["B1", "B2"]}


def toy_data(num_users=50, num_items=30, length=8, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    sequences = [rng.permutation(num_items)[:length] for _ in range(num_users)]
    return Interactions("toy", [str(i) for i in range(num_items)], [f"item {i}" for i in range(num_items)],
                        [str(u) for u in range(num_users)], sequences)


def test_loo_split_is_leave_one_out_by_time(ml100k):
    split = make_split(ml100k, "loo")
    for u, seq in enumerate(ml100k.sequences):
        assert split.test[u] == seq[-1] and split.valid[u] == seq[-2]
        assert np.array_equal(split.train[u], seq[:-2])
        assert np.array_equal(split.test_history(u), seq[:-1])
    assert not split.cold.any()


def test_cold_split_never_trains_on_cold_items(ml100k):
    split = make_split(ml100k, "cold", cold_fraction=0.2, seed=0)
    assert split.cold.sum() == round(0.2 * ml100k.num_items)
    assert not split.cold[np.concatenate(split.train)].any()  # neither as input nor as target
    for targets in (split.valid, split.test):  # validation and test have both kinds of target
        assert 0 < split.cold[targets].sum() < len(targets)
    # At test time the history is complete, cold items included.
    assert any(split.cold[split.test_history(u)].any() for u in range(len(ml100k.user_ids)))
    assert np.array_equal(make_split(ml100k, "cold", seed=0).cold, split.cold)
    assert not np.array_equal(make_split(ml100k, "cold", seed=1).cold, split.cold)


def test_short_users_only_train():
    data = toy_data()
    data.sequences[0] = data.sequences[0][:2]
    split = make_split(data, "loo")
    assert split.test[0] == -1 and split.valid[0] == -1 and len(split.train[0]) == 2


def test_content_cache_keeps_order_and_keys_by_text(tmp_path):
    texts = ["Toy Story (1995) Category: Animation.", "a", "A much longer title " * 5]
    config = CEGConfig()
    first = content_embeddings(texts, config, tmp_path, batch_size=2)  # batches sorted by length
    assert first.shape == (3, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([content_embeddings([t], config, tmp_path) for t in texts])
    assert np.allclose(first, one_by_one, atol=1e-5)  # the original order was restored
    assert len(list(tmp_path.glob("all-minilm-l6-v2-*.npy"))) == 4  # one file per distinct text list
    assert np.array_equal(content_embeddings(texts, config, tmp_path), first)  # served from the cache
