"""View fusion at the encoder input: the gradient-sensitive gating network (GSGN), concatenation, single view.

Source: spec ``speech_fusion.md`` sections 3.2-3.3 (equations are the project's reading of the paper's figure; the
paper's method section was not available). Views are named ``fbank`` and ``ssl``; presence masks are [B, 2] in the
order of :data:`VIEWS`.

GSGN (``gate_sharing="per_view"``, one gate stack c per output view)::

    z^c_{v,t} = G^c_v(sg(h_{v,t}))      G = Linear(d, d_g) -> GELU -> Linear(d_g, 1 or d), last layer zero-init
    z^c_b     = b^c                      learned bias slot (zero-init)
    pi^c_t    = softmax([z^c_f, z^c_s, z^c_b] / tau)   absent views: logit -inf
    h_t       = pi^f_t[f] * h_f + pi^s_t[s] * h_s   (+ h_f when residual="fbank")

At initialisation every slot is 1/3, so ``h = (h_f + h_s) / 3``; with SSL absent ``alpha_f = 1/2`` and ``h = h_f/2``.

View dropout (training only): per utterance one of {keep both, drop ssl, drop fbank} with probabilities
``(1 - p_s - p_f, p_s, p_f)``; both views are never dropped. Feature dropout: ordinary dropout on h_v before the
gate. Both are set by :meth:`set_view_dropout` (the :class:`callbacks.multi_stage_dropout.MultiStageDropout` hook).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VIEWS", "ConcatFusion", "GSGNFusion", "SingleViewFusion", "ViewDropout", "build_fusion"]

VIEWS: tuple[str, str] = ("fbank", "ssl")


class ViewDropout(nn.Module):
    """Per-utterance view dropout and per-view feature dropout (spec 3.3); probabilities set at run time.

    Attributes:
        p_drop: ``{"fbank": p_f, "ssl": p_s}`` probability that an utterance loses that view (training only).
        p_feat: ``{"fbank": ..., "ssl": ...}`` dropout rate on each view's features (training only).
        last_dropped: ``{"fbank": fraction, "ssl": fraction}`` realised in the last training call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.p_drop = {v: 0.0 for v in VIEWS}
        self.p_feat = {v: 0.0 for v in VIEWS}
        self.last_dropped = {v: 0.0 for v in VIEWS}

    def set(self, p_drop: dict[str, float] | None = None, p_feat: dict[str, float] | None = None) -> None:
        """Set the probabilities (keys ``fbank``/``ssl``; missing keys keep their value).

        Raises:
            ValueError: a probability outside [0, 1], ``p_drop[fbank] + p_drop[ssl] > 1`` or an unknown view key.
        """
        for name, new in (("p_drop", p_drop), ("p_feat", p_feat)):
            for view, p in (new or {}).items():
                if view not in VIEWS:
                    raise ValueError(f"{name}: unknown view {view!r}, expected one of {VIEWS}")
                if not 0.0 <= float(p) <= 1.0:
                    raise ValueError(f"{name}[{view}] must be in [0, 1], got {p}")
        merged = {**self.p_drop, **(p_drop or {})}
        if merged["fbank"] + merged["ssl"] > 1.0 + 1e-9:
            raise ValueError(f"p_drop fbank + ssl must be <= 1, got {merged['fbank']} + {merged['ssl']}")
        self.p_drop = {v: float(merged[v]) for v in VIEWS}
        self.p_feat = {v: float({**self.p_feat, **(p_feat or {})}[v]) for v in VIEWS}

    def drop_views(self, present: Tensor) -> Tensor:
        """present [B, 2] bool -> new presence mask with dropped views (training only; never drops both views and
        only drops a view the utterance has while it keeps the other)."""
        if not self.training or (self.p_drop["fbank"] == 0.0 and self.p_drop["ssl"] == 0.0):
            self.last_dropped = {v: 0.0 for v in VIEWS}
            return present
        u = torch.rand(present.size(0), device=present.device)
        p_s, p_f = self.p_drop["ssl"], self.p_drop["fbank"]
        drop_ssl = (u < p_s) & present.all(dim=1)
        drop_fbank = (u >= p_s) & (u < p_s + p_f) & present.all(dim=1)
        out = present.clone()
        out[:, 1] &= ~drop_ssl
        out[:, 0] &= ~drop_fbank
        n = max(present.size(0), 1)
        self.last_dropped = {"ssl": float(drop_ssl.sum()) / n, "fbank": float(drop_fbank.sum()) / n}
        return out

    def feature_dropout(self, h: dict[str, Tensor]) -> dict[str, Tensor]:
        """Dropout with rate ``p_feat[v]`` on each view's features (identity in eval mode)."""
        return {v: F.dropout(x, self.p_feat.get(v, 0.0), self.training) for v, x in h.items()}


