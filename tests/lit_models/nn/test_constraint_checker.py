"""The constrained-MT checker on the acceptance cases of shared/methods/constrained_mt.md section 10."""

from __future__ import annotations

import importlib.util

import pytest

from lit_models.nn.constraint_checker import (
    ConstraintChecker,
    check_lexical,
    count_term,
    extract_units,
    normalize,
)


def met(hyp: str, tgt: str | list[str], src: str = "x", **kw) -> bool:
    return check_lexical(hyp, [{"src": src, "tgt": tgt}], **kw)[0]


def test_normalize_unicode_and_spaces() -> None:
    assert normalize("Gro\u0308\u00dfe") == normalize("Größe") == "grösse"
    assert normalize("d\u2019 \u00e9chantillons\u00a0 x\u200b") == "d'échantillons x"
    assert normalize("STRASSE") == normalize("Straße") == "strasse"
    assert normalize("Größe", casefold=False) == "Größe"


def test_composed_and_decomposed_umlauts_match_both_ways() -> None:
    nfd = "Die Gro\u0308\u00dfe ist gut"
    assert met(nfd, "Größe") and met("Die Größe ist gut", "Gro\u0308\u00dfe")
    assert met("die größe", "Größe") and not met("die größe", "Größe", casefold=False)
    assert met("IN DER STRASSE", "Straße")


def test_word_boundaries_and_punctuation() -> None:
    assert not met("Der Artikel", "Art")
    assert met("eine (Art).", "Art") and met("Art, die", "Art")
    assert met("prélèvement d'échantillons", "prélèvement d' échantillons")
    assert met("le diabète", ["diabètes", "diabète"])
    assert not met("Der Artikel", "Art", word_boundary=True) and met("Der Artikel", "Art", word_boundary=False)


def test_cjk_and_korean_without_spaces() -> None:
    assert met("我们研究机器翻译。", "机器翻译")
    assert met("机器翻译", "翻译")
    assert met("회사는 크다", "회사")


def test_german_inflection_needs_prefix_matching() -> None:
    hyp = "Die Rechte des Bundes und die Größen"
    assert not met(hyp, "Bund") and met(hyp, "Bund", match="prefix")
    assert not met(hyp, "Größe") and met(hyp, "Größe", match="prefix")
    # at most prefix_max_strip final characters are stripped, and at least 4 kept
    assert not met("er macht", "machen", match="prefix", prefix_max_strip=1)
    assert met("er macht", "machen", match="prefix", prefix_max_strip=2)
    assert not met("Artikel", "Art", match="prefix")  # shorter than 4 characters: whole words only
    assert met("die Bundesrepublik Deutschlands", "Bundesrepublik Deutschland", match="prefix")


def test_lemma_matching_fails_clearly_without_a_lemmatiser() -> None:
    if importlib.util.find_spec("simplemma") is not None:
        assert met("the houses", "house", match="lemma")
    else:
        with pytest.raises(ImportError, match="simplemma"):
            ConstraintChecker(match="lemma")


@pytest.mark.parametrize(("hyp", "independent", "exclusive"),
                         [("in New York", [True, True], [True, False]),
                          ("New York and York", [True, True], [True, True])])
def test_overlapping_terms(hyp: str, independent: list[bool], exclusive: list[bool]) -> None:
    cons = [{"src": "York", "tgt": "York"}, {"src": "New York", "tgt": "New York"}]
    exp_ind = list(reversed(independent))
    exp_exc = list(reversed(exclusive))
    assert check_lexical(hyp, cons, overlap="independent") == exp_ind
    assert check_lexical(hyp, cons, overlap="exclusive") == exp_exc


def test_count_occurrences() -> None:
    c = [{"src": "Haus", "tgt": "house"}]
    src = "Das Haus und das Haus"
    assert check_lexical("the house", c, source=src) == [True]
    assert check_lexical("the house", c, source=src, count_occurrences=True) == [False]
    assert check_lexical("the house and the house", c, source=src, count_occurrences=True) == [True]
    assert count_term("haus", normalize(src)) == 2


