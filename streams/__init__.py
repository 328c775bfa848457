"""Stream workers (faust): item-uploads → embeddings → Feast."""
