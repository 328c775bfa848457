"""Data sources: parquet batch sources, each behind the push source the stream workers write to."""

from feast import FileSource, PushSource

# The offline store is a folder of parquet part files per feature view, appended
# to by the workers (coldstart/store.py) and read by `feast materialize`. Paths
# are relative to the repo path Feast is given: the data folder (COLDSTART_DATA_DIR)
# for the service's own commands, this folder for the `feast` CLI run here.
OFFLINE_DIR = "offline"

# Item embeddings as written by the item agent.
item_embeddings_source = FileSource(
    name="item_embeddings_source",
    path=f"{OFFLINE_DIR}/item_embeddings",
    timestamp_field="event_timestamp",
    description="Item embeddings written by the item agent (parquet part files)",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# Streaming entry point of item embeddings.
item_embeddings_push_source = PushSource(
    name="item_embeddings_push_source",
    batch_source=item_embeddings_source,
    description="Item embeddings pushed by the item agent",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# User embeddings as written by the user agent.
user_embeddings_source = FileSource(
    name="user_embeddings_source",
    path=f"{OFFLINE_DIR}/user_embeddings",
    timestamp_field="event_timestamp",
    description="User embeddings written by the user agent (parquet part files)",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# Streaming entry point of user embeddings.
user_embeddings_push_source = PushSource(
    name="user_embeddings_push_source",
    batch_source=user_embeddings_source,
    description="User embeddings pushed by the user agent",
    owner="coldstart",
    tags={"team": "coldstart"},
)
