"""`coldstart evaluate`: LEARN against popularity, raw content and RecBole's SASRec.

Protocols (encoders.datasets.make_split), every model scored by one ranker
(encoders.metrics) on the same split:
- "loo": leave-one-out by time, full ranking over all items, history excluded.
- "cold": a seeded 20% of items are never trained on; the same test targets,
  reported overall ("cold_overall") and for cold ("cold_cold") and warm
  ("cold_warm") targets.

Models: "learn" (the named default config, the hybrid; trained first if it has no
checkpoint), "learn-minilm-next1" (pure LEARN, content only: always reported), "sasrec" (RecBole, cached per split), "pop" (training-interaction
counts), "content" (user = mean of the history's frozen content embeddings,
cosine to items, no training), plus any extra LEARN configs asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from encoders.training.configs import DEFAULT, PURE_LEARN, TrainConfig, get_config
from encoders.training.registry import encoder_config
from encoders.training.datasets import Interactions, Split, content_embeddings, make_split, prepare_ml100k
from encoders.training.own_data import ReadReport, read_data
from encoders.training.metrics import KS, rank_metrics, target_ranks
from encoders.training.train import CHECKPOINT, HISTORY, Start, load_checkpoint, pick_device, score_all, train

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

    def run_dir(self, dataset: str, config: TrainConfig, protocol: str) -> Path:
        return self.root / "checkpoints" / dataset / config.name / protocol / f"seed-{config.seed}"


def load_dataset(paths: Paths, data: Path | None = None,
                 skip_bad_rows: bool = False) -> tuple[Interactions, ReadReport]:
    """The data folder `data` (encoders.training.own_data), or MovieLens-100K (fetched and converted once)
    without one; and what was read. own_data.DataError (BadRow) if it breaks the format's rules."""
    if data is None:
        return read_data(prepare_ml100k(paths.ml100k), skip_bad_rows, name="ml-100k")
    return read_data(data, skip_bad_rows)


def data_digest(data: Interactions) -> str:
    """A short hash of what a model is trained on: items, their texts, users and sequences."""
    digest = hashlib.sha256(json.dumps([data.name, data.item_ids, data.item_texts, data.user_ids]).encode())
    for sequence in data.sequences:
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


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


def current_history(config: TrainConfig, run_dir: Path, data: Interactions | None = None) -> dict | None:
    """history.json of the checkpoint in run_dir if it was trained with this config's
    settings (and, given `data`, on that data); None if there is none, if a config's numbers
    changed since, or if the data folder's content did (a checkpoint from before data digests
    were recorded counts as trained on it)."""
    if not (run_dir / HISTORY).exists():
        return None
    history = json.loads((run_dir / HISTORY).read_text())
    if history.get("settings") != stored_settings(config):
        log.warning("the checkpoint in %s was trained with other settings than %s's", run_dir, config.name)
        return None
    if data is not None and "data" in history and history["data"] != data_digest(data):
        log.warning("the checkpoint in %s was trained on other data than %s's now", run_dir, data.name)
        return None
    if config.init_from and history.get("init_settings") != stored_settings(init_config(config)):
        log.warning("the checkpoint in %s started from other settings of %s", run_dir, config.init_from)
        return None
    return history


