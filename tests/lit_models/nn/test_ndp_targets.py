"""NDP target math: count transforms, smoothing, mixing, weights and the sparse soft cross-entropy.

Spec ``ndp.md`` section 10, tests 1 (exact reduction), 2 (rows sum to 1), 3 (transform values), 4 (dense = sparse),
6 (mix modes and weights), 7 (epoch identity), plus the argument errors of section 11 and a vectorisation check.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from lit_models.nn.count_targets import (
    SparseRows,
    count_weights,
    counts_to_rows,
    mix_rows,
    one_hot_rows,
    row_entropy,
    solve_smoothing_temperature,
    to_dense,
    validate_args,
)
from lit_models.nn.soft_ce import dense_soft_cross_entropy, mix_losses, sparse_soft_cross_entropy

RATIOS = (0.0, 0.5, 0.8, 1.0)


def _csr(rows: list[dict[int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[{tok: count}, ...]`` -> CSR ``(ptr, tok, cnt)``."""
    ptr = [0]
    tok: list[int] = []
    cnt: list[float] = []
    for r in rows:
        tok += list(r)
        cnt += list(r.values())
        ptr.append(len(tok))
    dtype = torch.float64 if any(isinstance(c, float) for c in cnt) else torch.int64
    return torch.tensor(ptr), torch.tensor(tok, dtype=torch.int64), torch.tensor(cnt, dtype=dtype)


def _random_count_rows(n: int, vocab: int, max_len: int, seed: int) -> list[dict[int, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, max_len + 1, (1,), generator=g))
        toks = torch.randperm(vocab, generator=g)[:k].tolist()
        cnts = torch.randint(1, 7, (k,), generator=g).tolist()
        out.append(dict(zip(toks, cnts)))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Test 1: exact reduction to NTP when every row of both tables is a singleton
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["softmax", "freq"])
def test_exact_reduction_to_ntp(transform: str) -> None:
    g = torch.Generator().manual_seed(0)
    n, vocab = 64, 97
    logits = torch.randn(n, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (n,), generator=g)
    # singleton rows with varied counts (a duplicated example counts 2, a CLM key seen 5 times counts 5, ...)
    sup_cnt = torch.randint(1, 4, (n,), generator=g)
    clm_cnt = torch.randint(1, 30, (n,), generator=g)
    ptr = torch.arange(n + 1)
    sup, inf_sup = counts_to_rows(ptr, targets, sup_cnt, transform=transform, vocab_size=vocab)
    clm, inf_clm = counts_to_rows(ptr, targets, clm_cnt, transform=transform, vocab_size=vocab)
    assert inf_sup == inf_clm == 0
    assert torch.equal(sup.prob, torch.ones(n)) and torch.equal(clm.prob, torch.ones(n))

    ntp = F.cross_entropy(logits, targets, reduction="none")
    assert torch.equal(sparse_soft_cross_entropy(logits, one_hot_rows(targets)), ntp)
    loss_sup = sparse_soft_cross_entropy(logits, sup)
    loss_clm = sparse_soft_cross_entropy(logits, clm)
    for r in RATIOS:
        target_level = sparse_soft_cross_entropy(logits, mix_rows(sup, clm, r))
        loss_level = mix_losses(loss_sup, loss_clm, r)
        assert torch.equal(target_level, ntp), r
        assert torch.equal(loss_level, ntp), r
        assert abs(target_level.mean().item() - F.cross_entropy(logits, targets).item()) <= 1e-6
        assert abs(loss_level.mean().item() - F.cross_entropy(logits, targets).item()) <= 1e-6


def test_exact_reduction_bf16_logits_are_scored_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 40, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 40, (16,), generator=g)
    loss = sparse_soft_cross_entropy(logits, one_hot_rows(targets))
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.float(), targets, reduction="none"))


# --------------------------------------------------------------------------------------------------------------------
# Test 2: rows sum to 1
# --------------------------------------------------------------------------------------------------------------------


def _expected_infeasible(rows: list[dict[int, int]], z: float, vocab: int, transform: str) -> int:
    """Scalar reference for the number of rows whose smoothing falls back to freq."""
    if z == 0:
        return 0
    count = 0
    for r in rows:
        n = len(r)
        if n >= vocab:
            count += 1
        elif transform == "softmax":
            m = max(r.values())
            f_hi = math.exp(-m / 100) / (math.exp(-m / 100) + sum(math.exp((c - m) / 100) for c in r.values()))
            if not (z * (1 + n) < 1 and f_hi >= z):
                count += 1
    return count


