"""Spec checks 1-7 and section 11 errors for lit_models/nn/pc_layer.py (shared/methods/pcformer.md section 10)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from lit_models.nn.pc_layer import (
    MultistepHistory,
    PCLayer,
    PCTransformerEncoder,
    PreNormEncoderBlock,
    ema_gammas,
)

D, H, FFN, L = 32, 4, 64, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _enc(**kw) -> PCTransformerEncoder:
    torch.manual_seed(0)
    args = dict(num_layers=L, d_model=D, n_heads=H, ffn_dim=FFN)
    args.update(kw)
    return PCTransformerEncoder(**args)


def _inputs(b: int = 2, s: int = 6, d: int = D) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, d, generator=g)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -2:] = True
    return x, pad


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class VanillaEncoder(nn.Module):
    """Reference pre-norm encoder: blocks in sequence, then a final LayerNorm."""

    def __init__(self, num_layers: int, **kw) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PreNormEncoderBlock(D, H, FFN, **kw) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(D)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, pad_mask)
        return self.final_norm(x)


class LinearStub(nn.Module):
    """Stub block with G(x) = A x and B(x) = x + A x (spec check 3)."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = a
        self.d_model = a.size(0)

    def branch(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return x @ self.a.T

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return x + self.branch(x, pad_mask)


# ----------------------------------------------------------------------------- the block itself
def test_block_matches_torch_norm_first_layer_and_branch() -> None:
    torch.manual_seed(0)
    block = PreNormEncoderBlock(D, H, FFN, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).eval()
    ref = nn.TransformerEncoderLayer(D, H, FFN, dropout=0.0, norm_first=True, batch_first=True).eval()
    with torch.no_grad():
        a = block.self_attn
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
        ref.norm1.load_state_dict(block.self_attn_layer_norm.state_dict())
        ref.norm2.load_state_dict(block.final_layer_norm.state_dict())
        ref.linear1.load_state_dict(block.fc1.state_dict())
        ref.linear2.load_state_dict(block.fc2.state_dict())
    x, pad = _inputs()
    with torch.no_grad():
        out = block(x, pad)
        expected = ref(x, src_key_padding_mask=pad)
        real = ~pad
        torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block.branch(x, pad), out - x, atol=1e-6, rtol=0)
    assert torch.all(block.fc1.bias == 0) and torch.all(block.fc2.bias == 0)


# ----------------------------------------------------------------------------- check 1: EMA vector
def test_ema_gamma_values_and_sums() -> None:
    half = torch.tensor(0.5)
    g2, g4 = torch.stack(ema_gammas(half, 2)), torch.stack(ema_gammas(half, 4))
    assert g2.tolist() == [0.25, 0.5] and g2.sum().item() == 0.75
    assert g4.tolist() == [0.0625, 0.125, 0.25, 0.5] and g4.sum().item() == 0.9375
    assert _enc(order=2).gammas().tolist() == [0.25, 0.5]
    assert _enc(order=4, alpha_scope="channel").gammas().tolist() == [0.0625, 0.125, 0.25, 0.5]
    assert _enc(order=4, coefficients="rk").gammas().tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 3, 1 / 6])
    assert _enc(order=1, corrector="none").gammas().tolist() == [1.0]


