"""Closed-form pieces of latent preference alignment against torch.distributions and hand-computed values (spec 10),
and the prefix adapter's cache against the LM's own key/value cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from lit_models.nn.latent_preference import (
    CallCounter,
    GSkip,
    LatentEncoder,
    LatentPrefixAdapter,
    dg_kld,
    dpo_sigmoid_loss,
    gaussian_kl,
    gaussian_log_density,
    latent_dpo_loss,
    latent_reward,
    select_pairs,
)


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, (0.5 * logvar).exp()), 1)


def test_log_density_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(5, 7, 32, generator=g, dtype=torch.float64), torch.randn(5, 7, 32, generator=g, dtype=torch.float64)
    logvar = 3 * torch.randn(5, 7, 32, generator=g, dtype=torch.float64)
    ours = gaussian_log_density(z, mu, logvar)
    torch.testing.assert_close(ours, _normal(mu, logvar).log_prob(z), rtol=1e-12, atol=1e-10)


def test_log_density_hand_values() -> None:
    zero = torch.zeros(32)
    assert gaussian_log_density(zero, zero, zero).item() == pytest.approx(-16 * math.log(2 * math.pi), abs=1e-4)
    assert gaussian_log_density(zero, zero, zero).item() == pytest.approx(-29.4060, abs=1e-4)
    assert gaussian_log_density(zero, torch.ones(32), zero).item() == pytest.approx(-45.4060, abs=1e-4)


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    mu, s = torch.randn(6, 32, generator=g, dtype=torch.float64), torch.randn(6, 32, generator=g, dtype=torch.float64)
    mu2, s2 = torch.randn(6, 32, generator=g, dtype=torch.float64), torch.randn(6, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kl(mu, s, mu2, s2), kl_divergence(_normal(mu, s), _normal(mu2, s2)))
    std = _normal(torch.zeros_like(mu), torch.zeros_like(s))
    torch.testing.assert_close(gaussian_kl(mu, s), kl_divergence(_normal(mu, s), std))


def test_dg_kld_limits() -> None:
    torch.manual_seed(0)
    k = 64
    same = dg_kld(torch.zeros(k, 32), torch.zeros(k, 32), samples=16)
    assert abs(same.item()) < 0.05  # the aggregate equals N(0, I)
    # all posteriors N(3, 1): the aggregate is N(3, 1) too, KL = 32 * 3^2 / 2 = 144
    far = dg_kld(torch.full((k, 32), 3.0), torch.zeros(k, 32), samples=16)
    assert far.item() == pytest.approx(144.0, rel=0.05)
    joint = dg_kld(torch.full((k, 32), 3.0), torch.zeros(k, 32), samples=16, mode="dg_joint")
    assert joint.item() == pytest.approx(144.0, rel=0.05)
    assert dg_kld(torch.full((4, 32), 3.0), torch.zeros(4, 32), mode="standard").item() == pytest.approx(144.0)
    with pytest.raises(ValueError, match="kl_mode must be one of"):
        dg_kld(torch.zeros(2, 4), torch.zeros(2, 4), mode="bad")  # type: ignore[arg-type]


def test_dpo_loss_is_trl_formula_by_hand() -> None:
    # TRL DPOTrainer.dpo_loss (loss_type="sigmoid"): logits = (pi_c - pi_r) - (ref_c - ref_r)
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -3.0]), torch.tensor([-11.0, -2.5])
    beta = 0.1
    losses, cr, rj = dpo_sigmoid_loss(pc, pr, rc, rr, beta)
    # row 0: logits = (1) - (-1) = 2 -> -log sigmoid(0.2); row 1: logits = 0 - 0.5 = -0.5 -> -log sigmoid(-0.05)
    expected = [-math.log(1 / (1 + math.exp(-0.2))), -math.log(1 / (1 + math.exp(0.05)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert cr.tolist() == pytest.approx([0.1, 0.0], abs=1e-7) and rj.tolist() == pytest.approx([-0.1, 0.05], abs=1e-7)
    smooth, _, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    by_hand = 0.9 * expected[0] + 0.1 * -math.log(1 / (1 + math.exp(0.2)))
    assert smooth[0].item() == pytest.approx(by_hand, abs=1e-7)


def test_pair_mask_exact() -> None:
    r = torch.tensor([[0.875, 0.125, 0.5, 0.5]])
    gap = (r[:, :, None] - r[:, None, :]).flatten()
    assert torch.quantile(gap, 0.75).item() == 0.375  # index 11.25 of the sorted 16 gaps
    mask = select_pairs(r, 0.5, "quantile")
    kept = {(a, b) for a in range(4) for b in range(4) if mask[0, a, b] == 1}
    assert kept == {(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)}
    top = select_pairs(torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]]), mode="topk_pairs")
    kept = {(a, b) for a in range(8) for b in range(8) if top[0, a, b] == 1}
    assert kept == {(1, 0), (6, 5)}  # top 2 paired with bottom 2, element-wise


def test_latent_dpo_loss_is_log2_at_reference_and_reward_range() -> None:
    mask = select_pairs(torch.rand(3, 48), 0.5)
    loss, margins = latent_dpo_loss(torch.zeros(3, 48), mask, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and margins.abs().max().item() == 0.0
    z = torch.randn(2, 5, 8)
    r = latent_reward(z, torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(2, 8), torch.zeros(2, 8))
    lw = _normal(torch.zeros(8), torch.zeros(8)).log_prob(z)
    ll = _normal(torch.ones(8), torch.zeros(8)).log_prob(z)
    torch.testing.assert_close(r, torch.sigmoid(lw - ll))


@pytest.fixture(scope="module")
def lm() -> nn.Module:
    from lit_models.hf import load_causal_lm

    return load_causal_lm("llama-tiny")


def test_fresh_encoder_outputs_standard_normal_and_layout(lm: nn.Module) -> None:
    enc = LatentEncoder(lm, dim_z=32, num_queries=4, num_layers=2)
    ids = torch.randint(3, 500, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mu, s = enc(ids, mask)
    assert mu.shape == (3, 32) and torch.equal(mu, torch.zeros(3, 32)) and torch.equal(s, torch.zeros(3, 32))
    # layout: each query gives 8 means then 8 log-variances (spec pitfall 5), concatenated over the 4 queries
    with torch.no_grad():
        enc.h2z[-1].bias.copy_(torch.arange(16.0))
    mu, s = enc(ids, mask)
    assert mu[0].tolist() == list(range(8)) * 4 and s[0].tolist() == list(range(8, 16)) * 4
    # right and left padding of the same text give the same latent
    left = torch.cat([ids[:1, 6:], ids[:1, :6]], 1)
    left_mask = torch.cat([mask[:1, 6:], mask[:1, :6]], 1)
    nn.init.normal_(enc.h2z[-1].weight)
    torch.testing.assert_close(enc(ids[:1], mask[:1])[0], enc(left, left_mask)[0], rtol=1e-5, atol=1e-5)
    assert enc.backbone.get_input_embeddings() is lm.get_input_embeddings()  # shared, frozen


def test_prefix_cache_equals_the_lms_own_cache(lm: nn.Module) -> None:
    """The adapter's K/V path (frozen k_proj/v_proj, RoPE at 0..n_p-1) and the position handling after the prefix
    reproduce the LM exactly when the prefix states are those of 4 real tokens."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 10))
    n_p = 4
    decoder = lm.get_decoder()
    states: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, i, o: states.append(o.detach()))
             for layer in decoder.layers]
    with torch.no_grad():
        full = lm(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    adapter = LatentPrefixAdapter(lm.config, dim_z=8, prefix_len=n_p)

    class Const(nn.Module):
        def __init__(self, x: torch.Tensor) -> None:
            super().__init__()
            self.x = x

        def forward(self, _: torch.Tensor) -> torch.Tensor:
            return self.x

    for i, st in enumerate(states):
        adapter.norms[i] = Const(st[:, :n_p])
    with torch.no_grad():
        cache = adapter(torch.zeros(2, 8), lm)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == n_p
        mask = torch.ones(2, 10, dtype=torch.long)
        pos = torch.arange(n_p, 10)[None].expand(2, -1)
        rest = lm(input_ids=ids[:, n_p:], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
    assert (rest - full[:, n_p:]).abs().max().item() < 1e-5


def test_gskip_is_zero_in_value_but_passes_gradient() -> None:
    g = GSkip(8, 16)
    z = torch.randn(3, 32, 8, requires_grad=True)
    out = g(z)
    assert torch.equal(out, torch.zeros(3, 16))
    (out * torch.randn(3, 16)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum().item() > 0


def test_call_counter_counts_forward_calls() -> None:
    lin = nn.Linear(2, 2)
    with CallCounter([lin]) as c:
        lin(torch.zeros(1, 2))
        lin(torch.zeros(1, 2))
    lin(torch.zeros(1, 2))
    assert c.count == 2
