"""Nothing acknowledged is lost: a graceful worker restart, and an online store rebuilt from the offline store.

The crash and outage scenarios are in test_reliability.py.
"""

import os
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import restart_worker, upload_batch, wait_readable

pytestmark = pytest.mark.reliability


def test_graceful_restart_loses_nothing(stack, producer):
    before = upload_batch(producer, "before", 20)
    restart_worker(stack, crash=False)  # some of `before` may not be processed yet
    during = upload_batch(producer, "during", 20)  # sent while no worker is up
    wait_readable(stack.store, before + during, timeout=60)


def test_materialize_rebuilds_a_wiped_online_store(stack, producer):
    ids = upload_batch(producer, "rebuild", 5)
    served = wait_readable(stack.store, ids)
    time.sleep(stack.settings.offline_flush_seconds + 1.5)  # offline part file written
    redis.Redis.from_url(stack.settings.redis_url).flushdb()
    assert stack.store.get_online_features(
        features=["item_embedding:item_embedding"], entity_rows=[{"item_id": ids[0]}]
    ).to_dict()["item_embedding"] == [None]

    env = {**os.environ, **stack.settings.as_env()}
    subprocess.run([sys.executable, "-m", "coldstart.cli", "materialize"], env=env, check=True, timeout=120)
    restored = wait_readable(stack.store, ids, timeout=5)
    for item_id in ids:
        assert restored[item_id]["item_embedding"] == pytest.approx(served[item_id]["item_embedding"])
