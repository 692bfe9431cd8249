"""Sparse soft targets from next-token counts (NDP, spec ``ndp.md`` section 3 "Counts to probabilities", "Mixing",
"Weights").

A batch of targets is a :class:`SparseRows`: one CSR row per prediction position, listing the row's support ``S``
(token ids with their probabilities) plus ``u``, the probability of *each* token outside ``S`` (0 when the row is not
smoothed), so that ``sum_S p + (V - |S|) * u = 1``. Nothing here builds a ``[R, V]`` tensor except :func:`to_dense`
(tests and references only).

Everything is vectorised over rows with segment operations (``repeat_interleave`` row index, ``scatter_reduce`` /
``index_add_``); there is no Python loop over rows. Rows are normalised in float64 and cast to float32; a singleton row
without smoothing is exactly 1.0, so all-singleton rows reproduce NTP bit for bit (spec "NTP and the exact reduction").

Count transforms (spec section 3, pitfalls 2-4):

- ``softmax`` (default): ``p_k = exp(c_k / tau) / sum_S exp(c_j / tau)`` over *raw* counts (``tau`` =
  ``count_temperature``, default 1). {3, 1} -> [0.880797, 0.119203]. Scale-dependent (pitfall 3).
- ``freq``: ``p_k = c_k / sum c``. {3, 1} -> [0.75, 0.25].
- Smoothing ``zero_prob = z > 0``:

  * softmax: ``tau`` is solved per row by bisection on [1e-7, 100] (bracket width tolerance 1e-6, at most 100
    iterations) so that ``1 / (1 + sum_S exp(c_k / tau)) = z`` (:func:`solve_smoothing_temperature`; the given
    ``temperature`` is then not used). The row is ``p_k = (1 - z) * softmax(c / tau)_k`` and ``u = z / (V - |S|)``,
    which equals the spec's ``exp(c_k / tau) / (1 + sum_S exp(c_j / tau))`` at the root and keeps the off-support mass
    exactly ``z`` despite the bisection tolerance.
  * A row is *infeasible* when no ``tau`` in the bracket solves the equation: ``z >= 1 / (1 + |S|)`` (the spec's case,
    pitfall 4), or -- our addition -- the root lies outside [1e-7, 100] (e.g. counts {1000, 1} need ``tau`` > 100), or
    ``|S| = V`` (no off-support token). Infeasible rows use freq smoothing (unsmoothed freq when ``|S| = V``) and are
    counted (``ndp/infeasible_smoothing_rows``).
  * freq: ``p_k = (1 - z) * c_k / sum c``, ``u = z / (V - |S|)`` (rows with ``|S| = V``: unsmoothed, counted).

Mixing (:func:`mix_rows`) is the target-level ``r * P_a + (1 - r) * P_b`` on the union of supports; count weights
(:func:`count_weights`) are ``min((c / x_max) ** 0.75, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ALLOWED_TRANSFORMS",
    "SparseRows",
    "count_weights",
    "counts_to_rows",
    "mix_rows",
    "one_hot_rows",
    "row_entropy",
    "solve_smoothing_temperature",
    "to_dense",
    "validate_args",
]

ALLOWED_TRANSFORMS = ("softmax", "freq")

# Bisection settings of the smoothing-temperature search (spec section 3, "Smoothing").
TAU_LO = 1e-7
TAU_HI = 100.0
TAU_TOL = 1e-6
TAU_MAX_ITER = 100


@dataclass
class SparseRows:
    """A batch of ``R`` sparse next-token distributions over a vocabulary of size ``V`` (CSR layout).

    Attributes:
        ptr: int64 ``[R + 1]``, row offsets (``ptr[0] = 0``, non-decreasing); row ``i`` owns entries
            ``ptr[i]:ptr[i + 1]``.
        tok: int64 ``[M]``, token ids of the listed entries (distinct within a row), ``M = ptr[-1]``.
        prob: float32 ``[M]``, probability of each listed token.
        u: float32 ``[R]``, probability of *each* token outside the row's support (0 when unsmoothed), so that
            ``prob[row].sum() + (V - |S_row|) * u[row] = 1``.

    All tensors live on the same device.
    """

    ptr: Tensor
    tok: Tensor
    prob: Tensor
    u: Tensor

    @property
    def num_rows(self) -> int:
        """``R``."""
        return self.ptr.numel() - 1

    @property
    def lengths(self) -> Tensor:
        """int64 ``[R]``: support size ``|S|`` of each row."""
        return self.ptr[1:] - self.ptr[:-1]

    def row_index(self) -> Tensor:
        """int64 ``[M]``: the row of each entry."""
        return _row_index(self.ptr)

    def to(self, device: torch.device | str) -> SparseRows:
        """Copy to ``device``."""
        return SparseRows(self.ptr.to(device), self.tok.to(device), self.prob.to(device), self.u.to(device))


# --------------------------------------------------------------------------------------------------------------------
# Argument checks (spec section 11)
# --------------------------------------------------------------------------------------------------------------------


def _check_transform(value: str, name: str) -> None:
    if value not in ALLOWED_TRANSFORMS:
        raise ValueError(f"{name} must be one of {list(ALLOWED_TRANSFORMS)}, got {value!r}")


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_zero_prob(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _check_ratio(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def validate_args(
    *,
    count_transform: str | None = None,
    count_temperature: float | None = None,
    zero_prob: float | None = None,
    mix_ratio: float | None = None,
    x_max_sup: float | None = None,
    x_max_clm: float | None = None,
) -> None:
    """Check NDP hyperparameters (those given, not ``None``) as spec section 11 requires.

    Raises:
        ValueError: ``count_transform`` not in ``{"softmax", "freq"}`` (listing the allowed values);
            ``count_temperature <= 0``; ``zero_prob`` outside [0, 1); ``mix_ratio`` outside [0, 1];
            ``x_max_sup`` / ``x_max_clm`` <= 0 -- each message names the argument and the value.
    """
    if count_transform is not None:
        _check_transform(count_transform, "count_transform")
    if count_temperature is not None:
        _check_positive(count_temperature, "count_temperature")
    if zero_prob is not None:
        _check_zero_prob(zero_prob, "zero_prob")
    if mix_ratio is not None:
        _check_ratio(mix_ratio, "mix_ratio")
    if x_max_sup is not None:
        _check_positive(x_max_sup, "x_max_sup")
    if x_max_clm is not None:
        _check_positive(x_max_clm, "x_max_clm")


def _row_index(ptr: Tensor) -> Tensor:
    """int64 ``[M]`` row id of each CSR entry."""
    num_rows = ptr.numel() - 1
    return torch.repeat_interleave(torch.arange(num_rows, device=ptr.device), ptr[1:] - ptr[:-1])


def _row_of_entry(ptr: Tensor, entry: int) -> int:
    return int(torch.searchsorted(ptr, torch.tensor(entry, device=ptr.device), right=True).item()) - 1


def _check_csr(ptr: Tensor, tok: Tensor, cnt: Tensor, vocab_size: int) -> None:
    """Validate CSR count arrays; errors name the offending row."""
    if ptr.dim() != 1 or ptr.numel() < 1:
        raise ValueError(f"ptr must be a 1-D tensor with R + 1 >= 1 entries, got shape {tuple(ptr.shape)}")
    if ptr.dtype.is_floating_point or tok.dtype.is_floating_point:
        raise ValueError(f"ptr and tok must be integer tensors, got {ptr.dtype} and {tok.dtype}")
    if tok.dim() != 1 or cnt.dim() != 1 or tok.numel() != cnt.numel():
        raise ValueError(f"tok and cnt must be 1-D of equal length, got {tuple(tok.shape)} and {tuple(cnt.shape)}")
    if int(ptr[0]) != 0:
        raise ValueError(f"ptr[0] must be 0, got {int(ptr[0])}")
    diffs = ptr[1:] - ptr[:-1]
    if ptr.numel() > 1 and bool((diffs < 0).any()):
        row = int(torch.nonzero(diffs < 0)[0, 0])
        raise ValueError(f"CSR ptr decreases at row {row}: ptr[{row}]={int(ptr[row])} > ptr[{row + 1}]={int(ptr[row + 1])}")
    if int(ptr[-1]) != tok.numel():
        raise ValueError(f"ptr[-1] = {int(ptr[-1])} but tok/cnt have {tok.numel()} entries")
    if ptr.numel() > 1 and bool((diffs == 0).any()):
        row = int(torch.nonzero(diffs == 0)[0, 0])
        raise ValueError(f"row {row} is empty (ptr[{row}] == ptr[{row + 1}]); every row needs at least one token")
    if tok.numel() == 0:
        return
    bad = ~(cnt > 0) if cnt.dtype.is_floating_point else cnt <= 0  # ~(x > 0) also catches NaN
    if cnt.dtype.is_floating_point:
        bad |= ~torch.isfinite(cnt)
    if bool(bad.any()):
        e = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"count must be > 0 (and finite), got {cnt[e].item()} for token {int(tok[e])} in row "
                         f"{_row_of_entry(ptr, e)}")
    bad = (tok < 0) | (tok >= vocab_size)
    if bool(bad.any()):
        e = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"token id {int(tok[e])} in row {_row_of_entry(ptr, e)} is outside the vocabulary "
                         f"[0, {vocab_size})")
    # distinct tokens within a row: sort by (row, tok) and look for equal neighbours
    key = _row_index(ptr) * vocab_size + tok.long()
    skey = torch.sort(key).values
    dup = skey[1:] == skey[:-1]
    if bool(dup.any()):
        k = int(skey[1:][dup][0])
        raise ValueError(f"token {k % vocab_size} is listed twice in row {k // vocab_size}")


# --------------------------------------------------------------------------------------------------------------------
# Segment helpers (float64)
# --------------------------------------------------------------------------------------------------------------------


def _seg_sum(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    return torch.zeros(num_rows, dtype=x.dtype, device=x.device).index_add_(0, row, x)


def _seg_max(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    out = torch.full((num_rows,), -math.inf, dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(0, row, x, reduce="amax", include_self=True)


def _seg_softmax(x: Tensor, row: Tensor, num_rows: int) -> Tensor:
    """Softmax of ``x`` within each row (max-subtracted)."""
    e = torch.exp(x - _seg_max(x, row, num_rows)[row])
    return e / _seg_sum(e, row, num_rows)[row]


# --------------------------------------------------------------------------------------------------------------------
# Counts -> probabilities
# --------------------------------------------------------------------------------------------------------------------


def _off_support_mass(c: Tensor, cmax: Tensor, row: Tensor, num_rows: int, tau: Tensor) -> Tensor:
    """``f(tau) = 1 / (1 + sum_S exp(c / tau))`` per row, computed without overflow.

    With ``m = max_S c``: ``f = a / (a + s)``, ``a = exp(-m / tau)``, ``s = sum_S exp((c - m) / tau) >= 1``.
    """
    s = _seg_sum(torch.exp((c - cmax[row]) / tau[row]), row, num_rows)
    a = torch.exp(-cmax / tau)
    return a / (a + s)


def solve_smoothing_temperature(
    ptr: Tensor,
    cnt: Tensor,
    zero_prob: float,
    *,
    lo: float = TAU_LO,
    hi: float = TAU_HI,
    tol: float = TAU_TOL,
    max_iter: int = TAU_MAX_ITER,
) -> tuple[Tensor, Tensor]:
    """Per-row temperature ``tau`` with ``1 / (1 + sum_S exp(c_k / tau)) = zero_prob`` (softmax smoothing).

    ``f(tau) = 1 / (1 + sum_S exp(c_k / tau))`` increases with ``tau`` for positive counts (towards ``1 / (1 + |S|)``),
    so one vectorised bisection over all rows at once halves every bracket until its width is below ``tol`` (27 steps
    for the default [1e-7, 100] and 1e-6), at most ``max_iter`` steps.

    Args:
        ptr: int64 ``[R + 1]`` CSR row offsets (non-empty rows).
        cnt: ``[M]`` positive counts (any real dtype; computed in float64).
        zero_prob: ``z`` in (0, 1).

    Returns:
        ``(tau, feasible)``: float64 ``[R]`` (the bracket midpoint at exit; meaningless where infeasible) and bool
        ``[R]``, True where a root lies in ``[lo, hi]``, i.e. ``z < 1 / (1 + |S|)`` and ``f(lo) <= z <= f(hi)``.
    """
    _check_zero_prob(zero_prob, "zero_prob")
    num_rows = ptr.numel() - 1
    device = ptr.device
    row = _row_index(ptr)
    c = cnt.to(torch.float64)
    cmax = _seg_max(c, row, num_rows)
    n = (ptr[1:] - ptr[:-1]).to(torch.float64)
    lo_t = torch.full((num_rows,), float(lo), dtype=torch.float64, device=device)
    hi_t = torch.full((num_rows,), float(hi), dtype=torch.float64, device=device)
    feasible = (zero_prob * (1.0 + n) < 1.0) & (zero_prob > 0)
    feasible &= _off_support_mass(c, cmax, row, num_rows, lo_t) <= zero_prob
    feasible &= _off_support_mass(c, cmax, row, num_rows, hi_t) >= zero_prob
    width = float(hi) - float(lo)  # identical for every row: each step halves every bracket
    for _ in range(max_iter):
        if width < tol:
            break
        mid = 0.5 * (lo_t + hi_t)
        below = _off_support_mass(c, cmax, row, num_rows, mid) < zero_prob  # root above mid
        lo_t = torch.where(below, mid, lo_t)
        hi_t = torch.where(below, hi_t, mid)
        width *= 0.5
    return 0.5 * (lo_t + hi_t), feasible


def counts_to_rows(
    ptr: Tensor,
    tok: Tensor,
    cnt: Tensor,
    *,
    transform: Literal["softmax", "freq"] = "softmax",
    temperature: float = 1.0,
    zero_prob: float = 0.0,
    vocab_size: int,
) -> tuple[SparseRows, int]:
    """Turn CSR next-token counts into probability rows (spec section 3, "Counts to probabilities").

    Args:
        ptr: int ``[R + 1]`` CSR row offsets (``ptr[0] = 0``, non-decreasing, no empty row).
        tok: int ``[M]`` token ids in ``[0, vocab_size)``, distinct within a row.
        cnt: int or float ``[M]`` counts, all > 0.
        transform: ``"softmax"`` over raw counts at ``temperature`` or ``"freq"`` (relative frequency).
        temperature: softmax temperature (ignored by ``freq`` and by softmax smoothing, which solves ``tau``).
        zero_prob: smoothing mass ``z`` spread uniformly over the tokens outside each row's support.
        vocab_size: ``V``.

    Returns:
        ``(rows, infeasible)``: the float32 :class:`SparseRows` on ``tok``'s device (computed in float64) and the
        number of rows whose smoothing was infeasible and fell back to freq smoothing (0 when ``zero_prob = 0``).

    Raises:
        ValueError: unknown ``transform`` (listing the allowed values); ``temperature <= 0``; ``zero_prob`` outside
            [0, 1); ``vocab_size < 1``; malformed CSR (decreasing ``ptr``, empty row, length mismatch), a count
            <= 0, a token id outside the vocabulary or a token listed twice in a row -- naming the row.
    """
    _check_transform(transform, "transform")
    _check_positive(temperature, "temperature")
    _check_zero_prob(zero_prob, "zero_prob")
    if not (isinstance(vocab_size, int) and vocab_size >= 1):
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    device = tok.device
    ptr = ptr.to(device=device, dtype=torch.int64)
    _check_csr(ptr, tok, cnt, vocab_size)
    num_rows = ptr.numel() - 1
    row = _row_index(ptr)
    n = ptr[1:] - ptr[:-1]
    c = cnt.to(device=device, dtype=torch.float64)
    z = float(zero_prob)

    total = _seg_sum(c, row, num_rows)
    infeasible = 0
    if z == 0.0:
        p = _seg_softmax(c / temperature, row, num_rows) if transform == "softmax" else c / total[row]
        u = torch.zeros(num_rows, dtype=torch.float64, device=device)
    else:
        room = n < vocab_size  # at least one off-support token to hold the mass z
        z_row = torch.where(room, z, 0.0).to(torch.float64)
        # freq smoothing: the freq transform itself, and the fallback of infeasible softmax rows
        p = (1.0 - z_row[row]) * c / total[row]
        u = torch.where(room, z_row / (vocab_size - n).clamp(min=1).to(torch.float64), 0.0)
        if transform == "softmax":
            tau, ok = solve_smoothing_temperature(ptr, c, z)
            ok &= room
            p_soft = (1.0 - z) * _seg_softmax(c / tau[row], row, num_rows)
            p = torch.where(ok[row], p_soft, p)
            infeasible = int((~ok).sum())
        else:
            infeasible = int((~room).sum())
    rows = SparseRows(ptr=ptr, tok=tok.to(torch.int64), prob=p.to(torch.float32), u=u.to(torch.float32))
    return rows, infeasible


def one_hot_rows(targets: Tensor) -> SparseRows:
    """NTP rows ``{x_{t+1}: 1.0}`` (spec "NTP and the exact reduction").

    Args:
        targets: int ``[R]`` next-token ids.

    Returns:
        :class:`SparseRows` with ``ptr = arange(R + 1)``, ``prob = 1``, ``u = 0``.
    """
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [R], got shape {tuple(targets.shape)}")
    num_rows = targets.numel()
    device = targets.device
    return SparseRows(
        ptr=torch.arange(num_rows + 1, device=device),
        tok=targets.to(torch.int64),
        prob=torch.ones(num_rows, dtype=torch.float32, device=device),
        u=torch.zeros(num_rows, dtype=torch.float32, device=device),
    )


def mix_rows(a: SparseRows, b: SparseRows, ratio: float) -> SparseRows:
    """Target-level mixing ``P = ratio * P_a + (1 - ratio) * P_b`` (spec "Mixing"; ``ratio`` = ``mix_ratio``).

    The result's support is the union of both supports (tokens sorted within a row, duplicates merged) and
    ``u = ratio * u_a + (1 - ratio) * u_b``. A token listed in only one row gets the other row's floor ``u`` for its
    other part, so the dense result is exactly the dense mix. Computed in float64 (as floor plus excesses
    ``p - u``), cast to float32. ``ratio`` 1 or 0 returns ``a`` or ``b`` itself (no union).

    Raises:
        ValueError: ``ratio`` outside [0, 1]; different row counts.
    """
    _check_ratio(ratio, "ratio")
    if a.num_rows != b.num_rows:
        raise ValueError(f"cannot mix {a.num_rows} rows with {b.num_rows} rows")
    if ratio == 1.0:
        return a
    if ratio == 0.0:
        return b
    r = float(ratio)
    num_rows = a.num_rows
    device = a.tok.device
    row = torch.cat([a.row_index(), b.row_index()])
    tok = torch.cat([a.tok, b.tok])
    ua, ub = a.u.to(torch.float64), b.u.to(torch.float64)
    excess = torch.cat([r * (a.prob.to(torch.float64) - ua[a.row_index()]),
                        (1.0 - r) * (b.prob.to(torch.float64) - ub[b.row_index()])])
    span = int(tok.max()) + 1 if tok.numel() else 1
    keys, inverse = torch.unique(row * span + tok, sorted=True, return_inverse=True)
    u = r * ua + (1.0 - r) * ub
    new_row = keys // span
    prob = u[new_row].index_add_(0, inverse, excess)
    ptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
    ptr[1:] = torch.cumsum(torch.bincount(new_row, minlength=num_rows), 0)
    return SparseRows(ptr=ptr, tok=keys % span, prob=prob.to(torch.float32), u=u.to(torch.float32))


def count_weights(ptr: Tensor, cnt: Tensor, x_max: float) -> Tensor:
    """GloVe-style row weights ``w = min((c / x_max) ** 0.75, 1)``, ``c`` = the row's total count (spec "Weights").

    Args:
        ptr: int ``[R + 1]`` CSR row offsets.
        cnt: ``[M]`` counts.
        x_max: saturation count (spec: 10 supervised, 50 CLM).

    Returns:
        float32 ``[R]``: 1 at ``c >= x_max``; 0.177828 at ``c = 1, x_max = 10``; 0.053183 at ``c = 1, x_max = 50``.

    Raises:
        ValueError: ``x_max <= 0``.
    """
    _check_positive(x_max, "x_max")
    ptr = ptr.to(device=cnt.device, dtype=torch.int64)
    total = _seg_sum(cnt.to(torch.float64), _row_index(ptr), ptr.numel() - 1)
    return torch.clamp((total / float(x_max)) ** 0.75, max=1.0).to(torch.float32)


def row_entropy(rows: SparseRows, vocab_size: int) -> Tensor:
    """Entropy (nats) of each row, off-support mass included: ``-sum_S p log p - (V - |S|) u log u``.

    Returns:
        float32 ``[R]`` (computed in float64, ``0 log 0 = 0``).
    """
    num_rows = rows.num_rows
    p = rows.prob.to(torch.float64)
    u = rows.u.to(torch.float64)
    h = -_seg_sum(torch.special.xlogy(p, p), rows.row_index(), num_rows)
    h -= (vocab_size - rows.lengths).to(torch.float64) * torch.special.xlogy(u, u)
    return h.to(torch.float32)


def to_dense(rows: SparseRows, vocab_size: int) -> Tensor:
    """Dense float32 ``[R, V]`` probabilities. For tests and reference paths only: this is the ``[R, V]`` target the
    sparse loss avoids (pitfall 1)."""
    dense = rows.u[:, None].expand(rows.num_rows, vocab_size).clone()
    dense[rows.row_index(), rows.tok] = rows.prob
    return dense
