"""LongBench metrics on hand-made cases against the reference definitions (THUDM/LongBench metrics.py / eval.py,
pltrdy rouge 1.0.1, fuzzywuzzy ratio)."""

from __future__ import annotations

import math

import pytest

from lit_models.nn.longbench_metrics import (
    classification,
    code_sim,
    count,
    first_line_rule,
    length_bucket,
    normalize_answer,
    qa_f1,
    retrieval,
    rouge,
    score_sample,
)
from lit_models.remamba import ReMamba


def test_qa_f1_normalises_case_punctuation_and_articles() -> None:
    assert normalize_answer("The  Cat, sat!  an apple") == "cat sat apple"
    assert qa_f1("The cat sat.", "cat sat on") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert qa_f1("a the an", "cat") == 0.0
    assert qa_f1("Paris, France", "paris") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_rouge_l_is_pltrdy_summary_level_with_unique_words() -> None:
    assert rouge("a b c", "a b c") == pytest.approx(1.0, abs=1e-6)
    # hyp sentences "the cat sat on the mat" / "it was happy"; ref "the cat was on the mat":
    # m = 5 distinct ref words, n = 8 distinct hyp words, union LCS {the, cat, on, mat} + {was} = 5
    assert rouge("the cat sat on the mat. it was happy", "the cat was on the mat") == pytest.approx(
        2 * (5 / 8) * 1 / (5 / 8 + 1 + 1e-8))
    # repeated words count once (exclusive=True): hyp "a a b" has n = 2, LCS words {a, b}
    assert rouge("a a b", "a b") == pytest.approx(2 * 1 * 1 / (2 + 1e-8))
    assert rouge("", "a b") == 0.0 and rouge("...", "a b") == 0.0  # the package raises: LongBench scores 0


def test_classification_keeps_longbench_quirks() -> None:
    classes = ["DESC", "ENTY", "ABBR"]
    assert classification("DESC and ENTY", "DESC", all_classes=classes) == 0.5
    assert classification("ENTY", "DESC", all_classes=classes) == 0.0
    # classes contained in the gold (but not equal to it) are dropped while the list is iterated, which skips the
    # element after each removal: "bc" (after "b") survives, so the second score is 1/2 and not 1
    assert classification("a b bc", "abc", all_classes=["b", "bc", "abc"]) == 0.0
    assert classification("b bc abc", "abc", all_classes=["b", "bc", "abc"]) == 0.5


def test_count_retrieval_and_code_sim() -> None:
    assert count("3 and 5", "5") == 0.5
    assert count("none", "5") == 0.0
    assert retrieval("Paragraph 3 or 4", "Paragraph 3") == 0.5
    assert retrieval("It is Paragraph 12", "Paragraph 12") == 1.0
    assert code_sim("# c\nx = 1", "x = 1") == 1.0
    assert code_sim("\n\n```python\nreturn a", "return b") == round(100 * (1 - 2 / 16)) / 100  # InDel 2 of 16 chars


def test_first_line_rule_applies_to_trec_not_to_qasper() -> None:
    assert first_line_rule("trec", "\n\nDESC\nENTY") == "DESC"
    assert first_line_rule("qasper", "a\nb") == "a\nb"
    assert score_sample("trec", "\nDESC\nENTY ABBR", ["DESC"], ["DESC", "ENTY", "ABBR"]) == 1.0
    assert score_sample("qasper", "cat", ["dog", "cat"]) == 1.0  # max over answers
    with pytest.raises(ValueError, match="known: narrativeqa"):
        score_sample("nope", "x", ["x"])


def test_buckets_and_the_longbench_e_average() -> None:
    assert [length_bucket(n) for n in (1000, 3999, 4000, 5000, 7999, 8000, 9000)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "4-8k", "8k+", "8k+"]
    records = [
        {"dataset": "qasper", "pred": "cat", "answers": ["cat"], "length": 1000},
        {"dataset": "qasper", "pred": "dog", "answers": ["cat"], "length": 1500},
        {"dataset": "qasper", "pred": "cat", "answers": ["cat"], "length": 5000},
        {"dataset": "qasper", "pred": "cat", "answers": ["cat"], "length": 9000},
        {"dataset": "trec", "pred": "DESC", "answers": ["DESC"], "all_classes": ["DESC"], "length": 100},
    ]
    metrics, _ = ReMamba.score(records, "longbench_e")
    assert metrics["test/qasper/0-4k"] == 50.0 and metrics["test/qasper/4-8k"] == 100.0
    assert metrics["test/qasper/8k+"] == 100.0
    assert metrics["test/qasper"] == pytest.approx(round((50 + 100 + 100) / 3, 2))
    assert metrics["test/trec"] == 100.0 and math.isnan(metrics["test/trec/8k+"])  # empty bucket left out
    assert metrics["test/avg"] == pytest.approx(round((metrics["test/qasper"] + 100.0) / 2, 2))
    plain, _ = ReMamba.score(records, "longbench")
    assert plain["test/qasper"] == 75.0
