"""ReMamba (Yuan et al., arXiv 2408.15496): selective compression and adaptation for long-context Mamba.

A Mamba-1 LM reads the prompt twice (blocks in :mod:`lit_models.nn.remamba`; spec ``shared/methods/remamba.md``):
stage 1 scores the prompt's final normed hidden states inside the span ``[s0, s0 + L')`` against the last prompt
token and keeps the top ``k`` (in order); their ``V``-projections replace the span's embeddings; stage 2 runs the
shortened sequence with every layer's pre-softplus delta at the ``k`` positions rescaled by the ReLU(cos) weight plus
a per-layer bias. Decoding continues from stage 2's recurrent cache without the hook. ``remamba: false`` runs the same
backbone as plain Mamba (the baseline, one switch).

Training (``fit``, batch size 1, pairs with :class:`datamodules.longbench.LongBenchDataModule`): LoRA (peft) on the
backbone (``lora_targets``) with ``full_train`` modules (``dt_proj``) fully trained, plus the selector MLPs and the
per-layer ``ret_bias``; cross-entropy on the response + EOS. ``(p, rho)`` are drawn per step (``train_sampling``),
while validation/test use ``compress_ratio``/``keep_ratio``. Logged: ``train/loss``, ``train/compress_p``,
``train/keep_rho``, ``train/k``, ``train/mean_weight``, ``train/ret_bias_norm``, ``val/loss``.

Test: greedy decoding per sample with the task's max new tokens and stop ids, LongBench scoring
(:mod:`lit_models.nn.longbench_metrics`): ``test/<task>`` (x100; LongBench-E: the mean of the non-empty length
buckets, each also logged as ``test/<task>/0-4k`` ...), ``test/<task>/em`` for the needle demo, ``test/avg`` (mean
over tasks), ``test/prefill_tokens_per_s`` (prompt tokens over stage-1 + stage-2 time), ``test/decode_tokens_per_s``.
Predictions go to ``<log dir>/predictions/<task>.jsonl`` (``pred, answers, all_classes, length, _id``, LongBench's
layout) and the scores to ``<log dir>/predictions/result.json``.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_models.fileio import atomic_write
from lit_models.hf import count_parameters, load_causal_lm, load_tokenizer
from lit_models.nn.longbench_metrics import BUCKETS, exact_match, first_line_rule, mean100, score_sample
from lit_models.nn.remamba import (
    ReMambaSelector,
    Selection,
    check_ratios,
    delta_adaptation,
    init_from_layer0,
    mamba_mixers,
    sample_train_ratios,
    span_sizes,
    stage2_embeddings,
    stage2_labels,
)

__all__ = ["ReMamba"]


class ReMamba(L.LightningModule):
    """ReMamba on a transformers ``MambaForCausalLM`` (see the module docstring).

    Args:
        backbone: a :func:`lit_models.hf.load_causal_lm` name (``mamba-tiny``), a local ``MambaForCausalLM``
            directory, or a config dict (``{"model_type": "mamba", "hidden_size": 64, ...}``) built with random
            weights (seeded by ``seed``).
        tokenizer: linked from the DataModule; ``None`` loads the backbone's.
        backbone_config_overrides: tiny registry names only: config fields to change.
        dtype: parameter dtype.
        kernel: ``auto`` (mamba-ssm's CUDA scan when installed, else torch), ``torch`` or ``cuda`` for the hooked
            stage-2 scan.
        compress_ratio, keep_ratio, start_ratio: evaluation ``p`` in (0, 1], ``rho`` in (0, 1], ``s`` in [0, 1).
        train_sampling: ``official`` / ``uniform`` / ``fixed`` (:func:`lit_models.nn.remamba.sample_train_ratios`).
        train_p_range, train_rho_range, long_threshold, keep_uncompressed, short_p: the training distribution.
        remamba: ``False``: plain Mamba (training and decoding without selection or hook), the baseline.
        lora_r, lora_alpha, lora_dropout, lora_targets: peft LoRA on the backbone; ``lora_r: 0`` trains every
            backbone weight instead (used by the from-scratch CPU demo).
        full_train: backbone modules trained in full next to LoRA (peft ``modules_to_save``).
        init_qkv_from_layer0: the official Q/K/V initialisation from layer 0's in_proj/out_proj.
        lr, weight_decay, warmup_steps, scheduler: AdamW and its schedule (``cosine`` or ``constant``).
        max_new_tokens: override every task's generation length (``None``: the task's LongBench value).
        seed: seed of the config-dict backbone and of the training ratio sampler.

    Raises:
        ValueError: ratios out of range (naming the key), a LoRA target / ``full_train`` name that matches no module
            (listing the module names), a batch with more than one sample.
        TypeError: the backbone is not a ``MambaForCausalLM`` (naming its class).
        RuntimeError: ``kernel="cuda"`` without CUDA or mamba-ssm.
    """

    EVAL_TIME_HPARAMS = ("compress_ratio", "keep_ratio", "start_ratio", "remamba", "kernel", "max_new_tokens")

    def __init__(
        self,
        backbone: str | dict[str, Any] = "mamba-tiny",
        tokenizer: Any = None,
        backbone_config_overrides: dict[str, Any] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        kernel: Literal["auto", "torch", "cuda"] = "auto",
        compress_ratio: float = 0.18,
        keep_ratio: float = 0.009,
        start_ratio: float = 0.0,
        train_sampling: Literal["official", "fixed", "uniform"] = "official",
        train_p_range: tuple[float, float] = (0.1, 0.3),
        train_rho_range: tuple[float, float] = (0.05, 0.2),
        long_threshold: int = 1600,
        keep_uncompressed: int = 1500,
        short_p: float = 0.1,
        remamba: bool = True,
        lora_r: int = 32,
        lora_alpha: int = 8,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        full_train: list[str] | None = None,
        init_qkv_from_layer0: bool = True,
        lr: float = 2e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        check_ratios(compress_ratio, keep_ratio, start_ratio)
        if start_ratio + compress_ratio >= 1.0:  # the last prompt token (the query) must stay uncompressed
            raise ValueError(f"model.init_args.start_ratio + compress_ratio must be < 1 (the last prompt token stays "
                             f"uncompressed); got {start_ratio} + {compress_ratio}")
        for key, rng in (("train_p_range", train_p_range), ("train_rho_range", train_rho_range)):
            if len(rng) != 2 or not 0.0 < rng[0] <= rng[1] <= 1.0:
                raise ValueError(f"model.init_args.{key} must be [lo, hi] with 0 < lo <= hi <= 1; got {list(rng)}")
        if train_p_range[1] >= 1.0:
            raise ValueError(f"model.init_args.train_p_range: hi must be < 1 (the last prompt token stays "
                             f"uncompressed); got {list(train_p_range)}")
        if kernel == "cuda":  # fail at construction, not at the first test sample
            from lit_models.nn.remamba import _scan_impl

            _scan_impl("cuda", None)
        base = self._load_backbone()
        self.tokenizer = tokenizer if tokenizer is not None else self._default_tokenizer()
        if len(self.tokenizer) > base.get_input_embeddings().num_embeddings:
            raise ValueError(f"the tokenizer ({len(self.tokenizer)} tokens) does not fit the backbone "
                             f"({base.get_input_embeddings().num_embeddings} embeddings)")
        mixers = mamba_mixers(base)
        d, d_in = base.config.hidden_size, base.config.intermediate_size
        self.selector = ReMambaSelector(d)
        if init_qkv_from_layer0:
            init_from_layer0(self.selector, mixers[0])
        self.ret_bias = nn.ParameterList([nn.Parameter(torch.zeros(d_in)) for _ in mixers])
        self.model = self._wrap(base)
        self._rng = random.Random(seed)
        self._records: list[dict[str, Any]] = []
        self._timing = torch.zeros(4, dtype=torch.float64)
        self._val = [0.0, 0]

    # ------------------------------------------------------------------------------------------------ building
    def _default_tokenizer(self) -> Any:
        bb = self.hparams.backbone
        return load_tokenizer(bb if isinstance(bb, str) else "mamba-tiny")

    def _load_backbone(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, MambaForCausalLM

        hp = self.hparams
        if isinstance(hp.backbone, dict):
            fields = dict(hp.backbone)
            model_type = fields.pop("model_type", "mamba")
            config = AutoConfig.for_model(model_type, **fields)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hp.seed)
                model = AutoModelForCausalLM.from_config(config)
            model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[hp.dtype])
        else:
            model = load_causal_lm(hp.backbone, hp.dtype, config_overrides=hp.backbone_config_overrides)
        if not isinstance(model, MambaForCausalLM):
            raise TypeError(
                f"model.init_args.backbone={hp.backbone!r} is a {type(model).__name__}, not a MambaForCausalLM: ReMamba "
                "needs a Mamba-1 backbone (Mamba-2 is not supported by this implementation)"
            )
        model.config.use_cache = False
        return model

    def _wrap(self, base: nn.Module) -> nn.Module:
        hp = self.hparams
        targets = list(hp.lora_targets) if hp.lora_targets is not None else ["embeddings", "in_proj", "lm_head"]
        full = list(hp.full_train) if hp.full_train is not None else ["dt_proj"]
        names = [n for n, _ in base.named_modules() if n]
        for key, patterns in (("lora_targets", targets if hp.lora_r > 0 else []), ("full_train", full)):
            unmatched = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in names)]
            if unmatched:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
                raise ValueError(f"model.init_args.{key}: {unmatched} match no module of {type(base).__name__}; "
                                 f"module names: {leaves}")
        if hp.lora_r <= 0:
            base.requires_grad_(True)
            base.train()
            return base
        import peft

        config = peft.LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                                 target_modules=targets, modules_to_save=full or None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            try:
                model = peft.get_peft_model(base, config)
            except ValueError as err:
                raise ValueError(f"model.init_args.lora_targets={targets}: {err}") from err
        model.train()
        return model

    @property
    def base(self) -> nn.Module:
        """The ``MambaForCausalLM`` (inside the peft wrapper when LoRA is on; LoRA layers are injected into it)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # ------------------------------------------------------------------------------------------------ the two passes
    def select(self, prompt_ids: Tensor, p: float, rho: float, s: float) -> Selection:
        """Stage 1 on ``prompt_ids`` [1, L]: the selection (gradients flow unless under no_grad)."""
        L_ = prompt_ids.size(1)
        s0, span, k = span_sizes(L_, p, rho, s)
        hidden = self.base.backbone(input_ids=prompt_ids, use_cache=False).last_hidden_state[0]
        return self.selector.select(hidden, s0, span, k)

    def stage2(self, embeds: Tensor, sel: Selection, use_cache: bool = False) -> Any:
        """Stage 2 over ``embeds`` [1, T', d] with the delta hook at the selection's positions; the backbone output."""
        with delta_adaptation(self.base, sel.s0, sel.weights, list(self.ret_bias), self.hparams.kernel):
            return self.base.backbone(inputs_embeds=embeds, use_cache=use_cache)

    def sequence_loss(self, batch: dict[str, Any], p: float | None, rho: float | None) -> tuple[Tensor, Selection | None]:
        """Mean cross-entropy on the response tokens of one sample; ``p is None`` (or ``remamba: false``): plain."""
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.size(0) != 1:
            raise ValueError("ReMamba needs batch_size=1; use accumulate_grad_batches")
        sel = None
        if self.hparams.remamba and p is not None:
            sel = self.select(ids[:, :int(batch["prompt_len"])], p, rho, self.hparams.start_ratio)
            embeds = stage2_embeddings(self.base.get_input_embeddings()(ids), sel)
            labels = stage2_labels(labels, sel)
            hidden = self.stage2(embeds, sel).last_hidden_state
        else:
            hidden = self.base.backbone(input_ids=ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        mask = targets.ne(-100)
        logits = self.base.lm_head(hidden[:, :-1][mask])
        return F.cross_entropy(logits.float(), targets[mask]), sel

    # ------------------------------------------------------------------------------------------------ Lightning steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        L_ = int(batch["prompt_len"])
        hp = self.hparams
        p, rho = sample_train_ratios(L_, self._rng, hp.train_sampling, hp.train_p_range, hp.train_rho_range,
                                     hp.long_threshold, hp.keep_uncompressed, hp.short_p,
                                     (hp.compress_ratio, hp.keep_ratio))
        loss, sel = self.sequence_loss(batch, p if hp.remamba else None, rho)
        metrics = {"train/loss": loss.detach()}
        if sel is not None:
            metrics.update({
                "train/compress_p": torch.tensor(p), "train/keep_rho": torch.tensor(rho),
                "train/k": torch.tensor(float(sel.k)), "train/mean_weight": sel.weights.detach().mean(),
                "train/ret_bias_norm": torch.stack([b.detach().norm() for b in self.ret_bias]).norm(),
            })
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=1)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = [0.0, 0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.sequence_loss(batch, self.hparams.compress_ratio, self.hparams.keep_ratio)
        self._val[0] += float(loss)
        self._val[1] += 1

    def on_validation_epoch_end(self) -> None:
        if self._val[1]:
            self.log("val/loss", self._val[0] / self._val[1])

    # ------------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, stop_ids: list[int] | tuple[int, ...] = ()
                 ) -> tuple[list[int], float, float]:
        """Greedy continuation of ``prompt_ids`` [1, L] (ReMamba or plain): ``(new ids, prefill s, decode s)``.

        The stop token, when produced, is included in the ids (decode with ``skip_special_tokens``).
        """
        if prompt_ids.size(0) != 1:
            raise ValueError("ReMamba needs batch_size=1; use accumulate_grad_batches")
        hp = self.hparams
        base = self.base
        was_training = self.model.training
        self.model.eval()
        sync = torch.cuda.synchronize if prompt_ids.is_cuda else (lambda: None)
        t0 = time.perf_counter()
        if hp.remamba:
            sel = self.select(prompt_ids, hp.compress_ratio, hp.keep_ratio, hp.start_ratio)
            embeds = stage2_embeddings(base.get_input_embeddings()(prompt_ids), sel)
            out = self.stage2(embeds, sel, use_cache=True)
        else:
            out = base.backbone(input_ids=prompt_ids, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "cache_params", None)
        token = base.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        sync()
        t1 = time.perf_counter()
        new: list[int] = []
        for step in range(max_new_tokens):
            new.append(int(token))
            if int(token) in stop_ids or step == max_new_tokens - 1:
                break
            out = base.backbone(input_ids=token[:, None], use_cache=True, **{self._cache_kw(): cache})
            cache = getattr(out, "cache", None) or getattr(out, "cache_params", None)
            token = base.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        sync()
        t2 = time.perf_counter()
        if was_training:
            self.model.train()
        return new, t1 - t0, t2 - t1

    def _cache_kw(self) -> str:
        """``cache`` (transformers >= 5.24) or ``cache_params`` (earlier 5.x): the backbone's recurrent-state kwarg."""
        import inspect

        params = inspect.signature(self.base.backbone.forward).parameters
        return "cache" if "cache" in params else "cache_params"

    def on_test_epoch_start(self) -> None:
        self._records = []
        self._timing = torch.zeros(4, dtype=torch.float64)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        meta = batch["meta"]
        ids = batch["input_ids"].to(self.device)
        limit = self.hparams.max_new_tokens or int(meta["max_new_tokens"])
        new, prefill_s, decode_s = self.generate(ids, limit, tuple(meta.get("stop_ids", ())))
        pred = self.tokenizer.decode(new, skip_special_tokens=True)
        self._timing += torch.tensor([ids.size(1), prefill_s, max(len(new) - 1, 0), decode_s], dtype=torch.float64)
        self._records.append({"pred": pred, "answers": meta["answers"], "all_classes": meta.get("all_classes"),
                              "length": meta["length"], "_id": meta["_id"], "dataset": meta["dataset"]})

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Greedy prediction of one sample: ``{"pred", "_id", "dataset"}``."""
        meta = batch["meta"]
        limit = self.hparams.max_new_tokens or int(meta["max_new_tokens"])
        new, _, _ = self.generate(batch["input_ids"].to(self.device), limit, tuple(meta.get("stop_ids", ())))
        return {"pred": self.tokenizer.decode(new, skip_special_tokens=True), "_id": meta["_id"],
                "dataset": meta["dataset"]}

    def on_test_epoch_end(self) -> None:
        metrics, per_task = self.score(self._records, self._variant())
        tokens, prefill_s, dec_tokens, decode_s = self._timing.tolist()
        metrics["test/prefill_tokens_per_s"] = tokens / prefill_s if prefill_s > 0 else math.nan
        metrics["test/decode_tokens_per_s"] = dec_tokens / decode_s if decode_s > 0 else math.nan
        self.log_dict({k: float(v) for k, v in metrics.items()})
        self._write(per_task, metrics)

    def _variant(self) -> str:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(getattr(dm, "hparams", None), "variant", "longbench_e") if dm is not None else "longbench_e"

    @staticmethod
    def score(records: list[dict[str, Any]], variant: str = "longbench_e") -> tuple[dict[str, float],
                                                                                      dict[str, list[dict[str, Any]]]]:
        """LongBench scores of prediction records (``pred, answers, all_classes, length, dataset``).

        ``longbench``: ``test/<task>`` = ``round(100 * mean, 2)``; ``longbench_e``: every bucket
        (``test/<task>/0-4k`` ...) and ``test/<task>`` = mean of the non-empty buckets (an empty bucket is skipped
        with a warning). ``test/avg`` = mean over tasks. Needle demo: also ``test/<task>/em``.
        """
        per_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rec in records:
            rec["score"] = score_sample(rec["dataset"], rec["pred"], rec["answers"], rec.get("all_classes"))
            per_task[rec["dataset"]].append(rec)
        metrics: dict[str, float] = {}
        for task, recs in sorted(per_task.items()):
            if variant == "longbench_e":
                from lit_models.nn.longbench_metrics import length_bucket

                buckets = {b: [r["score"] for r in recs if length_bucket(r["length"]) == b] for b in BUCKETS}
                present = {b: mean100(v) for b, v in buckets.items() if v}
                empty = [b for b, v in buckets.items() if not v]
                if empty:
                    rank_zero_info(f"[remamba] {task}: no samples in buckets {empty} (left out of its mean)")
                for b in BUCKETS:
                    metrics[f"test/{task}/{b}"] = present.get(b, math.nan)
                metrics[f"test/{task}"] = round(sum(present.values()) / len(present), 2)
            else:
                metrics[f"test/{task}"] = mean100([r["score"] for r in recs])
            if task == "needle_austen":
                metrics[f"test/{task}/em"] = mean100([
                    max(exact_match(first_line_rule(task, r["pred"]), a) for a in r["answers"]) for r in recs
                ])
        tasks = sorted(per_task)
        if tasks:
            metrics["test/avg"] = round(sum(metrics[f"test/{t}"] for t in tasks) / len(tasks), 2)
        return metrics, per_task

    def _write(self, per_task: dict[str, list[dict[str, Any]]], metrics: dict[str, float]) -> None:
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
        for task, recs in per_task.items():
            lines = "".join(json.dumps({k: r[k] for k in ("pred", "answers", "all_classes", "length", "_id")},
                                       ensure_ascii=False) + "\n" for r in recs)
            atomic_write(out / f"{task}.jsonl", lines)
        atomic_write(out / "result.json", json.dumps(metrics, indent=1, default=float) + "\n")
        rank_zero_info(f"[remamba] wrote predictions of {len(per_task)} tasks to {out}; test/avg "
                       f"{metrics.get('test/avg')}")

    # ------------------------------------------------------------------------------------------------ optimisation
    def on_fit_start(self) -> None:
        rank_zero_info(f"[remamba] {count_parameters(self, trainable_only=True):,} trainable of "
                       f"{count_parameters(self):,} parameters (remamba={self.hparams.remamba})")

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        name = "cosine" if hp.scheduler == "cosine" else "constant_with_warmup"
        sched = get_scheduler(name, optimizer, num_warmup_steps=hp.warmup_steps, num_training_steps=max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Saves the training-ratio sampler's state (exact resume); with LoRA only trainable tensors are saved
        (adapter, ``full_train`` modules, selector, ``ret_bias``)."""
        checkpoint["remamba_ratio_rng"] = self._rng.getstate()
        if self.hparams.lora_r <= 0:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["litlab_adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("remamba_ratio_rng")
        if state is not None:
            self._rng.setstate(_as_rng_state(state))
        if not checkpoint.get("litlab_adapter_only"):
            return
        missing = sorted({n for n, p in self.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors of this model, e.g. {missing[:3]}")
        checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items()
                                         if k not in checkpoint["state_dict"]})


def _as_rng_state(state: Any) -> tuple[Any, ...]:
    """``random.Random.getstate()`` back from a checkpoint (lists where tuples were saved)."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
