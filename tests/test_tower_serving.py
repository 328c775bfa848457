"""The towers as the stream workers load them (encoders.towers) against the torch model they came from."""

import numpy as np
import pytest
import torch

from encoders.training.export_towers import export_towers
from encoders.training.model import LEARN, LEARNConfig
from encoders.towers import ContentTowers, OnnxTowers, load_towers
from tests.learn_fixtures import ml100k, ml100k_small  # noqa: F401  (fixtures)


def test_workers_serve_exported_towers_with_the_torch_vectors(ml100k_small, tmp_path):
    small, content = ml100k_small
    torch.manual_seed(0)
    model = LEARN(LEARNConfig(max_history=12), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path / "towers", encoder="all-minilm-l6-v2", config_name="test", protocol="loo",
                  item_ids=small.item_ids)

    towers = load_towers(tmp_path / "towers", "all-minilm-l6-v2")
    assert isinstance(towers, OnnxTowers) and towers.version.startswith("test@")
    histories = [content[[3, 1, 4]], content[list(range(20))]]  # the second is longer than N: last 12 are used
    ids = [[small.item_ids[i] for i in (3, 1, 4)], small.item_ids[:20]]
    users = towers.user_vectors(histories, ids)
    with torch.no_grad():
        want = model.last_user_vector(torch.tensor([[3, 1, 4] + [-1] * 9, list(range(8, 20))])).numpy()
        want_items = model.item_vectors(torch.tensor([3, 1])).numpy()
    assert (users * want).sum(axis=1).min() >= 0.999
    assert (towers.item_vectors(content[[3, 1]], [small.item_ids[3], small.item_ids[1]]) * want_items).sum(axis=1).min() >= 0.999


def test_towers_trained_on_another_encoder_are_refused(ml100k_small, tmp_path):
    _, content = ml100k_small
    model = LEARN(LEARNConfig(max_history=4), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path / "towers", encoder="smollm2-135m", config_name="test", protocol="loo", item_ids=[])
    with pytest.raises(ValueError, match="trained on encoder 'smollm2-135m'"):
        load_towers(tmp_path / "towers", "all-minilm-l6-v2")


def test_without_exported_towers_the_content_baseline_is_served(tmp_path):
    towers = load_towers(tmp_path, "all-minilm-l6-v2")
    assert isinstance(towers, ContentTowers)
    history = np.eye(4, dtype=np.float32)[:2]
    assert np.allclose(towers.user_vectors([history], [["a", "b"]])[0], np.array([1, 1, 0, 0]) / np.sqrt(2))