@pytest.mark.parametrize("transform", ["softmax", "freq"])
@pytest.mark.parametrize("z", [0.0, 0.05])
def test_rows_sum_to_one(transform: str, z: float) -> None:
    vocab = 50
    sup_rows = _random_count_rows(40, vocab, 30, seed=2) + [{7: 3}, {1: 1000, 2: 1}, dict.fromkeys(range(vocab), 2)]
    clm_rows = _random_count_rows(43, vocab, 12, seed=3)
    sup, inf_sup = counts_to_rows(*_csr(sup_rows), transform=transform, zero_prob=z, vocab_size=vocab)
    clm, inf_clm = counts_to_rows(*_csr(clm_rows), transform=transform, zero_prob=z, vocab_size=vocab)
    assert inf_sup == _expected_infeasible(sup_rows, z, vocab, transform)
    assert inf_clm == _expected_infeasible(clm_rows, z, vocab, transform)
    if z > 0:
        # |S| >= 19 rows, the full-vocabulary row and (softmax) {1000, 1}, whose root lies above tau = 100
        assert inf_sup > 0
    n_sup = torch.tensor([len(r) for r in sup_rows])
    off_mass = (vocab - sup.lengths).double() * sup.u.double()
    # off-support mass is z whenever there is an off-support token (freq fallback keeps z too)
    assert torch.allclose(off_mass, torch.where(n_sup < vocab, z, 0.0).double(), atol=1e-7, rtol=0)
    assert sup.prob[sup.ptr[-4]].item() == (1.0 if z == 0 else pytest.approx(1 - z, abs=1e-7))  # singleton {7: 3}

    for r in (0.0, 0.8, 1.0):
        mixed = mix_rows(sup, clm, r)
        total = torch.zeros(mixed.num_rows, dtype=torch.float64).index_add_(0, mixed.row_index(), mixed.prob.double())
        total += (vocab - mixed.lengths).double() * mixed.u.double()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6, rtol=0), r
        assert bool((mixed.prob >= 0).all()) and bool((mixed.u >= 0).all())
        dense = to_dense(mixed, vocab)
        expected = r * to_dense(sup, vocab).double() + (1 - r) * to_dense(clm, vocab).double()
        assert torch.allclose(dense.double(), expected, atol=1e-7, rtol=0)
        assert torch.allclose(dense.sum(1).double(), torch.ones(mixed.num_rows, dtype=torch.float64), atol=1e-6)
        # entropy includes the off-support mass
        h = -(torch.special.xlogy(dense.double(), dense.double())).sum(1)
        assert torch.allclose(row_entropy(mixed, vocab).double(), h, atol=1e-5, rtol=1e-6)


def test_mixed_support_is_union_with_sorted_tokens() -> None:
    a, _ = counts_to_rows(*_csr([{5: 1, 2: 1}, {9: 2}]), transform="freq", vocab_size=10)
    b, _ = counts_to_rows(*_csr([{2: 3}, {1: 1, 9: 1}]), transform="freq", vocab_size=10)
    m = mix_rows(a, b, 0.8)
    assert m.ptr.tolist() == [0, 2, 4]
    assert m.tok.tolist() == [2, 5, 1, 9]
    assert torch.allclose(m.prob, torch.tensor([0.8 * 0.5 + 0.2, 0.4, 0.1, 0.8 + 0.1]), atol=1e-7, rtol=0)
    assert torch.equal(m.u, torch.zeros(2))


# --------------------------------------------------------------------------------------------------------------------
# Test 3: transform values
# --------------------------------------------------------------------------------------------------------------------


def test_transform_values() -> None:
    ptr, tok, cnt = _csr([{0: 3, 1: 1}])
    soft, _ = counts_to_rows(ptr, tok, cnt, transform="softmax", vocab_size=4)
    freq, _ = counts_to_rows(ptr, tok, cnt, transform="freq", vocab_size=4)
    assert soft.prob.tolist() == pytest.approx([0.880797, 0.119203], abs=1e-6)
    assert freq.prob.tolist() == [0.75, 0.25]
    hot, _ = counts_to_rows(ptr, tok, cnt, transform="softmax", temperature=0.5, vocab_size=4)
    assert hot.prob.tolist() == pytest.approx([1 / (1 + math.exp(-4)), 1 / (1 + math.exp(4))], abs=1e-7)
    # scale dependence (pitfall 3): {20, 10} -> ~1.0 / 4.5e-5
    big, _ = counts_to_rows(*_csr([{0: 20, 1: 10}]), vocab_size=4)
    assert big.prob[1].item() == pytest.approx(4.54e-5, rel=1e-3)

    tau, ok = solve_smoothing_temperature(torch.tensor([0, 1]), torch.tensor([1]), 0.05)
    assert bool(ok.all())
    assert tau.item() == pytest.approx(1 / math.log(19), abs=1e-6)
    assert round(tau.item(), 6) == 0.339623
    row, infeasible = counts_to_rows(torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([1]),
                                     zero_prob=0.05, vocab_size=11)
    assert infeasible == 0
    assert row.prob.item() == pytest.approx(0.95, abs=1e-7)
    assert row.u.item() == pytest.approx(0.005, abs=1e-9)


