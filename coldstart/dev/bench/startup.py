"""`coldstart bench startup`: the worker's start-up time and resident memory, one or more installs side by side.

Each variant is a worker command: this checkout in this venv (always), and any
`--variant NAME=PYTHON[:SOURCE]` — another interpreter (a serving-only venv),
optionally running another checkout of the code (an older commit, for a
before/after comparison). Runs alternate between the variants, against one
broker and one Redis. Start-up = process start → a probe item uploaded at that
moment is readable in Feast; memory = resident set size after it served.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from coldstart import store as feast_store
from coldstart.config import PROJECT_ROOT, Settings
from coldstart.dev.bench.common import emit, machine
from coldstart.dev.load import item_event, new_producer, send_item
from coldstart.dev.services import LocalRedis, die_with_parent
from coldstart.dev.stack import LocalStack


def parse_variant(text: str) -> tuple[str, str, str]:
    name, _, command = text.partition("=")
    python, _, source = command.partition(":")
    if not name or not python:
        raise click.BadParameter(f"expected NAME=PYTHON[:SOURCE], got {text!r}")
    return name, python, source or str(PROJECT_ROOT)


@click.command()
@click.option("--runs", type=int, default=3, show_default=True, help="Starts per variant (alternating).")
@click.option("--variant", "variants", multiple=True,
              help="NAME=PYTHON[:SOURCE]: also start workers with this interpreter (and checkout); repeatable.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def startup(settings: Settings, runs: int, variants: tuple[str, ...], as_json: bool) -> None:
    """Worker start-up time and resident memory, and whether torch is mapped, per install."""
    commands = [("this checkout", sys.executable, str(PROJECT_ROOT)), *map(parse_variant, variants)]
    summary = run_startup_bench(settings, commands, runs)
    emit(summary["results"], summary, as_json)


def run_startup_bench(settings: Settings, commands: list[tuple[str, str, str]], runs: int) -> dict:
    import psutil

    samples: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, _, _ in commands}
    with LocalRedis() as redis_server:
        own = replace(settings, data_dir=Path(tempfile.mkdtemp(prefix="coldstart-bench-")),
                      feast_project="bench_startup", redis_url=redis_server.url)
        with LocalStack(own, worker=False) as stack:
            producer = new_producer(stack.settings)
            for run in range(runs):
                for name, python, source in commands:
                    # a consumer group of its own: every start joins afresh, as after a deploy
                    worker_settings = replace(stack.settings, consumer_group=f"startup-{uuid.uuid4().hex[:8]}")
                    env = {**os.environ, **worker_settings.as_env(), "PYTHONPATH": source, "HF_HUB_OFFLINE": "1"}
                    started = time.monotonic()
                    process = subprocess.Popen([python, "-m", "coldstart.cli", "worker"], cwd=source, env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               preexec_fn=die_with_parent)
                    try:
                        probe = f"startup-{uuid.uuid4().hex[:8]}"
                        send_item(producer, item_event({"item_id": probe, "title": "start-up probe"}))
                        producer.flush()
                        while not feast_store.read_item_features(stack.store, [probe]):
                            if process.poll() is not None or time.monotonic() - started > 180:
                                raise RuntimeError(f"{name}: the worker did not serve (exit {process.poll()})")
                            time.sleep(0.05)
                        serving_s = time.monotonic() - started
                        rss_mb = psutil.Process(process.pid).memory_info().rss / 2**20
                        torch_mapped = "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
                        samples[name].append((serving_s, rss_mb, torch_mapped))
                    finally:
                        process.terminate()
                        process.wait(timeout=60)
            producer.close()
    results = [{"worker": name, "runs": len(rows),
                "startup_s_median": round(float(np.median([r[0] for r in rows])), 2),
                "rss_mb_median": round(float(np.median([r[1] for r in rows]))),
                "torch_mapped": any(r[2] for r in rows)} for name, rows in samples.items()]
    return {"benchmark": "startup", "machine": machine(), "load_average": os.getloadavg(), "results": results}
