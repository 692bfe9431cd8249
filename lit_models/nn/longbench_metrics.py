"""LongBench metrics (THUDM/LongBench ``metrics.py`` / ``eval.py``, v1), re-implemented with their quirks.

Each metric takes ``(prediction, ground_truth, all_classes=None)`` and returns a float in [0, 1]; a sample's score is
the maximum over its ``answers`` (:func:`score_sample`). Definitions:

- :func:`qa_f1`: token F1 after LongBench's ``normalize_answer`` (lowercase, drop ASCII punctuation, drop the words
  a/an/the, collapse whitespace).
- :func:`rouge`: ROUGE-L F of PyPI ``rouge`` 1.0.1 (pltrdy), the package LongBench calls as
  ``Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]``, re-implemented here (no dependency): texts are cut
  into "sentences" at every ``.``, each sentence's words are its whitespace-split tokens; ROUGE-L is the
  *summary-level* union LCS with **unique** words (``exclusive=True``): ``m``/``n`` are the numbers of distinct words
  of the reference/hypothesis, ``llcs`` the size of the union over reference sentences of the LCS words,
  ``F = 2 P R / (P + R + 1e-8)``. LongBench returns 0 on any exception; the package raises on an empty
  hypothesis or reference (no sentence after the split), so those score 0 here too. Google's ``rouge-score`` (a
  different tokenizer and plain LCS) gives other numbers and is not used.
- :func:`classification`: LongBench's ``classification_score`` with both quirks (the difflib fallback never runs
  because ``em_match_list != 0`` is always true; classes contained in the gold are removed from the list while it is
  iterated, which skips the element after each removal).
- :func:`count`, :func:`retrieval`: the share of the numbers in the prediction equal to the answer (retrieval: the
  ``N`` of ``Paragraph N`` in the gold).
- :func:`code_sim`: the first line of the prediction (after stripping leading newlines) without "`", "#" or "//",
  compared with ``round(rapidfuzz.fuzz.ratio(pred, gt)) / 100``: rapidfuzz's ratio is the normalised InDel
  similarity, fuzzywuzzy (with python-Levenshtein) rounds the same value to an integer.
- Chinese variants :func:`qa_f1_zh` and :func:`rouge_zh` need ``jieba`` (not a dependency; imported lazily, with an
  ``ImportError`` naming it). ``retrieval_zh`` matches ``段落N``.

Scoring rules (``eval.py``): for trec, triviaqa, samsum and lsht the prediction is cut to its first line after
stripping leading newlines (:func:`first_line_rule`); LongBench-E buckets by ``length``: < 4000 -> ``0-4k``, < 8000
-> ``4-8k``, else ``8k+`` (:func:`length_bucket`); scores are ``round(100 * mean, 2)``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "BUCKETS",
    "DATASET2METRIC",
    "FIRST_LINE_TASKS",
    "classification",
    "code_sim",
    "count",
    "exact_match",
    "first_line_rule",
    "length_bucket",
    "mean100",
    "normalize_answer",
    "qa_f1",
    "qa_f1_zh",
    "retrieval",
    "retrieval_zh",
    "rouge",
    "rouge_zh",
    "score_sample",
]

BUCKETS = ("0-4k", "4-8k", "8k+")
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


# ============================================================================================ QA F1
def normalize_answer(s: str) -> str:
    """LongBench ``normalize_answer``: lowercase, remove punctuation, remove articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, **_: Any) -> float:
    """Token F1 of the normalised texts (0 when nothing is shared)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba() -> Any:
    try:
        import jieba
    except ImportError as err:
        raise ImportError("the Chinese LongBench metrics need jieba: pip install jieba") from err
    return jieba


def _normalize_zh(s: str) -> str:
    cn_punct = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
    exclude = set(string.punctuation + cn_punct)
    return "".join("".join(ch for ch in s.lower() if ch not in exclude).split())


def qa_f1_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench ``qa_f1_zh_score``: jieba tokens, normalised, empty tokens dropped."""
    jieba = _jieba()
    pred = [t for t in (_normalize_zh(x) for x in jieba.cut(prediction, cut_all=False)) if t]
    gold = [t for t in (_normalize_zh(x) for x in jieba.cut(ground_truth, cut_all=False)) if t]
    return _f1(pred, gold)