def _gate_mlp(d_model: int, hidden: int, out: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, out))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class GSGNFusion(nn.Module):
    """Gradient-sensitive gating network (spec 3.2); see the module docstring for the equations.

    Args:
        d_model: width d of both aligned views.
        gate_hidden: hidden width d_g of every scorer G.
        granularity: ``frame`` (one logit per slot and frame) or ``channel`` (d logits per slot; bias a d-vector).
        sharing: ``per_view`` (one stack per output view, as drawn) or ``shared`` (one stack for both views).
        detach_inputs: stop-gradient on the scorer inputs (the "gradient-sensitive" reading, spec 3.2).
        bias_slot: include the learned bias slot in each softmax.
        temperature: softmax temperature tau.
        residual: ``none`` or ``fbank`` (add h_f after fusion).

    Forward: ``h`` {"fbank": [B,T,d], "ssl": [B,T,d]} (either may be missing when absent for the whole batch),
    ``present`` [B, 2] bool, ``pad_mask`` [B, T] bool (True = pad) -> (fused [B, T, d],
    alphas {"fbank", "ssl", "bias"}: [B, T] (channel granularity: mean over channels)). Padded frames are zero.

    Raises:
        ValueError: unknown ``granularity``/``sharing``/``residual`` or ``temperature <= 0``.
    """

    def __init__(
        self,
        d_model: int,
        gate_hidden: int = 64,
        granularity: Literal["frame", "channel"] = "frame",
        sharing: Literal["per_view", "shared"] = "per_view",
        detach_inputs: bool = True,
        bias_slot: bool = True,
        temperature: float = 1.0,
        residual: Literal["none", "fbank"] = "none",
    ) -> None:
        super().__init__()
        if granularity not in ("frame", "channel"):
            raise ValueError(f"gate_granularity must be 'frame' or 'channel', got {granularity!r}")
        if sharing not in ("per_view", "shared"):
            raise ValueError(f"gate_sharing must be 'per_view' or 'shared', got {sharing!r}")
        if residual not in ("none", "fbank"):
            raise ValueError(f"gate_residual must be 'none' or 'fbank', got {residual!r}")
        if temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {temperature}")
        self.d_model, self.granularity, self.sharing = d_model, granularity, sharing
        self.detach_inputs, self.bias_slot, self.temperature, self.residual = (
            detach_inputs, bias_slot, temperature, residual,
        )
        width = 1 if granularity == "frame" else d_model
        stacks = ("fbank", "ssl") if sharing == "per_view" else ("shared",)
        self.scorers = nn.ModuleDict(
            {c: nn.ModuleDict({v: _gate_mlp(d_model, gate_hidden, width) for v in VIEWS}) for c in stacks}
        )
        self.bias = nn.ParameterDict({c: nn.Parameter(torch.zeros(width)) for c in stacks}) if bias_slot else None
        self.view_dropout = ViewDropout()

    def set_view_dropout(self, p_drop: dict[str, float], p_feat: dict[str, float]) -> None:
        """Set the view-dropout and feature-dropout probabilities (keys ``fbank``/``ssl``)."""
        self.view_dropout.set(p_drop, p_feat)

    def _stack_probs(self, c: str, h: dict[str, Tensor], present: Tensor, like: Tensor) -> Tensor:
        """Softmax over the slots [fbank, ssl, (bias)] of stack ``c`` -> [B, T, slots, width]."""
        bsz, t, _ = like.shape
        width = 1 if self.granularity == "frame" else self.d_model
        logits = []
        for i, v in enumerate(VIEWS):
            if v in h:
                x = h[v].detach() if self.detach_inputs else h[v]
                z = self.scorers[c][v](x)  # B x T x width
            else:
                z = like.new_zeros(bsz, t, width)
            absent = ~present[:, i]
            logits.append(z.masked_fill(absent[:, None, None], float("-inf")))
        if self.bias is not None:
            logits.append(self.bias[c].to(like.dtype).expand(bsz, t, width))
        z = torch.stack(logits, dim=2) / self.temperature  # B x T x slots x width
        return torch.softmax(z.float(), dim=2).to(like.dtype)

    def forward(self, h: dict[str, Tensor], present: Tensor, pad_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        like = next(iter(h.values()))
        present = present.to(torch.bool)
        missing = [i for i, v in enumerate(VIEWS) if v not in h and bool(present[:, i].any())]
        if missing:
            raise ValueError(f"view {VIEWS[missing[0]]!r} is marked present but no features were given")
        if not bool(present.any(dim=1).all()):
            raise ValueError("every utterance must keep at least one view")
        stacks = ("fbank", "ssl") if self.sharing == "per_view" else ("shared", "shared")
        probs = {c: self._stack_probs(c, h, present, like) for c in set(stacks)}
        out = torch.zeros_like(like)
        alphas: dict[str, Tensor] = {}
        for i, (v, c) in enumerate(zip(VIEWS, stacks)):
            a = probs[c][:, :, i]  # B x T x width
            alphas[v] = a.mean(-1)
            if v in h:
                out = out + a * h[v]
        if self.bias is not None:
            alphas["bias"] = (1.0 - alphas["fbank"] - alphas["ssl"]) if self.sharing == "shared" else (
                0.5 * (probs["fbank"][:, :, 2] + probs["ssl"][:, :, 2]).mean(-1)
            )
        if self.residual == "fbank" and "fbank" in h:
            out = out + h["fbank"] * present[:, 0, None, None].to(out.dtype)
        return out.masked_fill(pad_mask[..., None], 0.0), alphas


class ConcatFusion(nn.Module):
    """``concat`` baseline: [h_f; h_s] -> Linear(2d, d); an absent view is zeroed (spec 3.6 "For fusion: concat")."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * d_model, d_model)
        self.view_dropout = ViewDropout()

    def set_view_dropout(self, p_drop: dict[str, float], p_feat: dict[str, float]) -> None:
        self.view_dropout.set(p_drop, p_feat)

    def forward(self, h: dict[str, Tensor], present: Tensor, pad_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        like = next(iter(h.values()))
        parts = []
        for i, v in enumerate(VIEWS):
            x = h.get(v, torch.zeros_like(like))
            parts.append(x * present[:, i, None, None].to(x.dtype))
        out = self.proj(torch.cat(parts, dim=-1))
        return out.masked_fill(pad_mask[..., None], 0.0), {}


class SingleViewFusion(nn.Module):
    """``fbank``/``ssl`` single-view baselines: the output is that view's features; the other input is ignored."""

    def __init__(self, view: Literal["fbank", "ssl"]) -> None:
        super().__init__()
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.view = view
        self.view_dropout = ViewDropout()

    def set_view_dropout(self, p_drop: dict[str, float], p_feat: dict[str, float]) -> None:
        """View dropout does not apply to a single view; feature dropout does."""
        self.view_dropout.set({}, p_feat)

    def forward(self, h: dict[str, Tensor], present: Tensor, pad_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.view not in h:
            raise ValueError(f"fusion={self.view!r} needs the {self.view!r} view")
        return h[self.view].masked_fill(pad_mask[..., None], 0.0), {}


def build_fusion(
    fusion: Literal["gated", "concat", "fbank", "ssl"], d_model: int, **gate_kwargs: object
) -> GSGNFusion | ConcatFusion | SingleViewFusion:
    """The fusion module for the ``fusion`` switch of :class:`lit_models.speech_fusion.SpeechFusionST`.

    Raises:
        ValueError: unknown ``fusion``.
    """
    if fusion == "gated":
        return GSGNFusion(d_model, **gate_kwargs)  # type: ignore[arg-type]
    if fusion == "concat":
        return ConcatFusion(d_model)
    if fusion in ("fbank", "ssl"):
        return SingleViewFusion(fusion)
    raise ValueError(f"fusion must be one of gated, concat, fbank, ssl; got {fusion!r}")
