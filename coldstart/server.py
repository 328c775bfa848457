"""The HTTP read path: Feast's feature server, read-only, with limits on what one request may ask.

Feast's server also offers /push, /write-to-online-store, /materialize and more:
writes into the online store, unauthenticated by default. Ranking only reads, so
`coldstart serve` answers POST /get-online-features and GET /health and nothing
else (404). A body over MAX_BODY_BYTES gets 413 without being read further, more
than MAX_ENTITY_ROWS entity rows get 413, malformed JSON or a wrong shape gets
Feast's 422 with the reason, an unknown feature service Feast's 404.
"""

from __future__ import annotations

import json

from coldstart.ranking import MAX_CANDIDATES

MAX_BODY_BYTES = 256 * 1024  # a full ranking request (MAX_CANDIDATES rows) is about 60 KB
MAX_ENTITY_ROWS = MAX_CANDIDATES
ROUTES = {("POST", "/get-online-features"), ("GET", "/health")}


class ReadOnlyLimits:
    """ASGI middleware in front of Feast's app: only ROUTES, bounded bodies, bounded entity rows."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, max_entity_rows: int = MAX_ENTITY_ROWS):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_entity_rows = max_entity_rows

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (scope["method"], scope["path"]) not in ROUTES:
            return await _refuse(send, 404, "this server answers POST /get-online-features and GET /health only")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await _refuse(send, 413, f"request body over {self.max_body_bytes} bytes")
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # chunked, or longer than it said
                return await _refuse(send, 413, f"request body over {self.max_body_bytes} bytes")
        if _entity_rows(body) > self.max_entity_rows:
            return await _refuse(send, 413, f"more than {self.max_entity_rows} entity rows; split the request")

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _entity_rows(body: bytes) -> int:
    """Rows asked for; 0 when the body is not the expected shape (Feast then says what is wrong)."""
    try:
        entities = json.loads(body).get("entities", {})
        return max((len(v) for v in entities.values() if isinstance(v, list)), default=0)
    except (ValueError, AttributeError, RecursionError):
        return 0


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(store, host: str, port: int) -> None:
    """Run the read-only feature server (one process; scale with more processes behind a proxy)."""
    import uvicorn

    from coldstart.store import feature_server_app

    uvicorn.run(ReadOnlyLimits(feature_server_app(store)), host=host, port=port, timeout_keep_alive=5,
                limit_concurrency=64)
