"""Translate-and-Revise (TAR, Huang et al., CCL 2024, arXiv 2407.13164): constrained translation with an LLM.

Spec: ``shared/methods/constrained_mt.md``. Inference only: ``python train.py test|predict --config
configs/constrained_mt/<name>.yaml``; ``fit`` raises.

Per batch of items (:class:`datamodules.terminology.TerminologyDataModule`):

1. round 0: every item is translated with the constraints in the prompt (``translate_template``), one batched call;
2. the rule-based :class:`~lit_models.nn.constraint_checker.ConstraintChecker` finds the unmet units (term pairs,
   tags, placeholders, tag order) of each output;
3. rounds 1..``max_revisions``: only items with unmet units are re-prompted (``revise_template``: source, all
   constraints, the unmet ones, the current translation), one batched call per round; fully satisfied items are
   frozen and never sent again.

``select: best`` keeps, per item, the output with the most satisfied units (ties to the later round), so CSR never
decreases over rounds; ``select: last`` keeps the latest output. The revised translation is the selected one.

Prompts are ``str.format`` templates with the placeholders ``{src_lang}``, ``{tgt_lang}``, ``{source}``,
``{constraint_lines}``, ``{unit_list}``, ``{previous}`` and ``{unmet_lines}``. A template line is left out when an
optional placeholder on it (``{constraint_lines}``, ``{unit_list}``, ``{unmet_lines}``) is empty;
``{constraint_lines}`` and ``{unmet_lines}`` render one ``- ...`` line per entry, each preceded by a newline. Required:
``{source}`` in both, ``{constraint_lines}`` in the translate template (unless ``constraints_in_prompt: false``),
``{previous}`` and ``{unmet_lines}`` in the revise template. Literal braces are written ``{{`` ``}}``.

Output cleaning: strip whitespace and one leading label (``Translation:``, ``<tgt_lang>:``,
``<tgt_lang> translation:``), keep the first non-empty line for single-line sources, strip matching quotes.

Metrics (``test/...``; ``predict/...`` to the loggers when references exist), per round ``r = 0..max_revisions``
on the output selected after ``r`` revisions (items that stopped carry forward):

- ``csr_r{r}``: constraint satisfaction rate = satisfied units / units, micro-averaged over items with >= 1 unit;
- ``exact_r{r}``: share of those items with every unit met;
- ``sacrebleu_r{r}``, ``chrf_r{r}``: corpus sacreBLEU (``sacrebleu_tokenize``) and chrF over items with a reference;
- ``llm_calls_r{r}``: LLM calls made in round ``r``; ``len_ratio_r{r}``: hypothesis / reference characters;
- ``echo_r{r}``: share of outputs that copy the prompt's constraint lines (``→``, ``->``, "must be translated as"):
  such outputs can meet term constraints without translating (spec pitfall 3);

final ``csr``, ``exact``, ``sacrebleu``, ``chrf`` (= round ``max_revisions``); ``reference_csr`` (CSR of the
references: 1.0 on the demo set); ``revised_frac`` (items revised at least once), ``regressions`` (revisions whose
output met fewer units than the translation they revised), ``src_term_missing`` (constraint sources not found in
their source), ``failed_calls`` and ``failed_items`` (endpoint failures after retries; a failed item keeps its last
output, or "" when round 0 failed, and is not revised further).

Every item with every round's rendered prompt, raw and cleaned output, unmet list and the selected round is written
atomically as JSONL to ``predictions_path`` (default ``<log dir>/constrained_mt_<stage>.jsonl``), with a summary
``<same name>.summary.json`` (metrics, sacreBLEU signatures, settings).
"""

from __future__ import annotations

import json
import re
import string
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_models.fileio import atomic_write
from lit_models.nn.constraint_checker import CheckResult, ConstraintChecker
from lit_models.nn.llm_backends import (
    HFChatBackend,
    LLMBackend,
    LLMRequest,
    OpenAICompatBackend,
    ScriptedBackend,
)
from lit_models.nn.mt_metrics import corpus_bleu, corpus_chrf

__all__ = ["DEFAULT_REVISE", "DEFAULT_TRANSLATE", "ConstrainedTranslation", "clean_output", "is_echo",
           "render_template"]

