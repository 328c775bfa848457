"""`coldstart evaluate`: LEARN against popularity, raw content and RecBole's SASRec.

Protocols (encoders.datasets.make_split), every model scored by one ranker
(encoders.metrics) on the same split:
- "loo": leave-one-out by time, full ranking over all items, history excluded.
- "cold": a seeded 20% of items are never trained on; the same test targets,
  reported overall ("cold_overall") and for cold ("cold_cold") and warm
  ("cold_warm") targets.

Models: "learn" (the named default config; trained first if it has no
checkpoint), "sasrec" (RecBole, cached per split), "pop" (training-interaction
counts), "content" (user = mean of the history's frozen content embeddings,
cosine to items, no training), plus any extra LEARN configs asked for.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoders.training.configs import DEFAULT, TrainConfig, get_config
from encoders.training.registry import encoder_config
from encoders.training.datasets import Interactions, Split, content_embeddings, fetch_ml100k, load_ml100k, make_split
from encoders.training.metrics import KS, rank_metrics, target_ranks
from encoders.training.train import CHECKPOINT, HISTORY, load_checkpoint, pick_device, score_all, train

log = logging.getLogger(__name__)

PROTOCOLS = ("loo", "cold")


@dataclass
class Paths:
    """Where evaluate keeps what it fetches, caches and trains (all under the git-ignored data/)."""

    root: Path

    @property
    def ml100k(self) -> Path:
        return self.root / "datasets" / "ml-100k"

    @property
    def content_cache(self) -> Path:
        return self.root / "cache" / "content"

    @property
    def sasrec_cache(self) -> Path:
        return self.root / "cache" / "sasrec"

    def run_dir(self, dataset: str, config: str, protocol: str) -> Path:
        return self.root / "checkpoints" / dataset / config / protocol


def load_dataset(paths: Paths) -> Interactions:
    return load_ml100k(fetch_ml100k(paths.ml100k))


def popularity_scores(split: Split, users: np.ndarray) -> np.ndarray:
    """Every user gets the items' training-interaction counts."""
    counts = np.bincount(np.concatenate(split.train), minlength=len(split.cold)).astype(np.float32)
    return np.broadcast_to(counts, (len(users), len(counts)))


