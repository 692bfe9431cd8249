"""Early exit through the model's own head: oracle exits, sub-word categories, exit gates, their loss and exit rules.

Pure PyTorch, no Lightning (spec ``shared/methods/early_exit.md`` sections 3.2-3.4; the layer loop and the decoding
are in :mod:`lit_models.nn.exit_runner`).

**Exit points.** A model with ``L`` decoder layers has ``n_exits = L`` exit points (after each layer), or ``2L`` with
sub-layer exits (after the attention and after the FFN of each layer). They are indexed ``k = 0..n_exits-1`` here and
reported in layer units by :func:`exit_layer_units` (``k + 1``; sub-layer: ``(k + 1) / 2``, so 0.5 = after layer 1's
attention). The last exit point is the model's own output.

**Exit scores.** Every rule maps an exit point to a score ``s`` in [0, 1] and exits at the first eligible point with
``s >= threshold`` (:func:`first_exit`): ``learned``: ``sigmoid(gate logit)``; ``confidence``: the top softmax
probability; ``entropy``: ``1 - H / log V`` (so ``s >= tau`` is ``H / log V <= 1 - tau``); ``saturation``: 1 when the
top-1 prediction is the same at the last ``k`` exit points, else 0. Lowering the threshold can only move a token's
exit earlier. Threshold ``1.0`` or ``None`` never exits early (fp32 probabilities reach exactly 1.0, so "p >= 1"
would still exit: spec pitfall 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GATE_RULES",
    "ORACLES",
    "SUBWORD_CATEGORIES",
    "ExitGates",
    "check_threshold",
    "exit_layer_units",
    "first_exit",
    "gate_labels",
    "hidden_gate_features",
    "logit_gate_features",
    "logit_scores",
    "oracle_exit",
    "saturation_scores",
    "subword_categories",
]

ORACLES = ("stable", "first")
GATE_RULES = ("learned", "confidence", "entropy", "saturation")
GATE_FEATURES = ("hidden", "logits")
#: Sub-word categories of a predicted token (spec 3.3); word-initial = single + first, continuation = middle + last.
SUBWORD_CATEGORIES = ("single", "first", "middle", "last", "other")
#: Number of extra features besides the hidden state (cosine and relative update norm).
N_HIDDEN_EXTRA = 2
#: Features of the ``logits`` gate input: p_max, margin, normalised entropy, top-1 agreement, cosine, update norm.
N_LOGIT_FEATURES = 6


def check_threshold(threshold: float | None, key: str = "gate_threshold") -> float | None:
    """``threshold`` if it is None or in [0, 1], else ``ValueError`` naming ``key``."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{key} must be in [0, 1] (1.0 or null: never exit early); got {threshold!r}")
    return float(threshold)


def exit_layer_units(n_exits: int, sublayer: bool, device: torch.device | None = None) -> Tensor:
    """Exit points in layer units, float ``[n_exits]``: ``1..L`` or, with sub-layer exits, ``0.5, 1, 1.5, ..., L``."""
    k = torch.arange(1, n_exits + 1, dtype=torch.float32, device=device)
    return k / 2 if sublayer else k


