"""LEARN towers, the losses on hand-computed examples, the hybrid's cold path, and training smoke runs."""

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

from encoders.training.configs import get_config
from encoders.training.datasets import make_split
from encoders.training.evaluate import Paths, current_history, summarise, trained_learn, train_missing
from encoders.training.model import LEARN, LEARNConfig, Packing, Whitening, dense_all_action_loss, dropout
from encoders.training.train import (Candidates, Patience, Start, cpu_multiplies_bf16, history_exclusions, train,
                                     training_dtype, window_batches)
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


def test_excluded_candidates_and_log_q_by_hand():
    user = torch.tensor([[1.0, 0.0]])  # (P=1, D=2)
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # logits (1, 0, -1)
    positives = torch.tensor([[0]])
    # Item 1 excluded (say, in the user's history): the positive competes with item 2 alone.
    excluded = (torch.tensor([0]), torch.tensor([1]))
    want = math.log(1 + math.exp(-2))
    assert dense_all_action_loss(user, items, positives, 1.0, excluded).item() == pytest.approx(want, rel=1e-6)
    # logQ: each logit minus log q; a popular negative (q = e^-1 > the positive's e^-3) counts for less.
    log_q = torch.tensor([-3.0, -1.0, -1.0])  # corrected logits (4, 1, 0)
    want = -math.log(math.exp(4) / (math.exp(4) + math.exp(1) + math.exp(0)))
    assert dense_all_action_loss(user, items, positives, 1.0, log_q=log_q).item() == pytest.approx(want, rel=1e-5)


def test_dense_all_action_loss_gradients_match_the_plain_expression():
    """The loss makes, masks and differentiates its (P, M) logits in one buffer, by hand: its gradients must be
    the ones autograd finds for the same loss written plainly."""
    torch.manual_seed(0)
    P, M, K, D = 7, 9, 3, 4
    user = torch.randn(P, D, dtype=torch.float64, requires_grad=True)
    items = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    positives = torch.randint(0, M, (P, K))
    positives[2, 1:] = -1  # sequences that end early
    positives[5, 2] = -1
    excluded = (torch.rand(P, M) < 0.3).nonzero(as_tuple=True)  # (p, m) pairs
    log_q = torch.randn(M, dtype=torch.float64)

    def plain(user, items):
        logits = (user / 0.5) @ items.T - log_q
        valid = positives >= 0
        not_negative = torch.zeros(P, M, dtype=torch.bool)
        not_negative[excluded] = True
        not_negative[torch.arange(P)[:, None].expand(P, K)[valid], positives[valid]] = True
        negatives = torch.logsumexp(logits.masked_fill(not_negative, float("-inf")), dim=1, keepdim=True)
        positive = logits.gather(1, positives.clamp(min=0))
        return (torch.logaddexp(positive, negatives) - positive)[valid].mean()

    fused = dense_all_action_loss(user, items, positives, 0.5, excluded, log_q)
    want = plain(user, items)
    assert fused.item() == pytest.approx(want.item(), rel=1e-12)
    got_grads = torch.autograd.grad(fused, (user, items))
    want_grads = torch.autograd.grad(want, (user, items))
    for got, expected in zip(got_grads, want_grads):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_under_bf16_autocast_the_loss_stays_fp32_and_its_gradients_close():
    """Training on a CPU that multiplies bf16 runs the towers under bf16 autocast: the loss's logits must still be
    fp32 (the same loss from the same vectors) and only its backward products bf16 (gradients within bf16's
    rounding of the fp32 ones)."""
    torch.manual_seed(0)
    P, M, K, D = 300, 500, 2, 64
    user = torch.nn.functional.normalize(torch.randn(P, D), dim=1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(M, D), dim=1).requires_grad_()
    positives = torch.randint(0, M, (P, K))
    want = dense_all_action_loss(user, items, positives, 0.05)
    want_grads = torch.autograd.grad(want, (user, items))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dense_all_action_loss(user, items, positives, 0.05)
    got_grads = torch.autograd.grad(got, (user, items))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert got_grad.dtype == torch.float32
        assert not torch.equal(got_grad, want_grad)  # the products did run in bf16
        assert (got_grad - want_grad).norm() < 0.02 * want_grad.norm()


def test_training_precision_follows_the_config_and_the_cpu():
    cpu = torch.device("cpu")
    assert training_dtype("fp32", cpu) == torch.float32 and training_dtype("bf16", cpu) == torch.bfloat16
    assert training_dtype("auto", cpu) == (torch.bfloat16 if cpu_multiplies_bf16() else torch.float32)


