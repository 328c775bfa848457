"""Turn raw event bytes into a typed record, or say exactly why not.

Rules for user actions: a JSON object with `user_id`, `item_id` (identifiers as
for items), `action` (one of ACTIONS) and `occurred_at` (as `uploaded_at`).

Rules for item uploads:
- a JSON object with `item_id` (non-empty string), `title` (string) and
  `uploaded_at` (ISO-8601 with a time zone, or epoch seconds);
- optional `description`, `category`, `brand` (strings), `price` (finite number
  ≥ 0 or null), `tags` (list of strings); unknown fields are ignored;
- there must be some text to encode: title and description are not both blank;
- long text is kept and truncated at encode time (encoders.text, the tokenizer);
  more than MAX_TAGS tags are cut to the first MAX_TAGS.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from streams.records import ItemUpload, UserAction

MAX_ID_CHARS = 256
MAX_TAGS = 64
# Actions that say "more like this" and enter the user's history, and the ones that do not.
POSITIVE_ACTIONS = frozenset({"click", "like", "share", "purchase"})
ACTIONS = POSITIVE_ACTIONS | {"skip"}


class InvalidEvent(ValueError):
    """The event cannot be processed; str(error) is the reason sent to dead-letters."""


def parse_item_upload(raw: bytes | None) -> ItemUpload:
    data = _json_object(raw)
    item_id = _identifier(data, "item_id")
    title = _required_str(data, "title")
    description = _optional_str(data, "description")
    if not title.strip() and not description.strip():
        raise InvalidEvent("no text to encode: title and description are both empty")
    tags = data.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidEvent("tags must be a list of strings")
    return ItemUpload(
        item_id=item_id,
        title=title,
        uploaded_at=_event_time(data, "uploaded_at"),
        description=description,
        category=_optional_str(data, "category"),
        brand=_optional_str(data, "brand"),
        price=_price(data),
        tags=tags[:MAX_TAGS],
    )


def parse_user_action(raw: bytes | None) -> UserAction:
    data = _json_object(raw)
    action = _required_str(data, "action")
    if action not in ACTIONS:
        raise InvalidEvent(f"action must be one of {', '.join(sorted(ACTIONS))}, got {action[:40]!r}")
    return UserAction(
        user_id=_identifier(data, "user_id"),
        item_id=_identifier(data, "item_id"),
        action=action,
        occurred_at=_event_time(data, "occurred_at"),
    )


def _identifier(data: dict, name: str) -> str:
    value = _required_str(data, name)
    if not value.strip() or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidEvent(f"{name} must be 1–{MAX_ID_CHARS} printable characters")
    return value


def _json_object(raw: bytes | None) -> dict:
    if raw is None:
        raise InvalidEvent("empty message (no value)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidEvent(f"not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidEvent("not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    return data


def _required_str(data: dict, name: str) -> str:
    if name not in data or data[name] is None:
        raise InvalidEvent(f"missing required field {name!r}")
    value = data[name]
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string, got {type(value).__name__}")
    return value


def _optional_str(data: dict, name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string, got {type(value).__name__}")
    return value


def _price(data: dict) -> float | None:
    price = data.get("price")
    if price is None:
        return None
    if isinstance(price, bool) or not isinstance(price, (int, float)):
        raise InvalidEvent(f"price must be a number, got {type(price).__name__}")
    if not math.isfinite(price) or price < 0:
        raise InvalidEvent(f"price must be a finite number ≥ 0, got {price}")
    return float(price)


def _event_time(data: dict, name: str) -> datetime:
    if name not in data or data[name] is None:
        raise InvalidEvent(f"missing required field {name!r}")
    value = data[name]
    if isinstance(value, bool):
        raise InvalidEvent(f"{name} must be an ISO-8601 string or epoch seconds, got bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < 32503680000:  # before year 3000
            raise InvalidEvent(f"{name} epoch seconds out of range: {value}")
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be an ISO-8601 string or epoch seconds, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent(f"{name} is not an ISO-8601 time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise InvalidEvent(f"{name} needs a time zone (e.g. 2026-01-31T12:00:00Z)")
    return parsed.astimezone(timezone.utc)
