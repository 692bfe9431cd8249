"""Cross-entropy against sparse soft targets (NDP, spec ``ndp.md`` section 3 "Loss"; reusable for distillation).

For logits ``z`` in ``R^V`` with ``q = softmax(z)`` and a target row ``(S, p_S, u)`` (:class:`SparseRows`: listed
probabilities on the support ``S``, the same probability ``u`` on every other token), the per-position loss is

    l = - sum_{k in S} (p_k - u) * log q_k - u * sum_{k=1..V} log q_k
      = - sum_{k in S} (p_k - u) * log q_k - u * (sum_k z_k - V * logsumexp(z))

which is the full cross-entropy ``- sum_k P_k log q_k = KL(P || q) + H(P)``; ``H(P)`` does not depend on the logits,
so the gradient is KL's (``q - P`` per row when ``P`` sums to 1). It needs one ``log_softmax`` and a gather at
``(row, tok)``: no ``[R, V]`` target tensor is built (pitfall 1). The loss is computed in float32 whatever the
logits' dtype (pitfall 10). With one-hot rows (``p = 1``, ``u = 0``) it is bit-identical to
``F.cross_entropy(logits.float(), targets, reduction="none")``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_models.nn.count_targets import SparseRows

__all__ = ["dense_soft_cross_entropy", "mix_losses", "sparse_soft_cross_entropy"]


def sparse_soft_cross_entropy(logits: Tensor, rows: SparseRows, *, log_probs: Tensor | None = None) -> Tensor:
    """Per-position cross-entropy of ``logits`` against sparse target rows (see module docstring).

    Args:
        logits: ``[R, V]`` logits at the prediction positions (any float dtype; cast to float32). Gradients flow to it.
        rows: :class:`SparseRows` with ``R`` rows and token ids in ``[0, V)``.
        log_probs: ``F.log_softmax(logits.float(), -1)`` when the caller already has it (reused instead of a second
            ``[R, V]`` pass, e.g. for the one-hot loss or a second table); must come from ``logits``.

    Returns:
        float32 ``[R]`` losses ``l_i = KL(P_i || q_i) + H(P_i)``; reduce with ``.mean()`` (the spec's token mean).

    Raises:
        ValueError: ``logits`` not 2-D, or its row count differs from ``rows.num_rows`` (both counts given).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
    if logits.shape[0] != rows.num_rows:
        raise ValueError(f"logits have {logits.shape[0]} rows but the targets have {rows.num_rows}")
    logp = F.log_softmax(logits.float(), dim=-1) if log_probs is None else log_probs  # [R, V]
    row = rows.row_index()
    u = rows.u.to(device=logp.device, dtype=torch.float32)
    coef = rows.prob.to(device=logp.device, dtype=torch.float32) - u[row]  # [M]
    picked = logp[row, rows.tok]  # [M] gather at (row, tok)
    loss = -torch.zeros(rows.num_rows, dtype=torch.float32, device=logp.device).index_add(0, row, coef * picked)
    if bool((u != 0).any()):
        loss = loss - u * logp.sum(dim=-1)  # sum_k log q_k = sum_k z_k - V * logsumexp(z)
    return loss


def dense_soft_cross_entropy(logits: Tensor, probs: Tensor) -> Tensor:
    """Reference ``- sum_k P_k log softmax(z)_k`` per row with dense ``probs`` ``[R, V]`` (tests only).

    Returns:
        float32 ``[R]``.
    """
    return -(probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def mix_losses(loss_a: Tensor, loss_b: Tensor, ratio: float) -> Tensor:
    """Loss-level mixing ``ratio * loss_a + (1 - ratio) * loss_b`` (spec "Mixing", ``--alpha``), per position.

    Computed in float64 and cast back to ``loss_a``'s dtype, so equal inputs give back exactly the same values (the
    exact NTP reduction holds bit for bit in loss mode too). Gradients flow to both inputs.

    Raises:
        ValueError: ``ratio`` outside [0, 1].
    """
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    r = float(ratio)
    mixed = r * loss_a.to(torch.float64) + (1.0 - r) * loss_b.to(torch.float64)
    return mixed.to(loss_a.dtype)
