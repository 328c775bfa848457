"""The HTTP read path: one server for ranking lookups and retrieval, read-only, with limits on every request.

    POST /retrieve             {"user_id": "u42", "k": 100, "exclude_seen": true, "filter": {"category": "Comedy"}}
                               → {"user_id", "version", "model_version", "items": [{"item_id", "score"}, …]}
                                 (best first)
    POST /ranking-features     {"user_id": "u42", "item_ids": ["book-1", …]}
                               → {"user_id", "version", "user_embedding", "history_length",
                                  "items": [{"item_id", "title", "affinity", "item_embedding"}, …]}
    POST /get-online-features  Feast's own route and request shape, for Feast clients (slower, see below)
    GET  /health               the process is up
    GET  /ready                200 once the retrieval index is complete and Redis answers, 503 before (with the
                               index sizes)
    GET  /metrics              Prometheus: requests by route and status, index items per model version
                               (coldstart.metrics)

Why our own server rather than routes added to Feast's: Feast's lookup spends
its time in `get_online_features`, which turns every float of every vector into
a Python object and back (a 1-user + 100-item lookup at ~11x the p99 of raw
redis-py, BENCHMARKS.md), and the retrieval index must live in the serving
process, which Feast's app does not own. This one is a bare ASGI app on uvicorn
(httptools, uvloop): the lookup is coldstart.ranking's (one pipelined Redis
round trip for every view, numpy affinity), retrieval is the in-process index
(coldstart.retrieval), responses are encoded by orjson (numpy arrays
natively); `coldstart bench lookup` and `bench retrieve` measure both against
raw redis-py in one run. Feast's route stays for its clients.

Limits (README, "Security"): only the routes above (Feast's write endpoints
answer 404), a body over MAX_BODY_BYTES gets 413 without being read further,
more than MAX_ENTITY_ROWS rows or item ids get 413, malformed JSON or a wrong
shape gets 422 with the reason, an unknown user 404, a request while the index
is rebuilt 503; at most 64 requests are served at once (503 beyond).
"""

from __future__ import annotations

import asyncio
import json
import time

import orjson

from coldstart import metrics
from coldstart.ranking import MAX_CANDIDATES, UnknownUser, ranking_features
from coldstart.retrieval import NotReady, Retriever
from coldstart.store import online_store_reachable

MAX_BODY_BYTES = 256 * 1024  # a full ranking request (MAX_CANDIDATES rows) is about 60 KB
MAX_ENTITY_ROWS = MAX_CANDIDATES
FEAST_ROUTE = ("POST", "/get-online-features")
ROUTES = {("POST", "/retrieve"), ("POST", "/ranking-features"), FEAST_ROUTE, ("GET", "/health"), ("GET", "/ready"),
          ("GET", "/metrics")}


class TooLarge(ValueError):
    """The request asks for more than one request may (413)."""


