"""Multi-stage view/feature dropout schedule for multi-view speech models (spec ``speech_fusion.md`` section 3.5).

Stages switch on epoch (or global-step) boundaries; each stage sets the per-utterance view-drop probabilities
(``p_drop_ssl``, ``p_drop_fbank``) and the feature-dropout rates (``p_feat_ssl``, ``p_feat_fbank``). Stage ``k`` is
active while ``boundaries[k-1] <= t < boundaries[k]`` (``t`` = current epoch or global step). Default (paper scale):
boundaries [8, 20] epochs; warm start (no dropout), decouple (drop SSL 0.3, SSL feature dropout 0.1), robust (0.15
each, feature dropout 0.1 each).

Module protocol: ``set_view_dropout(p_drop: {"fbank", "ssl"}, p_feat: {"fbank", "ssl"})`` and optionally
``view_dropout_stats() -> {"fbank": frac, "ssl": frac}`` (realised fractions of the last batch).
The stage is recomputed from the trainer's counters at every training batch, and ``{stage, boundaries, unit}`` is
saved in checkpoints, so a resumed run continues in the right stage (a changed schedule is reported on resume).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["DEFAULT_STAGES", "MultiStageDropout"]

_KEYS = ("p_drop_ssl", "p_drop_fbank", "p_feat_ssl", "p_feat_fbank")
DEFAULT_STAGES: list[dict[str, float]] = [
    {"p_drop_ssl": 0.0, "p_drop_fbank": 0.0, "p_feat_ssl": 0.0, "p_feat_fbank": 0.0},
    {"p_drop_ssl": 0.3, "p_drop_fbank": 0.0, "p_feat_ssl": 0.1, "p_feat_fbank": 0.0},
    {"p_drop_ssl": 0.15, "p_drop_fbank": 0.15, "p_feat_ssl": 0.1, "p_feat_fbank": 0.1},
]


class MultiStageDropout(Callback):
    """Apply a staged view-dropout schedule to a multi-view model (module docstring).

    Args:
        unit: ``epoch`` or ``step`` (global optimiser steps).
        boundaries: sorted stage starts, ``len(stages) - 1`` of them.
        stages: per stage, the four probabilities ``p_drop_ssl``, ``p_drop_fbank``, ``p_feat_ssl``, ``p_feat_fbank``
            (missing keys are 0).

    Logs ``dropout/stage``, ``dropout/p_drop_ssl``, ``dropout/p_drop_fbank``, ``dropout/p_feat_ssl``,
    ``dropout/p_feat_fbank`` and the realised ``dropout/frac_dropped_ssl``, ``dropout/frac_dropped_fbank``.

    Raises:
        ValueError: ``len(stages) != len(boundaries) + 1``, unsorted or negative boundaries, an unknown key, a
            probability outside [0, 1] or ``p_drop_ssl + p_drop_fbank > 1`` (naming the stage and key).
    """

    def __init__(
        self,
        unit: Literal["epoch", "step"] = "epoch",
        boundaries: list[int] = [8, 20],  # noqa: B006
        stages: list[dict[str, float]] = DEFAULT_STAGES,
    ) -> None:
        super().__init__()
        if unit not in ("epoch", "step"):
            raise ValueError(f"MultiStageDropout.unit must be 'epoch' or 'step', got {unit!r}")
        if len(stages) != len(boundaries) + 1:
            raise ValueError(f"MultiStageDropout: len(stages)={len(stages)} must be len(boundaries)+1="
                             f"{len(boundaries) + 1}")
        if list(boundaries) != sorted(boundaries) or len(set(boundaries)) != len(boundaries) or any(
            b < 0 for b in boundaries
        ):
            raise ValueError(f"MultiStageDropout.boundaries must be strictly increasing and >= 0, got {boundaries}")
        clean = []
        for k, stage in enumerate(stages):
            unknown = set(stage) - set(_KEYS)
            if unknown:
                raise ValueError(f"MultiStageDropout.stages[{k}]: unknown key(s) {sorted(unknown)}; use {_KEYS}")
            s = {key: float(stage.get(key, 0.0)) for key in _KEYS}
            for key, p in s.items():
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"MultiStageDropout.stages[{k}].{key} must be in [0, 1], got {p}")
            if s["p_drop_ssl"] + s["p_drop_fbank"] > 1.0 + 1e-9:
                raise ValueError(f"MultiStageDropout.stages[{k}]: p_drop_ssl + p_drop_fbank must be <= 1, got "
                                 f"{s['p_drop_ssl']} + {s['p_drop_fbank']}")
            clean.append(s)
        self.unit, self.boundaries, self.stages = unit, [int(b) for b in boundaries], clean
        self.stage = -1
        self._t = 0
        self._restored: dict[str, Any] | None = None

    def stage_at(self, t: int) -> int:
        """Stage index active at epoch/step ``t``."""
        return sum(1 for b in self.boundaries if t >= b)

    def _counter(self, trainer: Trainer) -> int:
        return int(trainer.current_epoch if self.unit == "epoch" else trainer.global_step)

    def _apply(self, pl_module: LightningModule, stage: int) -> None:
        s = self.stages[stage]
        if not hasattr(pl_module, "set_view_dropout"):
            raise ValueError(f"MultiStageDropout needs a model with set_view_dropout(p_drop, p_feat); "
                             f"{type(pl_module).__name__} has none")
        pl_module.set_view_dropout(
            {"ssl": s["p_drop_ssl"], "fbank": s["p_drop_fbank"]}, {"ssl": s["p_feat_ssl"], "fbank": s["p_feat_fbank"]}
        )
        if stage != self.stage:
            rank_zero_info(f"[MultiStageDropout] stage {stage} from {self.unit} {self._t}: {s}")
        self.stage = stage

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is not None and (
            self._restored.get("boundaries") != self.boundaries or self._restored.get("unit") != self.unit
        ):
            rank_zero_info(f"[MultiStageDropout] the checkpoint's schedule {self._restored} differs from the "
                           f"configured one (unit={self.unit}, boundaries={self.boundaries}); using the configured one")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._t = self._counter(trainer)
        self._apply(pl_module, self.stage_at(self._t))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer._logger_connector.should_update_logs:  # Lightning's log_every_n_steps
            return
        s = self.stages[self.stage]
        metrics = {"dropout/stage": float(self.stage), **{f"dropout/{k}": v for k, v in s.items()}}
        if hasattr(pl_module, "view_dropout_stats"):
            metrics.update({f"dropout/frac_dropped_{k}": float(v) for k, v in pl_module.view_dropout_stats().items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if hasattr(pl_module, "set_view_dropout"):  # evaluation after fit never drops views
            pl_module.set_view_dropout({"ssl": 0.0, "fbank": 0.0}, {"ssl": 0.0, "fbank": 0.0})

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "boundaries": list(self.boundaries), "unit": self.unit}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.stage = int(state_dict.get("stage", -1))
