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
    _, content = ml100k_small
    torch.manual_seed(0)
    model = LEARN(LEARNConfig(max_history=12, item_tower=item_tower), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path, encoder="all-minilm-l6-v2", config_name="test", protocol="loo")
    assert check_parity(model, tmp_path, content) >= 0.999

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
    assert towers.item_vectors(content[:1]).shape == (1, 64)  # batch size 1 works too


def test_an_export_is_current_only_for_its_checkpoint_config_and_protocol(ml100k_small, tmp_path):
    _, content = ml100k_small
    assert not is_current(tmp_path, "test", "loo", "abc")  # nothing exported yet
    model = LEARN(LEARNConfig(max_history=12), torch.from_numpy(content)).eval()
    export_towers(model, tmp_path, encoder="all-minilm-l6-v2", config_name="test", protocol="loo", checkpoint_sha256="abc")
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