@pytest.mark.parametrize(("scope", "shape"), [("shared", (1,)), ("layer", (L,)), ("channel", (D,))])
def test_alpha_shapes_and_gradient(scope: str, shape: tuple[int, ...]) -> None:
    enc = _enc(alpha_scope=scope, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    assert isinstance(enc.alpha, nn.Parameter) and tuple(enc.alpha.shape) == shape
    assert torch.all(enc.alpha == 0.5)
    x, pad = _inputs()
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (enc(x, pad) * weight).sum().backward()  # a projection: sum/square of a LayerNorm output has no alpha grad
    assert torch.isfinite(enc.alpha.grad).all() and enc.alpha.grad.abs().sum() > 0


def test_alpha_absent_and_frozen() -> None:
    assert _enc(order=1).alpha is None
    assert _enc(order=2, coefficients="rk").alpha is None
    assert _enc(order=2, coefficients="gated").alpha is None
    assert not _enc(learn_alpha=False).alpha.requires_grad


# ----------------------------------------------------------------------------- check 2: exact reduction
@pytest.mark.parametrize("f_scope", ["full_block", "residual_branch"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_exact_reduction_to_vanilla(f_scope: str, p: float) -> None:
    drop = dict(dropout=p, attention_dropout=p, activation_dropout=p)
    pc = _enc(order=1, corrector="none", f_scope=f_scope, **drop)
    vanilla = VanillaEncoder(L, **drop)
    vanilla.load_state_dict(pc.state_dict(), strict=True)
    assert _nparams(pc) == _nparams(vanilla)
    x, pad = _inputs()
    pc.train(p > 0)
    vanilla.train(p > 0)
    torch.manual_seed(123)
    out_pc = pc(x, pad)
    torch.manual_seed(123)
    out_vanilla = vanilla(x, pad)
    torch.testing.assert_close(out_pc, out_vanilla, atol=1e-6, rtol=0)
    if p > 0:  # dropout really was active
        assert not torch.allclose(out_pc, pc.eval()(x, pad), atol=1e-4)


def test_reduction_creates_nothing_and_loads_strict() -> None:
    a = _enc(order=1, corrector="none")
    b = _enc(order=1, corrector="none", f_scope="residual_branch", stage_norm=True, alpha_scope="channel")
    assert a.alpha is None and a.history is None and a.pred_norms is None and a.stage_norms is None
    assert _nparams(a) == _nparams(VanillaEncoder(L))
    assert set(a.state_dict()) == set(VanillaEncoder(L).state_dict())
    b.load_state_dict(a.state_dict(), strict=True)


# ----------------------------------------------------------------------------- check 3: linear-map order checks
def _poly(a: Tensor, y: Tensor, coeffs: list[float]) -> Tensor:
    out, power = torch.zeros_like(y), y
    for c in coeffs:
        out = out + c * power
        power = power @ a.T
    return out


@pytest.mark.parametrize(
    ("order", "coefficients", "coeffs"),
    [
        (4, "rk", [1, 1, 1 / 2, 1 / 6, 1 / 24]),
        (2, "rk", [1, 1, 1 / 2]),
        (2, "ema", [1, 0.75, 0.5]),
        (4, "ema", [1, 15 / 16, 11 / 16, 5 / 16, 1 / 8]),
    ],
)
def test_linear_map_order(order: int, coefficients: str, coeffs: list[float]) -> None:
    g = torch.Generator().manual_seed(0)
    a64 = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.2
    y64 = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    layer = PCLayer(LinearStub(a64.float()), order=order, f_scope="residual_branch", coefficients=coefficients)
    out = layer(y64.float(), torch.tensor([0.5]))
    torch.testing.assert_close(out, _poly(a64, y64, coeffs).float(), atol=1e-6, rtol=0)


def test_linear_map_ema_k2_general_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    a, y, alpha = torch.randn(8, 8, generator=g) * 0.2, torch.randn(4, 8, generator=g), 0.3
    layer = PCLayer(LinearStub(a), order=2, f_scope="residual_branch", coefficients="ema")
    expected = _poly(a.double(), y.double(), [1, 2 * alpha - alpha**2, alpha]).float()
    torch.testing.assert_close(layer(y, torch.tensor(alpha)), expected, atol=1e-6, rtol=0)


def test_gated_layer_combination() -> None:
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(8, 8, generator=g) * 0.2, torch.randn(4, 8, generator=g)
    layer = PCLayer(LinearStub(a), order=2, f_scope="residual_branch", coefficients="gated")
    assert layer.gate.in_features == 16 and layer.gate.out_features == 1
    k1 = y @ a.T
    k2 = (y + k1) @ a.T
    gate = torch.sigmoid(layer.gate(torch.cat([k1, k2], -1)))
    torch.testing.assert_close(layer(y), y + gate * k1 + (1 - gate) * k2)


# ----------------------------------------------------------------------------- check 4: evaluation counts
@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("corrector", ["none", "multistep"])
@pytest.mark.parametrize("f_scope", ["full_block", "residual_branch"])
def test_block_evaluation_counts(order: int, corrector: str, f_scope: str) -> None:
    enc = _enc(order=order, corrector=corrector, f_scope=f_scope)
    counts = [0] * L
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    enc(*_inputs())
    expected = order + (corrector == "multistep")
    assert counts == [expected] * L and enc.nfe_per_layer == expected


# ----------------------------------------------------------------------------- check 5: parameter overhead
def test_parameter_overhead() -> None:
    d, n = 64, 3

    def count(**kw) -> int:
        return _nparams(PCTransformerEncoder(n, d, 4, 128, **kw))

    vanilla = count(order=1, corrector="none")
    assert count() - vanilla == 801 == 1 + 2 * (n + 1) ** 2 + 4 * n * d
    assert count(stage_norm=True) - vanilla == 801 + 2 * d * 3
    assert count(order=4, stage_norm=True) - vanilla == 801 + 2 * d * 5
    assert count(alpha_scope="layer") - vanilla == 800 + n
    assert count(alpha_scope="channel") - vanilla == 800 + d
    # corrector none: full_block K >= 2 keeps LN^p (2 L d), residual_branch adds only alpha
    assert count(corrector="none") - vanilla == 1 + 2 * n * d
    assert count(corrector="none", f_scope="residual_branch") - vanilla == 1
    assert count(coefficients="gated") - vanilla == 800 + n * (2 * d + 1)


# ----------------------------------------------------------------------------- check 6: history semantics
def test_history_init_rows_and_distinct_parameters() -> None:
    hist = MultistepHistory(3, D)
    for weight in (hist.W, hist.W_c):
        for t in range(4):
            assert torch.all(weight[t, : t + 1] == 1 / (t + 1)) and torch.all(weight[t, t + 1 :] == 0)
    assert hist.W is not hist.W_c and hist.W.data_ptr() != hist.W_c.data_ptr()
    names = dict(hist.named_parameters())
    assert names["W"] is hist.W and names["W_c"] is hist.W_c
    assert len(hist.pred_norms) == len(hist.corr_norms) == 3
    assert hist.rowsum_penalty().item() == 0.0


def test_history_step_semantics() -> None:
    n = 3
    hist = MultistepHistory(n, D)
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(2, 5, D, generator=g)
    hist.reset(y0)
    for t in range(n):
        hist.add(torch.randn(2, 5, D, generator=g), t)
        assert len(hist.states) == t + 2
        z = hist.corrector_input(t)
        torch.testing.assert_close(z, torch.stack(hist.states).mean(0), atol=1e-6, rtol=0)
        c = torch.randn(2, 5, D, generator=g)
        hist.replace_last(c, t)
        assert len(hist.states) == t + 2  # replaced, not appended
        torch.testing.assert_close(hist.states[-1], hist.corr_norms[t](c))
        torch.testing.assert_close(hist.output(t), torch.stack(hist.states).mean(0), atol=1e-6, rtol=0)
    assert hist.states[0] is y0
    with pytest.raises(RuntimeError, match="expected"):
        hist.add(y0, 0)


def test_history_in_encoder_and_gradients_below_diagonal() -> None:
    enc = _enc(order=2, num_layers=3)
    lengths: list[int] = []
    for layer in enc.layers:  # record len(H) at every block call; the corrector call is the (K+1)-th
        layer.register_forward_hook(lambda *_: lengths.append(len(enc.history.states)))
    x, pad = _inputs()
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        enc.history.W.add_(torch.randn(4, 4) * 0.01)  # make the penalty non-trivial
    loss = (enc(x, pad) * weight).sum() + enc.rowsum_penalty()
    loss.backward()
    assert lengths[2::3] == [2, 3, 4]  # at layer t the corrector sees t + 2 states
    assert enc.history.states == []  # cleared after the pass
    for w in (enc.history.W, enc.history.W_c):
        assert torch.all(w.grad.triu(1) == 0)
        assert w.grad.tril()[1:].abs().sum() > 0
        assert w.grad[0].abs().sum() == 0  # row 0 is never read


def test_rowsum_penalty_value() -> None:
    enc = _enc(num_layers=3)
    with torch.no_grad():
        enc.history.W[2, :3] = torch.tensor([1.0, 1.0, 1.0])  # row sum 3 -> 0.5 * 4 = 2
        enc.history.W[0, 3] = 5.0  # above the diagonal: ignored
    assert enc.rowsum_penalty().item() == pytest.approx(2.0 / 3)
    assert _enc(corrector="none").rowsum_penalty().item() == 0.0


# ----------------------------------------------------------------------------- check 7: padding invariance
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"order": 4, "f_scope": "residual_branch", "stage_norm": True},
        {"coefficients": "gated", "corrector": "none", "rel_pos_max_distance": 3},
    ],
)
def test_padding_invariance(kw: dict) -> None:
    enc = _enc(**kw).eval()
    x, pad = _inputs(s=7)
    extra = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(9)) * 5
    x_long = torch.cat([x, extra], 1)
    pad_long = torch.cat([pad, torch.ones(2, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        out, out_long = enc(x, pad), enc(x_long, pad_long)
    real = ~pad
    assert (out[real] - out_long[:, :7][real]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- stats and warnings
def test_pc_stats_and_alpha_warning() -> None:
    enc = _enc(order=4)
    stats = enc.pc_stats()
    assert set(stats) == {
        "pc/alpha", "pc/gamma_1", "pc/gamma_2", "pc/gamma_3", "pc/gamma_4",
        "pc/W_rowsum_mean", "pc/Wc_rowsum_mean", "pc/nfe_per_layer",
    }  # fmt: skip
    assert stats["pc/alpha"] == 0.5 and stats["pc/gamma_4"] == 0.5 and stats["pc/nfe_per_layer"] == 5.0
    assert stats["pc/W_rowsum_mean"] == pytest.approx(1.0) and stats["pc/Wc_rowsum_mean"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in stats.values())
    assert set(_enc(order=1, corrector="none").pc_stats()) == {"pc/gamma_1", "pc/nfe_per_layer"}
    with torch.no_grad():
        enc.alpha.fill_(2.5)
    with pytest.warns(UserWarning, match="alpha"):
        enc.pc_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.pc_stats()  # only once


# ----------------------------------------------------------------------------- section 11 errors
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"order": 3}, r"^order must be 1, 2 or 4, got 3$"),
        ({"corrector": "adams"}, r"corrector.*'none', 'multistep'"),
        ({"f_scope": "branch"}, r"f_scope.*'full_block', 'residual_branch'"),
        ({"coefficients": "learned"}, r"coefficients.*'ema', 'rk', 'gated'"),
        ({"alpha_scope": "head"}, r"alpha_scope.*'shared', 'layer', 'channel'"),
        ({"coefficients": "gated", "order": 4}, r"gated.*order in \[2\].*got order=4"),
        ({"ema_alpha": 0.0}, r"ema_alpha.*\(0, 1\)"),
        ({"ema_alpha": 1.5}, r"ema_alpha.*\(0, 1\)"),
        ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"activation": "tanh"}, r"activation.*'relu', 'gelu'"),
    ],
)
def test_encoder_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _enc(**kw)


def test_pc_layer_errors() -> None:
    stub = LinearStub(torch.eye(4))
    with pytest.raises(ValueError, match=r"^order must be 1, 2 or 4, got 3$"):
        PCLayer(stub, order=3)
    with pytest.raises(ValueError, match=r"gated.*order in \[2\]"):
        PCLayer(stub, order=1, coefficients="gated")
    with pytest.raises(ValueError, match="stage_norms"):
        PCLayer(stub, order=2, stage_norms=nn.ModuleList([nn.LayerNorm(4)]))
    with pytest.raises(ValueError, match="needs alpha"):
        PCLayer(stub, order=2)(torch.randn(2, 4))
