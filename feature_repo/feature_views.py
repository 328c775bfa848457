"""Feature views: what ranking reads from the online store, and the affinity computed at request time."""

import numpy as np
from feast import FeatureView, Field
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Bool, Float32, Float64, Int64, String

from feature_repo.data_sources import item_embeddings_push_source, user_embeddings_push_source
from feature_repo.entities import item, user

# The item's vector (item tower over its content embedding), plus what the user agent and displays need.
item_embedding_fv = FeatureView(
    name="item_embedding",
    entities=[item],
    ttl=None,  # an item's vector does not expire; a newer event time replaces it
    schema=[
        Field(name="item_embedding", dtype=Array(Float32), description="L2-normalised item vector (item tower)"),
        Field(name="content_embedding", dtype=Array(Float32), description="Frozen-LLM content embedding (CEG), the user tower's input"),
        Field(name="title", dtype=String, description="Item title, for display"),
        Field(name="model_version", dtype=String, description="Encoder and tower versions that produced the vectors"),
        Field(name="category", dtype=String, description="Item category (comma-separated for several), for retrieval filters"),
        Field(name="deleted", dtype=Bool, description="True on the offline row that records the item's removal"),
    ],
    source=item_embeddings_push_source,
    online=True,
    description="Item embeddings, written within a second of upload",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# The user's vector: the user tower over the content embeddings of their last N positive actions.
user_embedding_fv = FeatureView(
    name="user_embedding",
    entities=[user],
    ttl=None,
    schema=[
        Field(name="user_embedding", dtype=Array(Float32), description="L2-normalised user vector (user tower)"),
        Field(name="history_length", dtype=Int64, description="Positive actions the vector was computed from"),
        Field(name="model_version", dtype=String, description="Tower version that produced the vector"),
        Field(name="seen_item_ids", dtype=Array(String), description="Items of the history, left out of retrieval"),
    ],
    source=user_embeddings_push_source,
    online=True,
    description="User embeddings, recomputed within a second of each action",
    owner="coldstart",
    tags={"team": "coldstart"},
)


# user·item affinity, computed at request time: both vectors are unit length, so the dot is a
# cosine; null when the user or the item is unknown. (No `description` on the Field: Feast 0.67
# compares it with the inferred field, which has none, and refuses the view.)
@on_demand_feature_view(
    sources=[user_embedding_fv[["user_embedding"]], item_embedding_fv[["item_embedding"]]],
    schema=[Field(name="affinity", dtype=Float64)],
    mode="python",
    description="User-item affinity for ranking",
    owner="coldstart",
    tags={"team": "coldstart"},
)
def user_item_affinity(inputs: dict) -> dict:
    affinities = []
    for user_vector, item_vector in zip(inputs["user_embedding"], inputs["item_embedding"]):
        if user_vector is None or item_vector is None or len(user_vector) != len(item_vector):
            affinities.append(None)
        else:
            affinities.append(float(np.dot(user_vector, item_vector)))
    return {"affinity": affinities}
