"""Token-level loss normalisation over a whole optimiser update, shared by every model that trains on a summed loss.

A ``training_step`` returns the loss SUMMED over its target tokens and calls :meth:`TokenSumLoss.count_tokens`; the
mixin's ``on_before_optimizer_step`` then divides the gradients by the number of target tokens of the whole update
(all accumulated micro-batches on all ranks), fairseq's ``sample_size``. Batch 8 x 1, 4 x 2 and 2 ranks x 4 then give
identical updates, which a per-micro-batch mean does not when micro-batches hold different numbers of tokens.
It also keeps a tokens/s window between logging steps.
"""

from __future__ import annotations

import time

import torch


class TokenSumLoss:
    """Mixin for LightningModules (see module docstring). Call :meth:`count_tokens` once per training micro-batch."""

    _update_ntokens: int = 0
    _window_tokens: int = 0
    _window_start: float | None = None

    def count_tokens(self, ntokens: int) -> None:
        """Add a micro-batch's number of supervised tokens to the current update and the throughput window."""
        self._update_ntokens += int(ntokens)
        self._window_tokens += int(ntokens)

    def tokens_per_s(self) -> float | None:
        """Training tokens per second since the previous call (validation excluded); restarts the window."""
        now = time.perf_counter()
        rate = None
        if self._window_start is not None:
            rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens = now, 0
        return rate

    def on_train_start(self) -> None:
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def on_validation_end(self) -> None:
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the global token count of the update.

        Lightning divides each micro-batch loss by ``accumulate_grad_batches`` and DDP averages gradients over ranks;
        undoing both and dividing by the global token count gives the token mean of the whole update. Runs before
        Lightning's gradient clipping.
        """
        ntokens = torch.tensor(float(self._update_ntokens), device=self.device)
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world > 1:
            ntokens = trainer.strategy.reduce(ntokens, reduce_op="sum")
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        scale = accumulate * world / ntokens.clamp(min=1.0)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        self._update_ntokens = 0
