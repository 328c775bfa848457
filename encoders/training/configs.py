"""Named, frozen training configurations.

Each config carries the date it was validated and the command that
reproduces its numbers in EVALUATION.md. Change a config's numbers only
together with a new date; add a new name for a new experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from encoders.training.model import LEARNConfig
from encoders.training.registry import DEFAULT_ENCODER


LOSSES = ("in_batch", "full", "sampled")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    date: str  # when these settings were last validated
    command: str  # reproduces the numbers reported for this config
    model: LEARNConfig = field(default_factory=LEARNConfig)
    encoder: str = DEFAULT_ENCODER  # a name in encoders.training.registry
    next_k: int = 10  # dense all-action: each position's positives are the next K actions
    # Negatives of the loss: "in_batch" (the batch's distinct items), "full" (every item seen in
    # training: a full-catalogue softmax, as LEARN's released fine-tuning and SASRec's CE), or
    # "sampled" (the batch's items plus a shared pool of `negatives` items drawn by training
    # popularity, logQ-corrected: the large-catalogue form of "full").
    loss: str = "in_batch"
    negatives: int = 0  # "sampled": size of the shared negative pool drawn per step
    mask_history: bool = False  # items the user acted on before a position are never its negatives
    batch_size: int = 128  # windows of max_history items per step
    lr: float = 3e-3
    # "cosine": the learning rate falls from `lr` to 0 over max_epochs (set per epoch), so the late epochs
    # refine instead of jumping around the validation optimum.
    lr_schedule: str = "constant"
    weight_decay: float = 0.01
    # > 0: validate and keep an exponential moving average of the weights (this decay per step) instead of the
    # weights themselves: a smoother validation curve, so patience stops on a trend rather than on noise.
    ema_decay: float = 0.0
    max_epochs: int = 200
    patience: int = 10  # stop after this many epochs without a better validation NDCG@50 …
    # … averaged over this many last epochs (1: each epoch's own). The kept checkpoint is the best single epoch either
    # way. Validation NDCG@50 over the 943 users moves ±0.01 from one epoch to the next while it still rises, so a
    # patience on single epochs can stop on one lucky epoch (loo seed 1, EVALUATION.md, session 13: epoch 17 of 28).
    stop_window: int = 1
    # Start from the towers this config trained on the same split and seed (its checkpoint, trained first if
    # missing), the ID parts at zero: the hybrid as a second stage on top of pure LEARN. "": from scratch.
    init_from: str = ""
    seed: int = 0
    # The towers' products in training: "auto" is bf16 (autocast; weights, optimizer and loss stay fp32) where the
    # CPU multiplies bf16 natively (AVX512-BF16 or AMX), fp32 elsewhere. bf16 ran an epoch 1.25–1.3x faster on Zen 4
    # (its steps 1.45x) with the same validation (EVALUATION.md, issue 15, session 14). Evaluation and export: fp32.
    precision: str = "auto"
    cold_fraction: float = 0.2  # the "cold" protocol's share of items never trained on

    def __post_init__(self):
        assert self.next_k >= 1 and self.batch_size >= 1 and self.patience >= 1 and self.stop_window >= 1
        assert self.loss in LOSSES, f"loss must be one of {LOSSES}"
        assert self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"
        assert self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"
        assert (self.loss == "sampled") == (self.negatives > 0), "negatives: the sampled loss's pool size"
        assert 0.0 <= self.ema_decay < 1.0, "ema_decay: 0 (off) or the moving average's decay per step"


# The served default: the hybrid (ID parts for items seen in training, content alone for the rest)
# trained on each position's next action, with dropout on the content of items that have no ID part. Chosen on
# validation NDCG@50 (EVALUATION.md, "2026-12-06 (session 11)"), seed 0: loo 0.204, cold 0.173 against 0.200 / 0.166
# without content dropout (`learn-hybrid-minilm-next1`, the served default until then, itself chosen over the next-10
# hybrid `learn-hybrid-minilm` on loo validation 0.200 / 0.202 / 0.208 against 0.183 / 0.173).
DEFAULT = "learn-hybrid-minilm-next1-cdrop"
# Pure LEARN, the content-only towers, always reported beside the default: trained on the next action, like the
# default. Chosen on validation (EVALUATION.md, 2026-12-06): loo validation NDCG@50 0.174–0.178 over seeds 0–2
# against 0.152 (seed 0) for LEARN's own loss over the next 10 actions (`learn-minilm`, the reported row until then).
PURE_LEARN = "learn-minilm-next1"

# lr 3e-3 (was 1e-3 until 2026-11-25): validation NDCG@50 on loo 0.1313 → 0.1445, tuned on
# validation only (EVALUATION.md, "Tuning"). Since 2026-12-01 a full-catalogue softmax with the
# user's history masked (LEARN's released fine-tuning): validation NDCG@50 on loo 0.1445 → 0.1524.
_LEARN = TrainConfig(
    name="learn-minilm",
    date="2026-12-01",
    command="coldstart evaluate --config learn-minilm",
    loss="full",
    mask_history=True,
)

CONFIGS: dict[str, TrainConfig] = {
    c.name: c
    for c in [
        _LEARN,
        # Both since session 13 with patience on the mean of the last 5 epochs' validation (`stop_window`).
        replace(_LEARN, name=PURE_LEARN, date="2026-12-06", next_k=1, stop_window=5, command="coldstart evaluate"),
        replace(
            _LEARN, name=DEFAULT, date="2026-12-06", next_k=1, stop_window=5, command="coldstart evaluate",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3, content_dropout=0.3),
        ),
        # 2026-12-06 (session 14): the default as a second stage, started from pure LEARN's trained towers on the same
        # split (`init_from`, its ID parts at zero). A third of the epochs, a little less validation NDCG@50 (seed 0):
        # loo 0.2047 at epoch 20 of 34 against 0.2065 at 87 of 90 from scratch; cold 0.1641 at epoch 7 of 11 (patience
        # ran out on the first stage's level) against 0.1707 at 64 of 76. Not the default: it lost on validation.
        replace(
            _LEARN, name="learn-hybrid-minilm-staged", date="2026-12-06", next_k=1, stop_window=5, init_from=PURE_LEARN,
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3, content_dropout=0.3),
            command="coldstart evaluate --config learn-hybrid-minilm-staged --sasrec off --seeds 1",
        ),
        # The served default until 2026-12-06 (session 11): the same without content dropout.
        replace(
            _LEARN, name="learn-hybrid-minilm-next1", date="2026-12-06", next_k=1,
            command="coldstart evaluate --extra learn-hybrid-minilm-next1",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        # 2026-12-06 (session 11): that one validated and kept as a moving average of its weights. A smoother
        # validation curve, higher (cold, seed 0: 0.174 against 0.166) but only by epoch 89 of 100.
        replace(
            _LEARN, name="learn-hybrid-minilm-next1-ema", date="2026-12-06", next_k=1, ema_decay=0.99,
            command="coldstart evaluate --config learn-hybrid-minilm-next1-ema --protocol cold --sasrec off --seeds 1",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        # Ablations of the hybrid. Dense all-action (the next 10 actions, LEARN's loss); and, on that one, without
        # ID dropout; the user tower reading item vectors (SASRec's shared table); whitened content.
        replace(
            _LEARN, name="learn-hybrid-minilm", command="coldstart evaluate --extra learn-hybrid-minilm",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        replace(
            _LEARN, name="learn-hybrid-minilm-nodrop", command="coldstart evaluate --extra learn-hybrid-minilm-nodrop",
            model=replace(_LEARN.model, id_residual=True),
        ),
        replace(
            _LEARN, name="learn-hybrid-minilm-shared", command="coldstart evaluate --extra learn-hybrid-minilm-shared",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3, shared_input=True),
        ),
        replace(
            _LEARN, name="learn-hybrid-minilm-white", command="coldstart evaluate --extra learn-hybrid-minilm-white",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3, whiten=True),
        ),
        # 2026-12-06: more ID dropout (the content path trained alone more often, for cold items); a longer
        # patience (validation NDCG@50 on loo was still rising when patience 10 stopped the default).
        replace(
            _LEARN, name="learn-hybrid-minilm-drop5", date="2026-12-06",
            command="coldstart evaluate --config learn-hybrid-minilm-drop5 --sasrec off --seeds 1",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.5),
        ),
        replace(
            _LEARN, name="learn-hybrid-minilm-long", date="2026-12-06", patience=25,
            command="coldstart evaluate --config learn-hybrid-minilm-long --sasrec off --seeds 1",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        # 2026-12-06: the learning rate decayed over a fixed budget of 60 epochs (cosine), with a patience that
        # lets it finish: the validation curve at a constant rate moves ±0.01 per epoch, so where patience 10
        # stopped decided much of the seeds' spread. Lost on validation (loo seed 0): 0.1686 against 0.1827.
        replace(
            _LEARN, name="learn-hybrid-minilm-cosine", date="2026-12-06", lr_schedule="cosine", max_epochs=60,
            patience=20, command="coldstart evaluate --config learn-hybrid-minilm-cosine --sasrec off --seeds 3",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        # 2026-12-06: four times the updates per epoch (windows of 32 per step, was 128): the constant-rate
        # curve still rose at epoch 70–100, so the default looked short of updates, not of epochs. Lost on
        # validation (loo seed 0): 0.1745 against 0.1827.
        replace(
            _LEARN, name="learn-hybrid-minilm-b32", date="2026-12-06", batch_size=32,
            command="coldstart evaluate --config learn-hybrid-minilm-b32 --sasrec off --seeds 3",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3),
        ),
        # Ablations of pure LEARN's objective: in-batch negatives (the default until 2026-12-01);
        # a sampled softmax with logQ over a shared pool of 512 (the large-catalogue form).
        replace(_LEARN, name="learn-minilm-inbatch", loss="in_batch", mask_history=False,
                command="coldstart evaluate --extra learn-minilm-inbatch"),
        # The first ID variant (2026-11-30): in-batch negatives, an ID residual, no ID dropout.
        replace(_LEARN, name="learn-id-minilm", loss="in_batch", mask_history=False,
                model=replace(_LEARN.model, id_residual=True), command="coldstart evaluate --extra learn-id-minilm"),
        replace(_LEARN, name="learn-minilm-sampled", loss="sampled", negatives=512,
                command="coldstart evaluate --extra learn-minilm-sampled"),
        # Second encoder row: a small causal LLM, mean-pooled over the attention mask.
        replace(
            _LEARN, name="learn-smollm2", encoder="smollm2-135m",
            model=replace(_LEARN.model, content_dim=576),
            command="coldstart train --config learn-smollm2",
        ),
        # Ablation of LEARN's towers: the PCH architecture as item tower.
        replace(
            _LEARN, name="learn-minilm-pchitem", model=replace(_LEARN.model, item_tower="pch"),
            command="coldstart train --config learn-minilm-pchitem",
        ),
        # Fast towers for tests and demos (not a reported result): 3 epochs, the best kept.
        replace(
            _LEARN, name="learn-minilm-smoke", max_epochs=3, patience=3,
            command="coldstart train --config learn-minilm-smoke --protocol loo",
        ),
        replace(
            _LEARN, name="learn-hybrid-minilm-smoke", max_epochs=3, patience=3, init_from="learn-minilm-smoke",
            model=replace(_LEARN.model, id_residual=True, id_dropout=0.3, content_dropout=0.3),
            command="coldstart train --config learn-hybrid-minilm-smoke --protocol loo",
        ),
    ]
}


def get_config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]
