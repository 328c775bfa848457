"""Feature views: what ranking reads from the online store."""

from feast import FeatureView, Field
from feast.types import Array, Float32, String

from feature_repo.data_sources import item_embeddings_push_source
from feature_repo.entities import item

# The item's vector: content embedding (CEG) through the item tower, L2-normalised.
item_embedding_fv = FeatureView(
    name="item_embedding",
    entities=[item],
    ttl=None,  # an item's vector does not expire; a newer event time replaces it
    schema=[
        Field(name="item_embedding", dtype=Array(Float32), description="L2-normalised item vector"),
        Field(name="model_version", dtype=String, description="Encoder version that produced the vector"),
    ],
    source=item_embeddings_push_source,
    online=True,
    description="Item embeddings, written within a second of upload",
    owner="coldstart",
    tags={"team": "coldstart"},
)
