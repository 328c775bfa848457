"""The README's demo command, end to end, on a slice of the catalogue."""

import json
import os
import subprocess
import sys

from coldstart.dev.catalogue import load_catalogue
from coldstart.dev.demo import pick_queries


def test_catalogue_is_well_formed():
    items = load_catalogue()
    assert len(items) >= 200
    assert len({i["item_id"] for i in items}) == len(items)
    for item in items:
        assert item["title"] and len(item["description"]) > 40 and item["category"]
    assert len(pick_queries(items, 3)) == 3


def test_demo_json_reports_every_item_arrived(tmp_path, redis_url):
    env = {**os.environ, "COLDSTART_DATA_DIR": str(tmp_path), "REDIS_URL": redis_url, "COLDSTART_FEAST_PROJECT": "demo_test"}
    result = subprocess.run(
        [sys.executable, "-m", "coldstart.cli", "demo", "--items", "24", "--rate", "20", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["arrived"] == summary["expected"] == 24
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert len(summary["neighbours"]) == 3
