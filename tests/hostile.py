"""Hypothesis strategies for hostile item-upload events: the schema with every field attacked.

An event is raw bytes as a producer might send them: malformed JSON, the wrong
JSON type, required fields missing, wrong types, extra fields, control
characters and unicode of every category (unpaired surrogates included),
10 MB strings, huge tag lists, NaN/inf prices, times out of range.

A field whose strategy draws VALID_ID gets a fresh unique item_id when the
event is rendered, so end-to-end tests can tell their events apart.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import strategies as st

VALID_ID = "<valid-unique-id>"
_MISSING = object()

any_char = st.characters(exclude_categories=())  # every Unicode category, unpaired surrogates too
any_text = st.text(any_char, max_size=40)
# One character repeated up to 10 MB once JSON-escaped ("\ud800" is 6 bytes of JSON): past the
# 4,000-character field cap and the 1 MB Kafka default, inside the test producer's 16 MB.
long_text = st.builds(lambda c, n: c * (n // (len(json.dumps(c)) - 2)), st.sampled_from(["x", " ", "é", "😀", "\x00", "\ud800"]),
                      st.sampled_from([4_001, 300_000, 10_000_000]))
huge_int = st.integers(min_value=-(10**400), max_value=10**400)
json_scalar = st.none() | st.booleans() | st.integers() | huge_int | st.floats() | any_text
any_json = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)

_aware_times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                            timezones=st.timezones() | st.just(timezone.utc))
_recent_times = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime.now() - timedelta(days=1),
                             timezones=st.just(timezone.utc))
event_times = st.one_of(
    _recent_times.map(datetime.isoformat),  # valid
    _recent_times.map(lambda t: t.timestamp()),  # valid epoch seconds
    _aware_times.map(datetime.isoformat),  # any year 1–9999, any zone: mostly out of range
    st.datetimes().map(datetime.isoformat),  # no time zone
    st.floats(), huge_int, any_text, any_json,
)
text_field = any_text | long_text | any_json
optional = st.just(_MISSING) | st.none()
tag_lists = st.one_of(
    st.lists(any_text | long_text, max_size=80),
    st.integers(0, 100_000).map(lambda n: [f"tag{i}" for i in range(n)]),  # huge lists
    any_json,
)
event_objects = st.builds(
    lambda fields, extra: {**extra, **{k: v for k, v in fields.items() if v is not _MISSING}},
    st.fixed_dictionaries({
        "item_id": st.just(VALID_ID) | st.just(_MISSING) | any_text | any_json,
        "title": st.just(_MISSING) | text_field,
        "uploaded_at": st.just(_MISSING) | event_times,
        "description": optional | text_field,
        "category": optional | text_field,
        "brand": optional | text_field,
        "price": optional | st.floats() | huge_int | any_json,
        "tags": optional | tag_lists,
    }),
    st.dictionaries(any_text, any_json, max_size=3),  # extra fields
)


# A dict (rendered by `render`), or raw bytes that are not a JSON object at all.
hostile_events = st.one_of(
    event_objects, event_objects, event_objects,  # weighted: the schema is where the rules are
    st.binary(max_size=64),  # not JSON, not even UTF-8
    any_json.map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
    st.builds(lambda e, n: json.dumps(e).encode()[:n], event_objects, st.integers(0, 40)),  # cut short
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),  # nested deeper than the parser goes
)


def render(event: bytes | dict) -> bytes:
    """The bytes a producer sends: VALID_ID replaced by a unique id; NaN/Infinity as JSON literals."""
    if isinstance(event, bytes):
        return event
    if event.get("item_id") == VALID_ID:
        event = {**event, "item_id": f"hostile-{uuid.uuid4().hex[:12]}"}
    return json.dumps(event).encode()