DEFAULT_TRANSLATE = (
    "Translate the following {src_lang} text into {tgt_lang}.\n"
    "Use these term translations exactly as written:{constraint_lines}\n"
    "Keep every markup tag and placeholder ({unit_list}) unchanged, correctly nested and in the same order.\n"
    "Answer with the {tgt_lang} translation only.\n"
    "\n"
    "{src_lang}: {source}"
)
DEFAULT_REVISE = (
    "Source ({src_lang}): {source}\n"
    "Current {tgt_lang} translation: {previous}\n"
    "Required term translations:{constraint_lines}\n"
    "The current translation breaks these requirements:{unmet_lines}\n"
    "Rewrite the translation so that every requirement is met, changing as little else as possible.\n"
    "Answer with the corrected {tgt_lang} translation only."
)
SELF_CHECK_LINE = "\n- check every requirement above and fix any that the translation breaks"

PLACEHOLDERS = ("src_lang", "tgt_lang", "source", "constraint_lines", "unit_list", "previous", "unmet_lines")
OPTIONAL = ("constraint_lines", "unit_list", "unmet_lines")
BACKENDS = ("hf", "openai", "scripted")
SELECTS = ("best", "last")
DETECTIONS = ("rule", "self", "none")


def _fields(template: str, key: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"model.init_args.{key}: not a valid format template ({err}); write literal braces as "
                         "{{ and }}") from None
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if unknown:
        raise ValueError(f"model.init_args.{key}: unknown placeholder(s) {['{' + n + '}' for n in unknown]}; "
                         f"allowed: {['{' + p + '}' for p in PLACEHOLDERS]}")
    return names


def validate_template(template: str, key: str, required: tuple[str, ...]) -> None:
    """Raise ValueError naming ``key`` when ``template`` misses a required or uses an unknown placeholder."""
    names = _fields(template, key)
    missing = [r for r in required if r not in names]
    if missing:
        raise ValueError(f"model.init_args.{key} lacks the required placeholder(s) "
                         f"{['{' + m + '}' for m in missing]}")


def render_template(template: str, values: dict[str, str]) -> str:
    """Fill ``template``; lines holding an empty optional placeholder are left out (module docstring)."""
    out = []
    for line in template.split("\n"):
        names = {f for _, f, _, _ in string.Formatter().parse(line) if f is not None}
        if any(n in OPTIONAL and not values.get(n) for n in names):
            continue
        out.append(line.format(**values))
    return "\n".join(out)


_ECHO = re.compile(r"\u2192|->|must be translated as", re.IGNORECASE)


def is_echo(text: str) -> bool:
    """Does an output copy the prompt's constraint list (``"s" → "t"``) or its unmet report (gaming the checker)?"""
    return bool(_ECHO.search(text))


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201e": "\u201c", "\u00ab": "\u00bb", "`": "`"}


def clean_output(text: str, tgt_lang: str, single_line: bool = True) -> str:
    """Strip whitespace, one leading label (``Translation:``, ``English:``, ``English translation:``), keep the first
    non-empty line when ``single_line``, strip one pair of matching quotes."""
    s = text.strip()
    label = re.compile(rf"^(?:(?:corrected\s+)?(?:{re.escape(tgt_lang)}\s+)?translation|{re.escape(tgt_lang)})\s*:\s*",
                       re.IGNORECASE)
    s = label.sub("", s, count=1).strip()
    if single_line:
        s = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
        s = label.sub("", s, count=1).strip()
    if len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]]:
        s = s[1:-1].strip()
    return s


