"""Numeric answer extraction and scoring for generation-based math evaluation (GSM8K, MGSM, MSVAMP, GSM-symbolic).

Pure Python (no torch). Shared by SLAM (spec ``slam.md`` section 7) and NDP (spec ``ndp.md`` section 7).

Two extraction modes:

- ``mathoctopus`` (SLAM's default, faithful to MathOctopus): NFKC + Unicode digits to ASCII, delete every ``,``, take
  the last match of ``\\d+(\\.\\d+)?``. The sign is ignored ("-5" -> 5) and decimal commas become digits ("3,5" -> 35,
  SLAM pitfall 10). No answer marker is consulted.
- ``signed`` (NDP's default): the first number after the last ``####`` or ``The answer is`` marker (case-insensitive);
  if there is no marker, or no number after it, the last number of the text. Numbers keep their sign (``-`` or U+2212
  directly before the digits, not after a letter or digit: "3-5" is 3 and 5, "x = -5" is -5). Separators:

  * spaces (ordinary, NBSP, narrow NBSP, thin space) group digits only when the grouping is valid: first group 1-3
    digits, later groups exactly 3 digits ("1 600" -> 1600, "2 370 000,5" -> 2370000.5); otherwise they separate
    numbers ("12 15" -> 12 and 15). This is our restriction of the NDP spec's "remove spaces".
  * if both ``,`` and ``.`` occur, the rightmost is the decimal mark and the other is removed
    ("$1,200.50" -> 1200.5, "1.234,5" -> 1234.5);
  * a single separator type whose every occurrence is followed by exactly 3 digits is a thousands separator
    ("1,234" -> 1234, "2.370.000" -> 2370000), unless the first group starts with ``0`` or has more than 3 digits
    ("0,300" -> 0.3, "0.125" -> 0.125, "1234,567" -> 1234.567: our refinement); otherwise a single occurrence is a
    decimal mark ("0,3" -> 0.3, "3.50" -> 3.5), and repeated non-grouping occurrences separate numbers
    ("1,2,3" -> 1, 2, 3).

  A trailing sentence period is never part of a number ("The answer is 1,234." -> 1234). Currency symbols, units and
  ``%`` are ignored ("$1,200.50", "15 €", "30%" -> 30).

Gold answers (:func:`parse_gold`) always use the ``signed`` number grammar: the text after the last ``####`` (or,
failing that, after the last ``The answer is``), else the whole string, whose first line must be exactly one number.
"""

from __future__ import annotations

import math
import re
import unicodedata
from decimal import Decimal
from typing import Literal

__all__ = ["answers_match", "extract_last_number", "normalize_digits", "parse_gold", "score_math"]

Mode = Literal["signed", "mathoctopus"]

_SPACES = " \u00a0\u202f\u2009"  # ordinary space, NBSP, narrow NBSP, thin space
_CURRENCY = "$€£¥₹"
_BODY = rf"\d+(?:[,.{_SPACES}]\d+)*"
# Sign: ASCII hyphen-minus or U+2212, not glued to a preceding word character, digit or separator.
_NUMBER = re.compile(rf"(?P<sign>(?<![\w.,])[-\u2212])?(?:[{_CURRENCY}][{_SPACES}]?)?(?P<body>{_BODY})")
_GOLD = re.compile(
    rf"[{_SPACES}]*(?P<sign>[-\u2212])?[{_SPACES}]*(?:[{_CURRENCY}][{_SPACES}]?)?(?P<body>{_BODY})"
    rf"[{_SPACES}]*(?:[{_CURRENCY}%])?\.?[{_SPACES}]*"
)
_MARKER = re.compile(r"####|the answer is", re.IGNORECASE)
_GOLD_MARKERS = (re.compile(r"####"), re.compile(r"the answer is:?", re.IGNORECASE))
_MATHOCTOPUS = re.compile(r"\d+(?:\.\d+)?")
_SPACE_SPLIT = re.compile(f"[{_SPACES}]")


def normalize_digits(text: str) -> str:
    """NFKC-normalise ``text`` and map every Unicode decimal digit to its ASCII digit.

    Covers full-width ("１２" -> "12", already done by NFKC), Bengali ("১২"), Thai ("๑๒"), Devanagari ("१२"),
    Arabic-Indic and every other character with a ``unicodedata.decimal`` value. NFKC also turns NBSP/narrow NBSP into
    plain spaces.
    """
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    out = []
    for ch in text:
        digit = None if ch.isascii() else unicodedata.decimal(ch, None)
        out.append(ch if digit is None else str(digit))
    return "".join(out)


def _parse_punct(s: str) -> list[Decimal]:
    """Digits with ``,``/``.`` separators (no spaces) -> one number, or several when the separators do not parse."""
    seps = {c for c in s if c in ",."}
    if not seps:
        return [Decimal(s)]
    if len(seps) == 2:
        dec = s[max(s.rfind(","), s.rfind("."))]
        thou = "," if dec == "." else "."
        if s.count(dec) == 1:
            int_part, frac = s.split(dec)
            return [Decimal(int_part.replace(thou, "") + "." + frac)]
        return [Decimal(g) for g in re.split(r"[,.]", s)]
    groups = s.split(seps.pop())
    first = groups[0]
    if 1 <= len(first) <= 3 and first[0] != "0" and all(len(g) == 3 for g in groups[1:]):
        return [Decimal("".join(groups))]
    if len(groups) == 2:
        return [Decimal(groups[0] + "." + groups[1])]
    return [Decimal(g) for g in groups]


