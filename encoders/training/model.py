"""LEARN's trainable part: PCH user and item towers and the dense all-action loss.

The frozen CEG (encoders/ceg.py) turns every item's text into a content
embedding once; only what is in this file is trained. Both towers end in an
L2-normalised vector of the same size, so a user-item score is a cosine.

- User tower (PCH): content embeddings of the user's last N items, oldest
  first and right-padded, → linear projection + learned positions → a small
  causal transformer → a user vector at every position (the vector at
  position t has seen items 0..t).
- Item tower: an item's content embedding → an MLP projection ("mlp"), or,
  as an ablation, the PCH architecture (own weights) on a length-1 sequence
  ("pch"). Either way an item needs no interaction to get a vector.
- Dense all-action loss: the user vector at every position is contrasted
  (InfoNCE with temperature) against the next K items the user acted on
  (positives) and all other items in the batch (negatives); the other
  positives of the same position are masked out of its negatives.
- The hybrid (`id_residual`): a learned per-item ID vector is added to the
  projected content of items seen in training (the `warm` mask), on both
  towers. Items never trained on get no ID part, in training, evaluation and
  serving alike: their vector is exactly the content-only one. With
  `id_dropout` the ID part of each item occurrence is dropped at random in
  training, so the content path stays good on its own.
- Optional whitening (`whiten`): the frozen content embeddings are centred and
  PCA-whitened (statistics of the items seen in training) before the towers;
  sentence embeddings are anisotropic, whitening spreads them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LEARNConfig:
    content_dim: int = 384  # CEG output size (MiniLM 384, SmolLM2-135M 576)
    max_history: int = 50  # N: the user tower reads the last N items (SASRec's default length)
    dim: int = 64  # PCH width; 64 matches RecBole's SASRec hidden size
    out_dim: int = 64  # size of user and item embeddings
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    item_tower: str = "mlp"  # "mlp" (content → MLP) or "pch" (PCH on a length-1 sequence; ablation)
    item_hidden: int = 512  # MLP hidden width: enough to separate ~1.7k items from their text
    temperature: float = 0.05  # InfoNCE temperature on cosines
    shared_input: bool = False  # True: the user tower reads item-tower embeddings of its history (as SASRec shares its item table)
    id_residual: bool = False  # True: the hybrid: a learned ID vector per item seen in training
    id_dropout: float = 0.0  # hybrid: chance that an item occurrence's ID part is dropped in training
    whiten: bool = False  # PCA-whiten the content embeddings before the towers
    # Dropout on the item tower's content input where an item has no ID part (training only: never trained on, or
    # its ID part dropped this time): the content-only path — all a cold item gets — learns from noisy content
    # instead of memorising the warm items' exact embeddings, which the ID part does.
    content_dropout: float = 0.0

    def __post_init__(self):
        assert self.dim % self.n_heads == 0, "dim must split evenly across heads"
        assert self.item_tower in ("mlp", "pch"), self.item_tower
        assert 0.0 <= self.id_dropout < 1.0 and (self.id_residual or self.id_dropout == 0.0)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) in training, with masks from 16 random bits per element. torch's own CPU dropout draws each
    element through a Bernoulli distribution object (its MKL path is taken on Intel CPUs only): 6.2 ms for the item
    tower's 1,678 x 512 activations on a Zen 4 core against 1.1 ms here, and 14% of a training step over the seven
    dropouts of a step (EVALUATION.md, issue 15, session 13). p is applied to 1/65,536."""
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= round(p * 65536) - 32768  # chance 1 - p
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout over `dropout`'s cheaper masks."""

    def __init__(self, p: float):
        super().__init__()
        assert 0.0 <= p < 1.0
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p) if self.training and self.p > 0 else x


class Packing(NamedTuple):
    """Several histories in one row of the user tower's input (training packs its windows so that fewer rows are
    padding): which of the row's histories each input belongs to, and its position in that history."""

    history: torch.Tensor  # (B, T) a history's number, the same for all its inputs (any value at padding)
    position: torch.Tensor  # (B, T) 0 at each history's first input (0 at padding)