# ============================================================================================ ROUGE-L (pltrdy)
def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """Words of ``x`` on the LCS of ``x`` and ``y``, backtracked as the package does (a match first, then up when
    the upper cell is strictly larger, else left)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if x[i - 1] == y[j - 1] else max(prev[j], row[j - 1])
    out: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F of PyPI ``rouge`` 1.0.1 (summary level, unique words); 0 where the package raises."""
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    union: set[str] = set()
    llcs = 0
    for ref_sentence in ref:
        before = len(union)
        ref_words = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_words, hyp_sentence.split(" "))
        llcs += len(union) - before
    recall, precision = llcs / m, llcs / n
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """LongBench ``rouge_zh_score``: jieba-segmented texts joined by spaces, then :func:`rouge`."""
    jieba = _jieba()
    return rouge(" ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False)))


# ============================================================================================ the others
def classification(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_: Any) -> float:
    """LongBench ``classification_score`` (quirks kept, see the module docstring).

    Raises:
        ValueError: ``all_classes`` missing.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes (the sample's 'all_classes' field)")
    matches = [c for c in all_classes if c in prediction]
    for term in matches:  # removing while iterating skips the next element: LongBench's behaviour
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(target) for n in numbers) / len(numbers)


def count(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the numbers in the prediction that equal the answer."""
    return _share_equal(prediction, ground_truth)


def retrieval(prediction: str, ground_truth: str, **_: Any) -> float:
    """Share of the numbers in the prediction equal to the ``N`` of ``Paragraph N`` in the gold.

    Raises:
        ValueError: the gold has no ``Paragraph N``.
    """
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval gold {ground_truth!r} has no 'Paragraph N'")
    return _share_equal(prediction, found[0])


def retrieval_zh(prediction: str, ground_truth: str, **_: Any) -> float:
    """As :func:`retrieval` with the gold pattern ``段落N``."""
    found = re.findall(r"段落(\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval_zh gold {ground_truth!r} has no '段落N'")
    return _share_equal(prediction, found[0])


def code_sim(prediction: str, ground_truth: str, **_: Any) -> float:
    """First code line of the prediction vs the gold: ``round(fuzz.ratio) / 100`` (fuzzywuzzy's integer ratio)."""
    from rapidfuzz import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(fuzz.ratio(line, ground_truth)) / 100


def exact_match(prediction: str, ground_truth: str, **_: Any) -> float:
    """1.0 when the normalised texts are equal (used for the demo needle task)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


#: Task -> metric (LongBench ``eval.py``), plus the offline demo tasks.
DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_zh,
    "gov_report": rouge, "qmsum": rouge, "multi_news": rouge, "vcsum": rouge_zh,
    "trec": classification, "triviaqa": qa_f1, "samsum": rouge, "lsht": classification,
    "passage_retrieval_en": retrieval, "passage_count": count, "passage_retrieval_zh": retrieval_zh,
    "lcc": code_sim, "repobench-p": code_sim,
    "needle_austen": qa_f1, "verse_retrieval_bible": retrieval,
}


def first_line_rule(dataset: str, prediction: str) -> str:
    """trec, triviaqa, samsum, lsht: the first line after stripping leading newlines; other tasks: unchanged."""
    return prediction.lstrip("\n").split("\n")[0] if dataset in FIRST_LINE_TASKS else prediction


def score_sample(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """LongBench score of one prediction: the maximum over ``answers`` of the task's metric after the first-line rule.

    Raises:
        ValueError: unknown task (lists the known ones).
    """
    try:
        metric = DATASET2METRIC[dataset]
    except KeyError:
        raise ValueError(f"no LongBench metric for task {dataset!r}; known: {', '.join(DATASET2METRIC)}") from None
    prediction = first_line_rule(dataset, prediction)
    score = 0.0
    for gold in answers:
        score = max(score, metric(prediction, gold, all_classes=all_classes))
    return score


def length_bucket(length: float) -> str:
    """LongBench-E bucket of a ``length`` (words; characters for Chinese): ``0-4k``, ``4-8k`` or ``8k+``."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def mean100(values: Sequence[float]) -> float:
    """``round(100 * mean, 2)``; NaN for no values."""
    return round(100 * sum(values) / len(values), 2) if values else math.nan
