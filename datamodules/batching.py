"""Token-budget batching (fairseq ``--max-tokens``): length-sorted batches, shuffled per epoch, sharded over ranks.

Generic over any dataset that can give per-example source and target lengths (text or speech frames); used with
:class:`datamodules.resumable.ResumableDataLoader` for exact mid-epoch resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler", "TokenBatchSampler"]


class _EpochForwarder:
    """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (not on the batch sampler itself) at the
    start of every epoch; this stand-in forwards that call to the batch sampler."""

    def __init__(self, owner: ResumableBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class ResumableBatchSampler(Sampler[list[int]]):
    """Base of the project's batch samplers: an epoch-seeded order, DDP sharding, exact mid-epoch resume.

    A subclass defines :meth:`epoch_batches` (every rank's batches of an epoch, a function of ``seed`` and the epoch
    only) and :meth:`num_batches` (their count, the same every epoch). This class shards them: with ``even_shards``
    (training) the epoch's batch list wraps around to a multiple of ``num_replicas`` (a few batches are seen twice,
    as with ``DistributedSampler``) so every rank runs the same number of steps; without it (evaluation) no batch is
    repeated unless there are fewer batches than ranks. Rank ``r`` takes ``batches[r::num_replicas]``.

    Resume: ``start_batch`` skips that many of this rank's batches in the next iteration only; ``len()`` still reports
    the full per-rank count, matching the progress counters a restored trainer resumes from. Lightning calls
    ``set_epoch`` every epoch through the ``sampler`` attribute. Used with
    :class:`datamodules.resumable.ResumableDataLoader`.

    Raises:
        ValueError: ``rank`` outside ``[0, num_replicas)`` or a negative ``start_batch``.
    """

    def __init__(
        self,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
        even_shards: bool = True,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.even_shards = bool(even_shards)
        self.sampler = _EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next iteration's order."""
        self.epoch = int(epoch)

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches (every rank's) of ``epoch`` (default: the current one), before sharding."""
        raise NotImplementedError

    def num_batches(self) -> int:
        """Number of batches of an epoch before sharding (the same every epoch)."""
        return len(self.epoch_batches())

    def _total(self, n: int) -> int:
        return math.ceil(n / self.num_replicas) * self.num_replicas if self.even_shards else max(n, self.num_replicas)

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` in iteration order, ignoring ``start_batch``."""
        batches = self.epoch_batches(epoch)
        n = len(batches)
        if self.num_replicas == 1 or n == 0:
            return batches
        padded = [batches[i % n] for i in range(self._total(n))]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        skip, self.start_batch = self.start_batch, 0  # the resume offset applies to one iteration only
        yield from batches[skip:]

    def __len__(self) -> int:
        n = self.num_batches()
        if self.num_replicas == 1 or n == 0:
            return n
        return len(range(self.rank, self._total(n), self.num_replicas))


class TokenBatchSampler(ResumableBatchSampler):
    """Length-sorted token-budget batches, shuffled per epoch, sharded across DDP ranks, resumable mid-epoch.

    Batches are fixed once: example indices are sorted by (source length, target length), ties by index (stable;
    fairseq sorts by target then source, we follow the spec's source-first order, which packs the encoder side
    tighter), and each batch is filled while ``max_len_in_batch * n_sentences <= max_tokens`` where an example's
    length is ``max(src_len, tgt_len) + 1`` (the eos/bos the collate function adds), so the padded size of every
    batch respects the budget. Each epoch, the *order of batches* is shuffled (when ``shuffle``) with a
    ``torch.Generator`` seeded with ``seed + epoch``; the composition of the batches never changes.

    Sharding: with ``even_shards`` (training) the epoch's batch list is padded to a multiple of ``num_replicas`` by
    wrapping around to its start (a few batches are seen twice in that epoch, as with ``DistributedSampler``), so
    every rank runs the same number of steps; rank ``r`` takes ``batches[r::num_replicas]``. Without
    ``even_shards`` (evaluation) no batch is duplicated and ranks may get one batch more or less than each other;
    only when there are fewer batches than ranks do batches wrap around so that every rank has at least one (then
    de-duplicate predictions by ``id``).

    Resume: ``start_batch`` skips the first ``start_batch`` batches of this rank's order in the next iteration only
    (exact mid-epoch resume); ``len()`` still reports the full per-rank count, matching the progress counters a
    restored trainer resumes from. Lightning calls ``set_epoch`` each epoch through the ``sampler`` attribute.

    Args:
        src_lengths: source token counts per example, without special tokens (shape [N]).
        tgt_lengths: target token counts per example, without special tokens, or None (source-only data).
        max_tokens: budget of padded tokens per batch (max length in batch times number of sentences).
        shuffle: shuffle the batch order every epoch.
        seed: base seed of the shuffle.
        epoch: initial epoch (``set_epoch`` changes it).
        num_replicas: number of DDP ranks.
        rank: this process's rank.
        start_batch: batches of this rank's epoch order to skip once (mid-epoch resume).
        even_shards: wrap around so that every rank gets the same number of batches (see above).

    Raises:
        ValueError: lengths of different sizes, ``max_tokens < 1``, ``rank`` outside ``[0, num_replicas)``,
            negative ``start_batch``, or an example longer than ``max_tokens`` by itself (filter those first; the
            message gives its index).
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray | None,
        max_tokens: int,
        shuffle: bool = False,
        seed: int = 1,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
        even_shards: bool = True,
    ) -> None:
        src = np.asarray(src_lengths, dtype=np.int64).reshape(-1)
        tgt = np.zeros_like(src) if tgt_lengths is None else np.asarray(tgt_lengths, dtype=np.int64).reshape(-1)
        if src.shape != tgt.shape:
            raise ValueError(f"src_lengths has {src.size} entries but tgt_lengths has {tgt.size}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        super().__init__(seed, epoch, num_replicas, rank, start_batch, even_shards)
        self.max_tokens = int(max_tokens)
        self.shuffle = bool(shuffle)
        self.num_examples = int(src.size)
        self.batches = self._make_batches(src, tgt, self.max_tokens)

    @staticmethod
    def _make_batches(src: np.ndarray, tgt: np.ndarray, max_tokens: int) -> list[list[int]]:
        order = np.lexsort((tgt, src))  # primary key src, then tgt; lexsort is stable (ties by index)
        sizes = np.maximum(src, tgt) + 1
        batches: list[list[int]] = []
        current: list[int] = []
        current_max = 0
        for idx, size in zip(order.tolist(), sizes[order].tolist()):
            if size > max_tokens:
                raise ValueError(
                    f"example {idx} needs {size} tokens (max(src, tgt) + 1), more than max_tokens={max_tokens}"
                )
            new_max = max(current_max, size)
            if current and new_max * (len(current) + 1) > max_tokens:
                batches.append(current)
                current, new_max = [], size
            current.append(idx)
            current_max = new_max
        if current:
            batches.append(current)
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches (every rank's) in the order of ``epoch`` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.shuffle or len(self.batches) < 2:
            return [list(b) for b in self.batches]
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.batches), generator=generator).tolist()
        return [list(self.batches[i]) for i in perm]

    def num_batches(self) -> int:
        return len(self.batches)