# ------------------------------------------------------------------------------------------------------ oracle
def oracle_exit(preds: Tensor, mode: Literal["stable", "first"] = "stable") -> Tensor:
    """Oracle exit index of every token.

    Args:
        preds: top-1 predictions ``[n_exits, ...]`` (exit points first; the last row is the model's prediction).
        mode: ``stable``: the first exit point from which every later prediction equals the last one; ``first``: the
            first exit point whose prediction equals the last one (the paper's definition as reported).

    Returns:
        long ``[...]``: exit indices in ``0..n_exits-1``; always ``first <= stable``. Example: predictions
        [5, 7, 7, 3, 7, 7] give first = 1 and stable = 4 (layers 2 and 5).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in ORACLES:
        raise ValueError(f"oracle must be one of {list(ORACLES)}; got {mode!r}")
    eq = preds == preds[-1:]
    if mode == "first":
        return eq.long().argmax(0)  # the first True (the last row is always True)
    suffix = eq.flip(0).long().cumprod(0).flip(0)  # 1 where this and every later exit agree with the last
    return preds.shape[0] - suffix.sum(0)


def gate_labels(oracle: Tensor, n_exits: int) -> Tensor:
    """Gate targets ``y[k, ...] = 1[k >= oracle]`` for the gated exit points ``k = 0..n_exits-2``, float
    ``[n_exits - 1, ...]`` (the last exit point always exits and has no gate)."""
    k = torch.arange(n_exits - 1, device=oracle.device).view(-1, *([1] * oracle.dim()))
    return (k >= oracle.unsqueeze(0)).float()


# ------------------------------------------------------------------------------------------------------ sub-words
def _is_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def subword_categories(token_texts: Sequence[str], starts_space: Sequence[bool] | None = None) -> list[str]:
    """Sub-word position of every token of a sequence (spec 3.3).

    A token is ``other`` when its text has no alphanumeric character. Otherwise it starts a word when its text starts
    with whitespace (``starts_space[i]`` overrides this test, for tokenizers whose decoded pieces lose the marker: the
    byte-BPE ``Ġ`` or SentencePiece ``▁``), it is the first token, or the previous token is ``other`` or ends in
    whitespace. A word is a maximal run of alphanumeric tokens from a word start; its tokens are ``single`` (a one-token
    word) or ``first``, ``middle``, ``last``.

    Example: [" The", " un", "believ", "able", " cat", "."] -> [single, first, middle, last, single, other].
    """
    n = len(token_texts)
    alnum = [_is_alnum(t) for t in token_texts]
    space = [bool(starts_space[i]) if starts_space is not None else t[:1].isspace() for i, t in enumerate(token_texts)]
    starts = []
    for i, text in enumerate(token_texts):
        prev_breaks = i == 0 or not alnum[i - 1] or token_texts[i - 1][-1:].isspace()
        starts.append(alnum[i] and (space[i] or prev_breaks))
    out = []
    for i in range(n):
        if not alnum[i]:
            out.append("other")
            continue
        continues = i + 1 < n and alnum[i + 1] and not starts[i + 1]
        if starts[i]:
            out.append("first" if continues else "single")
        else:
            out.append("middle" if continues else "last")
    return out


# ------------------------------------------------------------------------------------------------------ features
def hidden_gate_features(u: Tensor, h: Tensor, h_prev: Tensor) -> Tensor:
    """Input of the default (``hidden``) gate: ``[u ; cos(h, h_prev) ; |h - h_prev| / |h|]``.

    Args:
        u: the final norm of ``h``, ``[..., d]``.
        h, h_prev: the residual stream at this exit point and at the previous one (embeddings for the first), ``[..., d]``.

    Returns:
        ``[..., d + 2]`` in the dtype of ``u``.
    """
    hf, pf = h.float(), h_prev.float()
    cos = F.cosine_similarity(hf, pf, dim=-1, eps=1e-6)
    delta = (hf - pf).norm(dim=-1) / hf.norm(dim=-1).clamp(min=1e-6)
    return torch.cat([u, cos.unsqueeze(-1).to(u.dtype), delta.unsqueeze(-1).to(u.dtype)], dim=-1)


def logit_scores(logits: Tensor) -> dict[str, Tensor]:
    """Top-1 id, top probability, margin to the second and normalised entropy of ``logits`` ``[..., V]`` (float32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top2 = logp.topk(2, dim=-1)
    p = top2.values.exp()
    entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return {"pred": top2.indices[..., 0], "p_max": p[..., 0], "margin": p[..., 0] - p[..., 1],
            "entropy": entropy.clamp(0.0, 1.0)}


def logit_gate_features(scores: dict[str, Tensor], prev_pred: Tensor, h: Tensor, h_prev: Tensor) -> Tensor:
    """Input of the ``logits`` gate: ``[p_max, p_max - p_2nd, H / log V, 1[a = a_prev], cos, update norm]``, ``[..., 6]``."""
    extra = hidden_gate_features(h.new_zeros(*h.shape[:-1], 0).float(), h, h_prev)
    same = (scores["pred"] == prev_pred).float()
    return torch.stack([scores["p_max"], scores["margin"], scores["entropy"], same, extra[..., 0], extra[..., 1]], -1)


def saturation_scores(preds: Tensor, k: int) -> Tensor:
    """1.0 where the top-1 prediction of exit points ``j-k+1..j`` is the same, else 0.0; ``preds`` ``[n_exits, ...]``.

    With ``k <= 1`` every score is 1. The first ``k - 1`` exit points score 0 (fewer than ``k`` predictions).
    """
    out = torch.ones(preds.shape, dtype=torch.float32, device=preds.device)
    for j in range(1, max(k, 1)):
        same = torch.zeros_like(out)
        same[j:] = (preds[j:] == preds[:-j]).float()
        out = out * same
    return out


def first_exit(scores: Tensor, threshold: float | None, min_exit: int = 0) -> Tensor:
    """Exit index of every token under a threshold rule.

    Args:
        scores: exit scores ``[n_gated, ...]`` in [0, 1] for the gated exit points ``0..n_gated-1`` (the exit point
            ``n_gated`` is the last one and always exits).
        threshold: exit at the first ``k >= min_exit`` with ``scores[k] >= threshold``; ``None`` or ``1.0``: never
            exit early.
        min_exit: the first eligible exit index.

    Returns:
        long ``[...]`` in ``min_exit..n_gated`` (``n_gated`` = the last exit point). Non-increasing as the threshold
        decreases.
    """
    n_gated = scores.shape[0]
    last = torch.full(scores.shape[1:], n_gated, dtype=torch.long, device=scores.device)
    if threshold is None or threshold >= 1.0 or n_gated == 0:
        return last
    ok = scores >= threshold
    ok[: max(min_exit, 0)] = False
    any_ok = ok.any(0)
    return torch.where(any_ok, ok.long().argmax(0), last)


# ------------------------------------------------------------------------------------------------------ gates
class ExitGates(nn.Module):
    """One small MLP per gated exit point: ``g_k = w2_k . GELU(W1_k x + b1_k) + b2_k``, ``p_k = sigmoid(g_k)``.

    The ``n_gates`` MLPs are held as stacked parameters so all exit points are scored in one ``einsum`` (training)
    or one slice (decoding). ``b2`` starts at ``init_bias`` (-2: ``p = 0.12``), so untrained gates rarely exit.

    Args:
        n_gates: gated exit points (``n_exits - 1``).
        in_features: ``d + 2`` for ``hidden`` features, 6 for ``logits`` features.
        hidden: MLP width ``r``.

    Buffers: ``oracle_hist`` ``[n_gates + 1]`` float64, the training-set oracle histogram (majority baseline).
    """

    def __init__(self, n_gates: int, in_features: int, hidden: int = 32, init_bias: float = -2.0) -> None:
        super().__init__()
        if n_gates < 1 or in_features < 1 or hidden < 1:
            raise ValueError(f"ExitGates needs n_gates, in_features, hidden >= 1; got {n_gates}, {in_features}, {hidden}")
        self.n_gates, self.in_features, self.hidden = n_gates, in_features, hidden
        bound1, bound2 = 1 / math.sqrt(in_features), 1 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(n_gates, in_features, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(n_gates, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(n_gates, hidden).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.full((n_gates,), float(init_bias)))
        self.register_buffer("oracle_hist", torch.zeros(n_gates + 1, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        """Gate logits ``[n_gates, N]`` from features ``[n_gates, N, in_features]``."""
        x = x.to(self.w1.dtype)
        hid = F.gelu(torch.einsum("gnf,gfr->gnr", x, self.w1) + self.b1[:, None])
        return torch.einsum("gnr,gr->gn", hid, self.w2) + self.b2[:, None]

    def forward_one(self, k: int, x: Tensor) -> Tensor:
        """Gate logits ``[N]`` of exit point ``k`` from features ``[N, in_features]``."""
        x = x.to(self.w1.dtype)
        return F.gelu(x @ self.w1[k] + self.b1[k]) @ self.w2[k] + self.b2[k]

    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None, pos_weight: float = 1.0) -> Tensor:
        """Mean BCE over gated exit points and tokens; ``logits``/``labels`` ``[n_gates, N]``, ``mask`` ``[N]``."""
        weight = torch.tensor(float(pos_weight), device=logits.device)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight, reduction="none")
        if mask is None:
            return bce.mean()
        m = mask.float().unsqueeze(0).expand_as(bce)
        return (bce * m).sum() / m.sum().clamp(min=1)

    def check_state_dict(self, state: dict[str, Tensor], prefix: str = "", source: str = "checkpoint") -> None:
        """Raise ``ValueError`` (showing both shapes) when gates saved for another model or setting do not fit.

        Raises:
            ValueError: a missing gate tensor, or another number of exit points, feature size or gate width.
        """
        key = prefix + "w1"
        if key not in state:
            raise ValueError(f"{source} holds no exit gates (no {key!r})")
        found = tuple(state[key].shape)
        need = (self.n_gates, self.in_features, self.hidden)
        if found != need:
            raise ValueError(
                f"{source}: its gates were trained for another model or setting: {found[0] + 1} exit points x "
                f"{found[1]} features x width {found[2]}; this model needs {need[0] + 1} exit points x {need[1]} "
                f"features x width {need[2]} (check model, sublayer_exits, gate_features, gate_hidden)"
            )
