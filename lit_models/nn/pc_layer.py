"""Predictor-corrector Transformer encoder (PCformer, Li et al., NeurIPS 2024, arXiv 2411.03042).

Spec: ``shared/methods/pcformer.md`` sections 3, 4, 9 and 11. A pre-norm layer B_t is one Euler step of an ODE; the
predictor runs an RK2/RK4-style one-step method on the *same* layer with exponentially decaying (EMA) coefficients,
the multistep corrector evaluates the layer once more on a learned combination of the layer history. All shapes are
batch-first: ``x`` [B, S, d], ``pad_mask`` [B, S] bool with True at padded positions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_models.nn.attention import MultiheadAttention

__all__ = ["MultistepHistory", "PCLayer", "PCTransformerEncoder", "PreNormEncoderBlock", "ema_gammas"]

ORDERS = (1, 2, 4)
F_SCOPES = ("full_block", "residual_branch")
COEFFICIENTS = ("ema", "rk", "gated")
CORRECTORS = ("none", "multistep")
ALPHA_SCOPES = ("shared", "layer", "channel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
_STEP = {1: (), 2: (1.0,), 4: (0.5, 0.5, 1.0)}  # stage i+1 input: y + _STEP[K][i] * k_i (spec section 3)
_RK = {1: (1.0,), 2: (0.5, 0.5), 4: (1 / 6, 1 / 3, 1 / 3, 1 / 6)}  # classical RK weights (ODE-Transformer)


def _check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _validate_pc(order: int, f_scope: str, coefficients: str) -> None:
    """Spec section 11 checks shared by :class:`PCLayer` and :class:`PCTransformerEncoder`."""
    if order not in ORDERS:
        raise ValueError(f"order must be 1, 2 or 4, got {order}")
    _check_choice("f_scope", f_scope, F_SCOPES)
    _check_choice("coefficients", coefficients, COEFFICIENTS)
    if coefficients == "gated" and order != 2:
        raise ValueError(f"coefficients='gated' requires order in [2] (ODE-Transformer's gate), got order={order}")


def ema_gammas(alpha: Tensor, order: int) -> list[Tensor]:
    """EMA coefficients gamma_i = alpha (1 - alpha)^(K - i), i = 1..K (spec section 3, "Combination").

    ``alpha`` may be 0-d, [1] or [d]; each gamma has alpha's shape. They sum to 1 - (1 - alpha)^K, *not* 1 (pitfall 6).
    """
    return [alpha * (1 - alpha) ** (order - i) for i in range(1, order + 1)]


class PreNormEncoderBlock(nn.Module):
    """Pre-norm Transformer encoder layer B(x) (spec section 3, "Notation"; fairseq ``normalize_before``).

    u = x + Dropout(SelfAttn(LN1(x))), B(x) = u + Dropout(fc2(Dropout_act(act(fc1(LN2(u)))))), G(x) = B(x) - x.
    fc1/fc2 weights are xavier-uniform with zero biases (fairseq). One ``dropout`` module serves both residual
    dropouts, so every PC stage that calls the block uses the same module, active in every stage.

    Raises:
        ValueError: unknown ``activation``; ``d_model % n_heads != 0`` (from :class:`MultiheadAttention`).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        activation: str = "relu",
        rel_pos_max_distance: int = 0,
    ) -> None:
        super().__init__()
        _check_choice("activation", activation, list(ACTIVATIONS))
        self.d_model = d_model
        self.self_attn = MultiheadAttention(d_model, n_heads, attention_dropout, rel_pos_max_distance)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.activation = ACTIVATIONS[activation]
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, branch_only: bool = False) -> Tensor:
        """x [B, S, d], pad_mask [B, S] bool (True = pad) -> B(x) [B, S, d], or G(x) if ``branch_only``."""
        a = self.dropout(self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=pad_mask))
        u = x + a
        f = self.fc2(self.activation_dropout(self.activation(self.fc1(self.final_layer_norm(u)))))
        f = self.dropout(f)
        return a + f if branch_only else u + f

    def branch(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Residual branch G(x) = B(x) - x, [B, S, d], computed as the sum of the two sub-layer outputs (no
        cancellation). Goes through ``__call__``, so forward hooks see it like a ``forward`` call."""
        return self(x, pad_mask, branch_only=True)


def _predict(
    block: nn.Module,
    y: Tensor,
    order: int,
    f_scope: str,
    coefficients: str,
    alpha: Tensor | None = None,
    pad_mask: Tensor | None = None,
    stage_norms: nn.ModuleList | None = None,
    gate: nn.Linear | None = None,
) -> Tensor:
    """Predictor P of order K for one layer (spec section 3); see :class:`PCLayer` for the semantics."""
    if order == 1:  # P = k_1 (full_block) or y + G(y) (residual_branch): both are B(y), computed as such (exact)
        return block(y, pad_mask)
    f = block if f_scope == "full_block" else block.branch
    base = y if stage_norms is None else stage_norms[order](y)
    ks: list[Tensor] = []
    x = y
    for i in range(order):
        k = f(x, pad_mask)
        ks.append(k if stage_norms is None else stage_norms[i](k))
        if i < order - 1:
            x = base + _STEP[order][i] * k  # the next stage uses the raw k_i (official --rk-norm)
    if coefficients == "gated":
        g = torch.sigmoid(gate(torch.cat(ks, dim=-1)))  # [B, S, 1], per position
        return base + g * ks[0] + (1 - g) * ks[1]
    if coefficients == "ema":
        if alpha is None:
            raise ValueError("coefficients='ema' needs alpha")
        gammas: Sequence[Tensor | float] = ema_gammas(alpha, order)
    else:
        gammas = _RK[order]
    out = base
    for gamma, k in zip(gammas, ks):
        out = out + gamma * k
    return out


class PCLayer(nn.Module):
    """Predictor of order K on one block (spec section 3 "Predictor" and "Combination"; paper eq. for RK2/RK4-EMA).

    Stages use f = B (``full_block``, official) or f = G (``residual_branch``, the ODE maths):
    K = 2: k_1 = f(y), k_2 = f(y + k_1); K = 4: k_1 = f(y), k_2 = f(y + k_1/2), k_3 = f(y + k_2/2), k_4 = f(y + k_3).
    P = y + sum_i gamma_i k_i with ``ema`` gamma_i = alpha (1-alpha)^(K-i), ``rk`` (1/2, 1/2) / (1/6, 1/3, 1/3, 1/6),
    or ``gated`` (K = 2): g = sigmoid(Linear(2d->1)([k_1; k_2])) per position, P = y + g k_1 + (1-g) k_2.
    K = 1: P = B(y) in both scopes (= k_1, resp. y + G(y)), no coefficients: the exact vanilla reduction.
    ``stage_norms`` (K + 1 LayerNorms, official ``--rk-norm``): entry i < K normalises the stored k_{i+1}, entry K
    replaces the base y by LN(y) (in the stage inputs and in P); stage inputs still use the raw k_i. Ignored for K = 1.

    ``block`` must provide ``forward(x, pad_mask)`` = B(x) and ``branch(x, pad_mask)`` = G(x) (e.g.
    :class:`PreNormEncoderBlock`, or a stub). The block, stage norms and gate are registered submodules here;
    :class:`PCTransformerEncoder` does not use PCLayer objects (it calls the same function with modules it owns, so
    each parameter appears once in its state_dict).

    Raises:
        ValueError: order not in {1, 2, 4}; unknown f_scope/coefficients; gated with order != 2; stage_norms not of
            length K + 1; gated without ``d_model`` and without ``block.d_model``; ema called without alpha.
    """

    def __init__(
        self,
        block: nn.Module,
        order: int = 2,
        f_scope: str = "full_block",
        coefficients: str = "ema",
        stage_norms: nn.ModuleList | None = None,
        d_model: int | None = None,
    ) -> None:
        super().__init__()
        _validate_pc(order, f_scope, coefficients)
        if stage_norms is not None and order > 1 and len(stage_norms) != order + 1:
            raise ValueError(f"stage_norms must hold order + 1 = {order + 1} LayerNorms, got {len(stage_norms)}")
        self.block, self.order, self.f_scope, self.coefficients = block, order, f_scope, coefficients
        self.stage_norms = stage_norms if order > 1 else None
        self.gate: nn.Linear | None = None
        if coefficients == "gated":
            d_model = d_model if d_model is not None else getattr(block, "d_model", None)
            if d_model is None:
                raise ValueError("coefficients='gated' needs d_model (or a block with a d_model attribute)")
            self.gate = _make_gate(d_model)

    def forward(self, y: Tensor, alpha: Tensor | None = None, pad_mask: Tensor | None = None) -> Tensor:
        """y [B, S, d]; alpha 0-d, [1] or [d] (``ema`` only); pad_mask [B, S] bool -> P [B, S, d]."""
        return _predict(
            self.block, y, self.order, self.f_scope, self.coefficients, alpha, pad_mask, self.stage_norms, self.gate
        )


def _make_gate(d_model: int) -> nn.Linear:
    gate = nn.Linear(2 * d_model, 1)  # fairseq Linear: xavier-uniform weight, zero bias -> g ~ 0.5 at init
    nn.init.xavier_uniform_(gate.weight)
    nn.init.zeros_(gate.bias)
    return gate


class MultistepHistory(nn.Module):
    """Multistep corrector history (spec section 3 "Corrector"; official ``RKPredictorMultistepCorrectorHistory``).

    Owns W and W_c ((L+1) x (L+1), initialised lower-triangular with row t = 1/(t+1) over columns 0..t; only the
    lower-triangular part is ever read, so entries above the diagonal get exactly zero gradient), the per-layer
    prediction norms LN^p (``pred_norms``) and correction norms LN^c (``corr_norms``). The list ``states`` (H) holds
    [B, S, d] tensors of the current forward pass: after layer t it has t + 2 entries.
    """

    def __init__(self, num_layers: int, d_model: int) -> None:
        super().__init__()
        n = num_layers + 1
        init = torch.ones(n, n).tril()
        init = init / init.sum(dim=1, keepdim=True)
        self.W = nn.Parameter(init.clone())
        self.W_c = nn.Parameter(init.clone())
        self.pred_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.corr_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.num_layers = num_layers
        self.states: list[Tensor] = []

    def reset(self, y0: Tensor) -> None:
        """Start a pass: H = [y_0] (embedding output, not normalised). y0 [B, S, d]."""
        self.states = [y0]

    def clear(self) -> None:
        """Drop the stored states (frees their memory after a forward pass)."""
        self.states = []

    def _check(self, layer: int, expected_len: int) -> None:
        if len(self.states) != expected_len:
            raise RuntimeError(f"history has {len(self.states)} states at layer {layer}, expected {expected_len}")

    def add(self, p: Tensor, layer: int) -> None:
        """Append LN^p_t(P) for layer t = ``layer`` (step 2.1). Raises RuntimeError if called out of order."""
        self._check(layer, layer + 1)
        self.states.append(self.pred_norms[layer](p))

    def _combine(self, weight: Tensor, layer: int) -> Tensor:
        w = weight[layer + 1, : layer + 2]  # lower-triangular part of row t+1 only
        out = w[0] * self.states[0]
        for j in range(1, layer + 2):
            out = out + w[j] * self.states[j]
        return out

    def corrector_input(self, layer: int) -> Tensor:
        """z = sum_{j=0..t+1} W[t+1, j] H_j, [B, S, d] (step 2.2)."""
        self._check(layer, layer + 2)
        return self._combine(self.W, layer)

    def replace_last(self, c: Tensor, layer: int) -> None:
        """H_{t+1} <- LN^c_t(c): replaces, does not append (step 2.4)."""
        self._check(layer, layer + 2)
        self.states[-1] = self.corr_norms[layer](c)

    def output(self, layer: int) -> Tensor:
        """y_{t+1} = sum_{j=0..t+1} W_c[t+1, j] H_j, [B, S, d] (step 2.5)."""
        self._check(layer, layer + 2)
        return self._combine(self.W_c, layer)

    def _rowsums(self, weight: Tensor) -> Tensor:
        """Lower-triangular row sums of rows 1..L ([L]); row 0 is never read by the forward pass."""
        return (weight * torch.ones_like(weight).tril()).sum(dim=1)[1:]

    def rowsum_penalty(self) -> Tensor:
        """mean over rows t = 1..L of 0.5 (sum_{j<=t} W[t, j] - 1)^2, a 0-d tensor (spec section 3, official
        ``get_loss``). Row 0 and the entries above the diagonal are excluded: the forward pass never reads them."""
        return (0.5 * (self._rowsums(self.W) - 1.0) ** 2).mean()


class PCTransformerEncoder(nn.Module):
    """Pre-norm Transformer encoder with a predictor-corrector step per layer (spec sections 3-4).

    ``forward(x, pad_mask)`` takes the already embedded y_0 [B, S, d] (scaled embedding + positions + dropout,
    done by the caller) and returns the final-LayerNorm output [B, S, d]. Per layer t: P = predictor(y_t)
    (:class:`PCLayer` semantics), then with ``corrector="multistep"`` the :class:`MultistepHistory` steps
    (add LN^p_t(P), c = B_t(z), replace by LN^c_t(c), y_{t+1} = W_c row); with ``corrector="none"``
    y_{t+1} = P, except ``full_block`` with K >= 2 where y_{t+1} = LN^p_t(P) (``pred_norms``, our default).
    ``order=1, corrector="none"`` creates no extra parameters: it *is* the vanilla pre-norm encoder.

    Attributes: ``layers`` (ModuleList of :class:`PreNormEncoderBlock`), ``alpha`` (Parameter [1], [L] or [d], or
    None when order = 1 or coefficients != "ema"; ``requires_grad=learn_alpha``, never clamped, pitfall 5),
    ``history`` (:class:`MultistepHistory` or None), ``pred_norms`` (LN^p for corrector none, or None),
    ``stage_norms`` (K + 1 LayerNorms shared across layers, or None), ``gates`` (per-layer Linear(2d, 1), or None),
    ``final_norm``. Parameter overhead over vanilla: |alpha| + 2(L+1)^2 + 4 L d with multistep (|alpha| + 2 L d for
    none + full_block + K >= 2), plus 2 d (K+1) with stage_norm (none for K = 1), plus L (2d + 1) with gated.

    Raises:
        ValueError: order not in {1, 2, 4} (message "order must be 1, 2 or 4, got 3"); corrector, f_scope,
            coefficients, alpha_scope or activation not in their sets (the message lists the allowed values);
            gated with order != 2; ema_alpha not in (0, 1); d_model % n_heads != 0.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        order: int = 2,
        corrector: str = "multistep",
        ema_alpha: float = 0.5,
        alpha_scope: str = "shared",
        learn_alpha: bool = True,
        f_scope: str = "full_block",
        coefficients: str = "ema",
        stage_norm: bool = False,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        activation: str = "relu",
        rel_pos_max_distance: int = 0,
    ) -> None:
        super().__init__()
        _validate_pc(order, f_scope, coefficients)
        _check_choice("corrector", corrector, CORRECTORS)
        _check_choice("alpha_scope", alpha_scope, ALPHA_SCOPES)
        if not 0.0 < ema_alpha < 1.0:
            raise ValueError(f"ema_alpha must be in the open interval (0, 1), got {ema_alpha}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.num_layers, self.d_model, self.order = num_layers, d_model, order
        self.corrector, self.f_scope, self.coefficients = corrector, f_scope, coefficients
        self.alpha_scope = alpha_scope
        self.layers = nn.ModuleList(
            PreNormEncoderBlock(
                d_model, n_heads, ffn_dim, dropout, attention_dropout, activation_dropout, activation,
                rel_pos_max_distance,
            )
            for _ in range(num_layers)
        )
        self.alpha: nn.Parameter | None = None
        if order > 1 and coefficients == "ema":
            shape = {"shared": 1, "layer": num_layers, "channel": d_model}[alpha_scope]
            self.alpha = nn.Parameter(torch.full((shape,), float(ema_alpha)), requires_grad=learn_alpha)
        self.stage_norms = (
            nn.ModuleList(nn.LayerNorm(d_model) for _ in range(order + 1)) if stage_norm and order > 1 else None
        )
        self.gates = nn.ModuleList(_make_gate(d_model) for _ in range(num_layers)) if coefficients == "gated" else None
        self.history = MultistepHistory(num_layers, d_model) if corrector == "multistep" else None
        self.pred_norms = (
            nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
            if corrector == "none" and f_scope == "full_block" and order > 1
            else None
        )
        self.final_norm = nn.LayerNorm(d_model)
        self._alpha_warned = False

    def _alpha_for(self, t: int) -> Tensor | None:
        if self.alpha is None:
            return None
        return self.alpha[t] if self.alpha_scope == "layer" else self.alpha

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """x = y_0 [B, S, d], pad_mask [B, S] bool (True = pad) -> final-LayerNorm output [B, S, d]."""
        y, history = x, self.history
        if history is not None:
            history.reset(y)
        for t, layer in enumerate(self.layers):
            gate = self.gates[t] if self.gates is not None else None
            p = _predict(
                layer, y, self.order, self.f_scope, self.coefficients, self._alpha_for(t), pad_mask,
                self.stage_norms, gate,
            )
            if history is not None:
                history.add(p, t)
                history.replace_last(layer(history.corrector_input(t), pad_mask), t)
                y = history.output(t)
            else:
                y = self.pred_norms[t](p) if self.pred_norms is not None else p
        if history is not None:
            history.clear()
        return self.final_norm(y)

    @property
    def nfe_per_layer(self) -> int:
        """Block evaluations per layer: K + 1 with the multistep corrector, K without (pitfall 10)."""
        return self.order + (1 if self.history is not None else 0)

    @torch.no_grad()
    def gammas(self) -> Tensor:
        """Current combination coefficients [K] (detached): ema gamma_i at the *mean* alpha (vector scopes), rk
        constants, [1.0] for K = 1, and an empty tensor for ``gated`` (its gate is per position)."""
        if self.order == 1:
            return torch.ones(1)
        if self.coefficients == "gated":
            return torch.zeros(0)
        if self.coefficients == "rk":
            return torch.tensor(_RK[self.order])
        return torch.stack(ema_gammas(self.alpha.detach().float().mean().cpu(), self.order))

    def rowsum_penalty(self) -> Tensor:
        """History row-sum penalty (:meth:`MultistepHistory.rowsum_penalty`), or a 0-d zero without history."""
        if self.history is None:
            return torch.zeros((), device=self.final_norm.weight.device)
        return self.history.rowsum_penalty()

    @torch.no_grad()
    def pc_stats(self) -> dict[str, float]:
        """Scalars to log: ``pc/alpha`` (mean; if alpha exists), ``pc/gamma_{i}`` (1-based, see :meth:`gammas`),
        ``pc/W_rowsum_mean`` and ``pc/Wc_rowsum_mean`` (rows 1..L, lower-triangular; with history) and
        ``pc/nfe_per_layer``. Warns once (``warnings.warn``) when some |alpha| > 2 (spec pitfall 5)."""
        stats: dict[str, float] = {}
        if self.alpha is not None:
            stats["pc/alpha"] = float(self.alpha.float().mean())
            if not self._alpha_warned and float(self.alpha.abs().max()) > 2.0:
                self._alpha_warned = True
                warnings.warn(
                    f"PCformer alpha left [-2, 2] (max |alpha| = {float(self.alpha.abs().max()):.3f}); it is "
                    "unconstrained as in the official code, so this is logged, not clamped",
                    stacklevel=2,
                )
        for i, gamma in enumerate(self.gammas().tolist(), start=1):
            stats[f"pc/gamma_{i}"] = float(gamma)
        if self.history is not None:
            stats["pc/W_rowsum_mean"] = float(self.history._rowsums(self.history.W).mean())
            stats["pc/Wc_rowsum_mean"] = float(self.history._rowsums(self.history.W_c).mean())
        stats["pc/nfe_per_layer"] = float(self.nfe_per_layer)
        return stats
