"""GSGN gate invariants (spec section 10, checks 2-5): init values, renormalisation with a view absent, gradient
routing with stop-gradient inputs, single-view fusion ignoring the other view exactly, frame alignment."""

from __future__ import annotations

import pytest
import torch

from lit_models.nn.fusion_gate import ConcatFusion, GSGNFusion, SingleViewFusion, ViewDropout
from lit_models.nn.speech_frontend import SSLProjection, align_frames, lengths_to_pad_mask


def _views(b: int = 3, t: int = 7, d: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fbank": torch.randn(b, t, d, generator=g), "ssl": torch.randn(b, t, d, generator=g)}


def _train_gate(gate: GSGNFusion, steps: int = 3) -> None:
    """A few SGD steps so the gate leaves its uniform initialisation."""
    opt = torch.optim.SGD(gate.parameters(), lr=0.05)
    for s in range(steps):
        h = _views(seed=100 + s)
        out, _ = gate(h, torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 7, dtype=torch.bool))
        opt.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        opt.step()


def test_gate_at_init_is_uniform() -> None:
    gate = GSGNFusion(16)
    h = _views()
    present = torch.ones(3, 2, dtype=torch.bool)
    out, alphas = gate(h, present, torch.zeros(3, 7, dtype=torch.bool))
    for k in ("fbank", "ssl", "bias"):
        assert torch.allclose(alphas[k], torch.full((3, 7), 1 / 3))
    assert torch.allclose(out, (h["fbank"] + h["ssl"]) / 3, atol=1e-6)


@pytest.mark.parametrize("sharing", ["per_view", "shared"])
@pytest.mark.parametrize("granularity", ["frame", "channel"])
def test_each_stack_sums_to_one(sharing: str, granularity: str) -> None:
    gate = GSGNFusion(16, sharing=sharing, granularity=granularity)
    _train_gate(gate)
    h = _views(seed=5)
    present = torch.ones(3, 2, dtype=torch.bool)
    for c in gate.scorers:
        probs = gate._stack_probs(c, h, present, h["fbank"])
        assert torch.allclose(probs.sum(dim=2), torch.ones_like(probs[:, :, 0]), atol=1e-6)
        assert probs.min() > 0 and not torch.allclose(probs, torch.full_like(probs, 1 / 3))
    if sharing == "shared":
        _, alphas = gate(h, present, torch.zeros(3, 7, dtype=torch.bool))
        assert torch.allclose(alphas["fbank"] + alphas["ssl"] + alphas["bias"], torch.ones(3, 7), atol=1e-6)


def test_absent_ssl_renormalises_and_gets_no_gradient() -> None:
    gate = GSGNFusion(16)
    h = {k: v.requires_grad_() for k, v in _views().items()}
    present = torch.tensor([[True, False], [True, True], [True, False]])
    out, alphas = gate(h, present, torch.zeros(3, 7, dtype=torch.bool))
    assert torch.equal(alphas["ssl"][[0, 2]], torch.zeros(2, 7))
    assert torch.allclose(alphas["fbank"][[0, 2]], torch.full((2, 7), 0.5))
    assert torch.allclose(out[[0, 2]], h["fbank"][[0, 2]] / 2, atol=1e-6)
    out.sum().backward()
    assert torch.equal(h["ssl"].grad[[0, 2]], torch.zeros(2, 7, 16))
    assert h["ssl"].grad[1].abs().sum() > 0
    # after training the gate still renormalises over the remaining slots
    _train_gate(gate)
    _, alphas = gate(_views(), present, torch.zeros(3, 7, dtype=torch.bool))
    assert torch.equal(alphas["ssl"][[0, 2]], torch.zeros(2, 7))


def test_gradient_routing_with_stop_gradient_inputs() -> None:
    for detach, routed in ((True, True), (False, False)):
        gate = GSGNFusion(16, detach_inputs=detach)
        _train_gate(gate)
        h = {k: v.requires_grad_() for k, v in _views(seed=9).items()}
        out, alphas = gate(h, torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 7, dtype=torch.bool))
        w = torch.randn_like(out)
        (out * w).sum().backward()
        for v in ("fbank", "ssl"):
            expected = alphas[v][..., None] * w  # dL/dh_v = alpha_v * dL/dh
            assert torch.allclose(h[v].grad, expected, atol=1e-6) == routed


