"""Turn raw event bytes into a typed record, or say exactly why not.

The rules themselves are coldstart.events (shared with the training-data
reader, so a training row is valid exactly when the same event is); this module
adds what is particular to the topics: a null value (a Kafka tombstone) is not
an item's removal, and is dead-lettered with ITEM_TOMBSTONE, which names the
removal event; and it builds the faust records the agents work on.
"""

from __future__ import annotations

from coldstart.events import (  # noqa: F401  (ACTIONS…: the rules' names, as the agents and tests import them)
    ACTIONS,
    MAX_TAGS,
    POSITIVE_ACTIONS,
    InvalidEvent,
    action_fields,
    item_fields,
    json_object,
)
from streams.records import ItemUpload, UserAction

# A null value is how compacted topics delete a key; item-uploads is not one, and an item is
# removed by an event of its own (README, "Input: item-uploads").
ITEM_TOMBSTONE = ('null value (a tombstone): it does not remove an item; to remove one, send '
                  '{"item_id": ..., "deleted": true, "uploaded_at": ...} (README, "Input: item-uploads")')


def parse_item_upload(raw: bytes | None) -> ItemUpload:
    if raw is None:
        raise InvalidEvent(ITEM_TOMBSTONE)
    return ItemUpload(**item_fields(json_object(raw)))


def parse_user_action(raw: bytes | None) -> UserAction:
    if raw is None:
        raise InvalidEvent("null value (a tombstone): user-actions holds events, not state; there is nothing to delete")
    return UserAction(**action_fields(json_object(raw)))
