"""Nothing acknowledged is lost: worker restarts and an online store rebuilt from the offline store."""

import os
import subprocess
import sys
import time

import pytest
import redis

from coldstart.stack import WorkerProcess
from tests.conftest import unique_id, upload, wait_readable


def restart_worker(stack, crash: bool) -> None:
    stack.worker.kill() if crash else stack.worker.stop()
    stack.worker = WorkerProcess(stack.settings).start()


def upload_batch(producer, prefix: str, count: int) -> list[str]:
    ids = [unique_id(prefix) for _ in range(count)]
    for item_id in ids:
        upload(producer, {"item_id": item_id, "title": f"Item {item_id} about gardening"})
    return ids


def test_graceful_restart_loses_nothing(stack, producer):
    before = upload_batch(producer, "before", 20)
    restart_worker(stack, crash=False)  # some of `before` may not be processed yet
    during = upload_batch(producer, "during", 20)  # sent while no worker is up
    wait_readable(stack.store, before + during, timeout=60)


@pytest.mark.reliability
def test_worker_killed_mid_batch_loses_nothing(stack, producer):
    ids = upload_batch(producer, "killed", 40)
    time.sleep(0.3)  # let the worker get into the middle of it
    restart_worker(stack, crash=True)  # SIGKILL: nothing flushed, nothing committed gracefully
    ids += upload_batch(producer, "after-kill", 10)
    wait_readable(stack.store, ids, timeout=60)


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