def stored_settings(config: TrainConfig) -> dict:
    """A config's settings as history.json stores them (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def init_config(config: TrainConfig) -> TrainConfig:
    """The config whose towers `config` starts from (config.init_from), on the same seed."""
    return replace(get_config(config.init_from), seed=config.seed)


def trained_learn(config: TrainConfig, data: Interactions, split: Split, content: np.ndarray,
                  paths: Paths, retrain: bool = False, show_progress: bool = True) -> LearnRun:
    """The checkpoint of this config on this split, training it first if there is none
    or if it was trained with other settings (a config's numbers changed since)."""
    run_dir = paths.run_dir(data.name, config, split.protocol)
    history = None if retrain else current_history(config, run_dir, data)
    if history is None:
        start = None
        if config.init_from:  # its first stage: trained here first if it has no current checkpoint
            first = trained_learn(init_config(config), data, split, content, paths, show_progress=show_progress)
            start = Start(first.model.state_dict(), first.history["settings"])
        log.info("training %s on %s [%s]", config.name, data.name, split.protocol)
        model, history = train(config, split, content, out_dir=run_dir, data_digest=data_digest(data), start=start,
                               show_progress=show_progress)
        return LearnRun(config, split.protocol, model, history)
    model = load_checkpoint(run_dir / CHECKPOINT, content).to(pick_device())
    return LearnRun(config, split.protocol, model, history)


def train_missing(configs: list[TrainConfig], splits: dict[tuple[str, int], Split], data: Interactions,
                  contents: dict[str, np.ndarray], paths: Paths, retrain: bool = False,
                  jobs: int | None = None) -> int:
    """Train every (config, split) whose checkpoint is missing or stale, `jobs` runs at a time (default: one per
    core), each in its own process on cores // jobs threads; returns how many were trained.

    A run's small matrices keep one core busier than they keep two: on the 2-core machine two one-thread runs
    side by side took 8.2 s an epoch each, one two-thread run 5.2 s (1.3x the epochs per second side by side)."""
    pending = []
    for (protocol, seed), split in splits.items():
        for config in (replace(c, seed=seed) for c in configs):
            if retrain or current_history(config, paths.run_dir(data.name, config, protocol), data) is None:
                pending.append((config, split))
    pending.sort(key=lambda run: bool(run[0].init_from))  # first stages before the runs that start from them
    cores = os.cpu_count() or 1
    jobs = min(jobs or cores, len(pending))
    if jobs <= 1 or pick_device().type == "cuda":  # one run (or a GPU): in this process, with its progress bar
        for config, split in pending:
            trained_learn(config, data, split, contents[config.encoder], paths, retrain=True)
        return len(pending)
    log.info("training %d runs, %d at a time (one process each, %d threads)", len(pending), jobs, max(1, cores // jobs))
    # A run that starts from another (init_from) waits for it when that one is pending too.
    pending_runs = {(config.name, config.seed, split.protocol) for config, split in pending}
    ready, blocked = [], {}
    for config, split in pending:
        first = (config.init_from, config.seed, split.protocol)
        (blocked.setdefault(first, []) if first in pending_runs else ready).append((config, split))
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_training_process,
                             initargs=(max(1, cores // jobs), logging.getLogger().level)) as pool, \
            tqdm(total=len(pending), desc=f"training ({jobs} at a time)") as progress:
        running = {pool.submit(_train_run, config, data, split, contents[config.encoder], paths): (config, split)
                   for config, split in ready}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for run in done:
                config, split = running.pop(run)
                run.result()  # a failed run raises here
                progress.update()
                for second, its_split in blocked.pop((config.name, config.seed, split.protocol), []):
                    now_ready = pool.submit(_train_run, second, data, its_split, contents[second.encoder], paths)
                    running[now_ready] = (second, its_split)
    return len(pending)


def _start_training_process(threads: int, log_level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _train_run(config: TrainConfig, data: Interactions, split: Split, content: np.ndarray, paths: Paths) -> None:
    trained_learn(config, data, split, content, paths, retrain=True, show_progress=False)


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
    dataset: tuple[Interactions, ReadReport] | None = None, seeds: tuple[int, ...] = (0,), jobs: int | None = None,
) -> dict:
    """Run every model on the protocols, once per seed, on a data set as load_dataset returns it
    (default: MovieLens-100K); returns the JSON-able report.

    A seed sets the training seed and, for the cold protocol, which items are cold. Missing checkpoints are
    trained first, `jobs` at a time (train_missing).
    "results" holds the mean over seeds, "seeds" every seed's figures, "spread" their
    standard deviation (population, over the seeds a model ran on)."""
    started = time.time()
    data, read = dataset or load_dataset(paths)
    if config_name != PURE_LEARN and PURE_LEARN not in extra_configs:
        extra_configs = (*extra_configs, PURE_LEARN)  # LEARN as published: always a row beside the default
    configs = [get_config(name) for name in (config_name, *extra_configs)]
    report = {"dataset": data.name, "seed_list": list(seeds), "results": {}, "seeds": {}, "spread": {},
              "counts": {}, "seconds": {}, "training": {}, "sasrec": {}, "data": read.as_dict()}
    contents = {}
    for config in configs:
        if config.encoder not in contents:
            t = time.time()
            contents[config.encoder] = content_embeddings(data.item_texts, encoder_config(config.encoder),
                                                          paths.content_cache)
            report["seconds"][f"content:{config.encoder}"] = time.time() - t
    splits = {(protocol, seed): make_split(data, protocol, configs[0].cold_fraction, seed)
              for protocol in protocols for seed in seeds}
    t = time.time()
    if train_missing(configs, splits, data, contents, paths, retrain, jobs):
        report["seconds"]["training"] = time.time() - t
    for protocol in protocols:
        for seed in seeds:
            split = splits[protocol, seed]
            users = np.flatnonzero(split.test >= 0)
            targets = split.test[users]
            histories = [split.test_history(u) for u in users]
            slices = slices_of(split, targets)
            for name, mask in slices.items():  # cold slices differ in size from one seed's split to the next
                report["counts"].setdefault(name, {})[str(seed)] = int(mask.sum())

            def record(model_name: str, scores: np.ndarray) -> None:
                ranks = target_ranks(scores, targets, histories)
                for slice_name, mask in slices.items():
                    per_seed = report["seeds"].setdefault(model_name, {}).setdefault(slice_name, {})
                    per_seed[str(seed)] = rank_metrics(ranks[mask])

            for i, config in enumerate(configs):
                t = time.time()
                run = trained_learn(replace(config, seed=seed), data, split, contents[config.encoder], paths)
                row = "learn" if i == 0 else config.name
                record(row, score_all(run.model, histories))
                report["seconds"][f"{row}:{protocol}:{seed}"] = time.time() - t
                report["training"][f"{row}:{protocol}:{seed}"] = {
                    "config": config.name, "train_seconds": run.history.get("train_seconds"),
                    "best_epoch": run.history.get("best_epoch"), "device": run.history.get("device"),
                }
            record("pop", popularity_scores(split, users))
            record("content", content_scores(contents[configs[0].encoder], histories))
            if sasrec != "off":
                _record_sasrec(report, record, data, split, users, paths, sasrec, f"{protocol}:{seed}")
    report["results"], report["spread"] = summarise(report["seeds"])
    report["seconds"]["total"] = time.time() - started
    return report


def _record_sasrec(report: dict, record, data: Interactions, split: Split, users: np.ndarray, paths: Paths,
                   sasrec: str, key: str) -> None:
    from encoders.training.sasrec_baseline import sasrec_scores

    t = time.time()
    try:
        scores, facts = sasrec_scores(data, split, paths.sasrec_cache, train=sasrec == "train")
    except FileNotFoundError as missing:  # --sasrec cached (the default) and this split never trained
        log.warning("%s: no SASRec row for [%s]; `--sasrec train` trains it (about 30 minutes)", missing, key)
        report["sasrec"][key] = {"error": str(missing)}
        return
    except (RuntimeError, OSError) as failure:  # the baselines venv could not be made or run
        log.error("SASRec baseline [%s] could not run: %s", key, failure)
        report["sasrec"][key] = {"error": str(failure)}
    else:
        record("sasrec", scores[users])
        report["sasrec"][key] = facts
        report["seconds"][f"sasrec:{key}"] = time.time() - t


def summarise(per_seed: dict) -> tuple[dict, dict]:
    """model → slice → seed → metrics  ⇒  (model → slice → mean metrics, model → slice → std)."""
    means, spreads = {}, {}
    for model, slices in per_seed.items():
        for slice_name, by_seed in slices.items():
            runs = list(by_seed.values())
            means.setdefault(model, {})[slice_name] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            spreads.setdefault(model, {})[slice_name] = {k: float(np.std([r[k] for r in runs])) for k in runs[0]}
    return means, spreads


def format_table(report: dict) -> str:
    """The results as a Markdown table: one row per model and slice, mean ± spread over seeds."""
    names = [f"{m}@{k}" for m in ("hr", "ndcg") for k in KS]
    lines = ["| model | slice | seeds | n | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for model, slices in report["results"].items():
        for slice_name, metrics in slices.items():
            seeds = report["seeds"][model][slice_name]
            spread = report["spread"][model][slice_name]
            values = " | ".join(f"{metrics[n]:.4f}" + (f" ± {spread[n]:.4f}" if len(seeds) > 1 else "")
                                for n in names)
            n = "/".join(str(report["counts"][slice_name][seed]) for seed in seeds)
            lines.append(f"| {model} | {slice_name} | {len(seeds)} | {n} | {values} |")
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
        row, protocol, seed = key.split(":")
        if int(seed) != report["seed_list"][0]:
            continue  # one curve per model and protocol: the first seed's
        config = replace(get_config(facts["config"]), seed=int(seed))
        history_file = paths.run_dir(report["dataset"], config, protocol) / HISTORY
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
        errors = [report["spread"][m].get(slice_name, {}).get("hr@50", 0.0) for m in models]
        n = "/".join(map(str, report["counts"][slice_name].values()))
        bars = ax.bar(np.arange(len(models)) + offset, values, width, yerr=errors, capsize=3,
                      label=f"{slice_name} (n={n})")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(models)), models, rotation=20, ha="right")
    ax.set(ylabel="HR@50 (mean ± std over seeds)", title=f"{report['dataset']}: HR@50 on cold vs warm test targets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "hr50_cold_warm.png", dpi=120)
    written.append(out_dir / "hr50_cold_warm.png")
    plt.close(fig)
    return written
