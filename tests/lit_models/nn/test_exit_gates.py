"""Oracle exits, gate labels, sub-word categories, exit rules and the gate module (lit_models/nn/exit_gates.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lit_models.nn.exit_gates import (
    ExitGates,
    check_threshold,
    exit_layer_units,
    first_exit,
    gate_labels,
    hidden_gate_features,
    logit_scores,
    oracle_exit,
    saturation_scores,
    subword_categories,
)


def test_oracle_worked_example() -> None:
    preds = torch.tensor([5, 7, 7, 3, 7, 7])
    assert int(oracle_exit(preds, "first")) == 1  # layer 2
    assert int(oracle_exit(preds, "stable")) == 4  # layer 5


def test_oracle_matches_brute_force_and_labels_are_monotone() -> None:
    g = torch.Generator().manual_seed(0)
    n_exits = 6
    preds = torch.randint(0, 3, (n_exits, 1000), generator=g)
    stable, first = oracle_exit(preds, "stable"), oracle_exit(preds, "first")
    for t in range(1000):
        col = preds[:, t].tolist()
        assert int(first[t]) == min(k for k in range(n_exits) if col[k] == col[-1])
        assert int(stable[t]) == min(k for k in range(n_exits) if all(c == col[-1] for c in col[k:]))
    assert bool((first <= stable).all()) and bool((stable <= n_exits - 1).all())
    y = gate_labels(stable, n_exits)
    assert y.shape == (n_exits - 1, 1000)
    assert bool((y[1:] >= y[:-1]).all())  # 0...0 1...1 along the exit points
    # every positive label is a safe exit: its prediction already equals the final one, and so do all later ones
    k, t = y.nonzero(as_tuple=True)
    assert bool((preds[k, t] == preds[-1, t]).all())
    # tokens whose oracle is the last exit have no positive label; the ungated last exit would be label 1
    assert bool((y[:, stable == n_exits - 1] == 0).all())


def test_unknown_oracle_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"oracle must be one of \['stable', 'first'\]"):
        oracle_exit(torch.zeros(3, 2, dtype=torch.long), "last")


def test_subword_categories() -> None:
    texts = [" The", " un", "believ", "able", " cat", "."]
    assert subword_categories(texts) == ["single", "first", "middle", "last", "single", "other"]
    # the first token starts a word; a token after whitespace or punctuation starts one too
    assert subword_categories(["Hel", "lo", "\n", "wor", "ld", "!", "x"]) == [
        "first", "last", "other", "first", "last", "other", "single"]
    # markers given explicitly (SentencePiece pieces decoded without their space)
    assert subword_categories(["The", "un", "believ"], starts_space=[True, True, False]) == ["single", "first", "last"]


def test_first_exit_rule_threshold_and_min_exit() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.6], [0.7, 0.1, 0.95], [0.85, 0.3, 0.97]])  # [n_gated=3, N=3]
    assert first_exit(scores, 0.8).tolist() == [2, 0, 1]
    assert first_exit(scores, 0.5).tolist() == [1, 0, 0]
    assert first_exit(scores, 0.5, min_exit=1).tolist() == [1, 3, 1]
    assert first_exit(scores, 0.99).tolist() == [3, 3, 3]  # nothing reaches it: the last exit point
    ones = torch.ones(3, 4)  # fp32 probabilities can be exactly 1.0: threshold 1.0 still never exits early
    assert first_exit(ones, 1.0).tolist() == [3] * 4 and first_exit(ones, None).tolist() == [3] * 4
    assert first_exit(ones, 0.0).tolist() == [0] * 4
    g = torch.Generator().manual_seed(1)
    rand = torch.rand(7, 500, generator=g)
    means = [first_exit(rand, t).float().mean().item() for t in (1.0, 0.95, 0.9, 0.8, 0.5, 0.2, 0.0)]
    assert all(a >= b for a, b in itertools.pairwise(means)) and means[0] == 7.0 and means[-1] == 0.0


def test_check_threshold() -> None:
    assert check_threshold(None) is None and check_threshold(1) == 1.0 and check_threshold(0.0) == 0.0
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"gate_threshold must be in \[0, 1\]"):
            check_threshold(bad)  # type: ignore[arg-type]


def test_saturation_scores() -> None:
    preds = torch.tensor([[1], [2], [2], [2], [3]])
    assert saturation_scores(preds, 2)[:, 0].tolist() == [0, 0, 1, 1, 0]
    assert saturation_scores(preds, 3)[:, 0].tolist() == [0, 0, 0, 1, 0]
    assert saturation_scores(preds, 1)[:, 0].tolist() == [1, 1, 1, 1, 1]


def test_logit_scores_and_features() -> None:
    uniform = torch.zeros(2, 8)
    s = logit_scores(uniform)
    assert torch.allclose(s["entropy"], torch.ones(2)) and torch.allclose(s["p_max"], torch.full((2,), 1 / 8))
    assert s["margin"].tolist() == [0.0, 0.0]
    peaked = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])  # probabilities 1/6, 1/2, 1/6, 1/6
    s = logit_scores(peaked)
    assert int(s["pred"]) == 1 and s["p_max"].item() == pytest.approx(0.5) and s["margin"].item() == pytest.approx(1 / 3)
    h, h_prev = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])
    feats = hidden_gate_features(torch.zeros(1, 5), h, h_prev)
    assert feats.shape == (1, 7)
    assert feats[0, 5].item() == pytest.approx(0.6) and feats[0, 6].item() == pytest.approx(0.8)  # cos, |dh| / |h|


def test_exit_gates_forward_loss_and_shape_check() -> None:
    torch.manual_seed(0)
    gates = ExitGates(n_gates=5, in_features=10, hidden=4)
    x = torch.randn(5, 7, 10)
    logits = gates(x)
    assert logits.shape == (5, 7)
    for k in range(5):
        assert torch.allclose(gates.forward_one(k, x[k]), logits[k], atol=1e-6)
    labels = (torch.rand(5, 7) > 0.5).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert gates.loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    mask = torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    masked = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, mask], labels[:, mask])
    assert gates.loss(logits, labels, mask).item() == pytest.approx(masked.item(), rel=1e-6)
    gates.check_state_dict(gates.state_dict())
    other = ExitGates(n_gates=3, in_features=10, hidden=4).state_dict()
    with pytest.raises(ValueError, match=r"4 exit points x 10 features x width 4; this model needs 6 exit points"):
        gates.check_state_dict(other)
    with pytest.raises(ValueError, match="holds no exit gates"):
        gates.check_state_dict({})


def test_exit_layer_units() -> None:
    assert exit_layer_units(3, False).tolist() == [1.0, 2.0, 3.0]
    assert exit_layer_units(4, True).tolist() == [0.5, 1.0, 1.5, 2.0]
