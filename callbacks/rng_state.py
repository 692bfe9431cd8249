"""Save and restore the global random number generators with every checkpoint, for exact resume.

Lightning checkpoints do not carry the torch/numpy/Python RNG states, so dropout masks after a resume would differ
from an uninterrupted run. :class:`RNGStateCheckpoint` stores the states of every rank and restores them at
``on_train_start`` (after the sanity check, which must not consume randomness). ``train.py`` adds it to every fit.
DataLoaders must use their own ``generator`` so that creating an iterator does not draw from the global RNG.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback


class RNGStateCheckpoint(Callback):
    """Checkpoint the global RNG states of each rank; restore them when training resumes."""

    def __init__(self) -> None:
        self._pending: dict[int, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _to_safe(_collect_rng_states(include_cuda=True))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"per_rank": dict(enumerate(gathered))}
        return {"per_rank": {0: states}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("per_rank")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._pending:
            return
        states = self._pending.get(trainer.global_rank)
        if states is None:
            raise ValueError(
                f"the checkpoint holds RNG states for ranks {sorted(self._pending)} but this is rank "
                f"{trainer.global_rank}: resume with the same number of processes for an exact resume"
            )
        _set_rng_states(_from_safe(states))
        self._pending = None


def _to_safe(states: dict[str, Any]) -> dict[str, Any]:
    """Make the numpy state loadable with ``torch.load(weights_only=True)`` (tensors and primitives only)."""
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))
    return out


def _from_safe(states: dict[str, Any]) -> dict[str, Any]:
    out = dict(states)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, gauss)
    return out
