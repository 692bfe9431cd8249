"""NDP: next distribution prediction (Ruan et al., arXiv 2408.17377; spec ``shared/methods/ndp.md``).

Supervised fine-tuning against a sparse empirical next-token distribution instead of the one-hot label. At every
prediction position the batch carries the raw counts of two offline tables (:class:`datamodules.ndp.
NDPInstructionDataModule`): the **supervised** row (what followed this exact prompt + answer prefix in the training
set; non-one-hot only where one prompt has several answers) and the **CLM** row (what followed this answer-only
prefix anywhere, plus an optional domain corpus). Counts become probabilities by a softmax over raw counts at
temperature τ (``count_transform: softmax``, the official default) or by relative frequency (``freq``), optionally
with an off-support mass ``zero_prob`` (spec 3, "Counts to probabilities"), and are mixed ``mix_ratio`` : 1 -
``mix_ratio`` (0.8 / 0.2):

- ``mix_mode: target``: P = r·P_sup + (1 - r)·P_clm, loss = CE(P, q);
- ``mix_mode: loss``: loss = r·CE(P_sup, q) + (1 - r)·CE(P_clm, q) (identical to ``target`` unless ``weighted``).

CE against a sparse row is :func:`lit_models.nn.soft_ce.sparse_soft_cross_entropy`: a gather on the log-softmax at
the row's tokens plus a closed form for the off-support floor, never a vocabulary-sized target (the official collator
builds dense rows: pitfall 1). Training costs no extra model time. ``weighted`` scales each position by
``min((c / x_max)^0.75, 1)`` of its row's total count c (summed over both rows in target mode) and still divides by
the number of positions (pitfall 8).

``target: ntp`` is the one-hot baseline on identical data (``label_smoothing`` > 0 gives the label-smoothing control
the spec requires, since the supervised table alone is NTP in expectation). Both targets log ``train/loss`` (their own
objective) and ``train/loss_ntp`` / ``val/loss_ntp`` (one-hot CE), so runs compare on one number; NDP also logs
``val/loss`` against the validation tables, ``train/target_entropy`` (nats, pitfall 3), ``train/frac_multi_sup`` and
``train/frac_multi_clm`` (share of positions whose row has more than one token) and
``train/infeasible_smoothing_rows``. ``test`` scores generations like the foundation (SacreBLEU and chrF against all
references, or exact match), from :class:`~lit_models.causal_lm.CausalLMFineTune`.

Losses sum over positions and the foundation divides by the update's positions (:mod:`lit_models.token_loss`), in
float32 at any precision.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.ndp import COUNT_KEYS
from lit_models.causal_lm import CausalLMFineTune
from lit_models.nn.count_targets import SparseRows, count_weights, counts_to_rows, mix_rows, row_entropy
from lit_models.nn.soft_ce import mix_losses, sparse_soft_cross_entropy

__all__ = ["NextDistributionLM"]


class NextDistributionLM(CausalLMFineTune):
    """:class:`~lit_models.causal_lm.CausalLMFineTune` trained on NDP soft targets (see module docstring).

    Args:
        target: ``ndp`` (count targets from the batch) or ``ntp`` (one-hot labels).
        mix_mode: ``target`` (mix the rows) or ``loss`` (mix the two cross-entropies).
        mix_ratio: r, the supervised table's share (0.8).
        count_transform: ``softmax`` (over raw counts at ``count_temperature``) or ``freq`` (c / sum c).
        count_temperature: τ of the softmax transform (> 0).
        zero_prob: z, the probability mass spread over the tokens outside a row (0: none; [0, 1)).
        weighted: weight positions by their rows' total counts (``x_max_sup``, ``x_max_clm``).
        label_smoothing: ``target: ntp`` only: the label-smoothing control.
        **kwargs: everything of :class:`~lit_models.causal_lm.CausalLMFineTune` (``model``, ``mode``, ``lr``, ...).

    Raises:
        ValueError: unknown ``target``/``mix_mode``/``count_transform`` (listing the allowed values), ``mix_ratio``
            outside [0, 1], ``zero_prob`` outside [0, 1), ``count_temperature <= 0``, ``x_max_* <= 0``,
            ``label_smoothing`` with ``target: ndp`` or outside [0, 1).
        RuntimeError: ``target: ndp`` with a batch lacking the count arrays ("NDP targets missing: run
            scripts/build_ndp_tables.py or set target: ntp"), or rows that do not match the batch's positions.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Any = None,
        target: Literal["ntp", "ndp"] = "ndp",
        mix_mode: Literal["target", "loss"] = "target",
        mix_ratio: float = 0.8,
        count_transform: Literal["softmax", "freq"] = "softmax",
        count_temperature: float = 1.0,
        zero_prob: float = 0.0,
        weighted: bool = False,
        x_max_sup: float = 10.0,
        x_max_clm: float = 50.0,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for name, value, allowed in (("target", target, ("ntp", "ndp")), ("mix_mode", mix_mode, ("target", "loss")),
                                     ("count_transform", count_transform, ("softmax", "freq"))):
            if value not in allowed:
                raise ValueError(f"model.init_args.{name} must be one of {list(allowed)}, got {value!r}")
        if not 0.0 <= mix_ratio <= 1.0:
            raise ValueError(f"model.init_args.mix_ratio must be in [0, 1], got {mix_ratio}")
        if not 0.0 <= zero_prob < 1.0:
            raise ValueError(f"model.init_args.zero_prob must be in [0, 1), got {zero_prob}")
        if count_temperature <= 0:
            raise ValueError(f"model.init_args.count_temperature must be > 0, got {count_temperature}")
        for name, value in (("x_max_sup", x_max_sup), ("x_max_clm", x_max_clm)):
            if value <= 0:
                raise ValueError(f"model.init_args.{name} must be > 0, got {value}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing > 0 and target == "ndp":
            raise ValueError("model.init_args.label_smoothing is the NTP control: use it with target: ntp")
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self._val_ndp = torch.zeros(3, dtype=torch.float64)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_target = getattr(dm, "target", None)
        if stage == "fit" and self.hparams.target == "ndp" and data_target not in (None, "ndp"):
            raise ValueError(f"model.init_args.target=ndp but data.init_args.target={data_target}: the batches would "
                             "carry no count rows; set both to ndp (or both to ntp for the one-hot baseline)")

    # ------------------------------------------------------------------------------------------------ targets
    def _rows(self, batch: dict[str, Any], table: str, n_pos: int, vocab: int) -> tuple[SparseRows, int]:
        ptr = batch[f"{table}_ptr"]
        if ptr.numel() != n_pos + 1:
            raise RuntimeError(f"NDP {table} rows ({ptr.numel() - 1}) do not match the batch's {n_pos} prediction "
                               "positions: the tables belong to other data")
        hp = self.hparams
        return counts_to_rows(ptr, batch[f"{table}_tok"], batch[f"{table}_cnt"], transform=hp.count_transform,
                              temperature=hp.count_temperature, zero_prob=hp.zero_prob, vocab_size=vocab)

    def _losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-batch sums: ``loss`` (the objective), ``loss_ntp`` (one-hot CE), and for NDP the target statistics.

        Returns tensors: ``loss`` [] (with grad), ``loss_ntp`` [], ``n`` [] (positions), and for ``target: ndp``
        ``entropy`` [] (summed over positions), ``multi_sup`` [], ``multi_clm`` [] (positions with multi-token rows),
        ``infeasible`` [] (rows whose smoothing fell back to freq).
        """
        hp = self.hparams
        logits, targets = self._supervised_logits(batch)
        logits = logits.float()
        n_pos = targets.numel()
        out: dict[str, Tensor] = {"n": torch.tensor(float(n_pos))}
        if hp.target == "ntp":
            ntp_vec = F.cross_entropy(logits, targets, reduction="none")
            out["loss_ntp"] = ntp_vec.detach().sum()
            if hp.label_smoothing > 0:
                out["loss"] = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=hp.label_smoothing)
            else:
                out["loss"] = ntp_vec.sum()
            return out
        # One log-softmax serves the one-hot loss (logged) and the soft targets' loss(es).
        logp = F.log_softmax(logits, dim=-1)
        out["loss_ntp"] = -logp.detach().gather(1, targets[:, None]).sum()
        missing = [k for k in COUNT_KEYS if k not in batch]
        if missing:
            raise RuntimeError("NDP targets missing: run scripts/build_ndp_tables.py or set target: ntp "
                               f"(the batch lacks {missing}; use datamodules.ndp.NDPInstructionDataModule with "
                               "target: ndp)")
        vocab = logits.size(-1)
        sup, inf_sup = self._rows(batch, "sup", n_pos, vocab)
        clm, inf_clm = self._rows(batch, "clm", n_pos, vocab)
        r = hp.mix_ratio
        w_sup = w_clm = None
        if hp.weighted:
            w_sup = count_weights(batch["sup_ptr"], batch["sup_cnt"], hp.x_max_sup)
            w_clm = count_weights(batch["clm_ptr"], batch["clm_cnt"], hp.x_max_clm)
        mixed = mix_rows(sup, clm, r)
        if hp.mix_mode == "target":
            loss_vec = sparse_soft_cross_entropy(logits, mixed, log_probs=logp)
            if w_sup is not None:
                loss_vec = loss_vec * (w_sup + w_clm)
        else:
            l_sup = sparse_soft_cross_entropy(logits, sup, log_probs=logp)
            l_clm = sparse_soft_cross_entropy(logits, clm, log_probs=logp)
            if w_sup is not None:
                l_sup, l_clm = l_sup * w_sup, l_clm * w_clm
            loss_vec = mix_losses(l_sup, l_clm, r)  # mixed in float64: equal inputs stay bit-identical
        sizes = {t: rows.ptr[1:] - rows.ptr[:-1] for t, rows in (("sup", sup), ("clm", clm))}
        out.update({
            "loss": loss_vec.sum(),
            "entropy": row_entropy(mixed, vocab).detach().sum(),
            "multi_sup": (sizes["sup"] > 1).sum().float(),
            "multi_clm": (sizes["clm"] > 1).sum().float(),
            "infeasible": torch.tensor(float(inf_sup + inf_clm)),
        })
        return out

    def _loss_sum(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        out = self._losses(batch)
        return out["loss"], int(out["n"])

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self._losses(batch)
        n = max(float(out["n"]), 1.0)
        self.count_tokens(int(out["n"]))
        bsz = batch["input_ids"].size(0)
        mean = out["loss"].detach() / n
        self.log("loss", mean, prog_bar=True, logger=False, batch_size=bsz)
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            metrics = {"train/loss": mean, "train/loss_ntp": out["loss_ntp"] / n}
            if "entropy" in out:
                metrics.update({"train/target_entropy": out["entropy"] / n, "train/frac_multi_sup": out["multi_sup"] / n,
                                "train/frac_multi_clm": out["multi_clm"] / n,
                                "train/infeasible_smoothing_rows": out["infeasible"]})
            rate = self.tokens_per_s()
            if rate is not None:
                metrics["train/tokens_per_s"] = torch.tensor(rate)
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=bsz)
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_ndp = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._losses(batch)
        self._val_ndp += torch.stack([out["loss"].detach().double(), out["loss_ntp"].double(),
                                      out["n"].double()]).to(self.device)

    def on_validation_epoch_end(self) -> None:
        sums = self._val_ndp
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = sums[2].clamp(min=1)
        loss, ntp = (sums[0] / n).float(), (sums[1] / n).float()
        self.log_dict({"val/loss": loss, "val/loss_ntp": ntp, "val/ppl": torch.exp(ntp.clamp(max=50))},
                      sync_dist=False)
