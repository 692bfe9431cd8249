"""Early exit through the model's own final norm and LM head: analysis, learned gates and early-exit decoding.

Method: Shan et al., *Early Exit Is a Natural Capability in Transformer-based Models* (arXiv 2412.01455); spec
``shared/methods/early_exit.md``. Any intermediate residual state ``h_l`` of a pre-norm decoder is decoded with the
model's own ``lm_head(norm(h_l))``; no extra exit heads exist. The oracle exit of a token is the first layer from which
the prediction equals the final layer's and stays equal (``oracle: stable``; ``first``: the first layer that equals
it). One small gate per layer (:class:`lit_models.nn.exit_gates.ExitGates`) learns to find that layer, with the LM
frozen (the paper's "without joint optimisation") or jointly fine-tuned (``finetune_lm``).

Three uses, one module (``mode``), all through ``train.py``:

- ``validate`` (any mode; ``configs/early_exit/analysis_smollm2.yaml``): teacher-forced over the validation blocks:
  per-layer agreement with the final prediction (and accuracy against the next token), the oracle exit histograms
  (stable and first-match), by sub-word position of the predicted token (``single``/``first``/``middle``/``last``/
  ``other``; word-initial vs continuation) and, with ``sublayer_exits``, after-attention exits. Written as
  ``early_exit_<stage>.json`` and ``early_exit_<stage>.png`` in the run's log directory, and as W&B tables and an image
  when a ``WandbLogger`` is configured.
- ``fit`` with ``mode: gate`` (``gate_demo.yaml``): trains the gates on oracle labels recomputed from the current
  model at every step (``train/gate_bce``, ``train/joint_lm_loss``, ``train/loss``); validation adds ``val/gate_acc``,
  ``val/gate_bce``, ``val/exit_safe_rate``, ``val/exit_minus_oracle``, ``val/avg_gated_exit``, majority baselines, and
  early-exit decoding of ``eval_decode_prompts`` prompts (the first ``decode_prompt_tokens`` tokens of validation
  rows): ``val/ee/avg_exit_layer``, ``val/ee/layer_speedup``, ``val/ee/tokens_per_s``, ``val/full/tokens_per_s``,
  ``val/ee/speedup``, ``val/ee/token_agreement``, ``val/ee/prefix_match``.
- ``predict`` (``decode_demo.yaml``): every prompt decoded at full depth and with early exit (same loop and cache);
  per-prompt records in ``predictions.jsonl`` and the summary (the ``ee/*`` figures above) in
  ``early_exit_decode.json``, also sent to the loggers as ``predict/...``.

``gate_threshold`` 1.0 (or null) never exits early and reproduces ``model.generate(do_sample=False)`` token for token.
The KV handling of skipped layers (``kv_mode``) is described in :mod:`lit_models.nn.exit_runner`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_models.causal_lm import CausalLMFineTune
from lit_models.hf import count_parameters, load_causal_lm
from lit_models.nn.exit_gates import (
    GATE_FEATURES,
    GATE_RULES,
    N_LOGIT_FEATURES,
    ORACLES,
    SUBWORD_CATEGORIES,
    ExitGates,
    check_threshold,
    first_exit,
    gate_labels,
    hidden_gate_features,
    logit_gate_features,
    oracle_exit,
    saturation_scores,
    subword_categories,
)
from lit_models.nn.exit_runner import KV_MODES, DecodeResult, ExitPolicy, LayerwiseRunner, early_exit_generate

__all__ = ["EarlyExitLM", "decode_summary"]

_MODES = ("analysis", "gate")
_INITIAL, _CONTINUATION = ("single", "first"), ("middle", "last")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.init_args.{name} must be one of {list(choices)}; got {value!r}")


def decode_summary(full: list[DecodeResult], ee: list[DecodeResult], forced: list[DecodeResult]) -> dict[str, float]:
    """Decoding figures over prompts: full-depth runs, free-running early-exit runs and early-exit runs teacher-forced
    on the full trajectory (same prompts, same order).

    Returns ``ee/avg_exit_layer`` (mean over generated tokens, layer units), ``ee/layer_speedup`` (L / that),
    ``ee/tokens_per_s``, ``full/tokens_per_s`` (all tokens / all seconds), ``ee/speedup`` (their ratio),
    ``ee/token_agreement`` (teacher-forced, per position), ``ee/prefix_match`` (identical free-running prefix /
    length) and ``ee/free_agreement`` (free-running, per position).
    """
    n_layers = full[0].n_layers
    exits = [e for r in ee for e in r.exits]
    avg = sum(exits) / len(exits)
    tps = lambda rs: sum(len(r.tokens) for r in rs) / max(sum(r.prefill_s + r.decode_s for r in rs), 1e-9)
    agree = [a == b for f, r in zip(full, forced, strict=True) for a, b in zip(f.tokens, r.tokens, strict=True)]
    free = [a == b for f, r in zip(full, ee, strict=True) for a, b in zip(f.tokens, r.tokens, strict=True)]
    prefix = []
    for f, r in zip(full, ee, strict=True):
        n = 0
        while n < len(f.tokens) and f.tokens[n] == r.tokens[n]:
            n += 1
        prefix.append(n / len(f.tokens))
    ee_tps, full_tps = tps(ee), tps(full)
    return {
        "ee/avg_exit_layer": avg,
        "ee/layer_speedup": n_layers / avg,
        "ee/tokens_per_s": ee_tps,
        "full/tokens_per_s": full_tps,
        "ee/speedup": ee_tps / max(full_tps, 1e-9),
        "ee/token_agreement": sum(agree) / len(agree),
        "ee/prefix_match": sum(prefix) / len(prefix),
        "ee/free_agreement": sum(free) / len(free),
    }


class EarlyExitLM(CausalLMFineTune):
    """Early exit without extra output layers (see the module docstring).

    Args:
        model: a LLaMA-family causal LM: ``smollm2-135m``, a tiny random config (``llama-tiny``), a local directory
            (see :mod:`lit_models.hf`).
        tokenizer: linked from the DataModule by the CLI (None: the model's own).
        dtype, model_config_overrides: as :class:`~lit_models.causal_lm.CausalLMFineTune`.
        mode: ``analysis`` (validate/test/predict only) or ``gate`` (``fit`` trains the gates).
        oracle: ``stable`` (default; monotone, safe gate labels) or ``first`` for the gate labels; both are reported.
        sublayer_exits: exit points after attention and after FFN of each layer (``2L``).
        gate: exit rule at evaluation: ``learned`` (the gates), ``confidence``, ``entropy`` or ``saturation``.
        gate_features: ``hidden`` (``[Norm_f(h_l); cos(h_l, h_l-1); |h_l - h_l-1| / |h_l|]``, no head needed) or
            ``logits`` (``[p_max, margin, H / log V, top-1 agreement, cos, update norm]``: a head product per layer).
        gate_hidden: gate MLP width ``r``. gate_pos_weight: BCE weight of positive labels.
        gate_threshold: exit when the score reaches it; 1.0 or null never exits early. In [0, 1].
        min_exit_layer: no exit before this layer (layer units, 1..L).
        saturation_k: equal consecutive top-1 predictions for ``saturation``.
        finetune_lm: also train the LM with the per-layer loss ``joint_loss_weight * sum_l w_l CE(z_l)``,
            ``w_l = l / sum(l)``; False: the LM is frozen and only gates train.
        lm_trainable_layers: decoder layers (0-based) trained when ``finetune_lm``; None: every LM weight.
        joint_loss_weight: lambda of the joint loss.
        kv_mode: ``propagate``, ``kv_copy`` or ``lazy`` (see :mod:`lit_models.nn.exit_runner`).
        lr: gate learning rate (AdamW, constant). lm_lr: LM learning rate with ``finetune_lm``. weight_decay: AdamW's.
        eval_decode_prompts: validation prompts decoded at the end of each validation in ``gate`` mode (0: none).
        eval_max_new_tokens: tokens generated per validation prompt.
        decode_prompt_tokens: prompt length taken from validation rows.
        max_new_tokens: tokens generated per prompt in ``predict``.
        threshold_sweep: thresholds of the teacher-forced sweep in the JSON report.

    Raises:
        ValueError: an unknown choice (listing the choices), a threshold outside [0, 1], ``min_exit_layer`` outside
            [1, L]; in ``on_load_checkpoint``: gates trained for another model (both shapes shown).
        TypeError: a model without ``model.model.layers`` (or norm, embeddings, rotary embedding, head).
        IndexError: ``lm_trainable_layers`` out of range (names the index).
    """

    EVAL_TIME_HPARAMS = ("gate", "gate_threshold", "min_exit_layer", "saturation_k", "kv_mode", "eval_decode_prompts",
                         "eval_max_new_tokens", "decode_prompt_tokens", "max_new_tokens", "threshold_sweep")
    # gates belong to the LM they were trained on: a checkpoint for another base model is refused by train.py
    CKPT_IDENTITY_HPARAMS = ("model", "model_config_overrides", "sublayer_exits", "gate_features", "gate_hidden")

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Any = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        model_config_overrides: dict[str, Any] | None = None,
        mode: Literal["analysis", "gate"] = "analysis",
        oracle: Literal["stable", "first"] = "stable",
        sublayer_exits: bool = False,
        gate: Literal["learned", "confidence", "entropy", "saturation"] = "learned",
        gate_features: Literal["hidden", "logits"] = "hidden",
        gate_hidden: int = 32,
        gate_pos_weight: float = 1.0,
        gate_threshold: float | None = 0.8,
        min_exit_layer: int = 1,
        saturation_k: int = 2,
        finetune_lm: bool = False,
        lm_trainable_layers: list[int] | None = None,
        joint_loss_weight: float = 1.0,
        kv_mode: Literal["propagate", "kv_copy", "lazy"] = "propagate",
        lr: float = 1e-3,
        lm_lr: float = 1e-5,
        weight_decay: float = 0.0,
        eval_decode_prompts: int = 8,
        eval_max_new_tokens: int = 64,
        decode_prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        threshold_sweep: list[float] = [0.5, 0.7, 0.8, 0.9, 0.95],  # noqa: B006 (jsonargparse needs a literal)
    ) -> None:
        for name, value, choices in (("mode", mode, _MODES), ("oracle", oracle, ORACLES), ("gate", gate, GATE_RULES),
                                     ("gate_features", gate_features, GATE_FEATURES), ("kv_mode", kv_mode, KV_MODES)):
            _check_choice(name, value, choices)
        check_threshold(gate_threshold, "model.init_args.gate_threshold")
        for t in threshold_sweep:
            check_threshold(t, "model.init_args.threshold_sweep")
        for name, value in (("gate_hidden", gate_hidden), ("max_new_tokens", max_new_tokens),
                            ("eval_max_new_tokens", eval_max_new_tokens), ("decode_prompt_tokens", decode_prompt_tokens)):
            if value < 1:
                raise ValueError(f"model.init_args.{name} must be >= 1; got {value}")
        if eval_decode_prompts < 0:
            raise ValueError(f"model.init_args.eval_decode_prompts must be >= 0; got {eval_decode_prompts}")
        super().__init__(model=model, tokenizer=tokenizer, dtype=dtype, model_config_overrides=model_config_overrides,
                         mode="full", lr=lr, weight_decay=weight_decay, max_new_tokens=max_new_tokens)
        self.runner = LayerwiseRunner(self.model, sublayer=sublayer_exits)
        if kv_mode == "propagate" or sublayer_exits:
            self.runner.check_layer_structure()
        L = self.runner.n_layers
        if not 1 <= min_exit_layer <= L:
            raise ValueError(f"model.init_args.min_exit_layer must be in [1, {L}] (the model has {L} layers); "
                             f"got {min_exit_layer}")
        if self.runner.n_exits < 2:
            raise ValueError("early exit needs at least 2 exit points (a model with 2+ layers, or sublayer_exits)")
        n_feat = self.runner.hidden_size + 2 if gate_features == "hidden" else N_LOGIT_FEATURES
        self.gates = ExitGates(self.runner.n_exits - 1, n_feat, gate_hidden)
        self._freeze_lm(finetune_lm, lm_trainable_layers)
        self._stats: dict[str, Tensor] = {}
        self._decode_prompts: list[Tensor] = []
        self._records: list[dict[str, Any]] = []
        self._decode: dict[str, list[DecodeResult]] = {}
        self._token_info: dict[int, tuple[str, bool]] = {}

    # ------------------------------------------------------------------------------------------------ setup
    def _build_model(self) -> torch.nn.Module:
        """The plain transformers model (no adapters: the LM is frozen or fully trainable per layer)."""
        hp = self.hparams
        model = load_causal_lm(hp.model, hp.dtype, config_overrides=hp.model_config_overrides)
        model.config.use_cache = False
        return model

    def _freeze_lm(self, finetune_lm: bool, layers: list[int] | None) -> None:
        self.model.requires_grad_(False)
        if not finetune_lm:
            return
        if layers is None:
            self.model.requires_grad_(True)
            return
        n = self.runner.n_layers
        for idx in layers:
            if not -n <= idx < n:
                raise IndexError(f"model.init_args.lm_trainable_layers: layer index {idx} is out of range for a model "
                                 f"with {n} layers")
            self.runner.layers[idx].requires_grad_(True)

    @property
    def min_exit_index(self) -> int:
        """First eligible exit index for ``min_exit_layer`` (layer units)."""
        units = self.runner.exit_units.tolist()
        return next(k for k, u in enumerate(units) if u >= self.hparams.min_exit_layer)

    def policy(self, threshold: float | None = None, rule: str | None = None) -> ExitPolicy:
        """The decoding exit policy (defaults: the configured ``gate`` and ``gate_threshold``)."""
        hp = self.hparams
        return ExitPolicy(self.runner, rule or hp.gate, hp.gate_threshold if threshold is None else threshold,
                          self.gates, hp.gate_features, self.min_exit_index, hp.saturation_k)

    # ------------------------------------------------------------------------------------------------ core
    def _valid_positions(self, batch: dict[str, Any]) -> Tensor:
        """Bool ``[B, T-1]``: positions ``t`` whose input and next token are both real."""
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        if am is None:
            return torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
        am = am.bool()
        return am[:, :-1] & am[:, 1:]

    def _exit_pass(self, batch: dict[str, Any], train_lm: bool, all_preds: bool = True) -> dict[str, Tensor]:
        """States, predictions, oracles and gate scores of every valid position of ``batch`` (teacher forcing).

        Returns ``states`` ``[n_exits + 1, P, d]`` (0 = embeddings), ``preds`` ``[n_exits, P]`` (+ ``pred0``, the
        embeddings' prediction, and ``p_max``/``margin``/``entropy`` when a logit-based rule needs them), ``oracle``,
        ``oracle_first`` ``[P]``, ``labels`` ``[n_gates, P]``, ``gate_logits`` ``[n_gates, P]``, ``targets`` ``[P]``,
        ``valid`` ``[B, T-1]``. With ``all_preds=False`` (training with hidden-state gates and the stable oracle) only
        the stable oracle is computed, top-down (:meth:`LayerwiseRunner.stable_oracle`), and ``preds`` is absent.
        """
        hp = self.hparams
        ids = batch["input_ids"]
        valid = self._valid_positions(batch)
        with torch.set_grad_enabled(train_lm and torch.is_grad_enabled()):
            states = self.runner.exit_states(ids, batch.get("attention_mask"))[:, :, :-1][:, valid]
        n = self.runner.n_exits
        out: dict[str, Tensor] = {"states": states, "valid": valid, "targets": ids[:, 1:][valid]}
        if not all_preds and hp.gate_features == "hidden" and hp.oracle == "stable":
            out["oracle"], _ = self.runner.stable_oracle(states[1:].detach())
            label_oracle = out["oracle"]
        else:
            need_scores = hp.gate in ("confidence", "entropy") or hp.gate_features == "logits"
            pr = self.runner.exit_predictions(states.detach(), with_scores=need_scores)
            out.update({k: v[1:] for k, v in pr.items()})
            out["pred0"] = pr["pred"][0]
            out["preds"] = out.pop("pred")
            out["oracle"] = oracle_exit(out["preds"], "stable")
            out["oracle_first"] = oracle_exit(out["preds"], "first")
            label_oracle = out["oracle"] if hp.oracle == "stable" else out["oracle_first"]
        out["labels"] = gate_labels(label_oracle, n)
        feats_src = states if train_lm else states.detach()
        if hp.gate_features == "hidden":
            h = feats_src[1:n]
            feats = hidden_gate_features(self.runner.norm(h), h, feats_src[: n - 1])
        else:
            prev = torch.cat([out["pred0"][None], out["preds"][: n - 2]]) if n > 1 else out["pred0"][None]
            scores = {k: out[k][: n - 1] for k in ("p_max", "margin", "entropy")} | {"pred": out["preds"][: n - 1]}
            feats = logit_gate_features(scores, prev, feats_src[1:n], feats_src[: n - 1])
        out["gate_logits"] = self.gates(feats)
        return out

    def _rule_scores(self, out: dict[str, Tensor]) -> Tensor:
        """Exit scores ``[n_gates, P]`` of the configured rule (teacher forcing)."""
        hp, n = self.hparams, self.runner.n_exits
        if hp.gate == "learned":
            return torch.sigmoid(out["gate_logits"].detach().float())
        if hp.gate == "confidence":
            return out["p_max"][: n - 1]
        if hp.gate == "entropy":
            return 1.0 - out["entropy"][: n - 1]
        return saturation_scores(out["preds"], hp.saturation_k)[: n - 1]

    def _joint_loss(self, states: Tensor, targets: Tensor) -> Tensor:
        """``sum_l w_l CE(lm_head(norm(h_l)), next token)``, ``w_l = l / sum(l)`` in layer units."""
        units = self.runner.exit_units.to(states.device)
        weights = units / units.sum()
        total = states.new_zeros(())
        for k in range(self.runner.n_exits):
            # recomputed in backward: the [P, V] logits of 30 exits are never held at once
            ce = torch.utils.checkpoint.checkpoint(self._exit_ce, states[k + 1], targets, use_reentrant=False)
            total = total + weights[k] * ce
        return total

    def _exit_ce(self, h: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.runner.logits(h).float(), targets)

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        if hp.mode != "gate":
            raise ValueError("model.init_args.mode=analysis has nothing to train: run validate, or set mode: gate")
        out = self._exit_pass(batch, train_lm=hp.finetune_lm, all_preds=False)
        bce = self.gates.loss(out["gate_logits"], out["labels"], pos_weight=hp.gate_pos_weight)
        loss = bce
        metrics = {"train/gate_bce": bce.detach()}
        if hp.finetune_lm:
            joint = self._joint_loss(out["states"], out["targets"])
            loss = bce + hp.joint_loss_weight * joint
            metrics["train/joint_lm_loss"] = joint.detach()
        metrics["train/loss"] = loss.detach()
        metrics["train/oracle_mean_exit"] = self.runner.exit_units[out["oracle"].cpu()].mean()
        with torch.no_grad():
            self.gates.oracle_hist += torch.bincount(out["oracle"], minlength=self.runner.n_exits).double()
        if self._trainer is not None:
            bsz = batch["input_ids"].shape[0]
            self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=bsz)
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=bsz)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The gate and joint losses are means: no token-count normalisation (unlike the base's summed loss)."""

    def on_fit_start(self) -> None:
        if self.hparams.mode != "gate":
            raise ValueError("model.init_args.mode=analysis has nothing to train: run validate, or set mode: gate")
        gates = count_parameters(self.gates)
        lm = count_parameters(self.model, trainable_only=True)
        rank_zero_info(f"[early_exit] {self.hparams.model}: training {gates:,} gate parameters "
                       f"({self.gates.n_gates} gates) and {lm:,} LM parameters of {count_parameters(self.model):,}")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [{"params": list(self.gates.parameters()), "lr": hp.lr}]
        lm = [p for p in self.model.parameters() if p.requires_grad]
        if lm:
            groups.append({"params": lm, "lr": hp.lm_lr})
        return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)

    # ------------------------------------------------------------------------------------------------ evaluation
    def _token_texts(self, ids: list[int]) -> tuple[list[str], list[bool]]:
        """Decoded text of every id and whether its piece starts with a word-boundary marker (cached per id)."""
        missing = sorted({i for i in ids if i not in self._token_info})
        if missing:
            pieces = self.tokenizer.convert_ids_to_tokens(missing)
            texts = self.tokenizer.batch_decode([[i] for i in missing])
            for i, piece, text in zip(missing, pieces, texts, strict=True):
                marker = isinstance(piece, str) and piece[:1] in ("Ġ", "▁")
                self._token_info[i] = (text, marker or text[:1].isspace())
        info = [self._token_info[i] for i in ids]
        return [t for t, _ in info], [s for _, s in info]

    def _categories(self, batch: dict[str, Any], valid: Tensor) -> Tensor:
        """Sub-word category index (into ``SUBWORD_CATEGORIES``) of the predicted token of every valid position."""
        cats = []
        index = {c: i for i, c in enumerate(SUBWORD_CATEGORIES)}
        for row in batch["input_ids"].tolist():
            texts, space = self._token_texts(row)
            cats.append([index[c] for c in subword_categories(texts, space)])
        cat = torch.tensor(cats, device=valid.device)[:, 1:]  # the token predicted at t is t + 1
        return cat[valid]

    def _add(self, key: str, value: Tensor) -> None:
        value = value.detach().double().cpu()
        self._stats[key] = self._stats[key] + value if key in self._stats else value

    def _eval_step(self, batch: dict[str, Any]) -> None:
        hp, n = self.hparams, self.runner.n_exits
        out = self._exit_pass(batch, train_lm=False)
        preds, oracle, first = out["preds"], out["oracle"], out["oracle_first"]
        P = oracle.numel()
        self._add("n", torch.tensor(float(P)))
        self._add("agree", (preds == preds[-1:]).sum(1))
        self._add("correct", (preds == out["targets"][None]).sum(1))
        self._add("hist_stable", torch.bincount(oracle, minlength=n))
        self._add("hist_first", torch.bincount(first, minlength=n))
        cats = self._categories(batch, out["valid"])
        n_cat = len(SUBWORD_CATEGORIES)
        self._add("hist_cat", torch.bincount(cats * n + oracle, minlength=n_cat * n).view(n_cat, n))
        if self.runner.sublayer:  # the oracle among whole-layer exits only
            full = oracle_exit(preds[1::2], "stable")
            self._add("hist_layer", torch.bincount(full, minlength=self.runner.n_layers))
            self._add("hist_first_layer", torch.bincount(oracle_exit(preds[1::2], "first"),
                                                         minlength=self.runner.n_layers))
            self._add("hist_cat_layer", torch.bincount(cats * self.runner.n_layers + full,
                                                       minlength=n_cat * self.runner.n_layers))
        if hp.mode == "gate":
            self._gate_stats(out)
        if hp.mode == "gate" and len(self._decode_prompts) < hp.eval_decode_prompts:
            ids, am = batch["input_ids"], batch.get("attention_mask")
            for r in range(ids.shape[0]):
                row = ids[r] if am is None else ids[r][am[r].bool()]
                if row.numel() > hp.decode_prompt_tokens and len(self._decode_prompts) < hp.eval_decode_prompts:
                    self._decode_prompts.append(row[: hp.decode_prompt_tokens].clone())

    def _gate_stats(self, out: dict[str, Tensor]) -> None:
        hp, n = self.hparams, self.runner.n_exits
        labels, logits = out["labels"], out["gate_logits"].detach().float()
        scores = self._rule_scores(out)
        tau = hp.gate_threshold if hp.gate_threshold is not None else 1.0
        self._add("gate_correct", ((scores >= tau).float() == labels).float().sum())
        self._add("gate_cells", torch.tensor(float(labels.numel())))
        self._add("gate_bce_sum", F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
        self._add("label_pos", labels.sum(1))
        self._add("oracle_hist_val", torch.bincount(out["oracle"], minlength=n))
        units = self.runner.exit_units.to(scores.device)
        label_oracle = out["oracle"] if hp.oracle == "stable" else out["oracle_first"]
        for t in sorted({*hp.threshold_sweep, tau}):
            e = first_exit(scores, t, self.min_exit_index)
            self._add(f"sweep_exit@{t}", units[e].sum())
            self._add(f"sweep_safe@{t}", (e >= out["oracle"]).float().sum())
            if t == tau:
                self._add("exit_sum", units[e].sum())
                self._add("exit_safe", (e >= out["oracle"]).float().sum())
                self._add("exit_minus_oracle", (units[e] - units[label_oracle]).sum())
        self._add("labels_by_oracle", torch.bincount(label_oracle, minlength=n))

    def _baselines(self) -> dict[str, float]:
        """Majority baseline (y = 1 for every exit >= the training median oracle) accuracy and the BCE of the per-exit
        class prior ``P_train(y_k = 1)``, evaluated on the validation oracle histogram."""
        n = self.runner.n_exits
        hist = self.gates.oracle_hist.double().cpu()
        if hist.sum() == 0:
            hist = self._stats["oracle_hist_val"]
        cdf = hist.cumsum(0) / hist.sum()
        median = int((cdf >= 0.5).nonzero()[0])
        val = self._stats["labels_by_oracle"]  # tokens per label oracle
        k = torch.arange(n - 1).double()
        o = torch.arange(n).double()
        y = (k[:, None] >= o[None, :]).double()  # [n_gates, n_oracle]: the label of exit k for a token with oracle o
        maj = (k >= median).double()[:, None]
        acc = ((maj == y).double() * val[None]).sum() / (val.sum() * (n - 1))
        prior = cdf[: n - 1].clamp(1e-4, 1 - 1e-4)[:, None]
        bce = -(y * prior.log() + (1 - y) * (1 - prior).log())
        return {"gate_acc_majority": float(acc), "gate_bce_prior": float((bce * val[None]).sum() / (val.sum() * (n - 1))),
                "train_median_oracle": float(self.runner.exit_units[median])}

    def on_validation_epoch_start(self) -> None:
        self._stats, self._decode_prompts = {}, []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        self._stats, self._decode_prompts = {}, []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    # ------------------------------------------------------------------------------------------------ reports
    def analysis_report(self) -> dict[str, Any]:
        """The accumulated evaluation statistics as a JSON-able dict (scalars, histograms, per-category figures)."""
        s, _n, L = self._stats, self.runner.n_exits, self.runner.n_layers
        if not s or s["n"].item() == 0:
            raise ValueError("no evaluation tokens: the validation/test split is empty")
        units = self.runner.exit_units.double()
        total = s["n"].item()
        mean = lambda h, u=units: float((h * u).sum() / h.sum()) if h.sum() > 0 else float("nan")
        rep: dict[str, Any] = {
            "n_tokens": int(total), "n_layers": L, "sublayer_exits": self.runner.sublayer, "exit_units": units.tolist(),
            "agreement_with_final": (s["agree"] / total).tolist(), "accuracy_next_token": (s["correct"] / total).tolist(),
            "hist_stable": s["hist_stable"].tolist(), "hist_first": s["hist_first"].tolist(),
        }
        hist = s["hist_stable"]
        if self.runner.sublayer:  # whole-layer figures from the whole-layer oracle; the sub-layer oracle separately
            lunits = torch.arange(1, L + 1, dtype=torch.float64)
            rep["oracle/mean_exit_sublayer"] = mean(hist)
            rep["hist_layer"] = s["hist_layer"].tolist()
            layer_hist, cat_hist, cunits = s["hist_layer"], s["hist_cat_layer"].view(-1, L), lunits
            rep["hist_first_layer"] = s["hist_first_layer"].tolist()
            rep["oracle/mean_exit_first"] = mean(s["hist_first_layer"], lunits)
            rep["oracle/mean_exit_first_sublayer"] = mean(s["hist_first"])
        else:
            layer_hist, cat_hist, cunits = hist, s["hist_cat"], units
            rep["oracle/mean_exit_first"] = mean(s["hist_first"])
        rep["oracle/mean_exit"] = mean(layer_hist, cunits)
        rep["oracle/frac_before_last"] = float(1 - layer_hist[-1] / layer_hist.sum())
        rep["by_category"] = {}
        for i, cat in enumerate(SUBWORD_CATEGORIES):
            rep["by_category"][cat] = {"count": int(cat_hist[i].sum()), "mean_exit": mean(cat_hist[i], cunits),
                                       "hist": cat_hist[i].tolist()}
            rep[f"oracle/mean_exit_word_{cat}"] = mean(cat_hist[i], cunits)
        idx = {c: i for i, c in enumerate(SUBWORD_CATEGORIES)}
        initial = sum(cat_hist[idx[c]] for c in _INITIAL)
        cont = sum(cat_hist[idx[c]] for c in _CONTINUATION)
        rep["hist_initial"], rep["hist_continuation"] = initial.tolist(), cont.tolist()
        rep["oracle/mean_exit_initial"], rep["oracle/mean_exit_continuation"] = mean(initial, cunits), mean(cont, cunits)
        if "gate_cells" in s:
            tau = self.hparams.gate_threshold if self.hparams.gate_threshold is not None else 1.0
            rep["gate_acc"] = float(s["gate_correct"] / s["gate_cells"])
            rep["gate_bce"] = float(s["gate_bce_sum"] / s["gate_cells"])
            rep["avg_gated_exit"] = float(s["exit_sum"] / total)
            rep["exit_safe_rate"] = float(s["exit_safe"] / total)
            rep["exit_minus_oracle"] = float(s["exit_minus_oracle"] / total)
            rep["threshold"] = tau
            rep["sweep"] = [{"threshold": t, "avg_exit": float(s[f"sweep_exit@{t}"] / total),
                             "safe_rate": float(s[f"sweep_safe@{t}"] / total)}
                            for t in sorted({*self.hparams.threshold_sweep, tau})]
            rep.update(self._baselines())
        return rep

    def _scalar_metrics(self, rep: dict[str, Any], stage: str) -> dict[str, float]:
        keys = [k for k in rep if k.startswith("oracle/")]
        keys += [k for k in ("gate_acc", "gate_bce", "avg_gated_exit", "exit_safe_rate", "exit_minus_oracle",
                             "gate_acc_majority", "gate_bce_prior") if k in rep]
        out = {f"{stage}/{k}": float(rep[k]) for k in keys if not math.isnan(float(rep[k]))}
        out.update({f"{stage}/{k}": float(v) for k, v in rep.get("decode", {}).items()})
        return out

    def _out_dir(self) -> Path:
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking or not self._stats:
            return
        if self.trainer.world_size > 1:  # every rank saw its own shard: sum the counts
            self._stats = {k: self.trainer.strategy.reduce(v.to(self.device), reduce_op="sum").cpu()
                           for k, v in sorted(self._stats.items())}
        rep = self.analysis_report()
        if self._decode_prompts:
            rep["decode"] = self._decode_eval(self._decode_prompts, self.hparams.eval_max_new_tokens)
        self.log_dict({k: torch.tensor(v) for k, v in self._scalar_metrics(rep, stage).items()})
        if self.trainer.is_global_zero:
            self._write_report(rep, stage)

    def _decode_eval(self, prompts: list[Tensor], max_new: int) -> dict[str, float]:
        """Full-depth, early-exit and teacher-forced early-exit decoding of ``prompts`` (1-D id tensors)."""
        was_training = self.training
        self.eval()
        full, ee, forced = [], [], []
        for p in prompts:
            ids = p.view(1, -1).to(self.device)
            f = early_exit_generate(self.runner, ids, max_new, None, self.hparams.kv_mode)
            full.append(f)
            ee.append(early_exit_generate(self.runner, ids, max_new, self.policy(), self.hparams.kv_mode))
            forced.append(early_exit_generate(self.runner, ids, max_new, self.policy(), self.hparams.kv_mode,
                                              forced_tokens=f.tokens[:-1]))
        self._decode = {"full": full, "ee": ee, "forced": forced}
        if was_training:
            self.train()
        return decode_summary(full, ee, forced)

    def _write_report(self, rep: dict[str, Any], stage: str) -> None:
        """``early_exit_<stage>.json`` and ``.png`` in the log directory; W&B tables and image when available."""
        out = self._out_dir()
        json_path = out / f"early_exit_{stage}.json"
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rep, indent=1) + "\n")
        tmp.replace(json_path)
        png = out / f"early_exit_{stage}.png"
        plot_report(rep, png, title=f"{self.hparams.model} ({stage})")
        rank_zero_info(f"[early_exit] {stage}: mean stable oracle {rep['oracle/mean_exit']:.2f} of {rep['n_layers']} "
                       f"layers over {rep['n_tokens']} tokens; wrote {json_path} and {png}")
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                cols = ["exit_layer", "stable", "first", "initial", "continuation", "agreement_with_final"]
                units = rep["exit_units"]
                init = rep["hist_initial"] if len(rep["hist_initial"]) == len(units) else [None] * len(units)
                cont = rep["hist_continuation"] if len(rep["hist_continuation"]) == len(units) else [None] * len(units)
                rows = [[u, a, b, c, d, e] for u, a, b, c, d, e in zip(
                    units, rep["hist_stable"], rep["hist_first"], init, cont, rep["agreement_with_final"], strict=True)]
                logger.log_table(key=f"{stage}/oracle/hist", columns=cols, data=rows)
                cats = [[c, v["count"], v["mean_exit"]] for c, v in rep["by_category"].items()]
                logger.log_table(key=f"{stage}/oracle/hist_subword", columns=["category", "count", "mean_exit"], data=cats)
                logger.log_image(key=f"{stage}/early_exit_plot", images=[str(png)])

    # ------------------------------------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._records = []
        self._decode = {"full": [], "ee": [], "forced": []}
        self._warm = False

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        hp = self.hparams
        ids, am = batch["input_ids"], batch.get("attention_mask")
        metas = batch.get("meta") or [{} for _ in range(ids.shape[0])]
        records = []
        for r in range(ids.shape[0]):
            prompt = (ids[r] if am is None else ids[r][am[r].bool()]).view(1, -1)
            if not self._warm:  # one untimed run so that lazy initialisation does not count
                early_exit_generate(self.runner, prompt, min(4, hp.max_new_tokens), None, hp.kv_mode)
                self._warm = True
            f = early_exit_generate(self.runner, prompt, hp.max_new_tokens, None, hp.kv_mode)
            e = early_exit_generate(self.runner, prompt, hp.max_new_tokens, self.policy(), hp.kv_mode)
            t = early_exit_generate(self.runner, prompt, hp.max_new_tokens, self.policy(), hp.kv_mode,
                                    forced_tokens=f.tokens[:-1])
            for key, res in (("full", f), ("ee", e), ("forced", t)):
                self._decode[key].append(res)
            summary = decode_summary([f], [e], [t])
            records.append({**{k: v for k, v in metas[r].items() if k in ("id", "lang", "prompt", "response")},
                            "output_full": self._text(f.tokens), "output_ee": self._text(e.tokens),
                            "exits": e.exits, **{k.replace("/", "_"): v for k, v in summary.items()}})
        self._records.extend(records)
        return records

    def _text(self, tokens: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        cut = tokens.index(eos) if eos in tokens else len(tokens)
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)

    def on_predict_epoch_end(self) -> None:
        if not self._records or not self.trainer.is_global_zero:
            return
        hp = self.hparams
        summary = decode_summary(self._decode["full"], self._decode["ee"], self._decode["forced"])
        summary.update({"n_prompts": len(self._records), "max_new_tokens": hp.max_new_tokens, "gate": hp.gate,
                        "gate_threshold": hp.gate_threshold, "kv_mode": hp.kv_mode, "n_layers": self.runner.n_layers,
                        "threads": torch.get_num_threads()})
        self._write(self._records, "predictions.jsonl")
        path = self._out_dir() / "early_exit_decode.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        for logger in self.loggers:
            logger.log_metrics({f"predict/{k}": float(v) for k, v in summary.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}, step=0)
            logger.save()
        rank_zero_info("[early_exit] predict: " + ", ".join(
            f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float)) + f"; wrote {path}")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With a frozen LM only the gates are saved (the LM comes from ``model``)."""
        if self.hparams.finetune_lm:
            return
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("gates.")}
        checkpoint["litlab_gates_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse gates of another model (``ValueError`` with both shapes); complete a gates-only state dict."""
        self.gates.check_state_dict(checkpoint["state_dict"], prefix="gates.", source="checkpoint")
        if checkpoint.get("litlab_gates_only"):
            base = {k: v for k, v in self.state_dict().items() if k not in checkpoint["state_dict"]}
            checkpoint["state_dict"].update(base)


