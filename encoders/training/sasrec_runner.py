"""Train RecBole's own SASRec and export its test scores. Runs in the baselines venv only.

    .venv-baselines/bin/python encoders/sasrec_runner.py WORKDIR

WORKDIR holds spec.json (RecBole's config dict) and sasrec/sasrec.{train,valid,test}.inter,
RecBole "benchmark" files with one row per (user, item_id_list → item_id) sample
written by encoders/sasrec_baseline.py. Writes into WORKDIR:
- scores.npy: (test rows, items) float32, SASRec's full-sort scores
- columns.json: the item id of each score column; rows.json: the user id of each row
- result.json: best validation result, epochs, seconds

This file imports nothing from coldstart: RecBole 1.2.1 pins colorlog 4.7.2,
which breaks the service's faust, so it lives in a venv of its own.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

# RecBole 1.2.1 re-creates numpy aliases that numpy 2 removed (np.float = np.float_, ...).
np.float_, np.complex_, np.unicode_ = np.float64, np.complex128, np.str_

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402  (not recbole.quick_start: it imports ray)
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402


def main(workdir: Path) -> None:
    started = time.time()
    spec = json.loads((workdir / "spec.json").read_text())
    config = Config(model="SASRec", dataset="sasrec", config_dict=spec)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)  # RecBole's per-epoch loss and validation lines, into run.log
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data.dataset).to(config["device"])
    # Importing RecBole's sequential models runs sine.py, which switches anomaly
    # detection on for the whole process: about 3x slower training, same losses.
    torch.autograd.set_detect_anomaly(False)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid, best_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)

    # RecBole's own load_best_model calls torch.load without weights_only=False,
    # which torch >= 2.6 refuses for its checkpoint; this file is ours, so load it here.
    checkpoint = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    rows = test_data.dataset.inter_feat
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            batch = rows[start : start + 256].to(config["device"])
            scores.append(model.full_sort_predict(batch).view(len(batch), -1).float().cpu().numpy())
    item_tokens = dataset.field2id_token[dataset.iid_field]
    user_tokens = dataset.field2id_token[dataset.uid_field]
    np.save(workdir / "scores.npy", np.concatenate(scores)[:, 1:])  # column 0 is RecBole's padding item
    (workdir / "columns.json").write_text(json.dumps([str(t) for t in item_tokens[1:]]))
    (workdir / "rows.json").write_text(json.dumps([str(user_tokens[u]) for u in rows[dataset.uid_field].tolist()]))
    (workdir / "result.json").write_text(json.dumps({
        "best_valid_score": float(best_valid),
        "best_valid_result": {k: float(v) for k, v in best_result.items()},
        "epochs_run": len(trainer.train_loss_dict),
        "train_loss": {int(k): float(v) for k, v in trainer.train_loss_dict.items()},
        "seconds": time.time() - started,
    }, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
