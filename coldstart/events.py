"""The input event contract: when an item upload or a user action is valid, and its fields if it is.

One set of rules for everything that takes events in: the stream worker
(streams.validation, on the raw bytes of item-uploads and user-actions) and the
training-data reader (encoders.training.own_data, on rows of a data folder), so
a row is accepted for training exactly when the worker would accept the same
event. Plain Python, no faust: the functions return the fields as a dict.

Rules for user actions: a JSON object with `user_id`, `item_id` (identifiers as
for items), `action` (one of ACTIONS) and `occurred_at` (as `uploaded_at`).

Rules for item uploads:
- a JSON object with `item_id` (non-empty string), `title` (string) and
  `uploaded_at` (ISO-8601 with a time zone, or epoch seconds);
- a removal is `{"item_id": …, "deleted": true, "uploaded_at": …}` (other fields
  ignored); `deleted` must be a boolean, and `false` means an ordinary upload;
- event times (`uploaded_at`, `occurred_at`) between 1970 and MAX_FUTURE ahead
  of this process's clock: a far-future time would stay "newest" and shadow every
  later update;
- optional `description`, `category`, `brand` (strings), `price` (finite number
  ≥ 0 or null), `tags` (list of strings); unknown fields are ignored;
- there must be some text to encode: title and description are not both blank;
- unpaired UTF-16 surrogates (valid JSON escapes, not valid Unicode) in text are
  replaced by U+FFFD, so a producer that cut a string mid-emoji loses one
  character, not the item;
- long text is kept and truncated at encode time (encoders.text, the tokenizer);
  more than MAX_TAGS tags are cut to the first MAX_TAGS.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone

MAX_ID_CHARS = 256
MAX_TAGS = 64
MAX_JSON_DEPTH = 256  # far below Python's recursion limit, far above any real event
MAX_FUTURE = timedelta(hours=1)  # allowance for producer clock skew
MAX_FUTURE_TEXT = "1 hour"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SURROGATES = re.compile("[\ud800-\udfff]")
# Actions that say "more like this" and enter the user's history, and the ones that do not.
POSITIVE_ACTIONS = frozenset({"click", "like", "share", "purchase"})
ACTIONS = POSITIVE_ACTIONS | {"skip"}


class InvalidEvent(ValueError):
    """The event cannot be processed; str(error) is the reason (sent to dead-letters by the worker)."""


def item_fields(data: dict, time_required: bool = True) -> dict:
    """The fields of a valid item upload (item_id, title, uploaded_at, deleted, description, category, brand,
    price, tags) or of a removal (item_id, title "", uploaded_at, deleted True); InvalidEvent says why not.

    time_required=False lets `uploaded_at` be absent (None): a training file's items need no upload time.
    """
    item_id = _identifier(data, "item_id")
    deleted = data.get("deleted", False)
    if not isinstance(deleted, bool):
        raise InvalidEvent(f"deleted must be true or false, got {type(deleted).__name__}")
    if deleted:
        return dict(item_id=item_id, title="", uploaded_at=_event_time(data, "uploaded_at", time_required),
                    deleted=True)
    title = _text(_required_str(data, "title"))
    description = _text(_optional_str(data, "description"))
    if not title.strip() and not description.strip():
        raise InvalidEvent("no text to encode: title and description are both empty")
    tags = data.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidEvent("tags must be a list of strings")
    return dict(
        item_id=item_id,
        title=title,
        uploaded_at=_event_time(data, "uploaded_at", time_required),
        deleted=False,
        description=description,
        category=_text(_optional_str(data, "category")),
        brand=_text(_optional_str(data, "brand")),
        price=_price(data),
        tags=[_text(t) for t in tags[:MAX_TAGS]],
    )


def action_fields(data: dict) -> dict:
    """The fields of a valid user action (user_id, item_id, action, occurred_at); InvalidEvent says why not."""
    action = _required_str(data, "action")
    if action not in ACTIONS:
        raise InvalidEvent(f"action must be one of {', '.join(sorted(ACTIONS))}, got {action[:40]!r}")
    return dict(
        user_id=_identifier(data, "user_id"),
        item_id=_identifier(data, "item_id"),
        action=action,
        occurred_at=_event_time(data, "occurred_at"),
    )


def json_object(raw: bytes) -> dict:
    """One JSON object (an event's bytes, a JSON Lines line); InvalidEvent if it is anything else."""
    if _nesting_depth(raw) > MAX_JSON_DEPTH:
        # Checked before parsing: how deep json.loads can go depends on the caller's stack,
        # and the same event must get the same verdict wherever it is parsed.
        raise InvalidEvent(f"not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise InvalidEvent(f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    return data


def _identifier(data: dict, name: str) -> str:
    value = _required_str(data, name)
    if not value.strip() or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidEvent(f"{name} must be 1–{MAX_ID_CHARS} printable characters")
    return value


_STRUCTURE = re.compile(rb'\\.|"|[\[\]{}]')  # escapes, quotes and brackets: all the depth depends on


def _nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting outside strings (cheap unless the event is full of brackets)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the bracket count
    depth = deepest = 0
    in_string = False
    for match in _STRUCTURE.finditer(raw):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif not in_string and token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and token in (b"]", b"}"):
            depth -= 1
    return deepest


def _required_str(data: dict, name: str) -> str:
    if name not in data or data[name] is None:
        raise InvalidEvent(f"missing required field {name!r}")
    value = data[name]
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string, got {type(value).__name__}")
    return value


def _text(value: str) -> str:
    return _SURROGATES.sub("\ufffd", value)


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
    if not math.isfinite(_as_float(price)) or price < 0:
        raise InvalidEvent(f"price must be a finite number ≥ 0, got {price!r:.40}")
    return float(price)


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an integer with more digits than a float holds
        return math.inf


def _event_time(data: dict, name: str, required: bool = True) -> datetime | None:
    if name not in data or data[name] is None:
        if not required:
            return None
        raise InvalidEvent(f"missing required field {name!r}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidEvent(f"{name} must be an ISO-8601 string or epoch seconds, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent(f"{name} is not an ISO-8601 time: {value[:40]!r}") from None
        if parsed.tzinfo is None:
            raise InvalidEvent(f"{name} needs a time zone (e.g. 2026-01-31T12:00:00Z)")
    else:
        try:
            parsed = datetime.fromtimestamp(value, tz=timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise InvalidEvent(f"{name} epoch seconds out of range: {value!r:.40}") from None
    latest = datetime.now(timezone.utc) + MAX_FUTURE
    if not EPOCH <= parsed <= latest:
        raise InvalidEvent(f"{name} must be between 1970 and {MAX_FUTURE_TEXT} from now, got {parsed.isoformat()}")
    return parsed.astimezone(timezone.utc)
