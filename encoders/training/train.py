"""Train LEARN's towers on one split with the dense all-action loss.

An epoch cuts every user's training sequence into windows of at most N
items (window borders shift by a random offset each epoch) and visits each
window once; a step's windows are packed several to a row of the user
tower, each seeing only itself. After each epoch the model is scored on the validation targets
(full ranking, NDCG@50); the best epoch is kept as the checkpoint and
training stops after `patience` epochs without a better mean over the last
`stop_window` epochs.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from encoders.training.configs import TrainConfig
from encoders.training.datasets import Split
from encoders.training.metrics import rank_metrics, target_ranks
from encoders.training.model import LEARN, LEARNConfig, Packing, dense_all_action_loss

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


def cpu_multiplies_bf16() -> bool:
    """Whether this (x86) CPU has bf16 dot-product instructions, AVX512-BF16 or AMX-BF16 (/proc/cpuinfo)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the towers' products run in during training (TrainConfig.precision)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cpu" and cpu_multiplies_bf16() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Windows(NamedTuple):
    """One training step: its windows packed several to a row of N inputs (`pack`)."""

    inputs: np.ndarray  # (R, N) item indices, -1 = padding
    targets: np.ndarray  # (R, N, K) each input's next K actions, -1 = none
    window: np.ndarray  # (R, N) which of the step's windows each input belongs to, -1 = padding
    position: np.ndarray  # (R, N) each input's position in its window, 0 at padding

    def to(self, device: torch.device) -> Windows:
        return Windows(*(torch.from_numpy(array).to(device) for array in self))


def pack(lengths: list[int], width: int) -> tuple[list[tuple[int, int]], int]:
    """First-fit decreasing: (row, offset) of each length in rows of `width`, and the number of rows. A third of a
    step's rows was padding with one window to a row (windows are 1..N long); packed, ~2% is (MovieLens-100K)."""
    free: list[int] = []  # room left in each row
    placed = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        placed[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return placed, len(free)


def window_batches(train: list[np.ndarray], config: TrainConfig, rng: np.random.Generator):
    """Yield one epoch's Windows, config.batch_size windows a step."""
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
        placed, rows = pack([end - start for _, start, end in picked], N)
        batch = Windows(np.full((rows, N), -1), np.full((rows, N, K), -1), np.full((rows, N), -1),
                        np.zeros((rows, N), dtype=np.int64))
        for w, ((user, start, end), (row, offset)) in enumerate(zip(picked, placed)):
            seq, span = train[user], slice(offset, offset + end - start)
            batch.inputs[row, span] = seq[start:end]
            batch.window[row, span] = w
            batch.position[row, span] = np.arange(end - start)
            for t, position in enumerate(range(start, end)):
                following = seq[position + 1 : position + 1 + K]
                batch.targets[row, offset + t, : len(following)] = following
        yield batch


class Start(NamedTuple):
    """A trained run that another starts from (TrainConfig.init_from): its weights and its settings."""

    state: dict[str, torch.Tensor]
    settings: dict


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


def history_exclusions(window: torch.Tensor, position: torch.Tensor, rows: torch.Tensor,
                       max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (p, m): candidate row m is among the inputs of input p's window at or before p. The inputs
    are given by window (P,), position in it (P,) and candidate row (P,) (-1: not a candidate)."""
    by_window = torch.full((int(window.max()) + 1, max_history), -1, dtype=torch.long, device=rows.device)
    by_window[window, position] = rows
    earlier = by_window[window]  # (P, N): the candidate rows of each input's window, by position
    counted = (torch.arange(max_history, device=rows.device) <= position[:, None]) & (earlier >= 0)
    p, t = counted.nonzero(as_tuple=True)
    return p, earlier[p, t]


def batch_loss(model: LEARN, batch: Windows, config: TrainConfig, candidates: Candidates) -> torch.Tensor:
    """Dense all-action loss of one step's windows (tensors) against the run's candidates."""
    inputs, targets = batch.inputs, batch.targets
    present = torch.cat([inputs[inputs >= 0], targets[targets >= 0]])
    table = candidates.table(present)  # (M,)
    row_of = torch.full((len(model.content),), -1, dtype=torch.long, device=inputs.device)
    row_of[table] = torch.arange(len(table), device=inputs.device)
    real = inputs >= 0  # (R, N)
    user = model.user_vectors(inputs, Packing(batch.window, batch.position))[real]  # (P, D)
    positives = torch.where(targets >= 0, row_of[targets.clamp(min=0)], -1)[real]  # (P, K)
    excluded = None
    if config.mask_history:
        excluded = history_exclusions(batch.window[real], batch.position[real], row_of[inputs[real]],
                                      config.model.max_history)
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


class Patience:
    """Early stopping: exhausted after `patience` epochs without a better mean of the last `window` validation
    values (window 1: of each epoch's own)."""

    def __init__(self, patience: int, window: int = 1):
        self.patience, self.window = patience, window
        self.values: list[float] = []
        self.best, self.stale = float("-inf"), 0

    def exhausted(self, value: float) -> bool:
        self.values.append(value)
        recent = float(np.mean(self.values[-self.window :]))
        if recent > self.best:
            self.best, self.stale = recent, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def train(
    config: TrainConfig, split: Split, content: np.ndarray, out_dir: Path | None = None,
    max_steps: int | None = None, device: torch.device | None = None, show_progress: bool = True,
    data_digest: str | None = None, start: Start | None = None,
) -> tuple[LEARN, dict]:
    """Train on split.train; returns the best model (by validation) and the run history.

    start: the trained run to start from (config.init_from): every weight but the ID tables, which the run it
    came from has not got and which start at zero; its settings are kept in the history.

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
    if start is not None:
        missing, unexpected = model.load_state_dict(start.state, strict=False)
        assert not unexpected and all(name.endswith("_ids.weight") for name in missing), (missing, unexpected)
    averaged = copy.deepcopy(model) if config.ema_decay else model  # what is validated and kept
    candidates = Candidates(config, split, device)
    # fused: one kernel over all parameters instead of a dozen small ops per parameter (5% of a CPU step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    dtype = training_dtype(config.precision, device)
    history = {"config": config.name, "settings": asdict(config), "protocol": split.protocol,
               "device": str(device), "dtype": str(dtype).removeprefix("torch."), "step_loss": [], "epochs": []}
    if data_digest is not None:
        history["data"] = data_digest
    if start is not None:
        history["init_settings"] = start.settings
    best, best_state, step, started = -1.0, None, 0, time.time()
    patience = Patience(config.patience, config.stop_window)
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
        for batch in progress:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = batch_loss(model, batch.to(device), config, candidates)
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
            best = metrics[VALID_METRIC]
            best_state = {k: v.detach().clone() for k, v in averaged.state_dict().items()}
            history["best_epoch"] = epoch
            if out_dir is not None:
                save_checkpoint(Path(out_dir) / CHECKPOINT, config, averaged, history)
        if patience.exhausted(metrics[VALID_METRIC]):
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
