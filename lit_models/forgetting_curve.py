"""Forgetting curve: how far back can a causal LM copy? (Liu et al., EMNLP 2024, arXiv 2410.04727).

For each dependency length ``L`` the model reads ``[bos] X [bos] X [eos]`` (copy setting) and ``[bos] Y [bos] X
[eos]`` (LM setting; Y unrelated) and is scored, teacher-forced, on the last ``ceil(L/2)`` tokens of the second ``X``
(spec ``forgetting_curve.md`` sections 3-4; samples from :class:`datamodules.long_text.LongTextDataModule`). The copy
curve against the LM curve gives the fine-grained memory length (copy accuracy >= 0.99) and the coarse-grained one
(copy significantly above LM, paired t-test p < 0.05). No training: run ``python train.py test --config
configs/forgetting_curve/<model>.yaml``.

Cost: one forward pass per input, copy and LM inputs stacked into one batch of ``2B`` rows of ``T = 2L + 3`` tokens.
Only the ``h`` scored positions go through the output layer (``decoder_and_head``), so memory does not grow with
``T x vocabulary``; predictions are argmaxes of the logits, never a softmax.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_models.fileio import atomic_write
from lit_models.hf import (
    count_parameters,
    decoder_and_head,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)
from lit_models.nn.forgetting_curve import (
    memory_lengths,
    paired_stats,
    plot_curve,
    scored_positions,
    teacher_forced_acc,
)

__all__ = ["ForgettingCurve", "ForwardContractError", "import_object"]

_STAT_KEYS = ("lm_mean", "lm_std", "copy_mean", "copy_std", "lm_accs", "copy_accs", "p_value", "normality")


class ForwardContractError(ValueError, TypeError):
    """A model or ``forward_fn`` that breaks the scoring contract (wrong output shape, no ``logits``): a setup bug,
    raised at once instead of being recorded as a failed length."""


def import_object(dotted: str, key: str) -> Any:
    """The object at ``package.module.attr`` (or ``package.module:attr``).

    Raises:
        ImportError: naming ``key`` and the path when the module or attribute does not exist.
    """
    module_name, sep, attr = dotted.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ImportError(f"{key}={dotted!r} is not a dotted path (package.module.function)")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"{key}={dotted!r} cannot be imported: {err}") from err


def _check_tokenizer(model: str, tokenizer: Any, trust_remote_code: bool) -> None:
    """Raise when the data's tokenizer is not the model's own (a silent mismatch would score garbage)."""
    try:
        own = load_tokenizer(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # no tokenizer beside the model (a bare weights directory): nothing to compare
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"data.init_args.tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) is not the "
            f"tokenizer of model.init_args.model={model!r}: set --data.init_args.tokenizer {model}"
        )


class ForgettingCurve(LightningModule):
    """Teacher-forced copy and LM accuracies per length, the paired t-test, memory lengths, JSON and plots.

    Outputs (in ``output_dir``, default ``<trainer.log_dir>/forgetting_curve``; never the working directory):

    - ``<title>.json``: one entry per length in the official schema (``length, lm_mean, lm_std, copy_mean, copy_std,
      lm_accs, copy_accs, p_value, normality{normality, variance_homogeneity}``) plus ``status`` (``ok``/``failed``),
      ``error``, ``n_scored`` (h), ``seconds``. Rewritten after every length, so a crash loses at most one length.
    - ``<title>.summary.json``: memory lengths and lower-bound flags, ``amnesia_length``, failures, model, data
      (tokenizer, corpus hash, N, seed, ids, grid), dtype, ``samples_per_s``, package versions.
    - ``<title>.png``: the two curves with +-1 std bands (and ``training_len`` markers).

    Logged: ``test/fine_grained_length``, ``test/coarse_grained_length``, ``test/amnesia_length`` (NaN when none),
    ``test/n_failed_lengths``, ``test/samples_per_s``; per length at ``step=L``: ``test/copy_acc``, ``test/lm_acc``,
    ``test/p_value``. W&B also gets the PNG (``test/forgetting_curve``) and the per-length table.

    Args:
        model: ``model_source="hf"``: a :func:`lit_models.hf.load_causal_lm` name (``smollm2-135m``, ``llama-tiny``,
            ``mamba-tiny``, ...), a local transformers directory or a cached hub name. ``"project"``: a dotted path
            to a callable returning an ``nn.Module`` (needs ``forward_fn``).
        tokenizer: the data's tokenizer object (linked from the DataModule by the CLI); it must be the model's own
            (compared by its full definition; tiny models use SmolLM2's). Data ids are checked against the model's
            vocabulary in ``on_test_start``.
        model_source: ``hf`` or ``project``.
        dtype: parameter dtype (``float32`` on CPU; ``bfloat16`` on GPU).
        model_config_overrides: tiny models only: config fields (e.g. ``{vocab_size: 1024, num_hidden_layers: 2}``).
        seed: initialisation seed of the tiny random models.
        attn_implementation: passed to ``from_pretrained`` (ignored by attention-free models).
        trust_remote_code: passed to ``from_pretrained``.
        forward_fn: dotted path to ``f(model, ids [B, T]) -> argmax ids [B, T]`` (the official
            ``teacher_forcing_forward`` hook) replacing the model's forward.
        score_half: ``ceil`` (official ``src[-length//2:]``) or ``floor`` tokens scored.
        fine_threshold: copy accuracy that counts as fine-grained memory, in (0, 1].
        alpha: significance level of the coarse-grained rule, in (0, 1).
        training_len: the model's training context, drawn on the plot (and ``training_len // 2``).
        title: file stem of the outputs.
        output_dir: where the outputs go; None: ``<trainer.log_dir>/forgetting_curve``.
        on_error: ``continue`` (record the failed length, go on) or ``raise`` (write the partial JSON, re-raise).
        log_x: log-scale length axis; None: log when the data's grid is ``log``.
        resume: reuse the lengths already in ``<output_dir>/<title>.json`` when its summary has the same settings.

    Raises:
        ValueError: ``fine_threshold``/``alpha``/``training_len``/``score_half``/``on_error`` out of range; the
            data holds ids the model's vocabulary does not have (naming the data keys).
        ImportError: ``forward_fn`` or a project ``model`` that cannot be imported.
        PermissionError: ``output_dir`` not writable (before any forward pass).
    """

    EVAL_TIME_HPARAMS = ("score_half", "fine_threshold", "alpha", "training_len", "title", "output_dir", "on_error",
                         "log_x", "resume", "forward_fn")

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Any = None,
        model_source: Literal["hf", "project"] = "hf",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        model_config_overrides: dict[str, Any] | None = None,
        seed: int = 0,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        forward_fn: str | None = None,
        score_half: Literal["ceil", "floor"] = "ceil",
        fine_threshold: float = 0.99,
        alpha: float = 0.05,
        training_len: int | None = None,
        title: str = "forgetting_curve",
        output_dir: str | None = None,
        on_error: Literal["continue", "raise"] = "continue",
        log_x: bool | None = None,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.tokenizer = tokenizer
        if not 0.0 < fine_threshold <= 1.0:
            raise ValueError(f"model.init_args.fine_threshold must be in (0, 1], got {fine_threshold}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"model.init_args.alpha must be in (0, 1), got {alpha}")
        if training_len is not None and training_len <= 0:
            raise ValueError(f"model.init_args.training_len must be > 0 or null, got {training_len}")
        if score_half not in ("ceil", "floor"):
            raise ValueError(f"model.init_args.score_half must be 'ceil' or 'floor', got {score_half!r}")
        if on_error not in ("continue", "raise"):
            raise ValueError(f"model.init_args.on_error must be 'continue' or 'raise', got {on_error!r}")
        if model_source not in ("hf", "project"):
            raise ValueError(f"model.init_args.model_source must be 'hf' or 'project', got {model_source!r}")
        self.forward_fn = import_object(forward_fn, "model.init_args.forward_fn") if forward_fn else None
        if model_source == "project":
            if self.forward_fn is None:
                raise ValueError("model_source='project' needs model.init_args.forward_fn (f(model, ids) -> argmax ids)")
            self.model = import_object(model, "model.init_args.model")()
        else:
            self.model = load_causal_lm(
                model, dtype, config_overrides=model_config_overrides, seed=seed,
                attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            )
        self.model.eval()
        self.model.requires_grad_(False)
        if tokenizer is not None and model_source == "hf":
            _check_tokenizer(model, tokenizer, trust_remote_code)
        self._reset()

    def _reset(self) -> None:
        self._accs: dict[int, dict[str, dict[int, float]]] = {}
        self._failed: dict[int, str] = {}
        self._seconds: dict[int, float] = {}
        self._samples = 0
        self._warned_lengths: set[int] = set()
        self._previous: dict[int, dict[str, Any]] = {}
        self._current_length: int | None = None

    # ------------------------------------------------------------------ model facts
    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def _vocab_size(self) -> int | None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return getattr(self.config, "vocab_size", None)

    def _position_limit(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def out_dir(self) -> Path:
        if self.hparams.output_dir is not None:
            return Path(self.hparams.output_dir).expanduser()
        root = self.trainer.log_dir if self._trainer is not None and self.trainer.log_dir else "."
        return Path(root) / "forgetting_curve"

    def _paths(self) -> dict[str, Path]:
        stem = self.out_dir / self.hparams.title
        return {"json": stem.with_name(stem.name + ".json"), "summary": stem.with_name(stem.name + ".summary.json"),
                "png": stem.with_name(stem.name + ".png")}

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def predict_accuracy(self, ids: Tensor, L: int) -> Tensor:
        """Teacher-forced accuracy of every row of ``ids`` [R, T = 2L + 3] on its scored positions.

        Returns:
            float64 [R].

        Raises:
            ForwardContractError (a ValueError and TypeError): ``forward_fn`` returned a shape other than [R, T], or
                the model output has no ``logits``.
        """
        targets = scored_positions(L, self.hparams.score_half).to(ids.device)
        if self.forward_fn is not None:
            pred = self.forward_fn(self.model, ids)
            if not isinstance(pred, Tensor) or tuple(pred.shape) != tuple(ids.shape):
                shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
                raise ForwardContractError(
                    f"forward_fn must return argmax ids of shape [B, T] = {tuple(ids.shape)}, got {shape}"
                )
            return teacher_forced_acc(pred, ids, L, self.hparams.score_half)
        decoder, head = decoder_and_head(self.model)
        if decoder is not None:
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            pred = head(hidden[:, targets - 1]).argmax(-1)
        else:
            out = self.model(input_ids=ids, use_cache=False)
            logits = getattr(out, "logits", None)
            if logits is None:
                raise ForwardContractError(f"{type(self.model).__name__} returned {type(out).__name__} without `logits`; give "
                                "model.init_args.forward_fn")
            pred = logits[:, targets - 1].argmax(-1)
        return pred.eq(ids[:, targets]).double().mean(-1).cpu()

    # ------------------------------------------------------------------ Lightning hooks
    def on_test_start(self) -> None:
        self._reset()
        out = self.out_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
                pass
        except OSError as err:
            raise PermissionError(f"model.init_args.output_dir={out} is not writable ({err})") from err
        dm = getattr(self.trainer, "datamodule", None)
        vocab = self._vocab_size()
        if dm is not None and hasattr(dm, "max_token_id") and vocab is not None and dm.max_token_id() >= vocab:
            raise ValueError(
                f"the data holds token id {dm.max_token_id()} but {type(self.model).__name__} has only {vocab} "
                "embeddings: use the model's own tokenizer (data.init_args.tokenizer) or, in random mode, set "
                f"data.init_args.random_id_range inside [0, {vocab - 1}] and bos_id/eos_id below {vocab}"
            )
        if self.hparams.resume:
            if self.hparams.output_dir is None:
                raise ValueError("model.init_args.resume=true needs a fixed model.init_args.output_dir (the default "
                                 "is a new logs/version_N directory per run, where nothing is found to resume)")
            self._previous = self._load_previous()
        if self.trainer.is_global_zero:
            # the settings go to disk before any partial JSON, so an interrupted run can be resumed and a partial
            # JSON is never read with another run's settings
            atomic_write(self._paths()["summary"], json.dumps(self._summary_head("running"), indent=1) + "\n")
        limit = self._position_limit()
        if dm is not None and limit is not None:
            over = [L for L in getattr(dm, "lengths", []) if 2 * L + 3 > limit]
            if over:
                rank_zero_warn(f"lengths {over} give inputs (2L+3 tokens) beyond the model's max_position_embeddings="
                               f"{limit}: probing past the trained length is intended, accuracies there may collapse")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        L = int(batch["length"])
        if self._current_length is not None and L != self._current_length:
            self._length_done(self._current_length)
        self._current_length = L
        if L in self._failed or L in self._previous:
            return
        ids = torch.cat([batch["copy_ids"], batch["lm_ids"]]).to(self.device)
        B = batch["copy_ids"].shape[0]
        t0 = time.perf_counter()
        try:
            acc = self.predict_accuracy(ids, L)
        except ForwardContractError:
            raise
        except Exception as err:  # OOM included: recorded per length, never silent
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._failed[L] = f"{type(err).__name__}: {err}"
            limit = self._position_limit()
            if limit is not None and 2 * L + 3 > limit:
                self._failed[L] += f" (input T={2 * L + 3} > max_position_embeddings={limit})"
            self._seconds[L] = self._seconds.get(L, 0.0) + time.perf_counter() - t0
            if self.hparams.on_error == "raise":
                self._write_partial()
                raise RuntimeError(f"forgetting curve failed at length L={L} (T={2 * L + 3}): {self._failed[L]}") \
                    from err
            rank_zero_warn(f"length L={L} (T={2 * L + 3}) failed and is recorded as failed: {self._failed[L]}")
            return
        self._seconds[L] = self._seconds.get(L, 0.0) + time.perf_counter() - t0
        self._samples += B
        rec = self._accs.setdefault(L, {"copy": {}, "lm": {}})
        for i, r in enumerate(batch["sample_idx"].tolist()):
            rec["copy"][r] = float(acc[i])
            rec["lm"][r] = float(acc[B + i])

    def _length_done(self, L: int) -> None:
        """Progress line and partial JSON once every sample of length ``L`` is scored (or it failed)."""
        self._write_partial()
        if L in self._previous:
            return
        rec = self._accs.get(L)
        if L in self._failed or rec is None:
            rank_zero_info(f"[forgetting_curve] L={L}: FAILED ({self._failed.get(L, 'no samples')})")
            return
        n = len(rec["copy"])
        rank_zero_info(f"[forgetting_curve] L={L} (T={2 * L + 3}): copy_acc {sum(rec['copy'].values()) / n:.4f}, "
                       f"lm_acc {sum(rec['lm'].values()) / n:.4f} over {n} samples in {self._seconds.get(L, 0.0):.1f}s")

    def on_test_epoch_end(self) -> None:
        if self._current_length is not None:
            self._length_done(self._current_length)
        accs, failed, seconds, samples = self._gathered()
        results = self._results(accs, failed, seconds)
        memory = memory_lengths(results, self.hparams.fine_threshold, self.hparams.alpha)
        total_s = sum(seconds.values())
        samples_per_s = samples / total_s if total_s > 0 and samples else None
        if self.trainer.is_global_zero:
            self._write_outputs(results, memory, samples_per_s)
            self._print_table(results, memory, samples_per_s)
            self._log_per_length(results)
        amnesia = memory["amnesia_length"]
        metrics = {
            "test/fine_grained_length": float(memory["fine_grained_length"]),
            "test/coarse_grained_length": float(memory["coarse_grained_length"]),
            "test/amnesia_length": float(amnesia) if amnesia is not None else float("nan"),
            "test/n_failed_lengths": float(memory["n_failed_lengths"]),
            "test/samples_per_s": float(samples_per_s) if samples_per_s is not None else float("nan"),
        }
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True)
        self.results, self.memory = results, memory

    # ------------------------------------------------------------------ results
    def _gathered(self) -> tuple[dict[int, dict[str, dict[int, float]]], dict[int, str], dict[int, float], int]:
        local = (self._accs, self._failed, self._seconds, self._samples)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
        accs: dict[int, dict[str, dict[int, float]]] = {}
        failed: dict[int, str] = {}
        seconds: dict[int, float] = {}
        for a, f, s, _ in parts:
            for L, rec in a.items():
                mine = accs.setdefault(L, {"copy": {}, "lm": {}})
                mine["copy"].update(rec["copy"])
                mine["lm"].update(rec["lm"])
            failed.update(f)
            for L, sec in s.items():
                seconds[L] = max(seconds.get(L, 0.0), sec)
        return accs, failed, seconds, sum(p[3] for p in parts)

    def _lengths(self) -> list[int]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "lengths"):
            return list(dm.lengths)
        return sorted(set(self._accs) | set(self._failed) | set(self._previous))

    def _results(self, accs: dict[int, Any], failed: dict[int, str], seconds: dict[int, float]) -> list[dict[str, Any]]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        repeats = getattr(dm, "repeats", None)
        out: list[dict[str, Any]] = []
        for L in self._lengths():
            if L in self._previous:
                out.append(self._previous[L])
                continue
            h = len(scored_positions(L, self.hparams.score_half))
            entry: dict[str, Any] = {"length": L, "n_scored": h, "seconds": round(seconds.get(L, 0.0), 4)}
            rec = accs.get(L)
            done = rec is not None and (repeats is None or len(rec["copy"]) == repeats)
            if L in failed or not done:
                error = failed.get(L, "not evaluated")
                entry.update({k: None for k in _STAT_KEYS}, status="failed", error=error)
            else:
                order = sorted(rec["copy"])
                stats = paired_stats([rec["lm"][r] for r in order], [rec["copy"][r] for r in order])
                entry.update(stats, status="ok", error=None)
            out.append(entry)
        return out

    def _settings(self) -> dict[str, Any]:
        """What must match for ``resume`` to reuse an earlier run's lengths."""
        dm = getattr(self.trainer, "datamodule", None)
        data = dict(getattr(dm, "info", {}))
        data.pop("lengths", None)
        data.pop("cache", None)
        data.pop("batch_size", None)
        hp = self.hparams
        return {"model": hp.model, "model_source": hp.model_source, "dtype": hp.dtype,
                "model_config_overrides": hp.model_config_overrides, "seed": hp.seed,
                "attn_implementation": hp.attn_implementation, "trust_remote_code": hp.trust_remote_code,
                "forward_fn": hp.forward_fn, "score_half": hp.score_half, "data": data}

    def _summary_head(self, status: str) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None)
        return {
            "status": status,
            "model": self.hparams.model,
            "lengths": list(getattr(dm, "lengths", [])),
            "settings": json.loads(json.dumps(self._settings(), default=str)),
        }

    def _load_previous(self) -> dict[int, dict[str, Any]]:
        paths = self._paths()
        if not paths["json"].is_file() or not paths["summary"].is_file():
            return {}
        summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
        if summary.get("settings") != json.loads(json.dumps(self._settings(), default=str)):
            rank_zero_warn(f"resume: {paths['summary']} was written with other settings; evaluating every length")
            return {}
        previous = {int(e["length"]): e for e in json.loads(paths["json"].read_text(encoding="utf-8"))
                    if e.get("status") == "ok"}
        rank_zero_info(f"[forgetting_curve] resume: reusing {len(previous)} lengths from {paths['json']}")
        return previous

    def _write_partial(self) -> None:
        if self.trainer.world_size > 1 or not self.trainer.is_global_zero:
            return
        results = [r for r in self._results(self._accs, self._failed, self._seconds)
                   if r["status"] == "ok" or r["length"] in self._failed]
        atomic_write(self._paths()["json"], json.dumps(results, indent=1) + "\n")

    def _write_outputs(self, results: list[dict[str, Any]], memory: dict[str, Any], samples_per_s: float) -> None:
        import lightning
        import scipy
        import transformers

        paths = self._paths()
        log_x = self.hparams.log_x
        dm = getattr(self.trainer, "datamodule", None)
        if log_x is None:
            log_x = getattr(dm, "granularity_type", "linear") == "log" and getattr(dm, "hparams", {}).get(
                "lengths") is None
        atomic_write(paths["json"], json.dumps(results, indent=1) + "\n")
        summary = {
            **self._summary_head("complete"),
            **memory,
            "fine_threshold": self.hparams.fine_threshold,
            "alpha": self.hparams.alpha,
            "model_class": type(self.model).__name__,
            "parameters": count_parameters(self.model),
            "max_position_embeddings": self._position_limit(),
            "training_len": self.hparams.training_len,
            "samples_per_s": samples_per_s,
            "failures": {str(r["length"]): r["error"] for r in results if r["status"] == "failed"},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "lightning": lightning.__version__, "scipy": scipy.__version__},
        }
        atomic_write(paths["summary"], json.dumps(summary, indent=1) + "\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plot_curve(results, paths["png"], training_len=self.hparams.training_len, log_x=bool(log_x),
                       title=f"{self.hparams.title} ({self.hparams.model})", memory=memory)

    def _print_table(self, results: list[dict[str, Any]], memory: dict[str, Any], samples_per_s: float) -> None:
        lines = ["", f"{'L':>7} {'lm_acc':>8} {'copy_acc':>9} {'p_value':>10}  status"]
        for r in results:
            if r["status"] == "ok":
                lines.append(f"{r['length']:>7} {r['lm_mean']:>8.4f} {r['copy_mean']:>9.4f} {r['p_value']:>10.3g}  ok")
            else:
                lines.append(f"{r['length']:>7} {'-':>8} {'-':>9} {'-':>10}  FAILED: {r['error']}")
        def bound(key: str) -> str:
            return " (a lower bound: it holds at the largest length, or longer lengths failed)" \
                if memory[f"{key}_is_lower_bound"] else ""

        amnesia = memory["amnesia_length"]
        lines.append(f"fine-grained memory length (copy >= {self.hparams.fine_threshold}): "
                     f"{memory['fine_grained_length']}{bound('fine')}")
        lines.append(f"coarse-grained memory length (copy > LM, p < {self.hparams.alpha}): "
                     f"{memory['coarse_grained_length']}{bound('coarse')}")
        lines.append(f"amnesia from L={amnesia}" if amnesia is not None else "no amnesia within the evaluated lengths")
        if samples_per_s is not None:
            lines.append(f"{samples_per_s:.2f} samples/s (one sample = a copy and an LM input)")
        if memory["failed_lengths"]:
            lines.append(f"could NOT evaluate lengths {memory['failed_lengths']} (errors in the JSON)")
        lines.append(f"outputs: {self._paths()['json'].parent}")
        rank_zero_info("\n".join(lines))

    def _log_per_length(self, results: list[dict[str, Any]]) -> None:
        ok = [r for r in results if r["status"] == "ok"]
        for logger in self.loggers:
            for r in ok:
                p = r["p_value"]
                logger.log_metrics({"test/copy_acc": r["copy_mean"], "test/lm_acc": r["lm_mean"],
                                    "test/p_value": p if p is not None and math.isfinite(p) else float("nan")},
                                   step=int(r["length"]))
            if type(logger).__name__ == "WandbLogger":
                columns = ["length", "lm_mean", "lm_std", "copy_mean", "copy_std", "p_value", "status"]
                logger.log_table("test/forgetting_curve_table", columns=columns,
                                 data=[[r.get(c) for c in columns] for r in results])
                logger.log_image("test/forgetting_curve", images=[str(self._paths()["png"])])