SRC = "<b>Hallo</b> <i>Welt</i> {0}"


@pytest.mark.parametrize(("hyp", "strict", "nesting"), [
    ("<b>Hello</b> <i>world</i> {0}", (4, 4), (3, 3)),
    ("<i>world</i> <b>Hello</b> {0}", (3, 4), (3, 3)),
    ("<b>Hello <i>world</i> {0}", (2, 4), (2, 3)),
    ("<b><i>world</b></i> {0}", (1, 4), (1, 3)),
    ("&lt;b&gt;Hello&lt;/b&gt; <i>world</i> {0}", (2, 4), (2, 3)),
])
def test_tag_table(hyp: str, strict: tuple[int, int], nesting: tuple[int, int]) -> None:
    for mode, expected in (("strict", strict), ("nesting", nesting)):
        res = ConstraintChecker(tag_order=mode).check(SRC, hyp, [])
        assert (res.n_met, res.n_units) == expected, mode


def test_tag_faults_and_unescape() -> None:
    checker = ConstraintChecker()
    res = checker.check(SRC, "<b>Hello <i>world</i> {0}", [])
    assert [(u.label, u.met) for u in res.units] == [("<b>", False), ("<i>", True), ("{0}", True),
                                                     ("tag order", False)]
    assert "not closed" in res.units[0].message
    crossed = checker.check(SRC, "<b><i>world</b></i> {0}", [])
    assert ["wrong nesting" in u.message for u in crossed.units[:2]] == [True, True]
    esc = "&lt;b&gt;Hello&lt;/b&gt; <i>world</i> {0}"
    assert "(missing)" in checker.check(SRC, esc, []).units[0].message
    assert ConstraintChecker(unescape_html=True).check(SRC, esc, []).n_met == 4


def test_attributes_selfclosing_and_placeholders() -> None:
    checker = ConstraintChecker(tag_order="nesting")
    assert checker.check('<a href="x">Link</a>', '<a href="y">link</a>', []).n_met == 0
    assert checker.check('<a  href="x">Link</a>', '<a href="x">link</a>', []).n_met == 1  # whitespace collapsed
    assert checker.check("eins<br/>zwei", "one<br>two", []).n_met == 0
    assert checker.check("eins<br/>zwei", "one<br/>two", []).n_met == 1
    res = checker.check("%s von %(n)s und %1$s", "%(n)s of and %1$s", [])
    assert [u.met for u in res.units] == [False, True, True]
    # count-aware: two {0} need two
    assert checker.check("{0} und {0}", "{0} and", []).n_met == 1
    # nesting: the parent must match
    assert checker.check("<p><b>x</b></p>", "<p>y</p><b>x</b>", []).n_met == 1


def test_unbalanced_source_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"item .seg-7.*an unclosed tag <b>"):
        extract_units("<b>Hallo", item_id="seg-7")
    with pytest.raises(ValueError, match="without an opening tag"):
        extract_units("Hallo</b>")
    with pytest.raises(ValueError, match="a crossed tag <b>"):
        extract_units("<b><i>x</b></i>")


def test_mixed_lexical_and_structural_result() -> None:
    checker = ConstraintChecker()
    cons = [{"src": "Haus", "tgt": "house"}, {"src": "Baum", "tgt": ["tree", "trunk"]}]
    res = checker.check("Das <b>Haus</b> und der Baum", "The <b>house</b> and the bush", cons)
    assert (res.n_met, res.n_units, res.all_met) == (2, 3, False)
    assert [u.message for u in res.unmet] == ['"Baum" must be translated as "tree" or "trunk"']
    assert checker.check("kein Markup", "no markup", []).csr is None
    assert checker.src_found("Die Häuser", [{"src": "Haus", "tgt": "house"}]) == [False]
    with pytest.raises(ValueError, match=r"match must be one of \['exact', 'prefix', 'lemma'\]"):
        ConstraintChecker(match="fuzzy")
