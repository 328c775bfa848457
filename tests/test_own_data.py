"""Your own training data: the data-folder format, its bad rows, and the service's history exported from its
topics and offline store and trained on, through the real broker, worker, Redis and Feast."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coldstart import store as feast_store
from coldstart.config import USER_VIEW
from coldstart.dev.load import item_event, send_action, send_item
from encoders.text import item_text
from encoders.training.configs import get_config
from encoders.training.evaluate import current_history, data_digest
from encoders.training.own_data import BadRow, DataError, read_data, write_data
from tests.conftest import serving_stack, stack_producer, unique_id, wait_readable

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
ITEMS = [
    {"item_id": "b1", "title": "Dune", "description": "A desert planet.", "category": "Science Fiction",
     "brand": "Ace", "price": 9.99, "tags": ["classic", "space"], "uploaded_at": T0},
    {"item_id": "b2", "title": "Salt, Fat, Acid, Heat", "category": "Cookbooks", "uploaded_at": T0},
    {"item_id": "b3", "title": "", "description": "Only a description, \"quoted\",\nover two lines."},
]
INTERACTIONS = [
    {"user_id": "u1", "item_id": "b2", "action": "click", "occurred_at": T0 + timedelta(minutes=2)},
    {"user_id": "u1", "item_id": "b1", "action": "like", "occurred_at": T0 + timedelta(minutes=1)},
    {"user_id": "u1", "item_id": "b3", "action": "purchase", "occurred_at": T0 + timedelta(minutes=2)},  # tie
    {"user_id": "u2", "item_id": "b1", "action": "skip", "occurred_at": T0},
    {"user_id": "u2", "item_id": "b3", "action": "share", "occurred_at": T0 + timedelta(seconds=1, microseconds=5)},
]


def run_coldstart(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coldstart.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


# ---- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_format_reads_the_same_data_set(tmp_path, fmt):
    write_data(tmp_path / "shelf", ITEMS, INTERACTIONS, fmt)
    data, read = read_data(tmp_path / "shelf")
    assert data.name == "shelf" and data.item_ids == ["b1", "b2", "b3"]  # file order
    assert data.item_texts[0] == item_text("Dune", "A desert planet.", "Science Fiction", "Ace", ["classic", "space"],
                                           9.99)  # the worker's text of the same fields
    assert data.item_texts[0] == ("Dune Category: Science Fiction. By Ace. Tags: classic, space. Price: 9.99. "
                                  "A desert planet.")
    sequences = {u: [data.item_ids[i] for i in s] for u, s in zip(data.user_ids, data.sequences)}
    assert sequences == {"u1": ["b1", "b2", "b3"], "u2": ["b3"]}  # by time, a tie in file order; skips left out
    assert (read.items.rows, read.interactions.rows, read.skips, read.bad_rows) == (3, 5, 1, 0)


def test_epoch_seconds_and_strings_are_times_too(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "items.csv").write_text("item_id,title\nb1,Dune\nb2,Emma\n")
    (folder / "interactions.csv").write_text("user_id,item_id,action,occurred_at\n"
                                             "u1,b2,click,1767600000.5\nu1,b1,click,2026-01-05T07:59:59Z\n")
    data, _ = read_data(folder)
    assert [data.item_ids[i] for i in data.sequences[0]] == ["b1", "b2"]  # 07:59:59 before 08:00:00.5


def bad_folder(tmp_path, items: str, interactions: str):
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "items.csv").write_text(items)
    (folder / "interactions.csv").write_text(interactions)
    return folder


ITEMS_CSV = 'item_id,title,description,price\nb1,Dune,"A desert\nplanet",9.99\nb2,Emma,,\n'  # b1 spans lines 2-3
ACTIONS_CSV = "user_id,item_id,action,occurred_at\nu1,b1,click,2026-01-05T09:00:00Z\nu1,b2,click,2026-01-05T09:01:00Z\n"


@pytest.mark.parametrize("items_tail, actions_tail, where, reason", [
    ("b3,Neuromancer,,cheap\n", "", "items.csv, line 5", "price must be a number, got str"),
    ("b4,,,\n", "", "items.csv, line 5", "no text to encode"),
    ("b2,Emma again,,\n", "", "items.csv, line 5", "item_id 'b2' is already on line 4"),
    ("", "u1,b9,click,2026-01-05T09:02:00Z\n", "interactions.csv, line 4", "item_id 'b9' is not in items.csv"),
    ("", "u1,b1,watch,2026-01-05T09:02:00Z\n", "interactions.csv, line 4", "action must be one of"),
    ("", "u1,b1,click,yesterday\n", "interactions.csv, line 4", "occurred_at is not an ISO-8601 time"),
    ("", "u1,b1,click,2026-01-05T09:02:00\n", "interactions.csv, line 4", "occurred_at needs a time zone"),
    ("", "u1,b1,click,2099-01-01T00:00:00Z\n", "interactions.csv, line 4", "between 1970 and 1 hour from now"),
    ("", "u1,b2,click,2026-01-05T09:01:00Z\n", "interactions.csv, line 4", "the same action as on line 3"),
    ("", ",b1,click,2026-01-05T09:02:00Z\n", "interactions.csv, line 4", "user_id must be 1–256 printable"),
    ("", "u1,b1,click\n", "interactions.csv, line 4", "3 cells for 4 columns"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, items_tail, actions_tail, where, reason):
    folder = bad_folder(tmp_path, ITEMS_CSV + items_tail, ACTIONS_CSV + actions_tail)
    with pytest.raises(BadRow) as bad:
        read_data(folder)
    assert f"{folder}/{where}: " in str(bad.value) and reason in str(bad.value)
    data, read = read_data(folder, skip_bad_rows=True)  # skipped and counted instead
    assert read.bad_rows == 1 and data.num_interactions == 2
    assert where.split(", ")[1] in read.summary() and reason in read.summary()


def test_skipped_rows_are_counted_per_file_and_a_skipped_item_takes_its_interactions(tmp_path):
    folder = bad_folder(tmp_path, ITEMS_CSV + "b3,Neuromancer,,-1\n",
                        ACTIONS_CSV + "u1,b3,click,2026-01-05T09:02:00Z\nu1,b1,click,not-a-time\n")
    data, read = read_data(folder, skip_bad_rows=True)
    assert (read.items.rows, len(read.items.bad), read.interactions.rows, len(read.interactions.bad)) == (3, 1, 4, 2)
    assert [where for where, _ in read.interactions.bad] == ["line 4", "line 5"]
    assert "item_id 'b3' is not in items.csv" in read.interactions.bad[0][1]
    assert data.item_ids == ["b1", "b2"] and data.num_interactions == 2


def test_jsonl_lines_and_parquet_rows_are_numbered_as_stored(tmp_path):
    folder = tmp_path / "j"
    write_data(folder, ITEMS, INTERACTIONS, "jsonl")
    with open(folder / "interactions.jsonl", "a") as f:
        f.write("\n{not json\n")  # a blank line 6 is no row; line 7 is bad
    with pytest.raises(BadRow, match=r"interactions\.jsonl, line 7: not valid JSON"):
        read_data(folder)

    folder = tmp_path / "p"
    write_data(folder, ITEMS, INTERACTIONS, "parquet")
    naive = pa.table({"user_id": ["u1", "u1"], "item_id": ["b1", "b2"], "action": ["click", "click"],
                      "occurred_at": pa.array([datetime(2026, 1, 5), datetime(2026, 1, 6)], pa.timestamp("us"))})
    pq.write_table(naive, folder / "interactions.parquet")
    with pytest.raises(BadRow, match=r"interactions\.parquet, row 1: occurred_at needs a time zone"):
        read_data(folder)
    pd.DataFrame({"item_id": [1, 2], "title": ["Dune", "Emma"]}).to_parquet(folder / "items.parquet")
    with pytest.raises(BadRow, match=r"items\.parquet, row 1: item_id must be a string, got int"):
        read_data(folder)


def test_a_removal_is_not_an_item(tmp_path):
    folder = tmp_path / "r"
    write_data(folder, ITEMS, INTERACTIONS, "jsonl")
    with open(folder / "items.jsonl", "a") as f:
        f.write(json.dumps({"item_id": "b9", "deleted": True, "uploaded_at": "2026-01-05T09:00:00Z"}) + "\n")
    with pytest.raises(BadRow, match=r"items\.jsonl, line 4: a removal \(deleted: true\) is not an item"):
        read_data(folder)


def test_folders_that_cannot_be_read_say_why(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        read_data(tmp_path / "missing")
    folder = tmp_path / "f"
    write_data(folder, ITEMS, INTERACTIONS, "csv")
    with pytest.raises(DataError, match="already holds items.csv"):
        write_data(folder, ITEMS, INTERACTIONS, "jsonl")
    (folder / "items.jsonl").write_text("")
    with pytest.raises(DataError, match="holds items.csv and items.jsonl: keep one"):
        read_data(folder)
    (folder / "items.jsonl").unlink()
    (folder / "interactions.csv").write_text("user,item,action,occurred_at\n")
    with pytest.raises(DataError, match="no column 'user_id', 'item_id'"):
        read_data(folder)
    (folder / "interactions.csv").write_text("user_id,item_id,action,occurred_at\nu1,b1,skip,1767600000\n")
    with pytest.raises(DataError, match="no positive interaction"):
        read_data(folder)


def test_a_checkpoint_on_other_data_is_not_current(tmp_path):
    write_data(tmp_path / "d", ITEMS, INTERACTIONS, "csv")
    data, _ = read_data(tmp_path / "d")
    config = get_config("learn-minilm-smoke")
    history = {"settings": json.loads(json.dumps(asdict(config)))}
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert current_history(config, tmp_path, data) is not None  # recorded before data digests: trusted
    (tmp_path / "history.json").write_text(json.dumps({**history, "data": data_digest(data)}))
    assert current_history(config, tmp_path, data) is not None
    data.sequences[0] = data.sequences[0][:-1]
    assert current_history(config, tmp_path, data) is None


# ---- the service's own history, through the real broker, worker, Redis and Feast ---------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    """A stack of this module's own: what it exports is exactly what this module sent."""
    with serving_stack(tmp_path_factory, redis_url, "coldstart_own_data") as running:
        yield running


