"""Start the whole local stack — Redis, the embedded broker, Feast, worker and server processes — and stop it.

Used by `coldstart demo`, the benchmarks and the tests, so that all three run
the service exactly as deployed: the worker is a separate `coldstart worker`
process (and the HTTP server a `coldstart serve` process) talking to a real
broker and a real Redis, configured by the settings they are handed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from coldstart import store as feast_store
from coldstart.config import Settings
from coldstart.dev.load import item_event, new_producer, send_item
from coldstart.dev.services import (
    EmbeddedBroker,
    LocalRedis,
    die_with_parent,
    ensure_redis,
    free_port,
)
from encoders.export_format import encoder_export_is_current
from streams.topics import create_topics

log = logging.getLogger(__name__)


class ServiceProcess:
    """A `coldstart <command>` child process with the given settings (its output in a log file)."""

    command: list[str] = []

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"coldstart-{self.command[0]}-", suffix=".log")[1])

    def start(self) -> "ServiceProcess":
        env = {**os.environ, **self.settings.as_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coldstart.cli", *self.command],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        return self

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM): a worker commits acknowledged offsets and leaves the group."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, with nothing flushed or committed."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerProcess(ServiceProcess):
    """`coldstart worker --role ROLE`: the stream worker (with settings.metrics_port, its /metrics, /ready on it)."""

    def __init__(self, settings: Settings, role: str = "all"):
        self.role = role
        self.command = ["worker", "--role", role]
        super().__init__(settings)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics_port}"

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait until GET /ready on the metrics port answers 200 (models loaded, broker and Redis reached);
        returns seconds waited."""
        import urllib.error
        import urllib.request

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                urllib.request.urlopen(f"{self.metrics_url}/ready", timeout=2)
                return time.monotonic() - start
            except (urllib.error.HTTPError, OSError):  # 503 until ready; refused until the endpoint is up
                pass
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout:.0f}s:\n{self.log_tail()}")


class FeatureServerProcess(ServiceProcess):
    """`coldstart serve` on a free port: the HTTP read path (lookups and retrieval)."""

    def __init__(self, settings: Settings, port: int | None = None):
        self.port = port or free_port()
        self.command = ["serve", "--port", str(self.port)]
        super().__init__(settings)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "FeatureServerProcess":
        """Start and wait until GET /health answers."""
        import urllib.request

        super().start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                if not self.alive() or time.monotonic() > deadline:
                    tail = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"feature server on port {self.port} did not come up:\n{tail}") from None
                time.sleep(0.3)

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait until GET /ready answers 200 (the retrieval index is complete); returns seconds waited."""
        import urllib.error
        import urllib.request

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                urllib.request.urlopen(f"{self.url}/ready", timeout=2)
                return time.monotonic() - start
            except urllib.error.HTTPError as not_ready:  # 503 while the index is rebuilt
                if not_ready.code != 503:
                    raise
            if not self.alive():
                raise RuntimeError(f"server on port {self.port} exited:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"server on port {self.port} not ready after {timeout:.0f}s:\n{self.log_tail()}")


class LocalStack:
    """Redis (the configured one, or a started one), an embedded broker, Feast and workers."""

    def __init__(self, settings: Settings, worker: bool = True, broker: EmbeddedBroker | None = None):
        self.settings = settings
        self.start_worker = worker
        self.redis: LocalRedis | None = None
        self.broker = broker  # None: a broker with memory storage
        self.worker: WorkerProcess | None = None
        self.store = None

    def start(self) -> "LocalStack":
        try:
            self.redis = ensure_redis(self.settings)
            if self.redis:
                self.settings = replace(self.settings, redis_url=self.redis.url)
            self.broker = (self.broker or EmbeddedBroker()).start()
            self.settings = replace(self.settings, kafka_bootstrap=self.broker.bootstrap)
            create_topics(self.settings)
            self.store = feast_store.apply(self.settings)
            if not encoder_export_is_current(self.settings.encoder_export_dir):
                # torch, only when there is something to export (`make demo` / `make test` export first)
                from encoders.training.ceg import ensure_exported
                from encoders.training.registry import encoder_config

                from coldstart.dev.catalogue import catalogue_texts

                ensure_exported(encoder_config(self.settings.encoder_name, self.settings.encoder_model_path),
                                self.settings.encoder_export_dir, catalogue_texts(0))
            if self.start_worker:
                self.worker = WorkerProcess(self.settings).start()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_serving(self, timeout: float = 90) -> float:
        """Upload a probe item and wait until Feast returns it; returns seconds waited."""
        probe_id = f"probe-{uuid.uuid4().hex[:8]}"
        producer = new_producer(self.settings)
        send_item(producer, item_event({"item_id": probe_id, "title": "warm-up probe"}))
        producer.flush()
        producer.close()
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.worker and not self.worker.alive():
                raise RuntimeError(f"worker exited:\n{self.worker.log_tail()}")
            if feast_store.read_item_features(self.store, [probe_id]):
                return time.monotonic() - start
            time.sleep(0.1)
        tail = self.worker.log_tail() if self.worker else ""
        raise TimeoutError(f"worker did not serve a probe item within {timeout:.0f}s\n{tail}")

    def stop(self) -> None:
        for part in (self.worker, self.broker, self.redis):
            if part is not None:
                part.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def fresh_stack(settings: Settings, project: str) -> Iterator[LocalStack]:
    """A serving local stack on empty stores, for a demo or a benchmark: a temporary data folder (removed
    after), and a redis-server of its own (nothing on disk), or, without `redis-server` on PATH, a Feast
    project of its own (`<project>_<random>`) on the Redis at REDIS_URL."""
    with tempfile.TemporaryDirectory(prefix="coldstart-") as data_dir:
        own = replace(settings, data_dir=Path(data_dir), feast_project=project)
        if shutil.which("redis-server") is None:
            own = replace(own, feast_project=f"{project}_{uuid.uuid4().hex[:8]}")
            with LocalStack(own) as stack:
                stack.wait_until_serving()
                yield stack
            return
        with LocalRedis() as redis_server, LocalStack(replace(own, redis_url=redis_server.url)) as stack:
            stack.wait_until_serving()
            yield stack
