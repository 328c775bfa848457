"""Hostile input, property-based: every event is dead-lettered with a reason or encoded (truncated).

The first property runs the worker's own steps in-process over many generated
events; the second sends generated events through the real broker and worker.
"""

import base64
import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from kafka.errors import MessageSizeTooLargeError

from coldstart import store as feast_store
from coldstart.dev.load import new_producer
from encoders.content import OnnxContentEncoder
from encoders.text import MAX_FIELD_CHARS, item_text
from streams.validation import MAX_TAGS, InvalidEvent, parse_item_upload
from tests.conftest import SETTINGS, read_topic, unique_id, wait_readable
from tests.hostile import hostile_events, render

pytestmark = pytest.mark.reliability

MAX_SEND_BYTES = 32 * 2**20


@pytest.fixture(scope="module")
def encoder():
    return OnnxContentEncoder(SETTINGS.encoder_export_dir, precision=SETTINGS.encoder_precision)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(event=hostile_events)
def test_any_event_is_rejected_with_a_reason_or_fully_processable(encoder, event):
    try:
        item = parse_item_upload(render(event))
    except InvalidEvent as reason:
        assert str(reason).strip()
        return
    if item.deleted:  # a removal: nothing to encode
        return
    text = item_text(item.title, item.description, item.category, item.brand, item.tags, item.price)
    assert len(text) <= 6 * MAX_FIELD_CHARS + 100 and len(item.tags) <= MAX_TAGS
    text.encode("utf-8")  # valid Unicode: Kafka, Feast and the tokenizer all need it
    vector = encoder.encode([text])[0]
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-3
    frame = feast_store.item_embedding_frame(
        [item.item_id], [vector], [vector], [item.title[:200]], [item.category], encoder.version,
        [item.uploaded_at])
    assert frame["event_timestamp"].notna().all()


# ---- through the real broker and worker ---------------------------------------

@pytest.fixture(scope="module")
def big_producer(stack):
    """A producer that may send up to MAX_SEND_BYTES: the default (1 MB) refuses 10 MB events itself."""
    p = new_producer(stack.settings, max_request_size=MAX_SEND_BYTES)
    yield p
    p.close()


def expected_outcomes(sent: list[bytes]) -> tuple[list[str], dict[str, str]]:
    """Item ids that must become readable, and sha256 → reason for the events that must be dead-lettered."""
    readable, dead = [], {}
    for raw in sent:
        try:
            item = parse_item_upload(raw)
            if not item.deleted:  # a removal leaves nothing to read
                readable.append(item.item_id)
        except InvalidEvent as reason:
            dead[hashlib.sha256(raw).hexdigest()] = str(reason)
    return readable, dead


def check_outcomes(stack, sent: list[bytes]) -> dict[str, dict]:
    """Every event dead-lettered with its reason or readable, the worker alive; the dead letters by sha256."""
    readable, dead = expected_outcomes(sent)
    letters = read_topic(stack.settings, "dead-letters", timeout=60,
                         until=lambda rs: set(dead) <= {r["original_sha256"] for r in rs})
    by_hash = {r["original_sha256"]: r for r in letters}
    for digest, reason in dead.items():
        assert by_hash[digest]["reason"] == reason
    wait_readable(stack.store, readable, timeout=60)
    assert stack.worker.alive() and "Crashed" not in stack.worker.log_path.read_text(errors="replace")
    return by_hash


@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],  # no shrinking on a live stack
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(events=st.lists(hostile_events, min_size=1, max_size=8))
def test_hostile_events_are_dead_lettered_with_a_reason_or_served(stack, big_producer, events):
    sent = [render(event) for event in events]
    assume(sum(map(len, sent)) < MAX_SEND_BYTES)  # 10 MB strings of escaped characters can go past it
    for raw in sent:
        big_producer.send("item-uploads", key=b"hostile", value=raw)  # one key: one partition, in order
    big_producer.flush()
    check_outcomes(stack, sent)


def test_poison_events_do_not_block_their_partition(stack, big_producer):
    now = datetime.now(timezone.utc).isoformat()
    poison = [
        b"{" + b"x" * 900_000,  # invalid, and its dead letter with the whole original would exceed 1 MB
        json.dumps({"item_id": unique_id(), "title": "cut mid-emoji \ud83d", "uploaded_at": now}).encode(),
        json.dumps({"item_id": unique_id(), "title": "from the future", "uploaded_at": "2500-01-01T00:00:00Z"}).encode(),
        json.dumps({"item_id": unique_id(), "title": "priceless", "uploaded_at": now, "price": 10**400}).encode(),
        b"[" * 100_000,
    ]
    after = [json.dumps({"item_id": unique_id("after-poison"), "title": f"Valid item {n}", "uploaded_at": now}).encode()
             for n in range(5)]
    for raw in poison + after:
        big_producer.send("item-uploads", key=b"poison", value=raw)  # same partition as what follows
    big_producer.flush()
    check_outcomes(stack, poison + after)


def test_ten_megabyte_events_are_refused_by_default_and_handled_when_sent(stack, producer, big_producer):
    now = datetime.now(timezone.utc).isoformat()
    valid = {"item_id": unique_id("10mb"), "title": "A very long description", "description": "word " * 2_000_000,
             "uploaded_at": now}
    invalid = b'{"item_id": "broken", "title": "' + b"y" * 10_000_000  # unterminated string
    with pytest.raises(MessageSizeTooLargeError):  # the default producer: a clear error, nothing sent
        producer.send("item-uploads", key=b"10mb", value=json.dumps(valid).encode()).get(timeout=30)
    sent = [json.dumps(valid).encode(), invalid,
            json.dumps({"item_id": unique_id("after-10mb"), "title": "Small", "uploaded_at": now}).encode()]
    for raw in sent:
        big_producer.send("item-uploads", key=b"10mb", value=raw).get(timeout=60)
    letter = check_outcomes(stack, sent)[hashlib.sha256(invalid).hexdigest()]
    assert letter["original_size"] == len(invalid)
    assert base64.b64decode(letter["original_base64"]) == invalid[:64 * 1024]  # cut, so the letter fits in Kafka
