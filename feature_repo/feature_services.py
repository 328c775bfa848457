"""Feature services: versioned bundles of features that a consumer reads together."""

from feast import FeatureService

from feature_repo.feature_views import item_embedding_fv

# Item vectors for candidate generation and ranking.
item_embeddings_v1 = FeatureService(
    name="item_embeddings_v1",
    features=[item_embedding_fv],
    description="Item vectors and the encoder version that made them",
    owner="coldstart",
    tags={"team": "coldstart"},
)