@pytest.fixture(scope="module")
def history(stack):
    """Items and actions sent through Kafka and processed by the worker. Returns what a training set of them
    holds: {item_id: its text} (title and category: the same from the topics and the offline store) and
    {user_id: [item_id, …]} (positive actions on items still there, in time order)."""
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    topics = ["gardening", "cooking", "space travel", "medieval history"]
    items = {unique_id("shelf"): (f"A book about {topics[i % 4]} ({i})", topics[i % 4]) for i in range(12)}
    ids = list(items)
    removed, replaced = ids[-1], ids[0]
    with stack_producer(stack) as producer:
        for n, (item_id, (title, category)) in enumerate(items.items()):
            send_item(producer, item_event({"item_id": item_id, "title": title, "category": category},
                                           start + timedelta(seconds=n)))
        items[replaced] = ("A book about gardening, 2nd edition", "")  # a newer upload replaces the first
        send_item(producer, item_event({"item_id": replaced, "title": items[replaced][0]},
                                       start + timedelta(minutes=5)))
        send_item(producer, b'{"item_id": "no-title", "uploaded_at": 1}')  # dead-lettered, left out
        producer.flush()
        wait_readable(stack.store, ids, timeout=60)
        send_item(producer, {"item_id": removed, "deleted": True,
                             "uploaded_at": (start + timedelta(minutes=6)).isoformat()})
        sequences = {}
        for u in range(8):
            user_id = unique_id("reader")
            liked = [ids[(u % 4) + 4 * k] for k in range(3)] + [ids[(u + 1) % 4]]  # mostly one topic
            for k, item_id in enumerate(liked):
                send_action(producer, user_id, item_id, "click" if k % 2 else "like",
                            start + timedelta(minutes=10 + u, seconds=k))
            send_action(producer, user_id, ids[(u + 2) % 4], "skip", start + timedelta(minutes=10 + u, seconds=9))
            sequences[user_id] = [i for i in liked if i != removed]
        send_action(producer, user_id, ids[1], "click", start + timedelta(minutes=30))  # and the same again:
        send_action(producer, user_id, ids[1], "click", start + timedelta(minutes=30))  # a replay, once
        sequences[user_id].append(ids[1])
        send_action(producer, user_id, "never-uploaded", "click", start + timedelta(minutes=31))
        producer.send("user-actions", key=b"x", value=b'{"user_id": "x", "action": "watch"}')
        producer.flush()
    del items[removed]
    wait_for_offline_histories(stack, sequences)
    return {i: item_text(title, category=category) for i, (title, category) in items.items()}, sequences


