"""Parsing and validating raw item-upload bytes (the rules that decide dead letters)."""

import json
from datetime import datetime, timedelta, timezone

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


def test_unpaired_surrogates_in_text_become_replacement_characters():
    item = parse_item_upload(raw(title="cut mid-emoji \ud83d", tags=["\udc00ok"]))
    assert (item.title, item.tags) == ("cut mid-emoji \ufffd", ["\ufffdok"])


def test_event_time_up_to_an_hour_ahead_is_accepted_and_further_is_not():
    now = datetime.now(timezone.utc)
    assert parse_item_upload(raw(uploaded_at=(now + timedelta(minutes=50)).isoformat())).uploaded_at > now
    with pytest.raises(InvalidEvent, match="uploaded_at must be between 1970 and 1 hour from now"):
        parse_item_upload(raw(uploaded_at=(now + timedelta(hours=2)).isoformat()))


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
        (raw(price=10**400), "price must be a finite number"),
        (b'{"item_id": "x", "title": "t", "uploaded_at": 1' + b"0" * 5000 + b"}", "not valid JSON: Exceeds the limit"),
        (raw(uploaded_at=-1), "uploaded_at must be between 1970"),
        (raw(uploaded_at=10**400), "epoch seconds out of range"),
        (raw(uploaded_at="2500-01-01T00:00:00Z"), "uploaded_at must be between 1970"),
        (raw(uploaded_at="0001-01-01T00:00:00+01:00"), "uploaded_at must be between 1970"),
    ],
)
def test_invalid_events_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        parse_item_upload(payload)
