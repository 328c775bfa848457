"""Parsing and validating raw item-upload bytes (the rules that decide dead letters)."""

import json
from datetime import datetime, timezone

import pytest

from streams.validation import MAX_TAGS, InvalidEvent, parse_item_upload

VALID = {"item_id": "b-1", "title": "Dune", "uploaded_at": "2026-01-31T12:00:00Z"}


def raw(**changes) -> bytes:
    return json.dumps({**VALID, **changes}).encode()


def test_minimal_event_parses_with_defaults():
    item = parse_item_upload(raw())
    assert item.item_id == "b-1" and item.title == "Dune"
    assert item.uploaded_at == datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert (item.description, item.tags, item.price) == ("", [], None)


def test_epoch_seconds_and_extra_fields_are_accepted():
    item = parse_item_upload(raw(uploaded_at=1767225600, colour="red"))
    assert item.uploaded_at == datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_huge_tag_lists_are_cut():
    assert len(parse_item_upload(raw(tags=[f"t{i}" for i in range(10_000)])).tags) == MAX_TAGS


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (raw(item_id=None), "missing required field 'item_id'"),
        (json.dumps({"item_id": "x", "uploaded_at": 1}).encode(), "missing required field 'title'"),
        (raw(uploaded_at=None), "missing required field 'uploaded_at'"),
        (raw(item_id=42), "item_id must be a string"),
        (raw(item_id=""), "item_id must be"),
        (raw(item_id="a\nb"), "item_id must be"),
        (raw(title=["Dune"]), "title must be a string"),
        (raw(price="cheap"), "price must be a number"),
        (raw(price=True), "price must be a number"),
        (raw(price=-1), "price must be a finite number"),
        (b'{"item_id": "x", "title": "t", "uploaded_at": 1, "price": NaN}', "price must be a finite number"),
        (b'{"item_id": "x", "title": "t", "uploaded_at": 1, "price": Infinity}', "price must be a finite number"),
        (raw(tags="a,b"), "tags must be a list of strings"),
        (raw(tags=[1, 2]), "tags must be a list of strings"),
        (raw(uploaded_at="yesterday"), "not an ISO-8601 time"),
        (raw(uploaded_at="2026-01-31T12:00:00"), "needs a time zone"),
        (raw(title="", description="   "), "no text to encode"),
    ],
)
def test_invalid_events_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        parse_item_upload(payload)