class ConstrainedTranslation(L.LightningModule):
    """Translate, check, revise (see the module docstring).

    Args:
        backend: ``hf`` (a transformers chat model), ``openai`` (an OpenAI-compatible endpoint) or ``scripted``
            (the deterministic fake LLM of :class:`~lit_models.nn.llm_backends.ScriptedBackend`).
        model_path: ``hf``: ``smollm2-135m`` (alias ``smollm2-135m-instruct``), a tiny random model name
            (``llama-tiny``, plumbing only), a local directory or a cached hub name (never downloaded).
        model_config_overrides: tiny random models only: config fields to change.
        dtype: ``hf`` parameter dtype (``float32`` on CPU; ``bfloat16`` on GPUs).
        tokenizer: linked from the DataModule by the CLI (None there); a tokenizer object overrides the model's.
        system_prompt: optional system message (None: the chat template's default).
        api_base, api_model, api_key_env, allow_remote, request_timeout_s, max_retries, retry_backoff_s, concurrency:
            ``openai`` settings (see :class:`~lit_models.nn.llm_backends.OpenAICompatBackend`).
        scripted_policy: ``scripted``: ``{"name": "fix_one_per_round" | "ignore_revisions" | "break_other" |
            "echo_source"}``.
        src_lang, tgt_lang: language names used in the prompts.
        max_revisions: revision rounds K (0: translate once).
        select: ``best`` or ``last`` (module docstring).
        constraints_in_prompt: False gives the plain-translation baseline (no constraint or unit lines).
        detection: ``rule`` (the checker's unmet list goes into the revise prompt), ``self`` (every item is revised
            each round and the LLM is told to check every requirement itself; an ablation), ``none`` (no revision).
        translate_template, revise_template: prompt templates (module docstring).
        casefold, match, prefix_max_strip, word_boundary, loose_punct_space, overlap, count_occurrences, tag_order,
            unescape_html, lemma_lang: checker options (:mod:`lit_models.nn.constraint_checker`).
        max_new_tokens: generation limit per call.
        sacrebleu_tokenize: sacreBLEU tokenizer (``13a``; ``zh`` for Chinese, ``char`` for Japanese without MeCab).
        predictions_path: the JSONL of every round (default ``<log dir>/constrained_mt_<stage>.jsonl``).

    Raises:
        ValueError: an unknown ``backend``/``select``/``match``/``overlap``/``tag_order``/``detection`` (listing the
            allowed values), ``max_revisions < 0``, a template with a missing or unknown placeholder (naming it),
            ``openai`` without ``api_base``/``api_model`` or with a remote host and ``allow_remote: false``,
            ``scripted`` without a policy, an unavailable sacreBLEU tokenizer, a tokenizer without a chat template.
        FileNotFoundError: ``hf`` with a missing local model path.
        ImportError: ``match: lemma`` without ``simplemma``.
        NotImplementedError: ``fit``.
    """

    def __init__(
        self,
        backend: Literal["hf", "openai", "scripted"] = "hf",
        model_path: str = "smollm2-135m",
        model_config_overrides: dict[str, Any] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        tokenizer: Any = None,
        system_prompt: str | None = None,
        api_base: str | None = None,
        api_model: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        allow_remote: bool = False,
        request_timeout_s: float = 60.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        concurrency: int = 4,
        scripted_policy: dict[str, Any] | None = None,
        src_lang: str = "German",
        tgt_lang: str = "English",
        max_revisions: int = 3,
        select: Literal["best", "last"] = "best",
        constraints_in_prompt: bool = True,
        detection: Literal["rule", "self", "none"] = "rule",
        translate_template: str = DEFAULT_TRANSLATE,
        revise_template: str = DEFAULT_REVISE,
        casefold: bool = True,
        match: Literal["exact", "prefix", "lemma"] = "exact",
        prefix_max_strip: int = 2,
        word_boundary: bool = True,
        loose_punct_space: bool = True,
        overlap: Literal["independent", "exclusive"] = "independent",
        count_occurrences: bool = False,
        tag_order: Literal["strict", "nesting"] = "strict",
        unescape_html: bool = False,
        lemma_lang: str = "en",
        max_new_tokens: int = 256,
        sacrebleu_tokenize: str = "13a",
        predictions_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        for key, value, allowed in (("backend", backend, BACKENDS), ("select", select, SELECTS),
                                    ("detection", detection, DETECTIONS)):
            if value not in allowed:
                raise ValueError(f"model.init_args.{key} must be one of {list(allowed)}, got {value!r}")
        if max_revisions < 0:
            raise ValueError(f"model.init_args.max_revisions must be >= 0, got {max_revisions}")
        if max_new_tokens < 1:
            raise ValueError(f"model.init_args.max_new_tokens must be >= 1, got {max_new_tokens}")
        validate_template(translate_template, "translate_template",
                          ("source", "constraint_lines") if constraints_in_prompt else ("source",))
        validate_template(revise_template, "revise_template",
                          ("source", "previous", "unmet_lines") if detection != "none" else ("source",))
        try:
            self.checker = ConstraintChecker(
                casefold=casefold, match=match, prefix_max_strip=prefix_max_strip, word_boundary=word_boundary,
                loose_punct_space=loose_punct_space, overlap=overlap, count_occurrences=count_occurrences,
                tag_order=tag_order, unescape_html=unescape_html, lemma_lang=lemma_lang)
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        corpus_bleu(["a"], [["a"]], tokenize=sacrebleu_tokenize)  # an unavailable tokenizer fails now, not at the end
        self.backend = self._build_backend(tokenizer)
        # register the LLM so that Lightning moves it to the device; None for HTTP / scripted backends
        self.llm = self.backend.module
        self._records: list[dict[str, Any]] = []
        self._round_times: list[float] = []

    # ------------------------------------------------------------------------------------------------ backend
    def _build_backend(self, tokenizer: Any) -> LLMBackend:
        hp = self.hparams
        if hp.backend == "scripted":
            return ScriptedBackend(hp.scripted_policy)
        if hp.backend == "openai":
            return OpenAICompatBackend(
                hp.api_base, hp.api_model, api_key_env=hp.api_key_env, allow_remote=hp.allow_remote,
                timeout_s=hp.request_timeout_s, max_retries=hp.max_retries, backoff_s=hp.retry_backoff_s,
                max_new_tokens=hp.max_new_tokens, concurrency=hp.concurrency, system_prompt=hp.system_prompt)
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else None
        return HFChatBackend.from_name(hp.model_path, dtype=hp.dtype, config_overrides=hp.model_config_overrides,
                                       tokenizer=tok, max_new_tokens=hp.max_new_tokens,
                                       system_prompt=hp.system_prompt)

    # ------------------------------------------------------------------------------------------------ fit refused
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise NotImplementedError("ConstrainedTranslation is inference-only; use test or predict")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        raise NotImplementedError("ConstrainedTranslation is inference-only; use test or predict")

    def configure_optimizers(self) -> Any:
        raise NotImplementedError("ConstrainedTranslation is inference-only; use test or predict")

    # ------------------------------------------------------------------------------------------------ prompts
    @staticmethod
    def _constraint_lines(constraints: list[dict[str, Any]]) -> str:
        return "".join("\n- \"{}\" \u2192 {}".format(c["src"], " or ".join(f'"{t}"' for t in c["tgt"]))
                       for c in constraints)

    def translate_prompt(self, item: dict[str, Any], units: list[Any]) -> str:
        """The round-0 prompt of ``item`` (``units``: its structural units)."""
        hp = self.hparams
        show = hp.constraints_in_prompt
        unit_labels = [u.label for u in units if u.kind != "order"]
        return render_template(hp.translate_template, {
            "src_lang": hp.src_lang, "tgt_lang": hp.tgt_lang, "source": item["source"],
            "constraint_lines": self._constraint_lines(item["constraints"]) if show else "",
            "unit_list": ", ".join(unit_labels) if show else "", "previous": "", "unmet_lines": ""})

    def revise_prompt(self, item: dict[str, Any], units: list[Any], previous: str, check: CheckResult) -> str:
        """The revision prompt of ``item`` for translation ``previous`` and its check."""
        hp = self.hparams
        unmet = SELF_CHECK_LINE if hp.detection == "self" else "".join(f"\n- {u.message}" for u in check.unmet)
        return render_template(hp.revise_template, {
            "src_lang": hp.src_lang, "tgt_lang": hp.tgt_lang, "source": item["source"], "previous": previous,
            "constraint_lines": self._constraint_lines(item["constraints"]),
            "unit_list": ", ".join(u.label for u in units if u.kind != "order"), "unmet_lines": unmet})

    # ------------------------------------------------------------------------------------------------ the loop
    def translate_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run TAR on ``items``; returns one record per item (see :meth:`_record`)."""
        hp = self.hparams
        K = 0 if hp.detection == "none" else hp.max_revisions
        states = []
        for item in items:
            units = self.checker.units(item["source"], item_id=item["id"])
            states.append({"item": item, "units": units, "rounds": [], "selected": [], "done": False,
                           "failed": False, "sel": None})
        for r in range(K + 1):
            if r == 0:
                active = states
            elif hp.detection == "self":
                active = [s for s in states if not s["failed"] and s["rounds"][s["sel"]]["n_units"] > 0]
            else:
                active = [s for s in states if not s["done"]]
            requests = []
            for s in active:
                if r == 0:
                    prompt = self.translate_prompt(s["item"], s["units"])
                    requests.append(LLMRequest(prompt, s["item"], 0))
                else:
                    base = s["rounds"][s["sel"]]
                    prompt = self.revise_prompt(s["item"], s["units"], base["output"], base["_check"])
                    requests.append(LLMRequest(prompt, s["item"], r, base["_check"].unmet, base["output"]))
            t0 = time.perf_counter()
            responses = self.backend.generate(requests) if requests else []
            if len(self._round_times) <= r:
                self._round_times += [0.0] * (r + 1 - len(self._round_times))
            self._round_times[r] += time.perf_counter() - t0
            for s, req, resp in zip(active, requests, responses, strict=True):
                self._update(s, r, req, resp)
            for s in states:  # the selection after r revisions (items that stopped carry forward)
                s["selected"].append(s["sel"])
        return [self._record(s) for s in states]

    def _update(self, s: dict[str, Any], r: int, req: LLMRequest, resp: Any) -> None:
        item = s["item"]
        single = "\n" not in item["source"].strip()
        entry: dict[str, Any] = {"round": r, "prompt": resp.rendered, "raw_output": resp.text, "error": resp.error,
                                 "attempts": resp.attempts}
        if resp.text is None:
            s["failed"], s["done"] = True, True
            if s["sel"] is not None:
                entry.update(output=None, n_met=None, n_units=None, unmet=None)
                s["rounds"].append(entry)
                return
            text = ""
        else:
            text = clean_output(resp.text, self.hparams.tgt_lang, single_line=single)
        check = self.checker.check(item["source"], text, item["constraints"], units=s["units"], item_id=item["id"])
        entry.update(output=text, n_met=check.n_met, n_units=check.n_units,
                     unmet=[u.message for u in check.unmet], echo=is_echo(text), _check=check)
        if r > 0 and s["sel"] is not None:
            entry["regression"] = check.n_met < s["rounds"][s["sel"]]["n_met"]
        s["rounds"].append(entry)
        idx = len(s["rounds"]) - 1
        if s["sel"] is None or self.hparams.select == "last" or check.n_met >= s["rounds"][s["sel"]]["n_met"]:
            s["sel"] = idx
        if check.all_met:
            s["done"] = True

    def _record(self, s: dict[str, Any]) -> dict[str, Any]:
        item = s["item"]
        rounds = [{k: v for k, v in e.items() if k != "_check"} for e in s["rounds"]]
        by_round = [rounds[i]["round"] if i is not None else None for i in s["selected"]]
        final = rounds[s["selected"][-1]] if s["selected"] and s["selected"][-1] is not None else {}
        ref = item.get("reference")
        ref_check = None
        if ref is not None:
            ref_check = self.checker.check(item["source"], ref, item["constraints"], units=s["units"])
        hyps = [rounds[i]["output"] if i is not None else "" for i in s["selected"]]
        echo = [bool(rounds[i].get("echo")) if i is not None else False for i in s["selected"]]
        met = [rounds[i]["n_met"] if i is not None else 0 for i in s["selected"]]
        found = self.checker.src_found(item["source"], item["constraints"])
        extra = {k: v for k, v in item.items() if k not in ("id", "source", "reference", "constraints")}
        return {
            "id": item["id"], "source": item["source"], "reference": ref, "constraints": item["constraints"],
            "output": final.get("output", ""), "selected_round": final.get("round"),
            "n_units": len(s["units"]) + len(item["constraints"]), "n_met": final.get("n_met", 0),
            "failed": s["failed"], "reference_n_met": ref_check.n_met if ref_check else None,
            "src_term_missing": sum(not f for f in found),
            "selected_by_round": by_round, "output_by_round": hyps, "n_met_by_round": met, "echo_by_round": echo,
            "rounds": rounds, **{f"meta_{k}": v for k, v in extra.items()},
        }

    # ------------------------------------------------------------------------------------------------ metrics
    def compute_metrics(self, records: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
        """Per-round and final metrics of ``records`` (module docstring) and the sacreBLEU signatures."""
        hp = self.hparams
        K = 0 if hp.detection == "none" else hp.max_revisions
        metrics: dict[str, float] = {}
        sigs: dict[str, str] = {}
        scored = [r for r in records if r["n_units"] > 0]
        with_ref = [r for r in records if r["reference"] is not None]
        for k in range(K + 1):
            if scored:
                units = sum(r["n_units"] for r in scored)
                metrics[f"csr_r{k}"] = sum(r["n_met_by_round"][k] for r in scored) / units
                metrics[f"exact_r{k}"] = sum(r["n_met_by_round"][k] == r["n_units"] for r in scored) / len(scored)
            metrics[f"llm_calls_r{k}"] = float(sum(any(e["round"] == k for e in r["rounds"]) for r in records))
            if records:
                metrics[f"echo_r{k}"] = sum(r["echo_by_round"][k] for r in records) / len(records)
            if with_ref:
                hyps = [r["output_by_round"][k] for r in with_ref]
                refs = [[r["reference"]] for r in with_ref]
                metrics[f"sacrebleu_r{k}"], sigs["sacrebleu"] = corpus_bleu(hyps, refs, tokenize=hp.sacrebleu_tokenize)
                metrics[f"chrf_r{k}"], sigs["chrf"] = corpus_chrf(hyps, refs)
                metrics[f"len_ratio_r{k}"] = sum(map(len, hyps)) / max(1, sum(len(r[0]) for r in refs))
        for name in ("csr", "exact", "sacrebleu", "chrf"):
            if f"{name}_r{K}" in metrics:
                metrics[name] = metrics[f"{name}_r{K}"]
        ref_scored = [r for r in scored if r["reference_n_met"] is not None]
        if ref_scored:
            metrics["reference_csr"] = sum(r["reference_n_met"] for r in ref_scored) / sum(
                r["n_units"] for r in ref_scored)
        if records:
            metrics["revised_frac"] = sum(any(e["round"] > 0 for e in r["rounds"]) for r in records) / len(records)
        metrics["regressions"] = float(sum(bool(e.get("regression")) for r in records for e in r["rounds"]))
        metrics["src_term_missing"] = float(sum(r["src_term_missing"] for r in records))
        metrics["failed_calls"] = float(sum(e["error"] is not None for r in records for e in r["rounds"]))
        metrics["failed_items"] = float(sum(r["failed"] for r in records))
        return metrics, sigs

    # ------------------------------------------------------------------------------------------------ Lightning
    def on_test_epoch_start(self) -> None:
        self._records, self._round_times = [], []

    def on_predict_epoch_start(self) -> None:
        self._records, self._round_times = [], []

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._records.extend(self.translate_batch(batch))

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        records = self.translate_batch(batch)
        self._records.extend(records)
        return [{"id": r["id"], "output": r["output"]} for r in records]

    def _gather(self) -> list[dict[str, Any]]:
        records = self._records
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, records)
            seen: set[Any] = set()
            records = []
            for part in parts:  # DistributedSampler pads with repeats: one record per id
                for rec in part:
                    if rec["id"] not in seen:
                        seen.add(rec["id"])
                        records.append(rec)
        return records

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_predict_epoch_end(self) -> None:
        self._finish("predict")

    def _finish(self, stage: str) -> None:
        records = self._gather()
        metrics, sigs = self.compute_metrics(records)
        prefixed = {f"{stage}/{k}": v for k, v in metrics.items()}
        if stage == "test":
            self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in prefixed.items()}, rank_zero_only=True)
        elif self.trainer.is_global_zero and any(r["reference"] is not None for r in records):
            for logger in self.trainer.loggers:
                logger.log_metrics(prefixed, step=0)
                logger.save()
        self.last_metrics = metrics
        if not self.trainer.is_global_zero:
            return
        path = Path(self.hparams.predictions_path) if self.hparams.predictions_path else (
            Path(self.trainer.log_dir or self.trainer.default_root_dir) / f"constrained_mt_{stage}.jsonl")
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
        summary = {"stage": stage, "n_items": len(records), "metrics": metrics, "signatures": sigs,
                   "round_wall_s": self._round_times, "hparams": {k: v for k, v in self.hparams.items()}}
        atomic_write(path.with_suffix(".summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
        K = 0 if self.hparams.detection == "none" else self.hparams.max_revisions
        lines = [f"[litlab] constrained MT {stage}: {len(records)} items -> {path}"]
        for k in range(K + 1):
            parts = [f"{name} {metrics[f'{name}_r{k}']:.4g}" for name in ("csr", "exact", "sacrebleu", "chrf",
                                                                          "llm_calls") if f"{name}_r{k}" in metrics]
            lines.append(f"  round {k}: " + ", ".join(parts))
        if sigs:
            lines.append(f"  {sigs.get('sacrebleu')}; {sigs.get('chrf')}")
        if metrics.get("failed_calls"):
            calls = sum(metrics.get(f"llm_calls_r{k}", 0.0) for k in range(K + 1))
            first = next((e["error"] for r in records for e in r["rounds"] if e["error"] is not None), "")
            lines.append(f"  WARNING: {metrics['failed_calls']:.0f} of {calls:.0f} LLM calls failed after retries "
                         f"({metrics.get('failed_items', 0):.0f} items keep no output); first error: {first}")
        rank_zero_info("\n".join(lines))
