"""sacreBLEU wrappers (NDP / constrained-MT spec section 7): values, multi-reference streams, signatures, errors."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from lit_models.nn.mt_metrics import (
    corpus_bleu,
    corpus_chrf,
    sentence_bleu,
    sentence_chrf,
)

HYPS = ["The cat sat on the mat.", "In the beginning God created the heaven and the earth."]
REFS = ["The cat is sitting on the mat.", "In the beginning God created the heavens and the earth."]
REFS2 = ["A cat sat on the mat.", "In the beginning, God created the heavens and the earth."]


def test_identical_is_100():
    refs = [[h] for h in HYPS]
    assert corpus_bleu(HYPS, refs)[0] == pytest.approx(100.0, abs=1e-9)
    assert corpus_chrf(HYPS, refs)[0] == pytest.approx(100.0, abs=1e-9)
    assert corpus_chrf(HYPS, refs, word_order=2)[0] == pytest.approx(100.0, abs=1e-9)
    assert sentence_bleu(HYPS[1], [HYPS[1]]) == pytest.approx(100.0, abs=1e-9)
    assert sentence_chrf(HYPS[1], [HYPS[1]]) == pytest.approx(100.0, abs=1e-9)


def test_bleu_small_example_by_hand_and_sacrebleu():
    # 13a tokens: hyp 7 + 11 = 18, ref 8 + 11 = 19; clipped matches 1-4-grams: 16/18, 12/16, 8/14, 5/12.
    expected = 100 * math.exp(1 - 19 / 18) * (16 / 18 * 12 / 16 * 8 / 14 * 5 / 12) ** 0.25
    score, sig = corpus_bleu(HYPS, [[r] for r in REFS])
    assert score == pytest.approx(expected, rel=1e-12)
    assert score == pytest.approx(59.70866916994491, rel=1e-12)
    assert score == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert sig.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    chrf, chrf_sig = corpus_chrf(HYPS, [[r] for r in REFS])
    assert chrf == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert chrf == pytest.approx(78.75087452857665, rel=1e-12)
    assert chrf_sig.startswith("chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    chrfpp, pp_sig = corpus_chrf(HYPS, [[r] for r in REFS], word_order=2)
    assert chrfpp == sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score
    assert pp_sig.startswith("chrF2++|") and "nw:2" in pp_sig


def test_two_references_equal_sacrebleu_streams():
    refs = [[a, b] for a, b in zip(REFS, REFS2)]
    score, sig = corpus_bleu(HYPS, refs)
    assert score == sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score
    assert score == pytest.approx(76.60256409669469, rel=1e-12)
    assert "nrefs:2" in sig
    assert corpus_chrf(HYPS, refs)[0] == sacrebleu.corpus_chrf(HYPS, [REFS, REFS2]).score
    # Order of references within a hypothesis does not matter.
    assert corpus_bleu(HYPS, [[b, a] for a, b in refs])[0] == score


def test_variable_reference_counts():
    hyps = [*HYPS, "Jesus wept."]
    refs = [[REFS[0]], [REFS[1], REFS2[1], "And God made the heaven and the earth."], ["Jesus wept.", "Jesus cried."]]
    streams = [
        [REFS[0], REFS[1], "Jesus wept."],
        [None, REFS2[1], "Jesus cried."],
        [None, "And God made the heaven and the earth.", None],
    ]
    score, sig = corpus_bleu(hyps, refs)
    assert score == sacrebleu.corpus_bleu(hyps, streams).score
    assert "nrefs:var" in sig
    assert corpus_chrf(hyps, refs)[0] == sacrebleu.corpus_chrf(hyps, streams).score
    # A duplicated reference changes nothing.
    assert corpus_bleu(HYPS, [[r, r] for r in REFS])[0] == corpus_bleu(HYPS, [[r] for r in REFS])[0]


def test_empty_hypotheses_and_empty_input():
    score, _ = corpus_bleu(["", HYPS[1]], [[REFS[0]], [REFS[1]]])
    assert score == sacrebleu.corpus_bleu(["", HYPS[1]], [[REFS[0], REFS[1]]]).score
    assert corpus_bleu([""], [["x y"]])[0] == 0.0
    assert corpus_chrf([""], [["x y"]])[0] == 0.0
    assert sentence_bleu("", ["x y"]) == 0.0
    assert sentence_chrf("", ["x y"]) == 0.0
    score, sig = corpus_bleu([], [])
    assert score == 0.0 and sig.startswith("BLEU|nrefs:0|") and "tok:13a" in sig
    score, sig = corpus_chrf([], [])
    assert score == 0.0 and sig.startswith("chrF2|nrefs:0|")


def test_sentence_scores_match_sacrebleu():
    assert sentence_bleu(HYPS[0], [REFS[0], REFS2[0]]) == sacrebleu.sentence_bleu(HYPS[0], [REFS[0], REFS2[0]]).score
    assert sentence_chrf(HYPS[0], [REFS[0]]) == sacrebleu.sentence_chrf(HYPS[0], [REFS[0]]).score


def test_tokenize_option():
    score, sig = corpus_bleu(["你好世界"], [["你好世界"]], tokenize="zh")
    assert score == pytest.approx(100.0, abs=1e-9) and "tok:zh" in sig
    assert corpus_bleu(HYPS, [[r] for r in REFS], tokenize="char")[0] == sacrebleu.corpus_bleu(
        HYPS, [REFS], tokenize="char"
    ).score


def test_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        corpus_bleu(HYPS, [[REFS[0]]])
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        corpus_chrf(HYPS, [[REFS[0]], []])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        corpus_bleu(HYPS[:1], [REFS[0]])  # a bare string, not a list of references
    with pytest.raises(ValueError, match="tokenizer 'bogus' is unavailable.*'char'"):
        corpus_bleu(HYPS, [[r] for r in REFS], tokenize="bogus")
    with pytest.raises(TypeError, match=r"hypotheses\[0\] must be a string"):
        corpus_bleu([None], [["x"]])
