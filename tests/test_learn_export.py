"""The user and item towers in ONNX, against their torch reference."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from encoders.training.export_towers import check_parity, export_towers, is_current
from encoders.training.model import LEARN, LEARNConfig
from encoders.towers import OnnxTowers
from tests.conftest import PROJECT_DATA_DIR, exported_towers
from tests.learn_fixtures import ml100k, ml100k_small  # noqa: F401  (fixtures)


@pytest.mark.parametrize("item_tower", ["mlp", "pch"])
def test_tower_onnx_parity(ml100k_small, tmp_path, item_tower):
    small, content = ml100k_small
    torch.manual_seed(0)
    model = LEARN(LEARNConfig(max_history=12, item_tower=item_tower, whiten=True), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path, encoder="all-minilm-l6-v2", config_name="test", protocol="loo", item_ids=small.item_ids)
    assert check_parity(model, tmp_path, content, small.item_ids) >= 0.999

    metadata = json.loads((tmp_path / "towers.json").read_text())
    assert metadata["content_dim"] == 384 and metadata["out_dim"] == 64 and metadata["max_history"] == 12
    assert metadata["padding"] == "right" and metadata["encoder"] == "all-minilm-l6-v2"

    towers = OnnxTowers(tmp_path)
    history = content[np.arange(12)][None].repeat(2, axis=0)  # (2, 12, 384)
    mask = np.zeros((2, 12), dtype=np.int64)
    mask[:, :5] = 1
    history[1, 5:] = 7.0  # garbage in the padding must not matter to the exported graph
    (users,) = towers.user_session.run(["user_embedding"], {"history": history, "history_mask": mask})
    assert users.shape == (2, 64) and np.allclose(users[0], users[1], atol=1e-5)
    with torch.no_grad():
        want = model.last_user_vector(torch.tensor([list(range(5)) + [-1] * 7])).numpy()
    assert float((users[0] * want[0]).sum()) >= 0.999
    assert towers.item_vectors(content[:1], small.item_ids[:1]).shape == (1, 64)  # batch size 1 works too


@pytest.mark.parametrize("shared_input", [False, True])
def test_hybrid_towers_serve_id_parts_for_trained_items_and_content_alone_for_the_rest(
        ml100k_small, tmp_path, shared_input):
    small, content = ml100k_small
    torch.manual_seed(0)
    warm = torch.ones(len(content), dtype=torch.bool)
    warm[::3] = False  # every third item never trained on
    model = LEARN(LEARNConfig(max_history=12, id_residual=True, shared_input=shared_input),
                  torch.from_numpy(content), warm).eval()
    for table in (model.item_ids, getattr(model, "user_ids", None)):
        if table is not None:
            torch.nn.init.normal_(table.weight)  # as if trained: ID parts that matter
    export_towers(model, tmp_path, encoder="all-minilm-l6-v2", config_name="test", protocol="cold", item_ids=small.item_ids)
    assert json.loads((tmp_path / "towers.json").read_text())["id_parts"] is True
    assert check_parity(model, tmp_path, content, small.item_ids) >= 0.999

    towers = OnnxTowers(tmp_path)
    content_only = LEARN(LEARNConfig(max_history=12, shared_input=shared_input), torch.from_numpy(content)).eval()
    content_only.load_state_dict({k: v for k, v in model.state_dict().items() if k in content_only.state_dict()})
    cold, trained = [0, 3], [1, 2]
    with torch.no_grad():
        want_cold = content_only.item_vectors(torch.tensor(cold)).numpy()
    served = towers.item_vectors(content[cold + trained], [small.item_ids[i] for i in cold + trained])
    assert np.allclose(served[:2], want_cold, atol=1e-5)  # never trained on: exactly the content-only vector
    assert (served[2:] * content_only.item_vectors(torch.tensor(trained)).detach().numpy()).sum(1).max() < 0.99
    renamed = towers.item_vectors(content[trained], ["a-new-item", "another"])  # an id the towers never saw
    with torch.no_grad():
        assert np.allclose(renamed, content_only.item_vectors(torch.tensor(trained)).numpy(), atol=1e-5)


def test_an_export_is_current_only_for_its_checkpoint_config_and_protocol(ml100k_small, tmp_path):
    _, content = ml100k_small
    assert not is_current(tmp_path, "test", "loo", "abc")  # nothing exported yet
    model = LEARN(LEARNConfig(max_history=12), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path, encoder="all-minilm-l6-v2", config_name="test", protocol="loo", item_ids=[],
                  checkpoint_sha256="abc")
    assert is_current(tmp_path, "test", "loo", "abc")
    assert not is_current(tmp_path, "test", "loo", "def")
    assert not is_current(tmp_path, "test", "cold", "abc") and not is_current(tmp_path, "other", "loo", "abc")


def test_export_towers_finds_the_towers_exported_from_its_checkpoint_current():
    """`make test` has exported the default towers; exporting again only checks that they are current."""
    exported_towers()
    env = {**os.environ, "COLDSTART_DATA_DIR": str(PROJECT_DATA_DIR)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "coldstart.cli", "export-towers"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0 and "towers up to date" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - started < 60
