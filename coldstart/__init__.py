"""coldstart: real-time cold-start embeddings (LEARN) served through Feast.

The package is the service's top and bottom; it defines only `retrieve`, which
imports what it needs when called, so that importing its bottom layer
(coldstart.config) loads nothing else. The map,
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


def retrieve(user_id: str, k: int = 100, exclude_seen: bool = True, filter: dict | None = None):
    """The top k items for a user (coldstart.retrieval.Retriever.retrieve), from a process-wide index.

    The Python API's edge, as the command line is the shell's: the first call reads the settings from
    the environment, builds the index (rebuilt from the online store, then following the topic) and
    waits until it is complete. Feast and the index library load then, not on `import coldstart`.
    """
    from coldstart.config import Settings
    from coldstart.retrieval import retrieve as retrieve_with

    return retrieve_with(Settings.from_env, user_id, k, exclude_seen, filter)
