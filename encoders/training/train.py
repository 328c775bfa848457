"""Train LEARN's towers on one split with the dense all-action loss.

An epoch cuts every user's training sequence into windows of at most N
items (window borders shift by a random offset each epoch) and visits each
window once. After each epoch the model is scored on the validation targets
(full ranking, NDCG@50); the best epoch is kept as the checkpoint and
training stops after `patience` epochs without improvement.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from encoders.training.configs import TrainConfig
from encoders.training.datasets import Split
from encoders.training.metrics import rank_metrics, target_ranks
from encoders.training.model import LEARN, LEARNConfig, dense_all_action_loss

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
VALID_METRIC = "ndcg@50"


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> None:
    """Let this process's allocator keep and reuse freed blocks of up to `limit` bytes. The loss's (positions x
    items) matrices, tens of MB, change size with every batch; glibc maps each from the OS afresh (its own
    threshold stops at 32 MB) and gives it back when freed, so every step paid the page faults of zeroed
    memory again: 15% of an epoch, on one thread or two (EVALUATION.md, issue 15, session 12). The same
    products run either way. Another C library: left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, limit)
    libc.mallopt(M_TRIM_THRESHOLD, limit)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def window_batches(train: list[np.ndarray], config: TrainConfig, rng: np.random.Generator):
    """Yield (inputs (B, N), targets (B, N, K)) item-index arrays, -1 = padding, for one epoch."""
    N, K = config.model.max_history, config.next_k
    windows = []  # (user, start, end): positions start..end-1 are inputs, each with ≥1 next action
    for user, seq in enumerate(train):
        first = int(rng.integers(1, N + 1))  # the first window is 1..N long: borders move each epoch
        starts = [0, *range(first, len(seq) - 1, N)]
        ends = [*starts[1:], len(seq) - 1]
        windows += [(user, s, e) for s, e in zip(starts, ends) if e > s]
    order = rng.permutation(len(windows))
    for begin in range(0, len(order), config.batch_size):
        picked = [windows[i] for i in order[begin : begin + config.batch_size]]
        inputs = np.full((len(picked), N), -1, dtype=np.int64)
        targets = np.full((len(picked), N, K), -1, dtype=np.int64)
        for row, (user, start, end) in enumerate(picked):
            seq = train[user]
            inputs[row, : end - start] = seq[start:end]
            for t, position in enumerate(range(start, end)):
                following = seq[position + 1 : position + 1 + K]
                targets[row, t, : len(following)] = following
        yield inputs, targets


class Candidates:
    """The negatives side of the loss for one training run (config.loss): which items each
    batch is contrasted against, with their logQ correction and exclusions."""

    def __init__(self, config: TrainConfig, split: Split, device: torch.device):
        self.config = config
        counts = np.bincount(np.concatenate(split.train), minlength=len(split.cold)).astype(np.float64)
        self.trained = torch.from_numpy(np.flatnonzero(counts)).to(device)  # never-trained items are never candidates
        self.popularity = torch.from_numpy(counts / counts.sum()).float().to(device)  # (I,)

    def table(self, present: torch.Tensor) -> torch.Tensor:
        """(M,) candidate item indices for a batch whose inputs and targets are `present`."""
        if self.config.loss == "full":
            return self.trained
        if self.config.loss == "sampled":
            pool = torch.multinomial(self.popularity, self.config.negatives, replacement=True)
            present = torch.cat([present, pool])
        return torch.unique(present)

    def log_q(self, table: torch.Tensor) -> torch.Tensor | None:
        """Sampled negatives come by popularity: logQ-correct them (in-batch and full: none)."""
        return torch.log(self.popularity[table]) if self.config.loss == "sampled" else None


def history_exclusions(inputs: torch.Tensor, row_of: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N, M) bool: candidate m is in window b's inputs at or before position t."""
    B, N = inputs.shape
    rows = torch.where(inputs >= 0, row_of[inputs.clamp(min=0)], -1)  # (B, N) candidate rows, -1: none
    first = torch.full((B, size + 1), N, dtype=torch.long, device=inputs.device)  # last column: a sink
    positions = torch.arange(N, device=inputs.device).expand(B, N)
    first.scatter_reduce_(1, torch.where(rows >= 0, rows, size), positions, reduce="amin")
    return first[:, None, :size] <= torch.arange(N, device=inputs.device)[None, :, None]


def batch_loss(model: LEARN, inputs: torch.Tensor, targets: torch.Tensor, config: TrainConfig,
               candidates: Candidates) -> torch.Tensor:
    """Dense all-action loss of one batch against the run's candidates."""
    present = torch.cat([inputs[inputs >= 0], targets[targets >= 0]])
    table = candidates.table(present)  # (M,)
    row_of = torch.full((len(model.content),), -1, dtype=torch.long, device=inputs.device)
    row_of[table] = torch.arange(len(table), device=inputs.device)
    positions = inputs >= 0  # (B, N)
    user = model.user_vectors(inputs)[positions]  # (P, D)
    positives = torch.where(targets >= 0, row_of[targets.clamp(min=0)], -1)[positions]  # (P, K)
    excluded = history_exclusions(inputs, row_of, len(table))[positions] if config.mask_history else None
    return dense_all_action_loss(user, model.item_vectors(table), positives, config.model.temperature,
                                 excluded, candidates.log_q(table))