def test_infeasible_smoothing_falls_back_to_freq() -> None:
    # z = 0.4 >= 1 / (1 + 2): no temperature can put mass 0.4 outside a 2-token support
    rows, infeasible = counts_to_rows(*_csr([{0: 3, 1: 1}, {2: 1}]), zero_prob=0.4, vocab_size=10)
    assert infeasible == 1
    assert rows.prob.tolist()[:2] == pytest.approx([0.6 * 0.75, 0.6 * 0.25], abs=1e-7)
    assert rows.u[0].item() == pytest.approx(0.4 / 8, abs=1e-9)
    # the singleton is feasible (0.4 < 1/2): tau solves 1 / (1 + e^{1/tau}) = 0.4
    assert rows.prob[2].item() == pytest.approx(0.6, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Test 4: dense = sparse (loss and gradient)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.0, 0.05])
def test_dense_equals_sparse(z: float) -> None:
    n, vocab = 7, 50
    g = torch.Generator().manual_seed(4)
    base = torch.randn(n, vocab, generator=g) * 2
    a, _ = counts_to_rows(*_csr(_random_count_rows(n, vocab, 6, seed=5)), zero_prob=z, vocab_size=vocab)
    b, _ = counts_to_rows(*_csr(_random_count_rows(n, vocab, 4, seed=6)), transform="freq", zero_prob=z,
                          vocab_size=vocab)
    for rows in (a, b, mix_rows(a, b, 0.8)):
        assert bool((rows.u > 0).all()) == (z > 0)
        x_sparse = base.clone().requires_grad_(True)
        x_dense = base.clone().requires_grad_(True)
        sparse = sparse_soft_cross_entropy(x_sparse, rows)
        dense = torch.nn.CrossEntropyLoss(reduction="none")(x_dense, to_dense(rows, vocab))
        torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)
        torch.testing.assert_close(sparse, dense_soft_cross_entropy(base, to_dense(rows, vocab)), atol=1e-6, rtol=0)
        sparse.sum().backward()
        dense.sum().backward()
        torch.testing.assert_close(x_sparse.grad, x_dense.grad, atol=1e-6, rtol=0)
        # gradient of KL: q - P
        q = torch.softmax(base, -1)
        torch.testing.assert_close(x_sparse.grad, q - to_dense(rows, vocab), atol=1e-6, rtol=0)
        # l = KL(P || q) + H(P)
        dense_p = to_dense(rows, vocab).double()
        kl = (torch.special.xlogy(dense_p, dense_p) - dense_p * torch.log_softmax(base.double(), -1)).sum(1)
        torch.testing.assert_close(sparse.double(), kl + row_entropy(rows, vocab).double(), atol=1e-5, rtol=0)


def test_loss_rejects_row_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 rows but the targets have 2"):
        sparse_soft_cross_entropy(torch.zeros(3, 5), one_hot_rows(torch.tensor([1, 2])))


# --------------------------------------------------------------------------------------------------------------------
# Test 6: mix modes and weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.0, 0.05])
def test_target_and_loss_level_mixing_agree(z: float) -> None:
    n, vocab = 20, 60
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, vocab, generator=g) * 2
    sup, _ = counts_to_rows(*_csr(_random_count_rows(n, vocab, 3, seed=8)), zero_prob=z, vocab_size=vocab)
    clm, _ = counts_to_rows(*_csr(_random_count_rows(n, vocab, 9, seed=9)), zero_prob=z, vocab_size=vocab)
    for r in RATIOS:
        target_level = sparse_soft_cross_entropy(logits, mix_rows(sup, clm, r))
        loss_level = mix_losses(sparse_soft_cross_entropy(logits, sup), sparse_soft_cross_entropy(logits, clm), r)
        torch.testing.assert_close(target_level, loss_level, atol=1e-6, rtol=0)
        assert abs(target_level.mean().item() - loss_level.mean().item()) <= 1e-6


