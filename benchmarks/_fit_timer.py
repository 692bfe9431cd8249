"""A Lightning callback used by ``benchmarks/pcformer_vs_vanilla.py`` to split the wall time of a ``train.py fit`` run.

It is added to a run from the command line (``--trainer.callbacks '[..., {"class_path":
"benchmarks._fit_timer.FitTimer", "init_args": {"output": ".../timing.json"}}]'``), so the project's CLI runs exactly
as usual; ``train.py`` puts the repository root on ``sys.path``, which makes ``benchmarks`` importable.

What it writes (JSON, rewritten at the end of fit and again at the end of test):

- ``params`` / ``params_trainable``: parameter counts of the LightningModule at the start of fit;
- ``steps``: training batches seen in this fit; ``train_step_s``: summed time from ``on_train_batch_start`` to
  ``on_train_batch_end`` (forward, backward, gradient scaling, optimizer step; not data loading, checkpoint writing
  or validation); ``train_step_s_median``: median of the per-step times;
- ``val_s``: summed time of the validation runs inside fit (loss + beam search + SacreBLEU), ``val_runs``;
- ``sanity_s``: time of the sanity-check validation (0 when ``num_sanity_val_steps=0``);
- ``fit_s``: ``on_fit_start`` to the end of ``on_fit_end`` of the callbacks listed before this one (put it last to
  include checkpoint averaging); ``fit_other_s = fit_s - train_step_s - val_s - sanity_s`` (data loading, checkpoint
  writing and averaging, Lightning's loop);
- ``test_s``: the test after fit (averaged checkpoint), when there is one.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class FitTimer(Callback):
    """Times training steps, validation and test of one run and writes them to ``output`` (see module docstring).

    Args:
        output: path of the JSON file to write (its directory is created).
    """

    def __init__(self, output: str) -> None:
        self.output = Path(output)
        self.data: dict[str, Any] = {
            "params": None,
            "params_trainable": None,
            "steps": 0,
            "train_step_s": 0.0,
            "val_s": 0.0,
            "val_runs": 0,
            "sanity_s": 0.0,
            "fit_s": None,
            "fit_other_s": None,
            "test_s": None,
        }
        self._step_times: list[float] = []
        self._t_fit = self._t_step = self._t_val = self._t_test = 0.0

    def _write(self) -> None:
        if self._step_times:
            self.data["train_step_s_median"] = statistics.median(self._step_times)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_name(f".{self.output.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.output)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data["params"] = sum(p.numel() for p in pl_module.parameters())
        self.data["params_trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._t_fit = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t_step = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dt = time.perf_counter() - self._t_step
        self._step_times.append(dt)
        self.data["steps"] += 1
        self.data["train_step_s"] += dt

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dt = time.perf_counter() - self._t_val
        if trainer.sanity_checking:
            self.data["sanity_s"] += dt
        elif trainer.state.fn == "fit":
            self.data["val_s"] += dt
            self.data["val_runs"] += 1

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_s = time.perf_counter() - self._t_fit
        self.data["fit_s"] = fit_s
        self.data["fit_other_s"] = fit_s - self.data["train_step_s"] - self.data["val_s"] - self.data["sanity_s"]
        if trainer.is_global_zero:
            self._write()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_test = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data["test_s"] = time.perf_counter() - self._t_test
        if trainer.is_global_zero:
            self._write()
