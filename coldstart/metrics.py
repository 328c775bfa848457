"""Prometheus metrics of the workers and the HTTP server: every metric object in one place, and the worker's endpoint.

The agents and the server call these objects in one line where the work is
done; `serve_endpoints` gives a worker (which has no HTTP server of its own)
GET /metrics, /health and /ready on COLDSTART_METRICS_PORT. The HTTP server
answers the same three routes on its own port. README, "Operating: scale and
metrics", lists the metrics and what to alert on; docs/monitoring/grafana holds the
dashboard.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# Importing Feast (feast.metrics) points PROMETHEUS_MULTIPROC_DIR at a temporary folder, for its gunicorn workers;
# prometheus_client imported after that keeps every value in files there. Ours are per process (each worker and
# server is scraped on its own), so `coldstart worker` and `serve` import this module before Feast with the
# variable unset (coldstart.cli.plain_metrics); Gauge.clear() then only warns, because Feast set it since.
warnings.filterwarnings("ignore", message="Clearing labels has not been implemented", category=UserWarning)

# Seconds from a record's send to its effect: a healthy pipeline is well under a second; a rebalance or an
# outage shows in the top buckets.
FRESHNESS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MODEL_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# ---- the workers -----------------------------------------------------------------------------------------

CONSUMER_LAG = Gauge(
    "coldstart_consumer_lag", "Records on a partition this worker holds that the group has not committed yet "
    "(the partition's high watermark − the committed offset)", ["topic", "partition"])
UPLOAD_TO_ONLINE = Histogram(
    "coldstart_upload_to_online_seconds", "From an upload's record timestamp (its send) to its vector in the "
    "online store", buckets=FRESHNESS_BUCKETS)
ACTION_TO_USER_VECTOR = Histogram(
    "coldstart_action_to_user_vector_seconds", "From an action's record timestamp (its send) to the user's new "
    "vector in the online store", buckets=FRESHNESS_BUCKETS)
MICRO_BATCH_EVENTS = Histogram("coldstart_micro_batch_events", "Events per micro-batch", ["agent"],
                               buckets=BATCH_BUCKETS)
ENCODER_SECONDS = Histogram("coldstart_encoder_seconds", "One content-encoder call (a micro-batch of items)",
                            buckets=MODEL_CALL_BUCKETS)
TOWER_SECONDS = Histogram("coldstart_tower_seconds", "One tower call (a micro-batch)", ["tower"],
                          buckets=MODEL_CALL_BUCKETS)
WRITE_RETRIES = Counter("coldstart_write_retries", "Store writes that failed and were retried", ["write"])
DEAD_LETTERS = Counter("coldstart_dead_letters", "Events sent to dead-letters", ["topic", "reason"])
MODEL = Gauge("coldstart_model", "1 for each model version and ONNX Runtime execution provider this worker "
              "serves", ["role", "version", "provider"])

# ---- the HTTP server ---------------------------------------------------------------------------------------

HTTP_REQUEST_SECONDS = Histogram("coldstart_http_request_seconds", "Requests answered, by route and status",
                                 ["route", "status"], buckets=MODEL_CALL_BUCKETS)
INDEX_ITEMS = Gauge("coldstart_index_items", "Items in the retrieval index, per model version (the versions "
                    "this server serves)", ["model_version"])

# A dead letter's reason names ids and values; its label is the kind of failure, so the series stay few.
_DEAD_LETTER_KINDS = (
    ("not valid JSON", "invalid_json"), ("expected a JSON object", "not_an_object"),
    ("missing required field", "missing_field"), ("null value", "tombstone"),
    ("never uploaded", "unknown_item"), ("no text to encode", "no_text"),
)


def dead_letter_reason(reason: str) -> str:
    """The label of a dead letter's reason: one of _DEAD_LETTER_KINDS, else invalid_field."""
    return next((kind for text, kind in _DEAD_LETTER_KINDS if text in reason), "invalid_field")


def observe_since(histogram: Histogram, sent_at_s: Iterable[float | None]) -> None:
    """Observe now − each send time (epoch seconds, e.g. a Kafka record's timestamp; None is skipped)."""
    now = time.time()
    for sent in sent_at_s:
        if sent is not None:
            histogram.observe(max(0.0, now - sent))


def exposition() -> tuple[bytes, str]:
    """The process's metrics in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


def serve_endpoints(port: int, readiness: Callable[[], dict]) -> ThreadingHTTPServer:
    """GET /metrics, /health and /ready on 0.0.0.0:port in a daemon thread.

    `readiness()` returns named checks (True when passing); /ready answers 200 when all pass, 503 otherwise,
    with the checks as JSON either way.
    """

    class Endpoints(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body, content_type = exposition()
                return self._reply(200, body, content_type)
            if self.path == "/health":
                return self._reply(200, b'{"status": "ok"}')
            if self.path == "/ready":
                checks = readiness()
                return self._reply(200 if all(checks.values()) else 503, json.dumps(checks).encode())
            self._reply(404, b'{"detail": "GET /metrics, /health or /ready"}')

        def _reply(self, status: int, body: bytes, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: not worth a log line each
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Endpoints)
    threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True).start()
    return server
