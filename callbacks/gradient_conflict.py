"""Gradient conflict between the views of a multi-view model, measured during training (spec ``speech_fusion.md``
section 3.6).

After optimiser steps 1, 1 + N, 1 + 2N, ... (N = ``every_n_steps``; in ``on_train_batch_end``) a probe sub-batch S
is taken: the leading utterances whose FBank frames sum to at most ``max_frame_fraction`` of the batch's (at least
one). With dropout off (eval mode, restored afterwards, also on errors) two single-view losses are computed,
``L_f = L(S; {fbank})`` and ``L_s = L(S; {ssl})``, and ``g_v = torch.autograd.grad(L_v, Theta, allow_unused=True)``
(unused -> zeros) over the shared parameters Theta (everything after the fusion). ``.grad``, the optimiser state and
the RNG state are not touched. Per group (flattened, fp32): ``cos = <g_f, g_s> / max(|g_f| |g_s|, 1e-12)``, plus the
norm ratio ``|g_s| / |g_f|`` over all shared parameters. Cost: two forward+backward passes on at most half the step's
frames each, i.e. at most one extra training step's forward+backward on measured steps.

Module protocol: ``views() -> list[str]``, ``loss_on(batch, views: set[str]) -> Tensor`` and
``shared_parameter_groups() -> dict[str, list[Parameter]]``.

Logs (directly to every logger, at the measured step) ``train/grad_cos_fbank_ssl`` (all shared parameters),
``train/grad_cos_fbank_ssl/<group>``, ``train/grad_norm_ratio_ssl_fbank`` and ``train/grad_cos_neg_frac`` (share of
groups with cos < 0). Rank zero only under DDP (the model is called directly, not through the DDP wrapper, so no
collective runs).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

__all__ = ["GradientConflictMonitor", "group_cosines", "probe_batch"]


def probe_batch(batch: dict[str, Any], max_frame_fraction: float) -> dict[str, Any]:
    """The leading utterances of ``batch`` whose frames (``fbank_lengths``, else ``ssl_lengths``) sum to at most
    ``max_frame_fraction`` of the batch's total, at least one; tensors with a leading batch dim are sliced and
    ``ntokens`` recomputed from ``target_lengths`` when present."""
    lengths = batch.get("fbank_lengths", batch.get("ssl_lengths"))
    bsz = int(lengths.size(0))
    budget = max_frame_fraction * float(lengths.sum())
    csum = torch.cumsum(lengths.float(), 0)
    n = max(1, int((csum <= budget + 1e-6).sum()))
    out = {k: (v[:n] if isinstance(v, Tensor) and v.dim() > 0 and v.size(0) == bsz else v) for k, v in batch.items()}
    if "target_lengths" in out:
        out["ntokens"] = int(out["target_lengths"].sum())
    return out


def group_cosines(
    grads_a: Sequence[Tensor | None], grads_b: Sequence[Tensor | None], params: Sequence[nn.Parameter],
    groups: dict[str, list[nn.Parameter]],
) -> dict[str, float]:
    """Cosine of the flattened fp32 gradients per group and over ``all`` parameters; ``None`` grads count as zeros.

    Returns:
        ``{group: cos, ..., "all": cos, "norm_ratio": |g_b| / max(|g_a|, 1e-12)}``.
    """
    index = {id(p): i for i, p in enumerate(params)}

    def flat(grads: Sequence[Tensor | None], members: list[nn.Parameter]) -> Tensor:
        parts = []
        for p in members:
            g = grads[index[id(p)]]
            parts.append((torch.zeros_like(p) if g is None else g).detach().float().reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def cos(a: Tensor, b: Tensor) -> float:
        return float(a.dot(b) / torch.clamp(a.norm() * b.norm(), min=1e-12))

    out = {name: cos(flat(grads_a, ps), flat(grads_b, ps)) for name, ps in groups.items() if ps}
    a, b = flat(grads_a, list(params)), flat(grads_b, list(params))
    out["all"] = cos(a, b)
    out["norm_ratio"] = float(b.norm() / torch.clamp(a.norm(), min=1e-12))
    return out


class GradientConflictMonitor(Callback):
    """Measure the cosine between the FBank-induced and the SSL-induced gradients of the shared parameters.

    Args:
        every_n_steps: measure after optimiser steps 1, 1 + every_n_steps, ... (``(global_step - 1) % N == 0``).
        max_frame_fraction: probe size as a fraction of the batch's FBank frames (0, 1].
        groups: ``per_layer`` (each group of ``shared_parameter_groups()`` plus ``all``) or ``all`` only.
        views: the two views compared.

    Raises:
        ValueError: ``every_n_steps < 1`` or ``max_frame_fraction`` outside (0, 1].
    """

    def __init__(self, every_n_steps: int = 100, max_frame_fraction: float = 0.5,
                 groups: Literal["per_layer", "all"] = "per_layer", views: tuple[str, str] = ("fbank", "ssl")) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"GradientConflictMonitor.every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 < max_frame_fraction <= 1.0:
            raise ValueError(f"GradientConflictMonitor.max_frame_fraction must be in (0, 1], got {max_frame_fraction}")
        if groups not in ("per_layer", "all"):
            raise ValueError(f"GradientConflictMonitor.groups must be per_layer or all, got {groups!r}")
        self.every_n_steps, self.max_frame_fraction, self.groups = every_n_steps, max_frame_fraction, groups
        self.views = tuple(views)
        self.enabled = True
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        have = set(pl_module.views()) if hasattr(pl_module, "views") else set()
        if not set(self.views) <= have or not hasattr(pl_module, "loss_on"):
            warnings.warn(
                f"GradientConflictMonitor disabled: the model uses views {sorted(have)}, not both of {self.views}",
                stacklevel=2,
            )
            self.enabled = False

    def measure(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Cosines for ``batch`` (probe taken inside); module modes and RNG states are restored afterwards."""
        probe = probe_batch(batch, self.max_frame_fraction) if any(
            k in batch for k in ("fbank_lengths", "ssl_lengths")) else batch
        groups = module.shared_parameter_groups()
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for ps in groups.values():
            for p in ps:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    params.append(p)
        groups = {k: [p for p in ps if p.requires_grad] for k, ps in groups.items()}
        modes = [(m, m.training) for m in module.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        module.eval()
        try:
            with torch.enable_grad():
                grads = []
                for v in self.views:
                    loss = module.loss_on(probe, {v})
                    grads.append(torch.autograd.grad(loss, params, allow_unused=True))
        finally:
            for m, flag in modes:
                m.training = flag
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        return group_cosines(grads[0], grads[1], params, groups if self.groups == "per_layer" else {})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or (trainer.global_step - 1) % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        res = self.measure(pl_module, batch)
        self.last = res
        a, b = self.views
        metrics = {f"train/grad_cos_{a}_{b}": res["all"], f"train/grad_norm_ratio_{b}_{a}": res["norm_ratio"]}
        per_group = {k: v for k, v in res.items() if k not in ("all", "norm_ratio")}
        for k, v in per_group.items():
            metrics[f"train/grad_cos_{a}_{b}/{k}"] = v
        if per_group:
            metrics["train/grad_cos_neg_frac"] = sum(v < 0 for v in per_group.values()) / len(per_group)
        # Written straight to the loggers at this step: Lightning's own throttle (log_every_n_steps) would drop
        # measurements that do not fall on a logging step.
        values = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