def _parse_body(body: str) -> list[Decimal]:
    """A digit run with any separators (``_BODY``) -> the numbers it denotes, in order."""
    chunks = _SPACE_SPLIT.split(body)
    if len(chunks) == 1:
        return _parse_punct(body)
    if (
        re.fullmatch(r"\d{1,3}", chunks[0])
        and all(re.fullmatch(r"\d{3}", c) for c in chunks[1:-1])
        and re.fullmatch(r"\d{3}(?:[,.]\d+)?", chunks[-1])
    ):
        return _parse_punct("".join(chunks))
    return [n for c in chunks for n in _parse_punct(c)]


def _numbers(text: str) -> list[Decimal]:
    """All numbers of ``text`` in order, under the ``signed`` grammar (see the module docstring)."""
    out: list[Decimal] = []
    for m in _NUMBER.finditer(text):
        nums = _parse_body(m.group("body"))
        if m.group("sign"):
            nums[0] = -nums[0]
        out.extend(nums)
    return out


def extract_last_number(text: str, mode: Mode = "signed", normalize: bool = True) -> float | None:
    """The predicted number of a generated answer, or ``None`` when it contains no number.

    ``mode="mathoctopus"``: the last ``\\d+(\\.\\d+)?`` after deleting ``,`` (sign ignored; SLAM spec section 7).
    ``mode="signed"``: the first number after the last ``####`` / ``The answer is`` marker, else the last number
    (rules in the module docstring). ``normalize`` applies :func:`normalize_digits` first.

    Raises:
        ValueError: unknown ``mode``.
    """
    if normalize:
        text = normalize_digits(text)
    if mode == "mathoctopus":
        matches = _MATHOCTOPUS.findall(text.replace(",", ""))
        return _finite(matches[-1]) if matches else None
    if mode != "signed":
        raise ValueError(f"answer extraction mode must be 'signed' or 'mathoctopus', got {mode!r}")
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _numbers(text[markers[-1].end() :])
        if after:
            return _finite(after[0])
    nums = _numbers(text)
    return _finite(nums[-1]) if nums else None


def _finite(number: str) -> float | None:
    """A degenerate output (hundreds of digits) overflows to inf: no usable answer."""
    value = float(number)
    return value if math.isfinite(value) else None


def parse_gold(answer: str) -> float:
    """Parse a gold answer: ``"... #### 1,600"`` -> 1600.0, ``"The answer is: 5."`` -> 5.0, ``"42"`` -> 42.0.

    The text after the last ``####`` (else after the last ``The answer is``, else the whole string), up to its first
    line break, must be exactly one number (optional sign, currency, ``%`` and final period), parsed with the
    ``signed`` grammar after :func:`normalize_digits`.

    Raises:
        ValueError: no single number there (e.g. ``"#### -154/5"``, ``"#### "``, ``"no number"``), quoting the text.
    """
    text = normalize_digits(answer)
    for marker in _GOLD_MARKERS:
        found = list(marker.finditer(text))
        if found:
            text = text[found[-1].end() :]
            break
    line = text.strip().split("\n", 1)[0].strip()
    m = _GOLD.fullmatch(line)
    nums = _parse_body(m.group("body")) if m else []
    if len(nums) != 1:
        snippet = answer if len(answer) <= 200 else "..." + answer[-200:]
        raise ValueError(f"gold answer has no single number after '####' / 'The answer is' or as text: {snippet!r}")
    return float(-nums[0] if m.group("sign") else nums[0])


def answers_match(pred: float | None, gold: float, abs_tol: float = 1e-3) -> bool:
    """``True`` iff ``pred`` is not ``None`` and ``pred == gold`` or ``|pred - gold| < abs_tol`` (MathOctopus: 1e-3)."""
    if pred is None:
        return False
    return pred == gold or abs(pred - gold) < abs_tol


def score_math(outputs: list[str], golds: list[str], mode: Mode = "signed", abs_tol: float = 1e-3) -> list[dict]:
    """Score generated answers against gold answers, one dict per item (ready for a predictions file).

    Returns:
        ``[{"pred": float | None, "gold": float, "correct": bool, "no_answer": bool}, ...]``; accuracy is the mean of
        ``correct``.

    Raises:
        ValueError: ``len(outputs) != len(golds)``, or ``golds[i]`` has no number (the message names ``i``).
    """
    if len(outputs) != len(golds):
        raise ValueError(f"score_math: {len(outputs)} outputs but {len(golds)} gold answers")
    rows = []
    for i, (out, gold_text) in enumerate(zip(outputs, golds)):
        try:
            gold = parse_gold(gold_text)
        except ValueError as e:
            raise ValueError(f"golds[{i}]: {e}") from None
        pred = extract_last_number(out, mode=mode)
        correct = answers_match(pred, gold, abs_tol)
        rows.append({"pred": pred, "gold": gold, "correct": correct, "no_answer": pred is None})
    return rows
