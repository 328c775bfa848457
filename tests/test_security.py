"""Security basics: the HTTP read path refuses what it should, credentials reach every client, nothing leaks."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from coldstart import store as feast_store
from coldstart.config import PROJECT_ROOT, USER_PUSH_SOURCE
from coldstart.server import MAX_BODY_BYTES, MAX_ENTITY_ROWS
from coldstart.dev.services import LocalRedis
from coldstart.dev.stack import FeatureServerProcess
from tests.conftest import SETTINGS, unique_id, upload, wait_readable

pytestmark = pytest.mark.reliability


def post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def feature_server(stack):
    with FeatureServerProcess(stack.settings) as server:
        yield server.port


def lookup(item_ids: list[str]) -> bytes:
    return json.dumps({"feature_service": "item_embeddings_v1", "entities": {"item_id": item_ids}}).encode()


def test_http_read_path_refuses_oversized_malformed_and_write_requests(stack, producer, feature_server):
    item_id = unique_id("http")
    upload(producer, {"item_id": item_id, "title": "Served over HTTP"})
    served = wait_readable(stack.store, [item_id])[item_id]["item_embedding"]
    refused = {
        "oversized body": (413, "/get-online-features", lookup(["x" * (MAX_BODY_BYTES + 1)])),
        "too many rows": (413, "/get-online-features", lookup([f"i{n}" for n in range(MAX_ENTITY_ROWS + 1)])),
        "not JSON": (422, "/get-online-features", b"{not json"),
        "wrong shape": (422, "/get-online-features", json.dumps({"entities": "item_id"}).encode()),
        "a write": (404, "/push", json.dumps({"push_source_name": "item_embeddings_push_source", "df": {}}).encode()),
        "materialize": (404, "/materialize", b"{}"),
        "too many item ids": (413, "/ranking-features",
                              json.dumps({"user_id": "u", "item_ids": [f"i{n}" for n in range(MAX_ENTITY_ROWS + 1)]}).encode()),
        "lookup not JSON": (422, "/ranking-features", b"{not json"),
    }
    for name, (status, path, body) in refused.items():
        got, answer = post(feature_server, path, body)
        assert got == status and answer.get("detail"), (name, got, answer)
    status, answer = post(feature_server, "/get-online-features", lookup([item_id]))  # still serving
    assert status == 200
    values = answer["results"][answer["metadata"]["feature_names"].index("item_embedding")]["values"][0]
    assert values == pytest.approx(served, abs=1e-6)


def test_redis_auth_from_redis_url_reaches_feast(tmp_path):
    with LocalRedis(password=uuid.uuid4().hex) as server:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("k", "v")
        settings = replace(SETTINGS, redis_url=server.url, data_dir=tmp_path, feast_project="auth_test")
        store = feast_store.apply(settings)
        frame = feast_store.user_embedding_frame(["u1"], [np.ones(4)], [1], [["i1"]], "v", [datetime.now(timezone.utc)])
        feast_store.push_online(store, USER_PUSH_SOURCE, frame)
        row = store.get_online_features(features=["user_embedding:history_length"],
                                        entity_rows=[{"user_id": "u1"}]).to_dict()
        assert row["history_length"] == [1]


def test_kafka_sasl_and_tls_settings_reach_the_worker_and_the_clients():
    env = {**os.environ, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_SASL_USERNAME": "svc-coldstart", "KAFKA_SASL_PASSWORD": "pw-from-env", "KAFKA_SSL_CAFILE": ""}
    probe = ("from coldstart.config import Settings; from streams.app import create_app; import json; "
             "c = create_app(Settings.from_env()).conf.broker_credentials; "
             "print(json.dumps([c.username, c.password, c.mechanism.value, c.protocol.name, "
             "Settings.from_env().kafka_client_options()]))")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    username, password, mechanism, protocol, client_options = json.loads(result.stdout.strip().splitlines()[-1])
    assert (username, password, protocol) == ("svc-coldstart", "pw-from-env", "SASL_SSL")
    assert mechanism == "SCRAM-SHA-512"
    assert client_options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                              "sasl_plain_username": "svc-coldstart", "sasl_plain_password": "pw-from-env"}


def test_docker_compose_binds_every_published_port_to_localhost():
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    published = [(name, port) for name, service in compose["services"].items() for port in service.get("ports", [])]
    assert published, "docker-compose.yml publishes no port at all"
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "password in a URL": re.compile(r"[a-z]+://[^/\s:@'\"]*:(?!(?:PASSWORD|password|secret)@|[{$])[^@\s/'\"]+@"),
    "assigned credential": re.compile(r"(?i)\b(password|secret|token)\s*[=:]\s*['\"][A-Za-z0-9+/_\-]{16,}['\"]"),
}


def test_no_secrets_are_committed():
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in files.splitlines():
        path = PROJECT_ROOT / name
        if Path(name).name in (".env", "id_rsa") or path.suffix in (".pem", ".key"):
            found.append(f"{name}: a credentials file")
        elif path.is_file() and path.stat().st_size < 2_000_000:
            text = path.read_text(errors="ignore")
            found += [f"{name}: {kind}" for kind, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    assert not found, found
