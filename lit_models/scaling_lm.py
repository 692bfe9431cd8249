"""Dense and Mixture-of-Experts decoder LMs for scaling-law sweeps (Wang et al., EMNLP 2024, arXiv 2410.05661).

Spec ``shared/methods/moe_scaling.md``: the paper fits final loss as a power law of parameters and data for dense and
MoE LMs (``L = L0 + A·N^-α·E^-γ + B·D^-β``) and optimal batch size and learning rate as power laws. This module is one
point of such a sweep: a decoder built from config only with transformers' classes (``LlamaForCausalLM`` for
``ffn="dense"``; ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` or ``OlmoeForCausalLM`` for ``ffn="moe"``), trained
on packed text from :class:`datamodules.text.TextDataModule`, with the accounting a fit needs:

- ``params/n_active_nonemb``, ``params/n_total_nonemb``, ``params/n_embedding`` (:func:`~lit_models.nn.scaling_utils.
  count_params`, spec section 3.1), ``tokens_seen`` (D, input tokens over all ranks), ``flops/per_token`` (6·N_active),
  ``flops/cumulative`` (6·N_active·D, the fitted compute) and ``flops/cumulative_kaplan`` (adds 6·L·T·d per token);
- ``train/loss`` (what is optimised: ``lm_loss + router_aux_loss_coef·aux_loss``), ``train/lm_loss``,
  ``train/aux_loss`` (MoE; transformers' ``load_balancing_loss_func``, which equals ``k`` for uniform routing,
  pitfall 7), ``moe/load_cv`` (coefficient of variation of top-k assignments per expert, averaged over layers) and
  ``moe/max_load_frac`` (the busiest expert's share of assignments, 1/E when balanced), ``lr``;
- ``val/loss``: token-mean cross-entropy in nats over all validation blocks, **without** the auxiliary loss (the fitted
  quantity, pitfall 1), ``val/ppl``, ``val/bpb`` (bits per UTF-8 byte of the scored tokens, comparable across
  tokenizers; a token's bytes are those of its decoded text, special tokens count 0).

Validation always runs at the final step (at ``trainer.max_steps`` the module asks the Trainer to stop, which makes
Lightning validate), so ``final_val_loss`` is the loss at the end of this run's own cosine schedule. ``on_fit_end``
writes ``run_summary.json`` (counts, tokens, compute, final and best losses, wall time, the hyper-parameters) to
``summary_file`` (default ``<log dir>/run_summary.json``) atomically; :mod:`scripts.scaling_sweep` collects them.

Optimisation: AdamW (``betas``, ``weight_decay`` on 2-D and 3-D weights only, never on norms or embeddings), linear
warm-up over ``warmup_ratio`` of the steps, cosine to ``min_lr_ratio``·lr at ``trainer.max_steps``.

Batch layout (from :class:`~datamodules.text.TextDataModule`): ``input_ids`` and ``labels`` ``[B, T]`` (labels not
shifted, -100 on padding), ``attention_mask`` ``[B, T]``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torchmetrics import SumMetric

from lit_models.fileio import atomic_write
from lit_models.nn.scaling_utils import build_config, count_params, flops_per_token

__all__ = ["ScalingLM"]


class ScalingLM(LightningModule):
    """A dense or MoE decoder LM built from config, with parameter, token and compute accounting (see module doc).

    Args:
        ffn: ``dense`` (Llama) or ``moe`` (``moe_impl``).
        vocab_size: embedding rows; None takes ``len(tokenizer)``. Both given and different: error.
        d_model, n_layers, n_heads, n_kv_heads: width d, depth L, heads H and key/value heads (None = H).
        intermediate_size: dense SwiGLU width f; None = ``ceil(8/3·d)`` rounded up to a multiple of 16.
        max_position_embeddings, rope_theta, tie_word_embeddings: as in transformers' configs.
        num_experts, top_k: E experts, k routed per token (MoE).
        expert_intermediate_size: f_e; None = ``intermediate_size // top_k`` (active-matched, spec pitfall 9).
        router_aux_loss_coef: weight of the load-balancing loss in ``train/loss`` (0: not added).
        router_jitter_noise: Mixtral's multiplicative router noise in training.
        moe_impl: ``mixtral`` (dropless, top-k weights renormalised), ``qwen2_moe`` (shared expert) or ``olmoe``.
        experts_implementation: transformers' expert kernel (``grouped_mm``, ``batched_mm``, ``eager``); None = its
            default.
        lr, min_lr_ratio, warmup_ratio, betas, weight_decay: AdamW and the schedule (see module doc).
        summary_file: where ``run_summary.json`` goes; None = ``<trainer.log_dir>/run_summary.json``.
        tokenizer: linked from the DataModule by the CLI (vocabulary size, special ids, bytes per token for bpb).

    Raises:
        ValueError: as :func:`~lit_models.nn.scaling_utils.build_config` (allowed values, divisibility, top_k), a
            vocabulary that differs from the tokenizer's (both numbers), neither ``vocab_size`` nor a tokenizer, and
            at ``setup`` a DataModule ``seq_len`` above ``max_position_embeddings``.
    """

    EVAL_TIME_HPARAMS = ("summary_file",)

    def __init__(
        self,
        ffn: Literal["dense", "moe"] = "dense",
        vocab_size: int | None = None,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = True,
        num_experts: int = 8,
        top_k: int = 2,
        expert_intermediate_size: int | None = None,
        router_aux_loss_coef: float = 0.01,
        router_jitter_noise: float = 0.0,
        moe_impl: Literal["mixtral", "qwen2_moe", "olmoe"] = "mixtral",
        experts_implementation: str | None = None,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_ratio: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        summary_file: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        if tokenizer is not None:
            n_tok = len(tokenizer)
            if vocab_size is not None and vocab_size != n_tok:
                raise ValueError(f"model.init_args.vocab_size={vocab_size} differs from the tokenizer's vocabulary "
                                 f"({n_tok} tokens, data.init_args.tokenizer): leave vocab_size null or match them")
            vocab_size = n_tok
        if vocab_size is None:
            raise ValueError("set model.init_args.vocab_size or give the DataModule a tokenizer (linked by the CLI)")
        if lr <= 0 or not 0 <= min_lr_ratio <= 1 or not 0 <= warmup_ratio < 1:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1 and 0 <= warmup_ratio < 1; got lr={lr}, "
                             f"min_lr_ratio={min_lr_ratio}, warmup_ratio={warmup_ratio}")
        if router_aux_loss_coef < 0:
            raise ValueError(f"model.init_args.router_aux_loss_coef must be >= 0, got {router_aux_loss_coef}")
        self.tokenizer = tokenizer
        self.is_moe = ffn == "moe"
        self.config = build_config(
            ffn=ffn, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
            rope_theta=rope_theta, tie_word_embeddings=tie_word_embeddings, num_experts=num_experts, top_k=top_k,
            expert_intermediate_size=expert_intermediate_size, router_aux_loss_coef=router_aux_loss_coef,
            router_jitter_noise=router_jitter_noise, moe_impl=moe_impl, experts_implementation=experts_implementation,
            bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
        )
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(self.config)
        self.counts = count_params(self.config)
        self.vocab_size = int(vocab_size)
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.final_val_loss = math.nan
        self.final_val_bpb = math.nan
        self.final_train_lm_loss = math.nan
        self._last_val_step = -1
        self._wall_s_before = 0.0  # training seconds of earlier (resumed-from) sessions
        self._fit_t0: float | None = None
        self.val_nats = SumMetric()
        self.val_tokens = SumMetric()
        self.val_bytes = SumMetric()
        self.register_buffer("bytes_per_id", self._bytes_table(tokenizer, self.vocab_size), persistent=False)

    # ------------------------------------------------------------------------------------------------ accounting
    @staticmethod
    def _bytes_table(tokenizer: Any, vocab_size: int) -> Tensor:
        """``[V]`` float: UTF-8 bytes of each token's decoded text (0 for special tokens; all 0 without a tokenizer,
        and then ``val/bpb`` is NaN)."""
        if tokenizer is None:
            return torch.zeros(vocab_size, dtype=torch.float64)
        table = [len(tokenizer.decode([i], skip_special_tokens=True).encode("utf-8")) for i in range(len(tokenizer))]
        return torch.tensor(table + [0] * (vocab_size - len(table)), dtype=torch.float64)

    def flops(self, seq_len: int) -> dict[str, int]:
        """Per-token training FLOPs of this model at ``seq_len`` (``flops_6n``, ``flops_kaplan``)."""
        return flops_per_token(self.config, seq_len)

    def _seq_len(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "seq_len", None)

    def setup(self, stage: str) -> None:
        seq_len = self._seq_len()
        if seq_len is not None and seq_len > self.hparams.max_position_embeddings:
            raise ValueError(f"data.init_args.seq_len={seq_len} exceeds model.init_args.max_position_embeddings="
                             f"{self.hparams.max_position_embeddings}")

    def _unique_train_tokens(self) -> int | None:
        """Tokens in the training rows (``rows x seq_len``) of a TextDataModule-like DataModule, else None."""
        dm = getattr(self.trainer, "datamodule", None)
        try:
            return len(dm.dataset("train")) * int(dm.seq_len)
        except (AttributeError, TypeError, ValueError):
            return None

    def on_fit_start(self) -> None:
        self._fit_t0 = time.perf_counter()
        unique, max_steps, dm = self._unique_train_tokens(), self.trainer.max_steps, self.trainer.datamodule
        if unique and max_steps and max_steps > 0 and getattr(dm, "batch_size", None):
            planned = (max_steps * dm.batch_size * int(dm.seq_len) * self.trainer.world_size
                       * self.trainer.accumulate_grad_batches)
            if planned > unique:
                rank_zero_warn(
                    f"[scaling] trainer.max_steps={max_steps} reads {planned:,} training tokens but the training set "
                    f"holds {unique:,}: the data repeats {planned / unique:.2f} times, while a scaling-law point "
                    "assumes one pass over D unique tokens (max_steps = ceil(D / (batch_size x seq_len)))"
                )
        metrics = {f"params/{k}": float(v) for k, v in self.counts.items() if k != "n_total"}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        hp = self.hparams
        kind = f"MoE {hp.moe_impl} E={hp.num_experts} k={hp.top_k}" if self.is_moe else "dense Llama"
        rank_zero_info(f"[scaling] {kind}, d={hp.d_model} L={hp.n_layers} H={hp.n_heads}: "
                       f"N_active={self.counts['n_active_nonemb']:,} N_total={self.counts['n_total_nonemb']:,} "
                       f"embedding={self.counts['n_embedding']:,} (non-embedding counts, spec 3.1)")

    # ------------------------------------------------------------------------------------------------ steps
    def _lm_nats(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Any]:
        """(sum of next-token nats ``[]``, scored-label mask ``[B, T-1]``, model output)."""
        extra = {"output_router_logits": True} if self.is_moe else {}
        out = self.model(input_ids=batch["input_ids"], use_cache=False, **extra)
        labels = batch["labels"][:, 1:]
        logits = out.logits[:, :-1].float()
        nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
        return nats, labels != -100, out

    def _router_stats(self, out: Any) -> dict[str, Tensor]:
        """Load-balance statistics of the top-k assignments of every layer (``router_logits``: ``[B·T, E]`` each)."""
        E, k = self.hparams.num_experts, self.hparams.top_k
        cv, max_frac = [], []
        for logits in out.router_logits:
            chosen = logits.detach().float().topk(k, dim=-1).indices.reshape(-1)
            counts = torch.bincount(chosen, minlength=E).float()
            cv.append(counts.std(unbiased=False) / counts.mean())
            max_frac.append(counts.max() / counts.sum())
        return {"moe/load_cv": torch.stack(cv).mean(), "moe/max_load_frac": torch.stack(max_frac).mean()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nats, mask, out = self._lm_nats(batch)
        lm_loss = nats / mask.sum().clamp_min(1)
        loss = lm_loss
        logs: dict[str, Any] = {"train/lm_loss": lm_loss}
        coef = self.hparams.router_aux_loss_coef
        if self.is_moe:
            aux = out.aux_loss
            logs["train/aux_loss"] = aux
            if coef > 0:
                loss = lm_loss + coef * aux
            logs.update(self._router_stats(out))
        self.tokens_seen += int(batch["input_ids"].numel()) * self.trainer.world_size
        per_token = self.flops(batch["input_ids"].size(1))
        logs.update({
            "train/loss": loss,
            "tokens_seen": float(self.tokens_seen),
            "flops/per_token": float(per_token["flops_6n"]),
            "flops/cumulative": float(per_token["flops_6n"] * self.tokens_seen),
            "flops/cumulative_kaplan": float(per_token["flops_kaplan"] * self.tokens_seen),
            "lr": self.optimizers().param_groups[0]["lr"] if self._trainer is not None else self.hparams.lr,
        })
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({k: v for k, v in logs.items() if k != "train/loss"})
        self.final_train_lm_loss = float(lm_loss.detach())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning validates when a run is asked to stop, not when max_steps ends mid-epoch: ask at the last step.
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and self.global_step >= max_steps:
            self.trainer.should_stop = True

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        nats, mask, _ = self._lm_nats(batch)
        labels = batch["labels"][:, 1:].clamp_min(0)
        self.val_nats.update(nats.double())
        self.val_tokens.update(mask.sum().double())
        if self.tokenizer is not None:
            self.val_bytes.update((self.bytes_per_id[labels] * mask).sum())

    def _eval_end(self, prefix: str) -> dict[str, float]:
        nats, tokens, n_bytes = (float(m.compute()) for m in (self.val_nats, self.val_tokens, self.val_bytes))
        for m in (self.val_nats, self.val_tokens, self.val_bytes):
            m.reset()
        loss = nats / max(tokens, 1.0)
        values = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0)),
                  f"{prefix}/bpb": nats / (math.log(2) * n_bytes) if n_bytes > 0 else math.nan,
                  f"{prefix}/tokens": tokens}
        self.log_dict(values, sync_dist=False)  # already summed over ranks by the metrics
        return values

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        values = self._eval_end("val")
        if self.trainer.sanity_checking:
            return
        self.final_val_loss, self.final_val_bpb = values["val/loss"], values["val/bpb"]
        self.best_val_loss = min(self.best_val_loss, values["val/loss"])
        self._last_val_step = self.global_step

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed_tokens" in name or "lm_head" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if total <= 0:
            raise ValueError("set trainer.max_steps so that the LR schedule has a length")
        scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=round(hp.warmup_ratio * total),
                                  num_training_steps=total, scheduler_specific_kwargs={"min_lr_rate": hp.min_lr_ratio})
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ resume and summary
    def _wall_s(self) -> float:
        return self._wall_s_before + (time.perf_counter() - self._fit_t0 if self._fit_t0 is not None else 0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scaling_state"] = {"tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
                                       "final_val_loss": self.final_val_loss, "final_val_bpb": self.final_val_bpb,
                                       "last_val_step": self._last_val_step, "wall_s": self._wall_s()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("scaling_state")
        if state is None:
            return
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = float(state["best_val_loss"])
        self.final_val_loss = float(state["final_val_loss"])
        self.final_val_bpb = float(state["final_val_bpb"])
        self._last_val_step = int(state["last_val_step"])
        self._wall_s_before = float(state["wall_s"])

    def summary(self) -> dict[str, Any]:
        """The ``run_summary.json`` record (see module doc): one row of a sweep's results table."""
        hp = self.hparams
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = self._seq_len()
        batch_size = getattr(dm, "batch_size", None)
        per_token = self.flops(seq_len) if seq_len else {"flops_6n": math.nan, "flops_kaplan": math.nan}
        world = self.trainer.world_size if self._trainer is not None else 1
        unique = self._unique_train_tokens() if self._trainer is not None else None
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return {
            "status": "ok" if self._last_val_step == self.global_step else "no_final_validation",
            "ffn": hp.ffn,
            "moe_impl": hp.moe_impl if self.is_moe else "",
            "num_experts": hp.num_experts if self.is_moe else 1,
            "top_k": hp.top_k if self.is_moe else 1,
            "d_model": hp.d_model,
            "n_layers": hp.n_layers,
            "n_heads": hp.n_heads,
            **{k: v for k, v in self.counts.items() if k != "n_total"},
            "tokens_seen": self.tokens_seen,
            "unique_train_tokens": unique,
            "passes": round(self.tokens_seen / unique, 4) if unique else None,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "batch_tokens": batch_size * seq_len * world * accumulate if batch_size and seq_len else None,
            "steps": self.global_step,
            "lr": hp.lr,
            "flops_6nd": per_token["flops_6n"] * self.tokens_seen,
            "flops_kaplan": per_token["flops_kaplan"] * self.tokens_seen,
            "final_train_lm_loss": self.final_train_lm_loss,
            "final_val_loss": self.final_val_loss,
            "final_val_bpb": self.final_val_bpb,
            "best_val_loss": self.best_val_loss,
            "wall_s": round(self._wall_s(), 3),
            "config": {k: v for k, v in dict(hp).items() if k != "summary_file"},
        }

    def summary_path(self) -> Path:
        if self.hparams.summary_file:
            return Path(self.hparams.summary_file)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "run_summary.json"

    @rank_zero_only
    def _write_summary(self) -> None:
        import json

        record = self.summary()
        path = atomic_write(self.summary_path(), json.dumps(record, indent=1, default=str) + "\n")
        rank_zero_info(f"[scaling] final val/loss {record['final_val_loss']:.4f} (best {record['best_val_loss']:.4f}) "
                       f"after {record['tokens_seen']:,} tokens, C=6ND={record['flops_6nd']:.3e}: {path}")

    def on_fit_end(self) -> None:
        self._write_summary()
