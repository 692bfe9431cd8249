"""What every sequence-to-sequence LightningModule in the project shares: the fairseq loss and schedule, and evaluation.

:class:`Seq2SeqEvaluation` is a mixin for a LightningModule that implements ``generate(src_tokens) -> list[list[int]]``
and ``_eval_losses(batch, prefix)``. It provides ``validation_step``/``test_step``/``predict_step``, SacreBLEU on
detokenised hypotheses against the DataModule's raw references (``trainer.datamodule.references(split)``), a gather
of hypotheses over DDP ranks, and the files written by ``test`` and ``predict``.

Batch protocol (see :mod:`datamodules.translation`): ``src_tokens`` [B, S], ``target`` [B, T] (optional in predict),
``id`` [B] (index of each example in its split).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.aggregation import SumMetric

_SPLITS = {"val": "validation", "test": "test", "predict": "predict"}


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """fairseq's label-smoothed cross-entropy, summed over non-pad tokens.

    loss = (1 - eps) * nll + eps * mean_v(-log p_v) per token (Szegedy et al. 2016; spec ``pcformer.md`` section 3).

    Args:
        logits: [B, T, V] (any float dtype; computed in float32).
        target: [B, T] token ids, ``ignore_index`` at padding.
        epsilon: smoothing in [0, 1).

    Returns:
        (loss_sum, nll_sum): 0-dim tensors summed over the non-pad tokens.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))
    target = target.reshape(-1)
    mask = target.ne(ignore_index)
    nll = -lprobs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    smooth = -lprobs.mean(dim=-1)
    nll_sum = nll[mask].sum()
    loss_sum = (1.0 - epsilon) * nll_sum + epsilon * smooth[mask].sum()
    return loss_sum, nll_sum


def inverse_sqrt_lambda(lr: float, warmup_steps: int, warmup_init_lr: float) -> Callable[[int], float]:
    """fairseq's ``inverse_sqrt`` schedule as a factor of ``lr`` for :class:`torch.optim.lr_scheduler.LambdaLR`.

    step < warmup: linear from ``warmup_init_lr`` to ``lr``; afterwards ``lr * sqrt(warmup_steps / step)``.
    """

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (warmup_init_lr + step * (lr - warmup_init_lr) / warmup_steps) / lr
        return math.sqrt(max(warmup_steps, 1) / max(step, 1))

    return factor


