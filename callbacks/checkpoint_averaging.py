"""Average the last N checkpoints at the end of ``fit`` (fairseq ``scripts/average_checkpoints.py`` semantics).

Spec: ``../shared/methods/pcformer.md`` section 4 (``CheckpointAveraging``). Generic for every method: it averages the
``state_dict`` of Lightning checkpoints, so it needs :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with
``save_top_k=-1`` (or >= ``last_n``) writing step checkpoints.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors (accumulated in float64, cast back); other tensors from the last.

    Args:
        state_dicts: oldest first, newest last; identical key sets, shapes and dtypes.

    Returns:
        The averaged state dict.

    Raises:
        ValueError: naming the first key that is missing, extra, or differs in shape or dtype.
    """
    if not state_dicts:
        raise ValueError("no state dicts to average")
    newest = state_dicts[-1]
    for i, sd in enumerate(state_dicts[:-1]):
        missing, extra = set(newest) - set(sd), set(sd) - set(newest)
        if missing or extra:
            key = sorted(missing or extra)[0]
            what = "missing" if missing else "unexpected"
            raise ValueError(f"checkpoint {i} has a {what} key {key!r} compared with the newest checkpoint")
        for key, ref in newest.items():
            t = sd[key]
            if t.shape != ref.shape:
                raise ValueError(f"key {key!r}: shape {tuple(t.shape)} differs from the newest {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise ValueError(f"key {key!r}: dtype {t.dtype} differs from the newest {ref.dtype}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in newest.items():
        if ref.is_floating_point() or ref.is_complex():
            acc = sum(sd[key].to(torch.float64 if ref.is_floating_point() else torch.complex128) for sd in state_dicts)
            out[key] = (acc / len(state_dicts)).to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


class CheckpointAveraging(Callback):
    """At ``on_fit_end``, average the newest ``last_n`` checkpoints into ``output_name`` and optionally load it.

    Args:
        last_n: how many of the newest checkpoints to average (>= 1).
        checkpoint_dir: where the checkpoints are; default the ``dirpath`` of the trainer's ModelCheckpoint.
        output_name: file name of the averaged checkpoint, written in ``checkpoint_dir``.
        load_into_model: load the averaged weights into the model, so a following ``trainer.test`` uses them.
        sort_by: ``step`` (the stored ``global_step``) or ``mtime`` to order checkpoints.

    ``output_name`` is ignored, and ``last*.ckpt`` counts only for a step no other checkpoint holds. The output keeps the
    newest checkpoint's metadata (hyper-parameters, loops, optimizer state) with the averaged ``state_dict``.

    Raises:
        ValueError: ``last_n < 1``; checkpoints whose key sets, shapes or dtypes differ (naming the key).
        RuntimeError: no checkpoint in the directory (naming it). Fewer than ``last_n`` only warns.
    """

    def __init__(
        self,
        last_n: int = 5,
        checkpoint_dir: str | None = None,
        output_name: str = "averaged.ckpt",
        load_into_model: bool = True,
        sort_by: Literal["step", "mtime"] = "step",
    ) -> None:
        if last_n < 1:
            raise ValueError(f"CheckpointAveraging: last_n must be >= 1, got {last_n}")
        if sort_by not in ("step", "mtime"):
            raise ValueError(f"CheckpointAveraging: sort_by must be 'step' or 'mtime', got {sort_by!r}")
        self.last_n, self.checkpoint_dir, self.output_name = last_n, checkpoint_dir, output_name
        self.load_into_model, self.sort_by = load_into_model, sort_by
        self.output_path: Path | None = None

    def _directory(self, trainer: L.Trainer) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if ckpt is None or ckpt.dirpath is None:
            raise RuntimeError("CheckpointAveraging needs checkpoint_dir or a ModelCheckpoint callback with a dirpath")
        return Path(ckpt.dirpath)

    def select(self, directory: Path) -> list[tuple[Path, dict[str, Any]]]:
        """The newest ``last_n`` checkpoints in ``directory``, oldest first, loaded on the CPU."""
        # last*.ckpt takes part only when no step checkpoint holds the same step (e.g. max_steps is not a multiple
        # of every_n_train_steps): the dedup below keeps the step file over a last.ckpt of the same step.
        files = [p for p in directory.glob("*.ckpt") if p.name != self.output_name]
        if not files:
            raise RuntimeError(f"CheckpointAveraging: no checkpoints to average in {directory}")
        loaded = [(p, torch.load(p, map_location="cpu", weights_only=False)) for p in files]
        if self.sort_by == "step":
            loaded.sort(key=lambda item: (item[1].get("global_step", -1), item[0].stat().st_mtime))
        else:
            loaded.sort(key=lambda item: item[0].stat().st_mtime)
        # Several files of the same step (e.g. an epoch-end and a step checkpoint) count once.
        unique: dict[int, tuple[Path, dict[str, Any]]] = {}
        for path, ckpt in loaded:
            step = ckpt.get("global_step", -1 - len(unique))
            # Same step twice: a step file beats last*.ckpt; otherwise the newer file (files are in mtime order
            # within a step) wins, so a rerun's "-v1" checkpoints replace an earlier run's.
            if step not in unique or unique[step][0].name.startswith("last") or not path.name.startswith("last"):
                unique[step] = (path, ckpt)
        if self.sort_by == "step":
            unique = dict(sorted(unique.items()))
        chosen = list(unique.values())[-self.last_n :]
        if len(chosen) < self.last_n:
            warnings.warn(
                f"CheckpointAveraging: only {len(chosen)} checkpoint(s) in {directory}, fewer than last_n="
                f"{self.last_n}; averaging what exists",
                stacklevel=2,
            )
        return chosen

    def average(self, directory: Path) -> tuple[Path, dict[str, Any], int]:
        """Average and write atomically. Returns (output path, averaged checkpoint, number averaged)."""
        chosen = self.select(directory)
        averaged = dict(chosen[-1][1])
        averaged["state_dict"] = average_state_dicts([ckpt["state_dict"] for _, ckpt in chosen])
        averaged["averaged_from"] = [str(p) for p, _ in chosen]
        out = directory / self.output_name
        tmp = out.with_suffix(".tmp")
        torch.save(averaged, tmp)
        tmp.replace(out)
        return out, averaged, len(chosen)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = self._directory(trainer)
        if trainer.is_global_zero:
            out, averaged, n = self.average(directory)
            rank_zero_info(f"CheckpointAveraging: averaged {n} checkpoints into {out}")
            for logger in trainer.loggers:
                logger.log_metrics({"ckpt_avg/n_averaged": n}, step=trainer.global_step)
        trainer.strategy.barrier("checkpoint_averaging")
        self.output_path = directory / self.output_name
        if self.load_into_model:
            ckpt = torch.load(self.output_path, map_location="cpu", weights_only=False)
            pl_module.load_state_dict(ckpt["state_dict"])
