"""shard_context: the rank layout a self-sharding DataModule uses, and the clear error when Lightning would inject a
DistributedSampler on top."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules.resumable import shard_context


def _trainer(world_size: int, use_distributed_sampler: bool) -> SimpleNamespace:
    connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
    return SimpleNamespace(
        world_size=world_size, global_rank=1, current_epoch=3, _accelerator_connector=connector
    )


def test_shard_context_reads_the_trainer() -> None:
    assert shard_context(None, "X") == (1, 0, 0)
    assert shard_context(_trainer(2, use_distributed_sampler=False), "X") == (2, 1, 3)
    assert shard_context(_trainer(1, use_distributed_sampler=True), "X") == (1, 1, 3)  # one rank: nothing to shard


def test_shard_context_refuses_lightnings_distributed_sampler() -> None:
    with pytest.raises(ValueError, match=r"InstructionDataModule shards .* 2 ranks .*use_distributed_sampler=false"):
        shard_context(_trainer(2, use_distributed_sampler=True), "InstructionDataModule")