def wait_for_offline_histories(stack, sequences: dict[str, list[str]], timeout: float = 60) -> None:
    """Until the offline store's user rows hold every item each user acted on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = feast_store.read_offline(stack.store, USER_VIEW, ["user_id", "seen_item_ids"])
        held = {}
        for user_id, seen in zip(rows["user_id"], rows["seen_item_ids"]):
            held.setdefault(user_id, set()).update(seen)
        if all(set(items) <= held.get(user, set()) for user, items in sequences.items()):
            return
        time.sleep(0.3)
    raise AssertionError(f"offline user histories incomplete after {timeout}s:\n{stack.worker.log_tail()}")


def as_sequences(folder) -> tuple[dict, dict]:
    data, read = read_data(folder)
    assert read.bad_rows == 0
    return (dict(zip(data.item_ids, data.item_texts)),
            {u: [data.item_ids[i] for i in s] for u, s in zip(data.user_ids, data.sequences)})


def test_history_exported_from_the_topics_holds_what_the_service_saw_and_trains(stack, history, tmp_path):
    items, sequences = history
    out = tmp_path / "from-topics"
    done = run_coldstart("data", "export", "--from", "topics", "--out", str(out), "--format", "csv",
                         "--idle-seconds", "1", env=stack.settings.as_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "invalid item events 1" in done.stdout and "removed items 1" in done.stdout
    assert "repeated actions 1" in done.stdout and "invalid action events 1" in done.stdout
    assert "actions on removed or unknown items 3" in done.stdout  # 2 on the removed item, 1 never uploaded
    texts, exported = as_sequences(out)
    assert f"wrote {len(texts)} items" in done.stdout
    assert {i: t for i, t in texts.items() if not i.startswith("probe-")} == items  # but the stack's warm-up item
    assert exported == sequences

    # Train on it: the smoke config (3 epochs), data and checkpoints in a folder of the test's own.
    env = {**stack.settings.as_env(), "COLDSTART_DATA_DIR": str(tmp_path / "data")}
    done = run_coldstart("train", "--data", str(out), "--config", "learn-minilm-smoke", "--protocol", "loo", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from-topics: {len(sequences)} users, {len(texts)} items" in done.stdout
    assert "learn-minilm-smoke [loo]: best epoch" in done.stdout
    assert (tmp_path / "data" / "checkpoints" / "from-topics" / "learn-minilm-smoke" / "loo" / "seed-0" / "checkpoint.pt").exists()

    # A training file with bad rows: the error names file and line; with the flag, skipped and counted.
    with open(out / "interactions.csv", "a") as f:
        f.write(f"{next(iter(sequences))},not-an-item,click,2026-01-05T09:00:00Z\n")
    bad_line = sum(1 for _ in open(out / "interactions.csv"))
    done = run_coldstart("train", "--data", str(out), "--config", "learn-minilm-smoke", "--protocol", "loo", env=env)
    assert done.returncode == 1
    assert (f"Error: {out}/interactions.csv, line {bad_line}: item_id 'not-an-item' is not in items.csv "
            "(--skip-bad-rows skips such rows and counts them)") in done.stderr
    done = run_coldstart("train", "--data", str(out), "--config", "learn-minilm-smoke", "--protocol", "loo",
                         "--skip-bad-rows", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"1 bad row skipped (line {bad_line}: item_id 'not-an-item' is not in items.csv)" in done.stdout
    assert "learn-minilm-smoke [loo]: best epoch" in done.stdout


def test_history_exported_from_the_offline_store_has_the_same_sequences(stack, history, tmp_path):
    items, sequences = history
    out = tmp_path / "from-offline"
    done = run_coldstart("data", "export", "--from", "offline", "--out", str(out), env=stack.settings.as_env(),
                         timeout=120)
    assert done.returncode == 0, done.stderr
    assert "removed items 1" in done.stdout
    texts, exported = as_sequences(out)
    assert {i: t for i, t in texts.items() if not i.startswith("probe-")} == items
    assert exported == sequences  # each history in its order (the times are those of the updates)