def last_items(histories: list[np.ndarray], n: int) -> torch.Tensor:
    """Each history's last n items, oldest first, right-padded with -1 → (U, n)."""
    out = torch.full((len(histories), n), -1, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = history[-n:]
        out[row, : len(tail)] = torch.from_numpy(np.asarray(tail, dtype=np.int64))
    return out


@torch.no_grad()
def score_all(model: LEARN, histories: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """(U, I) cosine of every user (after their history) with every item."""
    model.eval()
    device = model.content.device
    items = model.item_vectors(torch.arange(len(model.content), device=device))  # (I, D)
    padded = last_items(histories, model.config.max_history).to(device)
    users = torch.cat([model.last_user_vector(padded[s : s + batch_size]) for s in range(0, len(padded), batch_size)])
    return (users @ items.T).cpu().numpy()


def validate(model: LEARN, split: Split) -> dict[str, float]:
    """Metrics on the validation targets (these choose the epoch); on the cold protocol also per kind of
    target ("cold_ndcg@50", "warm_ndcg@50", …), which is what choosing between configs for cold items needs."""
    users = np.flatnonzero(split.valid >= 0)
    targets = split.valid[users]
    histories = [split.valid_history(u) for u in users]
    ranks = target_ranks(score_all(model, histories), targets, histories)
    metrics = rank_metrics(ranks)
    if split.cold.any():
        cold = split.cold[targets]
        for kind, mask in (("cold", cold), ("warm", ~cold)):
            metrics |= {f"{kind}_{name}": value for name, value in rank_metrics(ranks[mask]).items()}
    return metrics


def train(
    config: TrainConfig, split: Split, content: np.ndarray, out_dir: Path | None = None,
    max_steps: int | None = None, device: torch.device | None = None, show_progress: bool = True,
    data_digest: str | None = None,
) -> tuple[LEARN, dict]:
    """Train on split.train; returns the best model (by validation) and the run history.

    With out_dir, the best checkpoint is written there whenever validation
    improves, and the history (losses, validation, times) at the end.
    max_steps stops early (smoke runs); it skips validation-based selection.
    data_digest (evaluate.data_digest) is kept in the history: a later run on other data retrains.
    """
    device = device or pick_device()
    keep_freed_memory()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model_config = config.model
    assert content.shape[1] == model_config.content_dim, "config.model.content_dim must match the encoder"
    model = LEARN(model_config, torch.from_numpy(content), torch.from_numpy(split.trained_items())).to(device)
    averaged = copy.deepcopy(model) if config.ema_decay else model  # what is validated and kept
    candidates = Candidates(config, split, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = {"config": config.name, "settings": asdict(config), "protocol": split.protocol,
               "device": str(device), "step_loss": [], "epochs": []}
    if data_digest is not None:
        history["data"] = data_digest
    best, best_state, stale, step, started = -1.0, None, 0, 0, time.time()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    for epoch in range(config.max_epochs):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        batches = list(window_batches(split.train, config, rng))
        progress = tqdm(batches, desc=f"{config.name} [{split.protocol}] epoch {epoch}", leave=False,
                        disable=not show_progress)
        losses = []
        for inputs, targets in progress:
            loss = batch_loss(model, torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device),
                              config, candidates)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not model:
                with torch.no_grad():
                    for mean, param in zip(averaged.parameters(), model.parameters()):
                        mean.lerp_(param, 1.0 - config.ema_decay)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        history["step_loss"] += losses
        if max_steps is not None and step >= max_steps:
            break
        metrics = validate(averaged, split)
        history["epochs"].append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.time() - started,
                                  **{f"valid_{k}": v for k, v in metrics.items()}})
        improved = metrics[VALID_METRIC] > best
        log.info("%s [%s] epoch %d loss %.4f valid %s %.4f%s", config.name, split.protocol, epoch,
                 np.mean(losses), VALID_METRIC, metrics[VALID_METRIC], " *" if improved else "")
        if improved:
            best, stale = metrics[VALID_METRIC], 0
            best_state = {k: v.detach().clone() for k, v in averaged.state_dict().items()}
            history["best_epoch"] = epoch
            if out_dir is not None:
                save_checkpoint(Path(out_dir) / CHECKPOINT, config, averaged, history)
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    history["train_seconds"] = time.time() - started
    history["steps"] = step
    if out_dir is not None:
        (Path(out_dir) / HISTORY).write_text(json.dumps(history, indent=1))
    return model.eval(), history


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.max_epochs))
    return config.lr


def save_checkpoint(path: Path, config: TrainConfig, model: LEARN, history: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": asdict(config), "model_config": asdict(model.config),
                "state_dict": model.state_dict(), "best_epoch": history.get("best_epoch")}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, content: np.ndarray) -> LEARN:
    """A trained LEARN from a checkpoint, over the given content table (which is not saved in it)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LEARN(LEARNConfig(**saved["model_config"]), torch.from_numpy(content))
    model.load_state_dict(saved["state_dict"])  # warm mask and whitening statistics included
    return model.eval()