class SelfAttention(nn.Module):
    def __init__(self, config: LEARNConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attention_drop = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        # Written out (as scaled_dot_product_attention's own CPU path does with dropout) to use the cheaper masks.
        scores = (q @ k.transpose(2, 3)).mul_(1.0 / math.sqrt(D // self.n_heads))  # (B, H, T, T)
        weights = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        y = self.attention_drop(weights) @ v  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (nanoGPT)."""

    def __init__(self, config: LEARNConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim),
            Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class PCH(nn.Module):
    """Preference comprehension: projected content (B, T, C) → causal transformer → (B, T, out_dim), unit norm."""

    def __init__(self, config: LEARNConfig, in_dim: int):
        super().__init__()
        self.input = nn.Linear(in_dim, config.dim)
        self.position = nn.Embedding(config.max_history, config.dim)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.out_dim)

    def forward(self, content: torch.Tensor, mask: torch.Tensor, id_residual: torch.Tensor | None = None,
                packing: Packing | None = None) -> torch.Tensor:
        return self.over_projected(self.input(content), mask, id_residual, packing)

    def over_projected(self, x: torch.Tensor, mask: torch.Tensor, id_residual: torch.Tensor | None = None,
                       packing: Packing | None = None) -> torch.Tensor:
        """forward() from the input projection's output x (B, T, D) on: training projects the content table
        once per step and indexes it, which is fewer products than projecting every position."""
        B, T, _ = x.shape
        assert T <= self.position.num_embeddings, f"history of {T} > max_history"
        if id_residual is not None:
            x = x + id_residual  # (B, T, D), zero for items never trained on
        position = torch.arange(T, device=x.device) if packing is None else packing.position
        x = self.drop(x + self.position(position))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        itself = torch.eye(T, dtype=torch.bool, device=x.device)  # keeps padded rows from being empty
        seen = mask[:, None, :].bool()  # (B, 1, T)
        if packing is not None:  # a row's histories do not see each other
            seen = seen & (packing.history[:, :, None] == packing.history[:, None, :])  # (B, T, T)
        allowed = (causal & (seen | itself))[:, None]  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, allowed)
        return F.normalize(self.head(self.ln_f(x)), dim=-1)  # (B, T, out_dim)


class ItemTower(nn.Module):
    """Content embeddings (..., C) → item embeddings (..., out_dim), unit norm."""

    def __init__(self, config: LEARNConfig):
        super().__init__()
        self.kind = config.item_tower
        self.content_drop = Dropout(config.content_dropout)
        if self.kind == "mlp":
            self.input = nn.Linear(config.content_dim, config.item_hidden)
            self.output = nn.Sequential(
                nn.GELU(), Dropout(config.dropout), nn.Linear(config.item_hidden, config.out_dim)
            )
        else:
            self.pch = PCH(config, config.content_dim)

    def forward(self, content: torch.Tensor, id_residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.content_drop.p > 0:
            if id_residual is None:  # content-only towers: every item is content only
                content = self.content_drop(content)
            else:
                content_only = (id_residual == 0).all(dim=-1, keepdim=True)  # (..., 1)
                content = torch.where(content_only, self.content_drop(content), content)
        if self.kind == "mlp":
            x = self.input(content)  # (..., H)
            if id_residual is not None:
                x = x + id_residual
            return F.normalize(self.output(x), dim=-1)  # (..., out_dim)
        flat = content.reshape(-1, 1, content.shape[-1])  # (M, 1, C): each item a length-1 sequence
        ones = torch.ones(flat.shape[0], 1, dtype=torch.bool, device=content.device)
        residual = None if id_residual is None else id_residual.reshape(flat.shape[0], 1, -1)
        return self.pch(flat, ones, residual).view(*content.shape[:-1], -1)  # (..., out_dim)


class Whitening(nn.Module):
    """x → (x - mean) W: PCA whitening with fixed statistics (buffers saved in checkpoints)."""

    def __init__(self, sample: torch.Tensor, eps: float = 1e-3):
        super().__init__()
        mean = sample.mean(dim=0)
        covariance = torch.cov((sample - mean).T)  # (C, C)
        values, vectors = torch.linalg.eigh(covariance)
        self.register_buffer("mean", mean)
        self.register_buffer("matrix", vectors / torch.sqrt(values.clamp(min=0) + eps * values.max()))  # (C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix


class LEARN(nn.Module):
    """The two towers over a fixed table of content embeddings (I, C), which is a buffer, not trained.

    warm (I,) bool marks the items seen in training: only they get an ID part (hybrid).
    """

    def __init__(self, config: LEARNConfig, content: torch.Tensor, warm: torch.Tensor | None = None):
        super().__init__()
        assert content.shape[1] == config.content_dim, (content.shape, config.content_dim)
        self.config = config
        self.register_buffer("content", content.float(), persistent=False)
        warm = torch.ones(len(content), dtype=torch.bool) if warm is None else warm.bool()
        self.register_buffer("warm", warm)
        self.whitening = Whitening(self.content[warm]) if config.whiten else nn.Identity()
        self.user_tower = PCH(config, config.out_dim if config.shared_input else config.content_dim)
        self.item_tower = ItemTower(config)
        if config.id_residual:
            item_width = config.item_hidden if config.item_tower == "mlp" else config.dim
            self.item_ids = nn.Embedding(len(content), item_width)
            nn.init.zeros_(self.item_ids.weight)
            if not config.shared_input:
                self.user_ids = nn.Embedding(len(content), config.dim)
                nn.init.zeros_(self.user_ids.weight)

    def id_part(self, table: nn.Embedding, items: torch.Tensor) -> torch.Tensor:
        """(...) item indices → (..., W) ID vectors: zero for items never trained on, and
        dropped at random per occurrence in training."""
        keep = self.warm[items]
        if self.training and self.config.id_dropout > 0:
            keep = keep & (torch.rand(items.shape, device=items.device) >= self.config.id_dropout)
        return table(items) * keep[..., None]

    def user_vectors(self, history: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """history (B, T) item indices, right-padded with -1 → (B, T, out_dim): one vector per prefix
        (of each of a row's histories, with `packing`)."""
        mask = history >= 0  # (B, T)
        items = history.clamp(min=0)
        if self.config.shared_input:
            return self.history_vectors(self.content[items], mask, self.history_id_parts(items), packing)
        projected = self.user_tower.input(self.whitening(self.content))  # (I, D): the same as per position, cheaper
        return self.user_tower.over_projected(projected[items], mask, self.history_id_parts(items), packing)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) item indices → (..., out_dim)."""
        return self.content_item_vectors(self.content[items], self.item_id_parts(items))

    # The towers over content (what is exported and served): an item's ID part is an input,
    # looked up by the caller (zero for items never trained on).

    def history_vectors(self, content: torch.Tensor, mask: torch.Tensor,
                        id_parts: torch.Tensor | None = None, packing: Packing | None = None) -> torch.Tensor:
        """(B, T, C) history content + (B, T) mask [+ (B, T, W) history ID parts] → (B, T, out_dim)."""
        if self.config.shared_input:
            return self.user_tower(self.content_item_vectors(content, id_parts), mask, packing=packing)
        return self.user_tower(self.whitening(content), mask, id_parts, packing)

    def content_item_vectors(self, content: torch.Tensor, id_parts: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) content [+ (..., H) ID parts] → (..., out_dim)."""
        return self.item_tower(self.whitening(content), id_parts)

    def item_id_parts(self, items: torch.Tensor) -> torch.Tensor | None:
        return self.id_part(self.item_ids, items) if self.config.id_residual else None

    def history_id_parts(self, items: torch.Tensor) -> torch.Tensor | None:
        """The ID parts the user tower adds for its history items (the item tower's when it reads item vectors)."""
        if not self.config.id_residual:
            return None
        return self.id_part(self.item_ids if self.config.shared_input else self.user_ids, items)

    def last_user_vector(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded histories, each with at least one item → (B, out_dim) after the last item."""
        vectors = self.user_vectors(history)  # (B, T, out_dim)
        last = (history >= 0).sum(dim=1) - 1  # (B,)
        assert (last >= 0).all(), "every history needs at least one item"
        return vectors[torch.arange(len(history)), last]


def dense_all_action_loss(
    user: torch.Tensor, items: torch.Tensor, positives: torch.Tensor, temperature: float,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None, log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of every prefix vector against each of its next actions.

    user:      (P, D) unit user vectors, one per prefix position
    items:     (M, D) unit vectors of the candidate items (the batch's, a sampled pool, or all)
    positives: (P, K) row indices into `items` of the next K actions, -1 where the sequence ended
    excluded:  (rows, columns) index pairs (p, m): candidate m is never a negative of p (it is in p's history)
    log_q:     (M,) log sampling probability of each candidate: subtracted from the logits (logQ
               correction of sampled negatives, Yi et al. 2019)
    For each (p, k): -log softmax of the positive among {itself} ∪ {candidates that are neither a
    positive of p nor excluded}.
    """
    P, K = positives.shape
    assert user.shape[0] == P and user.shape[1] == items.shape[1]
    valid = positives >= 0  # (P, K)
    rows = torch.arange(P, device=user.device)[:, None].expand(P, K)
    not_negative = (rows[valid], positives[valid])  # accidental hits: no positive is a negative
    if excluded is not None:
        not_negative = tuple(torch.cat(pair) for pair in zip(not_negative, excluded))
    # The logits are fp32 whatever the towers ran in: they reach ±1/temperature, past bf16's precision. Under bf16
    # autocast (training on a CPU that multiplies bf16) the backward pass's two products run in bf16, as autocast's own
    # backward products do: 34 → 15 ms a step on Zen 4 (EVALUATION.md, issue 15, session 14).
    device = user.device.type
    products = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    user, items = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in (user, items))
    positive, negatives = _PositivesAndNegatives.apply(user / temperature, items, positives.clamp(min=0),
                                                       not_negative, log_q, products)  # (P, K), (P, 1)
    loss = torch.logaddexp(positive, negatives) - positive  # (P, K)
    return loss[valid].mean()


# The logits' product in slices of this many rows: one (P, 64) x (64, M) product into a (P, M) matrix of tens of MB ran
# at half the speed of the same product in slices (MKL, one thread: 25 against 12 ms for P = 4,500, M = 1,678).
ROWS_PER_PRODUCT = 256


class _PositivesAndNegatives(torch.autograd.Function):
    """logits = user @ items.T - log_q, then (each row's logits at `positives`, each row's log-sum-exp over the
    candidates that are not among its `not_negative` index pairs), with the (P, M) logits made, masked and
    exponentiated in one buffer that the backward pass turns into its gradient in place (its products in
    `gradient_dtype`, None: the logits').

    Autograd over the same expression made and kept about eight (P, M) float matrices a step (fill, shift,
    exp, their gradients, a scattered zero matrix for the gather) — tens of MB each, a fifth of a training
    step; this makes one (EVALUATION.md, issue 15, session 13)."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, user, items, positives, not_negative, log_q, gradient_dtype):
        logits = user.new_empty(len(user), len(items))  # (P, M)
        for start in range(0, len(user), ROWS_PER_PRODUCT):
            end = start + ROWS_PER_PRODUCT
            torch.mm(user[start:end], items.T, out=logits[start:end])
        if log_q is not None:
            logits -= log_q
        positive = logits.gather(1, positives)  # (P, K)
        logits.index_put_(not_negative, logits.new_tensor(float("-inf")))
        top = logits.amax(dim=1, keepdim=True)  # (P, 1)
        top.masked_fill_(top.isinf(), 0.0)  # a row with no negatives: -inf stays -inf
        shifted = logits.sub_(top).exp_()  # (P, M): exp(logit - top), 0 where masked
        total = shifted.sum(dim=1, keepdim=True)  # (P, 1)
        ctx.save_for_backward(user, items, positives, shifted, total)
        ctx.gradient_dtype = gradient_dtype
        return positive, total.log() + top

    @staticmethod
    def backward(ctx, grad_positive, grad_negatives):
        user, items, positives, shifted, total = ctx.saved_tensors
        grad_logits = shifted.mul_(grad_negatives / total)  # d lse / d logit = softmax over the negatives
        grad_logits.scatter_add_(1, positives, grad_positive)
        dtype = user.dtype
        if ctx.gradient_dtype is not None:
            grad_logits, items, user = (t.to(ctx.gradient_dtype) for t in (grad_logits, items, user))
        # (∂ user, ∂ items); positives, masks, log_q and the dtype take no gradient
        return (grad_logits @ items).to(dtype), (grad_logits.T @ user).to(dtype), None, None, None, None
