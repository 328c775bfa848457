"""Feature services: versioned bundles of features that a consumer reads together."""

from feast import FeatureService

from feature_repo.feature_views import item_embedding_fv, user_embedding_fv, user_item_affinity

# Item vectors for candidate generation and display.
item_embeddings_v1 = FeatureService(
    name="item_embeddings_v1",
    features=[item_embedding_fv[["item_embedding", "title", "model_version"]]],
    description="Item vectors, titles and the encoder version that made them",
    owner="coldstart",
    tags={"team": "coldstart"},
)

# What ranking reads for one user and a list of candidate items, in one call.
ranking_v1 = FeatureService(
    name="ranking_v1",
    features=[
        user_embedding_fv[["user_embedding", "history_length"]],
        item_embedding_fv[["item_embedding", "title"]],
        user_item_affinity,
    ],
    description="User and candidate item embeddings with their affinity, for ranking",
    owner="coldstart",
    tags={"team": "coldstart"},
)
