"""LEARN towers, the dense all-action loss on a hand-computed example, and a training smoke run."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from encoders.training.configs import get_config
from encoders.training.datasets import make_split
from encoders.training.evaluate import Paths, trained_learn
from encoders.training.model import LEARN, LEARNConfig, dense_all_action_loss
from encoders.training.train import train, window_batches
from tests.learn_fixtures import ml100k, ml100k_small  # noqa: F401  (fixtures)


def test_dense_all_action_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (P=2, D=2)
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # (M=3, D=2)
    positives = torch.tensor([[0, 1], [2, -1]])  # row 0: next actions items 0 and 1; row 1: item 2 only
    # Row 0, logits (1, 0, -1): its negatives are item 2 only (item 1 is a positive, not a negative).
    #   k=0: -log e^1/(e^1+e^-1);  k=1: -log e^0/(e^0+e^-1)
    # Row 1, logits (0, 1, 0): positive item 2 against items 0 and 1: -log 1/(1+1+e)
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2 + math.e)) / 3
    assert dense_all_action_loss(user, items, positives, temperature=1.0).item() == pytest.approx(want, rel=1e-6)
    # Temperature 0.5 doubles every logit.
    want_half = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-2)) + math.log(2 + math.exp(2))) / 3
    assert dense_all_action_loss(user, items, positives, temperature=0.5).item() == pytest.approx(want_half, rel=1e-6)


def tiny_model(**overrides) -> LEARN:
    torch.manual_seed(0)
    config = LEARNConfig(content_dim=6, max_history=5, dim=8, out_dim=4, n_layers=2, n_heads=2, item_hidden=16,
                         **overrides)
    return LEARN(config, torch.randn(10, 6)).eval()


@pytest.mark.parametrize("item_tower", ["mlp", "pch"])
def test_towers_are_causal_unit_norm_and_ignore_padding(item_tower):
    model = tiny_model(item_tower=item_tower)
    with torch.no_grad():
        a = model.user_vectors(torch.tensor([[1, 2, 3, 4, 5]]))
        b = model.user_vectors(torch.tensor([[1, 2, 7, 8, -1]]))
        padded = model.user_vectors(torch.tensor([[1, 2, 7, -1, -1]]))
        short = model.user_vectors(torch.tensor([[1, 2, 7]]))
        items = model.item_vectors(torch.arange(10))
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # position t sees items 0..t only
    assert not torch.allclose(a[:, 2], b[:, 2])
    assert torch.allclose(padded[:, :3], short, atol=1e-6)  # right padding changes nothing
    assert torch.allclose(a.norm(dim=-1), torch.ones(1, 5)) and torch.allclose(items.norm(dim=-1), torch.ones(10))
    last = model.last_user_vector(torch.tensor([[1, 2, 7, -1, -1], [1, 2, 3, 4, 5]]))
    assert torch.allclose(last, torch.stack([padded[0, 2], a[0, 4]]), atol=1e-6)


def test_windows_cover_every_next_action_once():
    config = replace(get_config("learn-minilm"), model=replace(get_config("learn-minilm").model, max_history=4),
                     next_k=2, batch_size=3)
    train_seqs = [np.arange(10), np.arange(20, 23), np.array([30])]
    batches = list(window_batches(train_seqs, config, np.random.default_rng(0)))
    inputs = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    got = sorted((int(i), *t.tolist()) for row_i, row_t in zip(inputs, targets) for i, t in zip(row_i, row_t) if i >= 0)
    # Every position that has a next action is an input exactly once, with its next K=2 actions (-1: none);
    # the last item of a sequence, and a 1-item sequence, have no next action.
    want = [(i, i + 1, i + 2 if i + 2 <= 9 else -1) for i in range(9)] + [(20, 21, 22), (21, 22, -1)]
    assert got == want
    assert inputs.shape[1] == 4 and (inputs >= 0).sum(axis=1).max() <= 4


def small_config(**overrides):
    base = get_config("learn-minilm")
    return replace(base, model=replace(base.model, max_history=20), batch_size=16, lr=3e-3, **overrides)


def test_training_smoke_loss_decreases(ml100k_small):
    data, content = ml100k_small
    _, history = train(small_config(), make_split(data, "loo"), content, max_steps=40, show_progress=False)
    losses = np.asarray(history["step_loss"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean() - 0.05


def test_id_residual_stays_zero_for_items_never_trained_on(ml100k_small, tmp_path):
    data, content = ml100k_small
    config = small_config()
    config = replace(config, model=replace(config.model, id_residual=True))
    split = make_split(data, "cold", seed=0)
    model, _ = train(config, split, content, max_steps=15, show_progress=False)
    trained = split.trained_items()
    assert not trained[split.cold].any()
    for table in (model.user_ids.weight, model.item_ids.weight):
        assert (table[torch.from_numpy(~trained)] == 0).all()  # cold path: content only
        assert (table[torch.from_numpy(trained)] != 0).any()


def test_shared_input_reads_item_tower_embeddings():
    model = tiny_model(shared_input=True)
    history = torch.tensor([[1, 2, 7, -1, -1]])
    with torch.no_grad():
        by_index = model.user_vectors(history)
        by_content = model.history_vectors(model.content[history.clamp(min=0)], history >= 0)
    assert model.user_tower.input.in_features == model.config.out_dim
    assert torch.allclose(by_index[:, :3], by_content[:, :3], atol=1e-6)


def test_a_checkpoint_is_reused_only_while_its_config_is_unchanged(ml100k_small, tmp_path):
    data, content = ml100k_small
    config = replace(small_config(), max_epochs=1)
    split = make_split(data, "loo")
    paths = Paths(tmp_path)
    first = trained_learn(config, data, split, content, paths)
    reused = trained_learn(config, data, split, content, paths)
    assert reused.history["train_seconds"] == first.history["train_seconds"]  # loaded, not trained again
    changed = replace(config, lr=config.lr * 3)  # same name, other numbers: the checkpoint is stale
    retrained = trained_learn(changed, data, split, content, paths)
    assert retrained.history["settings"]["lr"] == changed.lr
    assert retrained.history["train_seconds"] != first.history["train_seconds"]
