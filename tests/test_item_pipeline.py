"""An uploaded item through the real broker, worker, Redis and Feast (each test on a single Redis and on a Redis
Cluster: conftest.ONLINE_STORES)."""

import base64
import json

import numpy as np

from encoders.content import OnnxContentEncoder
from encoders.text import item_text
from encoders.towers import load_towers
from tests.conftest import read_topic, stack_on, unique_id, upload, wait_readable


def encode_directly(stack, item: dict) -> tuple[np.ndarray, str]:
    """The item's vector and model version computed here, without the service: CEG then item tower."""
    settings = stack.settings
    encoder = OnnxContentEncoder(settings.encoder_export_dir, precision=settings.encoder_precision)
    towers = load_towers(settings.towers_dir, settings.encoder_name)
    text = item_text(item["title"], item.get("description", ""), item.get("category", ""),
                     item.get("brand", ""), item.get("tags", []), item.get("price"))
    return towers.item_vectors(encoder.encode([text]), [item["item_id"]])[0], f"{encoder.version}+{towers.version}"


def test_uploaded_item_is_readable_with_the_vector_of_a_direct_encode(online_store, request):
    stack, producer = stack_on(online_store, request)
    item = {"item_id": unique_id("book"), "title": "The Food Lab", "description": "Better home cooking through science.",
            "category": "cookbooks", "brand": "J. Kenji López-Alt", "price": 49.95, "tags": ["science", "recipes"]}
    upload(producer, item)
    served = wait_readable(stack.store, [item["item_id"]], timeout=20)[item["item_id"]]
    want, version = encode_directly(stack, item)
    assert served["model_version"] == version
    assert float(np.dot(served["item_embedding"], want)) > 0.9999

    published = read_topic(stack.settings, "item-embeddings",
                           until=lambda rs: any(r["item_id"] == item["item_id"] for r in rs))
    record = next(r for r in published if r["item_id"] == item["item_id"])
    assert np.allclose(record["vector"], served["item_embedding"], atol=1e-6)


def test_bad_events_go_to_dead_letters_and_the_worker_keeps_going(online_store, request):
    stack, producer = stack_on(online_store, request)
    bad_events = {
        b"{this is not json": "not valid JSON",
        json.dumps({"item_id": unique_id(), "uploaded_at": "2026-01-01T00:00:00Z"}).encode(): "missing required field 'title'",
        json.dumps({"item_id": unique_id(), "title": 7, "uploaded_at": "2026-01-01T00:00:00Z"}).encode(): "title must be a string",
        json.dumps({"item_id": unique_id(), "title": "  ", "uploaded_at": "2026-01-01T00:00:00Z"}).encode(): "no text to encode",
    }
    for payload in bad_events:
        upload(producer, payload, key="bad")
    after = {"item_id": unique_id(), "title": "A valid item sent after the bad ones"}
    upload(producer, after)

    def all_dead_lettered(records):
        originals = {base64.b64decode(r["original_base64"]) for r in records}
        return set(bad_events) <= originals

    letters = read_topic(stack.settings, "dead-letters", until=all_dead_lettered)
    by_original = {base64.b64decode(r["original_base64"]): r for r in letters}
    for payload, reason in bad_events.items():
        letter = by_original[payload]
        assert reason in letter["reason"]
        assert letter["topic"] == "item-uploads" and letter["key"] == "bad" and letter["offset"] >= 0
    wait_readable(stack.store, [after["item_id"]], timeout=20)
    assert stack.worker.alive()


def test_huge_text_is_encoded_truncated(online_store, request):
    stack, producer = stack_on(online_store, request)
    huge = {"item_id": unique_id(), "title": "An enormous description", "description": "lorem ipsum " * 60_000}  # ~700 KB
    upload(producer, huge)
    served = wait_readable(stack.store, [huge["item_id"]], timeout=30)[huge["item_id"]]
    want, _ = encode_directly(stack, huge)  # the same truncation applies on both paths
    assert float(np.dot(served["item_embedding"], want)) > 0.9999
