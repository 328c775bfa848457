"""The README's demo command, end to end: the films demo (towers trained on the cold protocol) and the books one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coldstart.config import Settings
from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.demo import pick_queries
from coldstart.dev.films_demo import make_plan
from encoders.export_format import TOWERS_METADATA
from encoders.training.datasets import fetch_ml100k, load_ml100k, make_split
from tests.conftest import PROJECT_DATA_DIR, SETTINGS

USERS = 30  # the films demo's test replays a few users only: every film is still uploaded


def demo(env: dict, *options: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = subprocess.run([sys.executable, "-m", "coldstart.cli", "demo", *options], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **env})
    lines = result.stdout.strip().splitlines()
    return result, json.loads(lines[-1]) if "--json" in options and result.returncode == 0 and lines else None


@pytest.fixture(scope="module")
def cold_towers(tmp_path_factory):
    """Towers trained on the cold protocol, exported as `make demo` exports them, of the 3-epoch smoke config
    (its checkpoint is kept under the data folder, so later runs only export)."""
    out = tmp_path_factory.mktemp("towers-cold")
    # One torch thread: on a busy 2-core machine two threads spin against each other (an epoch took 10x longer).
    run = subprocess.run([sys.executable, "-m", "coldstart.cli", "export-towers", "--config", "learn-minilm-smoke",
                          "--protocol", "cold", "--out", str(out)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return out


def test_the_towers_folder_is_a_setting():
    assert Settings.from_env({}).towers_dir == Settings.from_env({}).onnx_dir / "towers"
    assert Settings.from_env({"COLDSTART_TOWERS_DIR": "/x/towers-cold"}).towers_dir.as_posix() == "/x/towers-cold"


def test_the_plan_uploads_fresh_exactly_the_films_the_towers_never_trained_on():
    towers = {"split": {"cold_fraction": 0.2, "seed": 0}}
    plan = make_plan(SETTINGS, towers)
    data = load_ml100k(fetch_ml100k(PROJECT_DATA_DIR / "datasets" / "ml-100k"))
    split = make_split(data, "cold", 0.2, 0)
    assert set(plan.cold) == {data.item_ids[i] for i in np.flatnonzero(split.cold)}
    assert not set(plan.cold) & set(plan.warm) and len(plan.cold) + len(plan.warm) == len(plan.films) == data.num_items
    assert len(plan.targets) == int(split.cold[split.test[split.test >= 0]].sum())  # offline's cold_cold users
    for user, target in plan.targets.items():
        assert target in plan.cold and target not in plan.histories[user]
    assert list(plan.histories)[: len(plan.targets)] == list(plan.targets)  # they come first
    few = make_plan(SETTINGS, towers, users=5)
    assert list(few.histories) == list(plan.histories)[:5] == list(few.targets)


def test_the_films_demo_refuses_towers_that_trained_on_every_film(tmp_path):
    (tmp_path / TOWERS_METADATA).write_text(json.dumps({"protocol": "loo", "version": "x"}))
    result, _ = demo({"COLDSTART_TOWERS_DIR": str(tmp_path)}, "--json")
    assert result.returncode == 1
    assert "trained on the cold protocol" in result.stderr and "export-towers --protocol cold" in result.stderr


def test_the_films_demo_retrieves_every_fresh_film_and_scores_the_users_who_watch_them(cold_towers):
    result, summary = demo({"COLDSTART_TOWERS_DIR": str(cold_towers)}, "--users", str(USERS), "--rate", "100", "--json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    towers = json.loads((cold_towers / TOWERS_METADATA).read_text())
    assert summary["towers"] == towers["version"] and summary["users"] == USERS
    assert summary["fresh_retrievable"] == summary["fresh_films"] == len(summary["retrievable_ms"]) > 300
    assert 0 < summary["retrievable_p50_ms"] <= summary["retrievable_p99_ms"] <= summary["retrievable_max_ms"]
    assert summary["online_hr_users"] == USERS and summary["online_errors"] == 0  # the first users' next film is fresh
    # Up to 10,000 items the index is scanned exactly: retrieval ranks as the offline scorer does over the same
    # vectors (the index holds them as f16: a near-tie at place 50 may go either way, for one user at most).
    assert abs(summary["online_hr_at_50"] - summary["served_exact_hr_at_50"]) <= 1 / USERS
    assert summary["offline_cold_cold_hr_at_50"] == pytest.approx(towers["test_metrics"]["cold_cold"]["hr@50"], abs=1e-4)


def test_catalogue_is_well_formed():
    items = load_catalogue()
    assert len(items) >= 200
    assert len({i["item_id"] for i in items}) == len(items)
    for item in items:
        assert item["title"] and len(item["description"]) > 40 and item["category"]
    assert len(pick_queries(items, 3)) == 3


def test_the_books_demo_json_reports_every_item_arrived(redis_url):
    result, summary = demo({"REDIS_URL": redis_url}, "--catalogue", "books", "--items", "24", "--rate", "20", "--json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["arrived"] == summary["expected"] == 24
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert len(summary["neighbours"]) == 3