def plot_report(rep: dict[str, Any], path: Path, title: str = "") -> None:
    """Four panels: oracle histograms (stable, first), agreement with the final prediction per exit, oracle by
    sub-word position, word-initial vs continuation; written to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = rep["exit_units"]
    width = 0.4 if not rep["sublayer_exits"] else 0.2
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0, 0].bar([u - width / 2 for u in units], rep["hist_stable"], width, label="stable")
    ax[0, 0].bar([u + width / 2 for u in units], rep["hist_first"], width, label="first match")
    ax[0, 0].set(title="oracle exit layer", xlabel="exit (layers)", ylabel="tokens")
    ax[0, 0].legend()
    ax[0, 1].plot(units, rep["agreement_with_final"], marker=".", label="= final prediction")
    ax[0, 1].plot(units, rep["accuracy_next_token"], marker=".", label="= next token")
    ax[0, 1].set(title="per-exit top-1 agreement", xlabel="exit (layers)", ylim=(0, 1.02))
    ax[0, 1].legend()
    cats = list(rep["by_category"])
    ax[1, 0].bar(cats, [rep["by_category"][c]["mean_exit"] for c in cats])
    ax[1, 0].set(title="mean oracle exit by sub-word position", ylabel="layers")
    n = len(rep["hist_initial"])
    xs = list(range(1, n + 1))
    tot_i, tot_c = max(sum(rep["hist_initial"]), 1), max(sum(rep["hist_continuation"]), 1)
    ax[1, 1].plot(xs, [v / tot_i for v in rep["hist_initial"]], marker=".", label="word-initial")
    ax[1, 1].plot(xs, [v / tot_c for v in rep["hist_continuation"]], marker=".", label="continuation")
    ax[1, 1].set(title="oracle exit: word-initial vs continuation", xlabel="exit layer", ylabel="fraction")
    ax[1, 1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
