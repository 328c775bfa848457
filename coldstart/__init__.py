"""coldstart: real-time cold-start embeddings (LEARN) served through Feast.

The package is the service's top and bottom; it re-exports only `retrieve`
(coldstart.retrieval.retrieve), and that lazily, so that importing its bottom
layer (coldstart.config) loads nothing else. The map,
bottom up (README "Architecture"; .importlinter keeps the arrows):

- coldstart.config   settings, read once at the edge, and the shared names
- encoders           ONNX Runtime + tokenizers: content encoder, towers (no torch)
- feature_repo       Feast declarations only
- coldstart.store    the Feast adapter: the only module that touches Feast internals
- coldstart.ranking  the read path for ranking (Python)
- coldstart.retrieval candidate retrieval: the top k items for a user (ANN index per model version)
- streams            the faust workers: item-uploads and user-actions
- coldstart.server   the HTTP read path
- encoders.training  torch: the encoder's reference and export, LEARN, training, evaluation
- coldstart.dev      local services, the demo, load generators, benchmarks
- coldstart.cli      the command line: reads the settings and passes them down
"""


def __getattr__(name: str):
    """`coldstart.retrieve(...)`, imported on first use (it loads Feast and the index library)."""
    if name == "retrieve":
        from coldstart.retrieval import retrieve

        return retrieve
    raise AttributeError(f"module 'coldstart' has no attribute {name!r}")