def test_count_weights() -> None:
    ptr, _, cnt = _csr([{0: 1}, {0: 10}, {0: 3, 1: 7}, {0: 60}, {0: 50}, {0: 2, 1: 3}])
    w10 = count_weights(ptr, cnt, 10.0)
    w50 = count_weights(ptr, cnt, 50.0)
    assert w10.dtype == torch.float32
    assert w10.tolist() == pytest.approx([0.177828, 1.0, 1.0, 1.0, 1.0, 0.5 ** 0.75], abs=1e-6)
    assert w50.tolist() == pytest.approx([0.053183, 0.2 ** 0.75, 0.2 ** 0.75, 1.0, 1.0, 0.1 ** 0.75], abs=1e-6)
    assert w10[1].item() == 1.0 and w50[4].item() == 1.0


# --------------------------------------------------------------------------------------------------------------------
# Test 7: epoch identity (freq, r = 1, z = 0): summed NDP == summed NTP
# --------------------------------------------------------------------------------------------------------------------


class _TinyCausalLM(torch.nn.Module):
    """Embedding + GRU + head: the logits at a position are a function of the prefix only."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.rnn = torch.nn.GRU(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0]) * 3


def test_epoch_identity_freq_r1() -> None:
    vocab = 12
    prompt = [1, 9, 10, 3]
    answers = [[4, 5, 6, 7], [4, 8, 6, 7]]
    ids = torch.tensor([prompt + a for a in answers])  # one prompt, two answers (full batch)
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)  # prediction positions: x_{t+1} is an answer token
    # supervised table keyed by the full prefix, one row per prediction position, by hand:
    #   prompt -> {4: 2}; prompt+[4] -> {5: 1, 8: 1}; prompt+[4,5] -> {6: 1}; prompt+[4,8] -> {6: 1}; ... -> {7: 1}
    per_example = [{4: 2}, {5: 1, 8: 1}, {6: 1}, {7: 1}]
    sup_ptr, sup_tok, sup_cnt = _csr(per_example + per_example)
    # CLM table keyed by the answer prefix (min_prefix 1; the empty prefix falls back to the supervised row)
    clm_ptr, clm_tok, clm_cnt = _csr([{4: 2}, {5: 1, 8: 1}, {6: 1}, {7: 2}] + [{4: 2}, {5: 1, 8: 1}, {6: 1}, {7: 2}])

    torch.manual_seed(0)
    model = _TinyCausalLM(vocab).eval()
    logits = model(ids)[:, positions].reshape(-1, vocab)  # [8, V], row-major like the collated CSR rows
    targets = ids[:, positions + 1].reshape(-1)
    assert torch.equal(logits[0], logits[4]) and torch.equal(logits[1], logits[5])  # shared prefixes

    sup, _ = counts_to_rows(sup_ptr, sup_tok, sup_cnt, transform="freq", vocab_size=vocab)
    clm, _ = counts_to_rows(clm_ptr, clm_tok, clm_cnt, transform="freq", vocab_size=vocab)
    assert sup.prob.tolist() == [1.0, 0.5, 0.5, 1.0, 1.0] * 2
    ndp = sparse_soft_cross_entropy(logits, mix_rows(sup, clm, 1.0)).double().sum()
    ntp = F.cross_entropy(logits, targets, reduction="none").double().sum()
    assert abs(ndp.item() - ntp.item()) <= 1e-6
    # the two answers differ at one position, so the per-position losses differ there but not in the sum
    per_pos = sparse_soft_cross_entropy(logits, sup) - F.cross_entropy(logits, targets, reduction="none")
    assert per_pos[1].abs().item() > 1e-3 and per_pos[[0, 2, 3, 4, 6, 7]].abs().max().item() == 0.0

    params = list(model.parameters())
    g_ndp = torch.autograd.grad(ndp, params, retain_graph=True)
    g_ntp = torch.autograd.grad(ntp, params)
    for a, b in zip(g_ndp, g_ntp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Bad arguments (spec section 11)
# --------------------------------------------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    ptr, tok, cnt = _csr([{0: 1, 1: 2}])
    with pytest.raises(ValueError, match=r"transform must be one of \['softmax', 'freq'\], got 'argmax'"):
        counts_to_rows(ptr, tok, cnt, transform="argmax", vocab_size=5)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            counts_to_rows(ptr, tok, cnt, temperature=t, vocab_size=5)
    for z in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"zero_prob must be in \[0, 1\)"):
            counts_to_rows(ptr, tok, cnt, zero_prob=z, vocab_size=5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        mix_rows(one_hot_rows(tok[:1]), one_hot_rows(tok[:1]), 1.5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got -0.2"):
        mix_losses(torch.zeros(1), torch.zeros(1), -0.2)
    with pytest.raises(ValueError, match="cannot mix 1 rows with 2 rows"):
        mix_rows(one_hot_rows(tok[:1]), one_hot_rows(tok), 0.5)
    with pytest.raises(ValueError, match="x_max must be a finite number > 0, got 0"):
        count_weights(ptr, cnt, 0)

    with pytest.raises(ValueError, match="count_transform must be one of"):
        validate_args(count_transform="dense")
    with pytest.raises(ValueError, match="count_temperature must be a finite number > 0, got 0"):
        validate_args(count_temperature=0)
    with pytest.raises(ValueError, match=r"zero_prob must be in \[0, 1\), got 1"):
        validate_args(zero_prob=1)
    with pytest.raises(ValueError, match=r"mix_ratio must be in \[0, 1\], got 1.1"):
        validate_args(mix_ratio=1.1)
    with pytest.raises(ValueError, match="x_max_sup must be a finite number > 0, got -1"):
        validate_args(x_max_sup=-1)
    with pytest.raises(ValueError, match="x_max_clm must be a finite number > 0, got 0.0"):
        validate_args(x_max_clm=0.0)
    validate_args(count_transform="freq", count_temperature=1e-6, zero_prob=0.0, mix_ratio=1.0, x_max_sup=10,
                  x_max_clm=50)


def test_bad_count_arrays_name_the_row() -> None:
    ptr, tok, cnt = _csr([{0: 1}, {1: 2, 2: 3}, {3: 1}])
    with pytest.raises(ValueError, match="count must be > 0.*got 0 for token 2 in row 1"):
        counts_to_rows(ptr, tok, torch.tensor([1, 2, 0, 1]), vocab_size=5)
    with pytest.raises(ValueError, match="count must be > 0.*in row 2"):
        counts_to_rows(ptr, tok, torch.tensor([1.0, 2.0, 3.0, -0.5]), vocab_size=5)
    with pytest.raises(ValueError, match="CSR ptr decreases at row 1"):
        counts_to_rows(torch.tensor([0, 3, 1, 4]), tok, cnt, vocab_size=5)
    with pytest.raises(ValueError, match="row 1 is empty"):
        counts_to_rows(torch.tensor([0, 1, 1, 4]), tok, cnt, vocab_size=5)
    with pytest.raises(ValueError, match=r"ptr\[-1\] = 3 but tok/cnt have 4 entries"):
        counts_to_rows(torch.tensor([0, 1, 3]), tok, cnt, vocab_size=5)
    with pytest.raises(ValueError, match=r"token id 3 in row 2 is outside the vocabulary \[0, 3\)"):
        counts_to_rows(ptr, tok, cnt, vocab_size=3)
    with pytest.raises(ValueError, match="token 1 is listed twice in row 1"):
        counts_to_rows(ptr, torch.tensor([0, 1, 1, 3]), cnt, vocab_size=5)


def test_inputs_are_not_modified() -> None:
    ptr, tok, cnt = _csr([{0: 3, 1: 1}, {2: 5}])
    before = (ptr.clone(), tok.clone(), cnt.clone())
    a, _ = counts_to_rows(ptr, tok, cnt, zero_prob=0.05, vocab_size=10)
    b, _ = counts_to_rows(ptr, tok, cnt, transform="freq", vocab_size=10)
    mix_rows(a, b, 0.3)
    assert all(torch.equal(x, y) for x, y in zip(before, (ptr, tok, cnt)))
    assert isinstance(a, SparseRows) and a.tok.dtype == torch.int64 and a.prob.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Vectorisation: 200k rows per batch must be cheap
# --------------------------------------------------------------------------------------------------------------------


def test_vectorised_200k_rows() -> None:
    g = torch.Generator().manual_seed(10)
    n, vocab = 200_000, 49_152
    lens = torch.randint(1, 4, (n,), generator=g)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(lens, 0)
    row = torch.repeat_interleave(torch.arange(n), lens)
    tok = (torch.randint(0, vocab, (n,), generator=g)[row] + torch.arange(int(ptr[-1])) - ptr[row]) % vocab
    cnt = torch.randint(1, 6, (int(ptr[-1]),), generator=g)
    start = time.perf_counter()
    sup, infeasible = counts_to_rows(ptr, tok, cnt, zero_prob=0.05, vocab_size=vocab)
    clm, _ = counts_to_rows(ptr, tok, cnt, transform="freq", vocab_size=vocab)
    mixed = mix_rows(sup, clm, 0.8)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"building 200k rows took {elapsed:.2f} s"
    assert infeasible == 0
    assert mixed.num_rows == n and torch.equal(mixed.ptr, ptr)  # same supports -> same CSR layout
    assert torch.allclose(sup.u, (0.05 / (vocab - lens)).float())
