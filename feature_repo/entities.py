"""Entities: what features are keyed by."""

from feast import Entity, ValueType

# An item (ad, video, book…) as uploaded on the item-uploads topic.
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="An uploaded item, keyed by the producer's item_id",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# A user whose actions arrive on the user-actions topic.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user, keyed by the producer's user_id",
    owner="coldstart",
    tags={"team": "coldstart"},
)
