"""Fixtures shared by the tests of the LEARN model (tests/test_learn_*.py): real MovieLens-100K."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.training.datasets import Interactions, content_embeddings, load_ml100k
from encoders.training.registry import encoder_config
from tests.conftest import PROJECT_DATA_DIR


@pytest.fixture(scope="session")
def ml100k() -> Interactions:
    """The real data set, fetched (once, checksum-verified) and converted into data/datasets/ml-100k."""
    return load_ml100k(PROJECT_DATA_DIR / "datasets" / "ml-100k")


@pytest.fixture(scope="session")
def ml100k_small(ml100k, tmp_path_factory) -> tuple[Interactions, np.ndarray]:
    """The first 120 users of ML-100K, only the items they touched, with MiniLM content embeddings."""
    sequences = ml100k.sequences[:120]
    kept = np.unique(np.concatenate(sequences))
    new_index = np.full(ml100k.num_items, -1)
    new_index[kept] = np.arange(len(kept))
    small = Interactions(
        name="ml-100k-small",
        item_ids=[ml100k.item_ids[i] for i in kept],
        item_texts=[ml100k.item_texts[i] for i in kept],
        user_ids=ml100k.user_ids[:120],
        sequences=[new_index[s] for s in sequences],
    )
    content = content_embeddings(small.item_texts, encoder_config("all-minilm-l6-v2"),
                                 tmp_path_factory.mktemp("content"))
    return small, content