def content_scores(content: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """Raw frozen embeddings: cosine of each item to the mean of the user's history embeddings."""
    users = np.stack([content[h].mean(axis=0) for h in histories])  # (U, C)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    return users @ content.T


@dataclass
class LearnRun:
    """A trained LEARN config on one split: the model plus its training facts."""

    config: TrainConfig
    protocol: str
    model: torch.nn.Module
    history: dict = field(default_factory=dict)


def current_history(config: TrainConfig, run_dir: Path) -> dict | None:
    """history.json of the checkpoint in run_dir if it was trained with this config's
    settings; None if there is none or a config's numbers changed since."""
    if not (run_dir / HISTORY).exists():
        return None
    history = json.loads((run_dir / HISTORY).read_text())
    if history.get("settings") != json.loads(json.dumps(asdict(config))):  # as history.json stores it
        log.warning("the checkpoint in %s was trained with other settings than %s's", run_dir, config.name)
        return None
    return history


def trained_learn(config: TrainConfig, data: Interactions, split: Split, content: np.ndarray,
                  paths: Paths, retrain: bool = False) -> LearnRun:
    """The checkpoint of this config on this split, training it first if there is none
    or if it was trained with other settings (a config's numbers changed since)."""
    run_dir = paths.run_dir(data.name, config.name, split.protocol)
    history = None if retrain else current_history(config, run_dir)
    if history is None:
        log.info("training %s on %s [%s]", config.name, data.name, split.protocol)
        model, history = train(config, split, content, out_dir=run_dir)
        return LearnRun(config, split.protocol, model, history)
    model = load_checkpoint(run_dir / CHECKPOINT, content).to(pick_device())
    return LearnRun(config, split.protocol, model, history)


def slices_of(split: Split, targets: np.ndarray) -> dict[str, np.ndarray]:
    if split.protocol == "loo":
        return {"loo": np.ones(len(targets), dtype=bool)}
    cold = split.cold[targets]
    return {"cold_overall": np.ones(len(targets), dtype=bool), "cold_cold": cold, "cold_warm": ~cold}


def learn_test_metrics(model: torch.nn.Module, split: Split) -> dict[str, dict[str, float]]:
    """A LEARN model's test metrics per slice of the split, scored as `evaluate` scores its "learn" row
    (each with "n", the test users in the slice): what export-towers records in towers.json."""
    users = np.flatnonzero(split.test >= 0)
    targets = split.test[users]
    histories = [split.test_history(u) for u in users]
    ranks = target_ranks(score_all(model, histories), targets, histories)
    return {name: {"n": int(mask.sum()), **rank_metrics(ranks[mask])} for name, mask in slices_of(split, targets).items()}


def evaluate(
    paths: Paths, config_name: str = DEFAULT, extra_configs: tuple[str, ...] = (),
    sasrec: str = "train", protocols: tuple[str, ...] = PROTOCOLS, retrain: bool = False,
) -> dict:
    """Run every model on the protocols; returns the JSON-able report."""
    started = time.time()
    data = load_dataset(paths)
    configs = [get_config(name) for name in (config_name, *extra_configs)]
    report = {"dataset": data.name, "results": {}, "counts": {}, "seconds": {}, "training": {}, "sasrec": {}}
    results = report["results"]
    contents = {}
    for config in configs:
        if config.encoder not in contents:
            t = time.time()
            contents[config.encoder] = content_embeddings(data.item_texts, encoder_config(config.encoder),
                                                          paths.content_cache)
            report["seconds"][f"content:{config.encoder}"] = time.time() - t
    for protocol in protocols:
        split = make_split(data, protocol, configs[0].cold_fraction, configs[0].seed)
        users = np.flatnonzero(split.test >= 0)
        targets = split.test[users]
        histories = [split.test_history(u) for u in users]
        slices = slices_of(split, targets)
        report["counts"].update({name: int(mask.sum()) for name, mask in slices.items()})

        def record(model_name: str, scores: np.ndarray) -> None:
            ranks = target_ranks(scores, targets, histories)
            for slice_name, mask in slices.items():
                results.setdefault(model_name, {})[slice_name] = rank_metrics(ranks[mask])

        for i, config in enumerate(configs):
            t = time.time()
            run = trained_learn(config, data, split, contents[config.encoder], paths, retrain)
            row = "learn" if i == 0 else config.name
            record(row, score_all(run.model, histories))
            report["seconds"][f"{row}:{protocol}"] = time.time() - t
            report["training"][f"{row}:{protocol}"] = {
                "config": config.name, "train_seconds": run.history.get("train_seconds"),
                "best_epoch": run.history.get("best_epoch"), "device": run.history.get("device"),
            }
        record("pop", popularity_scores(split, users))
        record("content", content_scores(contents[configs[0].encoder], histories))
        if sasrec != "off":
            from encoders.training.sasrec_baseline import sasrec_scores

            t = time.time()
            try:
                scores, facts = sasrec_scores(data, split, paths.sasrec_cache, train=sasrec == "train")
            except (RuntimeError, OSError) as failure:  # not cached, or the baselines venv could not be made or run
                log.error("SASRec baseline [%s] could not run: %s", protocol, failure)
                report["sasrec"][protocol] = {"error": str(failure)}
            else:
                record("sasrec", scores[users])
                report["sasrec"][protocol] = facts
                report["seconds"][f"sasrec:{protocol}"] = time.time() - t
    report["seconds"]["total"] = time.time() - started
    return report


def format_table(report: dict) -> str:
    """The results as a Markdown table: one row per model and slice."""
    names = [f"{m}@{k}" for m in ("hr", "ndcg") for k in KS]
    lines = ["| model | slice | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for model, slices in report["results"].items():
        for slice_name, metrics in slices.items():
            values = " | ".join(f"{metrics[n]:.4f}" for n in names)
            lines.append(f"| {model} | {slice_name} | {report['counts'][slice_name]} | {values} |")
    return "\n".join(lines)


def plot(report: dict, paths: Paths, out_dir: Path) -> list[Path]:
    """training_loss.png (LEARN loss per step, both protocols) and hr50_cold_warm.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, facts in report["training"].items():
        row, protocol = key.split(":")
        history_file = paths.run_dir(report["dataset"], facts["config"], protocol) / HISTORY
        if history_file.exists():
            losses = np.asarray(json.loads(history_file.read_text())["step_loss"])
            smooth = np.convolve(losses, np.ones(20) / 20, mode="valid") if len(losses) > 20 else losses
            ax.plot(smooth, label=f"{row} [{protocol}]")
    ax.set(xlabel="step", ylabel="dense all-action loss (20-step mean)", title="LEARN training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "training_loss.png", dpi=120)
    written.append(out_dir / "training_loss.png")
    plt.close(fig)

    if "cold_cold" not in report["counts"]:  # protocol loo alone: no cold and warm targets
        return written
    models = list(report["results"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for offset, slice_name in ((-width / 2, "cold_cold"), (width / 2, "cold_warm")):
        values = [report["results"][m].get(slice_name, {}).get("hr@50", np.nan) for m in models]
        bars = ax.bar(np.arange(len(models)) + offset, values, width, label=f"{slice_name} (n={report['counts'][slice_name]})")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(models)), models, rotation=20, ha="right")
    ax.set(ylabel="HR@50", title=f"{report['dataset']}: HR@50 on cold vs warm test targets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "hr50_cold_warm.png", dpi=120)
    written.append(out_dir / "hr50_cold_warm.png")
    plt.close(fig)
    return written