def test_dropout_keeps_each_element_with_chance_one_minus_p_and_keeps_the_mean():
    torch.manual_seed(0)
    y = dropout(torch.ones(400_000), 0.3)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.7)]  # dropped, or kept and scaled
    kept_by_lane = (y != 0).float().view(-1, 4).mean(dim=0)  # each of an int64's four 16-bit draws is uniform
    assert torch.allclose(kept_by_lane, torch.full((4,), 0.7), atol=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


def test_history_exclusions_cover_what_came_at_or_before_each_position_in_its_window():
    # Window 0: items 5, 7, 5; window 1: items 6, 9 (9 is not a candidate). Candidates 5, 6, 7 → rows 0, 1, 2.
    window = torch.tensor([0, 0, 0, 1, 1])
    position = torch.tensor([0, 1, 2, 0, 1])
    rows = torch.tensor([0, 2, 0, 1, -1])
    p, m = history_exclusions(window, position, rows, max_history=4)
    got = torch.zeros(5, 3, dtype=torch.bool)
    got[p, m] = True
    want = torch.tensor([[True, False, False], [True, False, True], [True, False, True],
                         [False, True, False], [False, True, False]])
    assert torch.equal(got, want)


def test_candidates_leave_out_items_never_trained_on_and_sample_by_popularity(ml100k_small):
    data, _ = ml100k_small
    split = make_split(data, "cold", seed=0)
    full = Candidates(replace(get_config("learn-minilm"), loss="full"), split, torch.device("cpu"))
    table = full.table(torch.tensor([0]))
    assert set(table.tolist()) == set(np.flatnonzero(split.trained_items()).tolist()) and full.log_q(table) is None
    sampled = Candidates(replace(get_config("learn-minilm"), loss="sampled", negatives=64), split, torch.device("cpu"))
    present = torch.from_numpy(split.train[0][:5])
    table = sampled.table(present)
    assert set(present.tolist()) <= set(table.tolist()) and not split.cold[table.numpy()].any()
    assert torch.isfinite(sampled.log_q(table)).all()


def test_whitening_decorrelates_the_content(ml100k_small):
    _, content = ml100k_small
    table = torch.from_numpy(content)
    white = Whitening(table)(table)
    assert white.mean(dim=0).abs().max() < 1e-4
    covariance = torch.cov(white.T)
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    assert off_diagonal.abs().max() < 0.05 and torch.diag(covariance).max() < 1.5


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


def test_content_dropout_touches_only_items_without_an_id_part():
    model = tiny_model(dropout=0.0, id_residual=True, content_dropout=0.5)
    with torch.no_grad():
        model.item_ids.weight.normal_()
        items = torch.arange(10)
        with_ids = model.item_id_parts(items)  # in eval: every item's ID part (all ten are warm)
        with_ids[5:] = 0  # items 5..9 as content only: never trained on, or their ID part dropped
        model.train()
        first, second = (model.content_item_vectors(model.content[items], with_ids) for _ in range(2))
        assert torch.equal(first[:5], second[:5])  # items with an ID part see their exact content
        assert not torch.allclose(first[5:], second[5:])  # the content-only ones a noisy copy
        model.eval()
        assert torch.equal(*(model.content_item_vectors(model.content[items], with_ids) for _ in range(2)))
    content_only = tiny_model(dropout=0.0, content_dropout=0.5).train()  # no ID parts at all: every item
    with torch.no_grad():
        assert not torch.allclose(*(content_only.item_vectors(torch.arange(10)) for _ in range(2)))


def test_windows_cover_every_next_action_once():
    config = replace(get_config("learn-minilm"), model=replace(get_config("learn-minilm").model, max_history=4),
                     next_k=2, batch_size=3)
    train_seqs = [np.arange(10), np.arange(20, 23), np.array([30])]
    batches = list(window_batches(train_seqs, config, np.random.default_rng(0)))
    inputs = np.concatenate([b.inputs for b in batches])
    targets = np.concatenate([b.targets for b in batches])
    got = sorted((int(i), *t.tolist()) for row_i, row_t in zip(inputs, targets) for i, t in zip(row_i, row_t) if i >= 0)
    # Every position that has a next action is an input exactly once, with its next K=2 actions (-1: none);
    # the last item of a sequence, and a 1-item sequence, have no next action.
    want = [(i, i + 1, i + 2 if i + 2 <= 9 else -1) for i in range(9)] + [(20, 21, 22), (21, 22, -1)]
    assert got == want
    assert inputs.shape[1] == 4
    # Packed: a row holds whole windows side by side, each numbered from position 0, and rows are saved.
    for b in batches:
        for row_window, row_position, row_input in zip(b.window, b.position, b.inputs):
            for w in set(row_window[row_window >= 0].tolist()):
                (at,) = np.nonzero(row_window == w)
                assert np.array_equal(at, np.arange(at[0], at[0] + len(at)))  # contiguous
                assert np.array_equal(row_position[at], np.arange(len(at)))
            assert np.array_equal(row_window >= 0, row_input >= 0)
    assert sum(len(b.inputs) for b in batches) < len({(id(b), w) for b in batches for w in b.window.ravel() if w >= 0})


def test_packed_histories_are_the_same_as_apart():
    """Training packs several windows to a row; each must get exactly the vectors it gets in a row of its own."""
    model = tiny_model(id_residual=True)
    first, second = torch.tensor([3, 1, 4]), torch.tensor([1, 5])
    packed = torch.tensor([[3, 1, 4, 1, 5]])
    packing = Packing(history=torch.tensor([[0, 0, 0, 1, 1]]), position=torch.tensor([[0, 1, 2, 0, 1]]))
    with torch.no_grad():
        together = model.user_vectors(packed, packing)[0]
        apart = [model.user_vectors(h[None])[0] for h in (first, second)]
    assert torch.allclose(together, torch.cat(apart), atol=1e-6)
    assert not torch.allclose(together[3:], model.user_vectors(packed)[0, 3:], atol=1e-3)  # unpacked: it would see the first


def test_patience_on_a_window_outlasts_one_lucky_epoch():
    rising = [0.10, 0.12, 0.18, 0.13, 0.14, 0.15, 0.16, 0.17]  # one lucky epoch, then a curve still rising
    single = Patience(patience=3)
    assert [single.exhausted(v) for v in rising][:6] == [False] * 5 + [True]  # stops 3 epochs after the 0.18
    windowed = Patience(patience=3, window=3)
    assert not any(windowed.exhausted(v) for v in rising)  # its means dip after the lucky epoch, then pass it
    assert [windowed.exhausted(v) for v in (0.1, 0.1, 0.1)] == [False, False, True]  # a fall ends it


def small_config(**overrides):
    base = get_config("learn-minilm")
    return replace(base, model=replace(base.model, max_history=20), batch_size=16, lr=3e-3, **overrides)


@pytest.mark.parametrize("loss", ["in_batch", "full", "sampled"])
def test_every_loss_trains(ml100k_small, loss):
    data, content = ml100k_small
    config = small_config(loss=loss, negatives=256 if loss == "sampled" else 0, mask_history=True)
    _, history = train(config, make_split(data, "loo"), content, max_steps=20, show_progress=False)
    losses = np.asarray(history["step_loss"])
    assert np.isfinite(losses).all() and losses[-10:].mean() < losses[:10].mean()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_smoke_loss_decreases(ml100k_small, precision):
    data, content = ml100k_small
    config = small_config(precision=precision)
    _, history = train(config, make_split(data, "loo"), content, max_steps=40, show_progress=False)
    assert history["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    losses = np.asarray(history["step_loss"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean() - 0.05


@pytest.mark.parametrize("shared_input", [False, True])
def test_the_hybrid_gives_items_never_trained_on_exactly_the_content_only_vector(ml100k_small, shared_input):
    data, content = ml100k_small
    config = small_config(loss="full", mask_history=True)
    config = replace(config, model=replace(config.model, id_residual=True, id_dropout=0.3, shared_input=shared_input))
    split = make_split(data, "cold", seed=0)
    model, _ = train(config, split, content, max_steps=15, show_progress=False)
    cold = torch.from_numpy(np.flatnonzero(split.cold))
    warm = torch.from_numpy(np.flatnonzero(split.trained_items()))
    with torch.no_grad():
        model.train()  # as in training (ID dropout on): a cold item has no ID part on either tower
        assert (model.item_id_parts(cold) == 0).all() and (model.history_id_parts(cold) == 0).all()
        model.eval()
        assert torch.allclose(model.item_vectors(cold), model.content_item_vectors(model.content[cold]), atol=1e-6)
        trained = model.item_vectors(warm)
        assert not torch.allclose(trained, model.content_item_vectors(model.content[warm]), atol=1e-3)
        history = cold[:5][None]  # a history of cold items only: the user tower reads their content alone
        assert torch.allclose(model.user_vectors(history),
                              model.history_vectors(model.content[history], history >= 0), atol=1e-6)


def test_seeds_are_summarised_as_mean_and_spread():
    per_seed = {"learn": {"loo": {"0": {"hr@50": 0.3, "ndcg@50": 0.1}, "1": {"hr@50": 0.5, "ndcg@50": 0.1}}}}
    means, spreads = summarise(per_seed)
    assert means["learn"]["loo"] == pytest.approx({"hr@50": 0.4, "ndcg@50": 0.1})
    assert spreads["learn"]["loo"] == pytest.approx({"hr@50": 0.1, "ndcg@50": 0.0})


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


def test_missing_runs_train_side_by_side_in_processes_then_are_reused(ml100k_small, tmp_path):
    data, content = ml100k_small
    config = replace(small_config(), max_epochs=1)
    splits = {("loo", 0): make_split(data, "loo"), ("cold", 1): make_split(data, "cold", config.cold_fraction, 1)}
    paths = Paths(tmp_path)
    assert train_missing([config], splits, data, {config.encoder: content}, paths, jobs=2) == 2
    for (protocol, seed) in splits:
        seeded = replace(config, seed=seed)
        history = current_history(seeded, paths.run_dir(data.name, seeded, protocol), data)
        assert history is not None and history["protocol"] == protocol and history["steps"] > 0
    assert train_missing([config], splits, data, {config.encoder: content}, paths, jobs=2) == 0  # all current


def test_validation_scores_cold_targets_apart_and_a_moving_average_is_what_is_kept(ml100k_small):
    data, content = ml100k_small
    config = small_config(loss="full", mask_history=True, max_epochs=1)
    config = replace(config, model=replace(config.model, id_residual=True, id_dropout=0.3))
    split = make_split(data, "cold", seed=0)
    raw, history = train(config, split, content, show_progress=False)
    (epoch,) = history["epochs"]
    assert {"valid_ndcg@50", "valid_cold_ndcg@50", "valid_warm_hr@50"} <= set(epoch)
    # Decay ~1: the average stays where training started (ID tables start at zero); the weights themselves moved.
    averaged, _ = train(replace(config, ema_decay=1 - 1e-9), split, content, show_progress=False)
    assert raw.item_ids.weight.abs().max() > 1e-3
    assert averaged.item_ids.weight.abs().max() < 1e-6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_reuses_freed_memory_for_the_next_steps_tensors():
    """The loss's (positions x items) matrices change size every step; glibc handed each back to the OS and mapped
    the next one afresh, page faults every step (15% of an epoch). keep_freed_memory (called by train) keeps them."""
    script = textwrap.dedent("""
        import resource, sys, torch
        from encoders.training.train import keep_freed_memory
        if sys.argv[1] == "keep":
            keep_freed_memory()
        for step, rows in enumerate(range(4000, 4800, 37)):  # a batch's positions: another count every step
            if step == 2:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            scores = torch.randn(rows, 1682)
            (scores.exp() - 1).sum()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["keep"] < faults["default"] / 3, faults


def test_a_run_started_from_another_has_its_weights_and_id_parts_at_zero(ml100k_small):
    data, content = ml100k_small
    split = make_split(data, "loo")
    first, _ = train(small_config(), split, content, max_steps=3, show_progress=False)
    second = replace(small_config(), lr=0.0)  # one step that moves nothing: what it returns is where it started
    second = replace(second, model=replace(second.model, id_residual=True, id_dropout=0.3))
    model, history = train(second, split, content, max_steps=1, show_progress=False,
                           start=Start(first.state_dict(), {"name": "first"}))
    state = model.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(state[name], value), name
    assert not state["item_ids.weight"].any() and not state["user_ids.weight"].any()
    assert history["init_settings"] == {"name": "first"}


def test_a_second_stage_trains_after_its_first_and_goes_stale_with_it(ml100k_small, tmp_path):
    """The default starts from pure LEARN's towers (init_from): evaluate trains the first stage, then the run that
    starts from it, side by side with others; a checkpoint that started from other settings is trained again."""
    data, content = ml100k_small
    first, second = get_config("learn-minilm-smoke"), get_config("learn-hybrid-minilm-smoke")
    splits = {("loo", 0): make_split(data, "loo")}
    paths = Paths(tmp_path)
    assert train_missing([second, first], splits, data, {first.encoder: content}, paths, jobs=2) == 2
    first_dir, second_dir = (paths.run_dir(data.name, c, "loo") for c in (first, second))
    first_history = current_history(first, first_dir, data)
    second_history = current_history(second, second_dir, data)
    assert second_history["init_settings"] == first_history["settings"]
    assert (second_dir / "checkpoint.pt").stat().st_mtime > (first_dir / "checkpoint.pt").stat().st_mtime
    second_history["init_settings"]["lr"] *= 2
    (second_dir / "history.json").write_text(json.dumps(second_history))
    assert current_history(second, second_dir, data) is None
    alone = Paths(tmp_path / "alone")  # `coldstart train` / export-towers: the first stage is trained on the way
    run = trained_learn(second, data, splits["loo", 0], content, alone, show_progress=False)
    assert run.history["init_settings"] == current_history(first, alone.run_dir(data.name, first, "loo"), data)["settings"]