def _gather_objects(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class Seq2SeqEvaluation:
    """Mixin: validation/test/predict loops with loss sums, beam search and SacreBLEU (spec section 7)."""

    hparams: Any
    tokenizer: Any
    trainer: Any

    # -------------------------------------------------------------- hooks the host module implements
    def generate(self, src_tokens: Tensor) -> list[list[int]]:  # pragma: no cover - interface
        raise NotImplementedError

    def _eval_losses(self, batch: dict[str, Tensor], prefix: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -------------------------------------------------------------- loss bookkeeping (DDP-safe through torchmetrics)
    def accumulate_eval_loss(self, prefix: str, loss_sum: Tensor, nll_sum: Tensor, ntokens: int) -> None:
        """Add one batch's summed loss, NLL and token count to the running totals of ``prefix`` (val/test)."""
        if not hasattr(self, "_eval_sums"):
            self._eval_sums: dict[str, list[SumMetric]] = {}
        if prefix not in self._eval_sums:
            self._eval_sums[prefix] = [SumMetric().to(loss_sum.device) for _ in range(3)]
        for metric, value in zip(self._eval_sums[prefix], (loss_sum, nll_sum, float(ntokens))):
            metric.update(torch.as_tensor(value, dtype=torch.float64, device=loss_sum.device))

    def _log_eval_losses(self, prefix: str) -> None:
        sums = getattr(self, "_eval_sums", {}).pop(prefix, None)
        if sums is None:
            return
        loss, nll, ntok = (m.compute().float() for m in sums)
        ntok = ntok.clamp(min=1.0)
        self.log(f"{prefix}/loss", loss / ntok, sync_dist=False)
        self.log(f"{prefix}/nll", nll / ntok, sync_dist=False)
        self.log(f"{prefix}/ppl", torch.exp((nll / ntok).clamp(max=50)), sync_dist=False)

    # -------------------------------------------------------------- hypotheses
    def _selected(self, ids: Tensor, split: str) -> Tensor:
        """Boolean mask of the batch examples whose BLEU is computed (``val_bleu_max_sentences``, fixed subset)."""
        limit = getattr(self.hparams, "val_bleu_max_sentences", None)
        if split != "validation" or not limit:
            return torch.ones_like(ids, dtype=torch.bool)
        n = len(self._references(split))
        if n <= limit:
            return torch.ones_like(ids, dtype=torch.bool)
        chosen = torch.linspace(0, n - 1, steps=limit).round().long().to(ids.device)
        return torch.isin(ids, chosen)

    def _collect(self, batch: dict[str, Tensor], split: str) -> None:
        keep = self._selected(batch["id"], split)
        if not keep.any():
            return
        hyps = self.generate(batch["src_tokens"][keep])
        store = self.__dict__.setdefault("_hyps", {})
        for i, tokens in zip(batch["id"][keep].tolist(), hyps):
            store[int(i)] = tokens

    def _gathered_hypotheses(self) -> list[tuple[int, str]]:
        local = self.__dict__.pop("_hyps", {})
        merged: dict[int, list[int]] = {}
        for part in _gather_objects(local):
            merged.update(part)
        return [(i, self.tokenizer.decode(merged[i])) for i in sorted(merged)]

    def _references(self, split: str) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "references"):
            raise RuntimeError(
                "BLEU needs the DataModule's raw references: the datamodule must implement references(split)"
            )
        return dm.references(split)

    def _bleu(self, prefix: str) -> sacrebleu.metrics.bleu.BLEUScore | None:
        split = _SPLITS[prefix]
        hyps = self._gathered_hypotheses()
        if not hyps:
            return None
        refs = self._references(split)
        metric = sacrebleu.metrics.BLEU(tokenize=getattr(self.hparams, "sacrebleu_tokenize", "13a"))
        score = metric.corpus_score([h for _, h in hyps], [[refs[i] for i, _ in hyps]])
        self.log(f"{prefix}/sacrebleu", float(score.score), sync_dist=False)
        if not getattr(self, "_signature_logged", False) and not self.trainer.sanity_checking:
            rank_zero_info(f"SacreBLEU signature: {metric.get_signature()}")
            self._signature_logged = True
        self._last_bleu = (score, str(metric.get_signature()), hyps)
        return score

    # -------------------------------------------------------------- Lightning hooks
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_losses(batch, "val")
        self._collect(batch, "validation")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_losses("val")
        self._bleu("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_losses(batch, "test")
        self._collect(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval_losses("test")
        score = self._bleu("test")
        if score is None:
            return
        _, signature, hyps = self._last_bleu
        if getattr(self.hparams, "compute_tok_bleu", False):
            refs = self._references("test")
            tok = sacrebleu.metrics.BLEU(tokenize="none", force=True)
            tok_score = tok.corpus_score(
                [_compound_split(h) for _, h in hyps], [[_compound_split(refs[i]) for i, _ in hyps]]
            )
            self.log("test/bleu_tok", float(tok_score.score), sync_dist=False)
        path = self._output_path("hypotheses_file", "hypotheses.test.txt")
        if self.trainer.is_global_zero:
            _write_lines(path, [h for _, h in hyps])
            rank_zero_info(f"test/sacrebleu = {score.score:.2f}  ({score})\n  signature: {signature}\n  hypotheses: {path}")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict[str, Any]]:
        hyps = self.generate(batch["src_tokens"])
        # An empty input line (only EOS) translates to an empty line.
        empty = batch["src_tokens"].ne(self.hparams.pad_id).sum(dim=1).le(1).tolist()
        hyps = [[] if e else h for e, h in zip(empty, hyps)]
        store = self.__dict__.setdefault("_hyps", {})
        for i, tokens in zip(batch["id"].tolist(), hyps):
            store[int(i)] = tokens
        return [{"id": int(i), "hypothesis": self.tokenizer.decode(t)} for i, t in zip(batch["id"].tolist(), hyps)]

    def on_predict_epoch_end(self) -> None:
        hyps = self._gathered_hypotheses()
        path = self._output_path("predictions_file", "predictions.txt")
        if self.trainer.is_global_zero:
            _write_lines(path, [h for _, h in hyps])
            rank_zero_info(f"wrote {len(hyps)} translations to {path}")

    def _output_path(self, hparam: str, default_name: str) -> Path:
        explicit = getattr(self.hparams, hparam, None)
        if explicit:
            return Path(explicit)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / default_name


def _compound_split(text: str) -> str:
    """Paper-comparable tokenized BLEU: split hyphenated compounds ``a-b`` -> ``a ##AT##-##AT## b`` (spec section 7)."""
    import re

    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", text)


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
