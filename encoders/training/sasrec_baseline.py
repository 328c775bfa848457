"""ID-based SASRec, trained by RecBole's own implementation, scored by our evaluator.

RecBole 1.2.1 cannot share the service's venv (it pins colorlog 4.7.2, which
breaks faust), so it gets one of its own, `.venv-baselines/`, made on first
use from the `baselines` extra in pyproject.toml (torch 2.13.0 first, the
CPU wheel). `encoders/training/sasrec_runner.py` runs in it as a subprocess.

The split is ours, handed to RecBole as "benchmark" files: every training
sample is a (last ≤ 50 items → next item) prefix of a user's training
sequence — exactly what RecBole's own LS split and data augmentation make
from the full log — validation rows predict the second-to-last interaction
(warm targets only under "cold"), test rows the last one from the complete
history. RecBole early-stops on validation NDCG@50; the best model's full
score matrix for the test rows comes back and is ranked by
`encoders.metrics`, like every other model. Results are cached under a key
of the files, the settings and the runner, so `evaluate` trains SASRec once
per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from coldstart.config import PROJECT_ROOT
from encoders.training.datasets import Interactions, Split

log = logging.getLogger(__name__)

VENV = PROJECT_ROOT / ".venv-baselines"
RUNNER = Path(__file__).with_name("sasrec_runner.py")
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")  # optional: faster epochs
MAX_LENGTH = 50  # RecBole's MAX_ITEM_LIST_LENGTH default, as in its SASRec runs

# RecBole's SASRec defaults (sasrec.yaml) and trainer defaults, with our evaluation settings.
RECBOLE_CONFIG = {
    "MAX_ITEM_LIST_LENGTH": MAX_LENGTH,
    "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256,
    "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE",
    "train_neg_sample_args": None,
    "epochs": 300, "train_batch_size": 2048, "learning_rate": 0.001, "stopping_step": 10,
    "eval_batch_size": 4096, "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                                           "group_by": "user", "mode": "full"},
    "metrics": ["Hit", "NDCG"], "topk": [10, 50, 200], "valid_metric": "NDCG@50",
    "seed": 2020, "reproducibility": True, "show_progress": False,
    "benchmark_filename": ["train", "valid", "test"],
    "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
    "alias_of_item_id": ["item_id_list"],
}


def requirements() -> list[str]:
    """The `baselines` extra of pyproject.toml: what the baselines venv holds besides torch."""
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["baselines"]


def ensure_venv() -> Path:
    """Create .venv-baselines with torch 2.13.0 (CPU wheel) and RecBole, once. Returns its python."""
    python = VENV / "bin" / "python"
    wanted = json.dumps(requirements())
    stamp = VENV / ".coldstart-baselines"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log.info("creating %s with RecBole (about a minute, from the package index)", VENV)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first and alone: never a CUDA torch
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("torch==2.13.0\n")
    subprocess.run([*pip, "-c", constraints.name, *requirements()], check=True)
    os.unlink(constraints.name)
    stamp.write_text(wanted)
    return python


def write_benchmark(data: Interactions, split: Split, folder: Path) -> None:
    """RecBole benchmark files sasrec.{train,valid,test}.inter for this split."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    item, user = data.item_ids, data.user_ids

    def row(u: int, history: np.ndarray, target: int) -> str:
        return f"{user[u]}\t{' '.join(item[i] for i in history[-MAX_LENGTH:])}\t{item[target]}\n"

    with open(folder / "sasrec.train.inter", "w") as f:
        f.write(header)
        for u, seq in enumerate(split.train):
            f.writelines(row(u, seq[:i], seq[i]) for i in range(1, len(seq)))
    with open(folder / "sasrec.valid.inter", "w") as f:
        f.write(header)
        validated = np.flatnonzero(split.valid >= 0)
        validated = validated[~split.cold[split.valid[validated]]]  # an ID model cannot rank an item it never saw
        f.writelines(row(u, split.valid_history(u), split.valid[u]) for u in validated)
    with open(folder / "sasrec.test.inter", "w") as f:
        f.write(header)
        f.writelines(row(u, split.test_history(u), split.test[u]) for u in np.flatnonzero(split.test >= 0))


def cache_key(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("sasrec.train.inter", "sasrec.valid.inter", "sasrec.test.inter"):
        digest.update((folder / name).read_bytes())
    digest.update(json.dumps(RECBOLE_CONFIG, sort_keys=True).encode())
    digest.update(RUNNER.read_bytes())
    digest.update(json.dumps(requirements()).encode())
    return digest.hexdigest()[:16]


def sasrec_scores(data: Interactions, split: Split, cache_dir: Path, train: bool = True) -> tuple[np.ndarray, dict]:
    """(U, I) SASRec scores for every user with a test target (other rows NaN), and run facts.

    Trains with RecBole in the baselines venv unless a cached result for the
    same files, settings and runner exists; with train=False a missing result
    raises FileNotFoundError.
    """
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "sasrec"
        write_benchmark(data, split, staging)
        key = cache_key(staging)
        workdir = Path(cache_dir).resolve() / f"{data.name}-{split.protocol}-{key}"
        if not (workdir / "result.json").exists():
            if not train:
                raise FileNotFoundError(f"no cached SASRec result for [{split.protocol}] in {workdir}")
            python = ensure_venv()
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(staging, workdir / "sasrec")
            spec = {**RECBOLE_CONFIG, "data_path": str(workdir), "checkpoint_dir": str(workdir / "saved")}
            (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
            env = dict(os.environ, PYTHONPATH="")
            if JEMALLOC.exists():
                env["LD_PRELOAD"] = str(JEMALLOC)
                # Never hand freed pages back to the kernel: with jemalloc's default decay the
                # runner spent more time in page faults (kernel) than in training (2026-12-01).
                env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
            log.info("training RecBole SASRec [%s] in %s (log: %s)", split.protocol, VENV, workdir / "run.log")
            started = time.time()
            with open(workdir / "run.log", "w") as out:
                done = subprocess.run([str(python), str(RUNNER), str(workdir)], stdout=out,
                                      stderr=subprocess.STDOUT, env=env, cwd=workdir)
            if done.returncode != 0:
                raise RuntimeError(f"SASRec runner failed ({done.returncode}); see {workdir / 'run.log'}")
            log.info("SASRec [%s] trained in %.0f s", split.protocol, time.time() - started)
    result = json.loads((workdir / "result.json").read_text())
    columns = json.loads((workdir / "columns.json").read_text())
    rows = json.loads((workdir / "rows.json").read_text())
    raw = np.load(workdir / "scores.npy")  # (rows, columns), RecBole's item order
    item_index = {item: i for i, item in enumerate(data.item_ids)}
    user_index = {user: u for u, user in enumerate(data.user_ids)}
    scores = np.full((len(data.user_ids), data.num_items), np.nan, dtype=np.float32)
    # Items RecBole never saw in any file get the lowest score: an ID model cannot rank them.
    known = np.full((len(rows), data.num_items), -np.inf, dtype=np.float32)
    known[:, [item_index[c] for c in columns]] = raw
    scores[[user_index[r] for r in rows]] = known
    return scores, result