class ReadOnlyLimits:
    """ASGI middleware in front of the app: only ROUTES, bounded bodies, bounded entity rows."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, max_entity_rows: int = MAX_ENTITY_ROWS):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_entity_rows = max_entity_rows

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (scope["method"], scope["path"]) not in ROUTES:
            return await _respond(send, 404, {"detail": "this server answers " + ", ".join(
                f"{method} {path}" for method, path in sorted(ROUTES))})
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await _respond(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # chunked, or longer than it said
                return await _respond(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})
        if _entity_rows(body) > self.max_entity_rows:
            return await _respond(send, 413, {"detail": f"more than {self.max_entity_rows} entity rows; split the request"})

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _entity_rows(body: bytes) -> int:
    """Rows asked for (Feast's `entities`, or our `item_ids`); 0 when the body is not that shape (the route says why)."""
    try:
        request = json.loads(body)
        entities = request.get("entities", {})
        rows = max((len(v) for v in entities.values() if isinstance(v, list)), default=0)
        item_ids = request.get("item_ids")
        return max(rows, len(item_ids) if isinstance(item_ids, list) else 0)
    except (ValueError, AttributeError, RecursionError):
        return 0


class ServingApp:
    """Our routes, answered on the event loop (each is a Redis round trip and/or an index search: no thread
    hop), and Feast's app for its route and its lifespan."""

    def __init__(self, store, retriever: Retriever, feast_app):
        self.store = store
        self.retriever = retriever
        self.feast_app = feast_app
        self.handlers = {("POST", "/retrieve"): self.retrieve, ("POST", "/ranking-features"): self.ranking_features}

    async def __call__(self, scope, receive, send):
        route = (scope.get("method"), scope.get("path"))
        if scope["type"] != "http" or route == FEAST_ROUTE:
            return await self.feast_app(scope, receive, send)
        if route == ("GET", "/health"):
            return await _respond(send, 200, {"status": "ok"})
        if route == ("GET", "/ready"):
            readiness = await asyncio.to_thread(self.readiness)  # a Redis PING: off the event loop
            return await _respond(send, 200 if readiness["ready"] else 503, readiness)
        if route == ("GET", "/metrics"):
            return await _respond_metrics(send, self.retriever.sizes())
        started = time.perf_counter()
        message = await receive()  # ReadOnlyLimits hands the whole body in one message
        try:
            request = orjson.loads(message.get("body", b""))
            if not isinstance(request, dict):
                raise ValueError(f"expected a JSON object, got {type(request).__name__}")
            status, payload = 200, self.handlers[route](request)
        except UnknownUser as err:
            status, payload = 404, {"detail": str(err)}
        except NotReady as err:
            status, payload = 503, {"detail": str(err)}
        except TooLarge as err:
            status, payload = 413, {"detail": str(err)}
        except ValueError as err:  # orjson.JSONDecodeError is one
            status, payload = 422, {"detail": str(err)}
        metrics.HTTP_REQUEST_SECONDS.labels(scope["path"], str(status)).observe(time.perf_counter() - started)
        return await _respond(send, status, payload)

    def readiness(self) -> dict:
        retriever = self.retriever
        redis_answers = online_store_reachable(self.store)
        return {"ready": retriever.ready.is_set() and redis_answers, "online_store_reachable": redis_answers,
                "index_items": retriever.sizes(),
                "loaded_in_s": retriever.loaded_in_s, "topic_records_applied": retriever.applied,
                "failure": str(retriever.failure) if retriever.failure else None}

    def retrieve(self, request: dict) -> dict:
        exclude_seen = request.get("exclude_seen", True)
        if not isinstance(exclude_seen, bool):
            raise ValueError("exclude_seen must be true or false")
        found = self.retriever.retrieve(_user_id(request), request.get("k", 100), exclude_seen, request.get("filter"))
        return {"user_id": found.user_id, "version": found.version, "model_version": found.model_version,
                "items": [{"item_id": r.item_id, "score": r.score} for r in found.items]}

    def ranking_features(self, request: dict) -> dict:
        item_ids = request.get("item_ids")
        if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
            raise ValueError("item_ids must be a list of item id strings")
        version, store = self.retriever.stores.active()  # every vector of the answer from this version's project
        features = ranking_features(store, _user_id(request), item_ids)
        return {"user_id": features.user_id, "version": version, "user_embedding": features.user_embedding,
                "history_length": features.history_length,
                "items": [{"item_id": c.item_id, "title": c.title, "affinity": c.affinity,
                           "item_embedding": c.item_embedding} for c in features.candidates]}


def _user_id(request: dict) -> str:
    user_id = request.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_id must be a non-empty string")
    return user_id


async def _respond(send, status: int, payload) -> None:
    await _send(send, status, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), "application/json")


async def _respond_metrics(send, index_sizes: dict[str, int]) -> None:
    metrics.INDEX_ITEMS.clear()  # versions no longer in the index drop out
    for version, items in index_sizes.items():
        metrics.INDEX_ITEMS.labels(version).set(items)
    await _send(send, 200, *metrics.exposition())


async def _send(send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(store, retriever: Retriever, host: str, port: int) -> None:
    """Run the server (one process; scale with more processes behind a proxy: each keeps its own index).
    The index is rebuilt in the background: /health answers at once, /ready once it is complete."""
    import uvicorn

    from coldstart.store import feature_server_app

    retriever.start()
    try:
        uvicorn.run(ReadOnlyLimits(ServingApp(store, retriever, feature_server_app(store))), host=host, port=port,
                    timeout_keep_alive=5, limit_concurrency=64)
    finally:
        retriever.stop()
