"""Exact mid-epoch resume for map-style datasets batched by a batch sampler.

Lightning saves the ``state_dict`` of every training DataLoader that has one (``fit_loop`` "combined_loader") and
calls ``load_state_dict`` on the new loader when resuming. :class:`ResumableDataLoader` stores the epoch and the
number of batches the training loop has *processed* (read from the trainer, so the fetcher's prefetch does not count)
and, on resume, tells its batch sampler to skip them. The batch sampler must have ``start_batch`` (skipped once, at the
next iteration) and ``set_epoch``; its order must depend only on (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose position inside the epoch survives a checkpoint.

    Args:
        *args, **kwargs: as for DataLoader; ``batch_sampler`` is required.
        progress: returns (epoch, batches processed in this epoch) of the running training loop.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        # A dedicated generator: creating an iterator must not draw from the global RNG (exact resume).
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None or not hasattr(self.batch_sampler, "start_batch"):
            raise ValueError("ResumableDataLoader needs a batch_sampler with a start_batch attribute")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batches"}: where the training loop is when the checkpoint is written."""
        if self.progress is None:
            return {"epoch": 0, "batches": 0}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches already processed in the saved epoch (an epoch already finished restarts at 0)."""
        batches = int(state.get("batches", 0))
        per_epoch = len(self.batch_sampler)
        self.batch_sampler.set_epoch(int(state.get("epoch", 0)))
        self.batch_sampler.start_batch = batches if batches < per_epoch else 0


def trainer_progress(trainer: Any) -> Callable[[], tuple[int, int]]:
    """The ``progress`` callable for a Lightning trainer: (current epoch, batches processed in it)."""

    def progress() -> tuple[int, int]:
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    return progress


def shard_context(trainer: Any, owner: str) -> tuple[int, int, int]:
    """``(world_size, global_rank, current_epoch)`` for a DataModule whose batch sampler shards itself over ranks;
    ``(1, 0, 0)`` without a trainer.

    Raises:
        ValueError: more than one rank while the trainer's ``use_distributed_sampler`` is on (Lightning cannot inject
            its DistributedSampler into a custom batch sampler); the message names ``owner`` and the config key.
    """
    if trainer is None:
        return 1, 0, 0
    replicas = int(trainer.world_size)
    connector = getattr(trainer, "_accelerator_connector", None)
    if replicas > 1 and getattr(connector, "use_distributed_sampler", False):
        raise ValueError(
            f"{owner} shards its batches across the {replicas} ranks itself: set trainer.use_distributed_sampler=false "
            "(Lightning cannot inject a DistributedSampler into a custom batch sampler)"
        )
    return replicas, int(trainer.global_rank), int(trainer.current_epoch)