def test_single_view_fusion_ignores_the_other_view_exactly() -> None:
    fusion = SingleViewFusion("fbank")
    a, b = _views(seed=1), _views(seed=2)
    b["fbank"] = a["fbank"].clone()
    pad = torch.zeros(3, 7, dtype=torch.bool)
    present = torch.ones(3, 2, dtype=torch.bool)
    assert torch.equal(fusion(a, present, pad)[0], fusion(b, present, pad)[0])
    concat = ConcatFusion(16)
    only_f = torch.tensor([[True, False]] * 3)
    assert torch.equal(concat(a, only_f, pad)[0], concat(b, only_f, pad)[0])


def test_batching_invariance_and_padding() -> None:
    gate = GSGNFusion(16)
    _train_gate(gate)
    h = _views()
    lengths = torch.tensor([7, 4, 2])
    pad = lengths_to_pad_mask(lengths, 7)
    out, _ = gate(h, torch.ones(3, 2, dtype=torch.bool), pad)
    for i, n in enumerate(lengths.tolist()):
        alone, _ = gate({k: v[i : i + 1, :n] for k, v in h.items()}, torch.ones(1, 2, dtype=torch.bool),
                        torch.zeros(1, n, dtype=torch.bool))
        assert torch.allclose(out[i, :n], alone[0], atol=1e-5)
        assert torch.equal(out[i, n:], torch.zeros(7 - n, 16))


def test_align_frames_pools_pairs_exactly_and_ignores_padding() -> None:
    x = torch.randn(2, 60, 4)
    lengths = torch.tensor([50, 30])
    out = align_frames(x, lengths, torch.tensor([25, 15]))
    assert torch.allclose(out[0], (x[0, 0:50:2] + x[0, 1:50:2]) / 2, atol=1e-6)
    assert torch.allclose(out[1, :15], (x[1, 0:30:2] + x[1, 1:30:2]) / 2, atol=1e-6)
    assert torch.equal(out[1, 15:], torch.zeros(10, 4))
    y = x.clone()
    y[1, 30:] = 1e6  # padding never enters a mean
    assert torch.allclose(align_frames(y, lengths, torch.tensor([25, 15])), out, atol=1e-6)
    # any ratio (down- and up-sampling): per-utterance adaptive_avg_pool1d bins
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 37, 5, generator=g)
    lengths, targets = torch.tensor([37, 20, 9, 1]), torch.tensor([12, 20, 14, 3])
    out = align_frames(x, lengths, targets, 22)
    for b in range(4):
        ref = torch.nn.functional.adaptive_avg_pool1d(x[b, : lengths[b]].T[None], int(targets[b]))[0].T
        assert torch.allclose(out[b, : targets[b]], ref, atol=1e-6)
        assert torch.equal(out[b, targets[b] :], torch.zeros(22 - int(targets[b]), 5))


def test_view_dropout_never_drops_both_and_validates() -> None:
    vd = ViewDropout()
    vd.set({"ssl": 0.4, "fbank": 0.6}, {})
    vd.train()
    torch.manual_seed(0)
    present = vd.drop_views(torch.ones(20000, 2, dtype=torch.bool))
    assert bool(present.any(dim=1).all())
    assert abs((~present[:, 1]).float().mean().item() - 0.4) < 0.02
    assert abs((~present[:, 0]).float().mean().item() - 0.6) < 0.02
    vd.eval()
    assert torch.equal(vd.drop_views(torch.ones(5, 2, dtype=torch.bool)), torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="p_drop fbank \\+ ssl must be <= 1"):
        vd.set({"ssl": 0.7, "fbank": 0.6}, {})
    with pytest.raises(ValueError, match=r"p_feat\[ssl\] must be in \[0, 1\]"):
        vd.set({}, {"ssl": 1.5})


def test_ssl_projection_types() -> None:
    disc = SSLProjection("discrete", 8, num_units=10)
    assert disc(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)
    with pytest.raises(ValueError, match="expects unit ids"):
        disc(torch.randn(1, 3, 4))
    cont = SSLProjection("continuous", 8, in_dim=4)
    assert cont(torch.randn(2, 3, 4)).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="needs num_units"):
        SSLProjection("discrete", 8)
