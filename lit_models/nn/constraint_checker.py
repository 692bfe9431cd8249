"""Rule-based checker for constrained translation: lexical term constraints and structural units (tags, placeholders).

Spec: ``shared/methods/constrained_mt.md`` section 3 (our defaults; the TAR paper's own checker is not public).

**Normalisation** (:func:`normalize`, applied to hypothesis and term alike; indices are never mapped back to the raw
string): Unicode NFC; zero-width characters (U+200B-U+200D, U+FEFF) removed; NBSP / narrow NBSP -> space; U+2018 /
U+2019 -> ``'``; U+2010 / U+2011 -> ``-``; whitespace collapsed; with ``loose_punct_space`` spaces next to ``'`` and
``-`` deleted (WMT21's Moses-tokenised "d' échantillons" matches "d'échantillons"); with ``casefold``
``str.casefold()`` ("Straße" and "STRASSE" both become "strasse").

**Lexical matching** (:func:`check_lexical`): a constraint ``(src, [t1, t2, ...])`` is met when some alternative
occurs in the hypothesis, with

- ``word_boundary``: at each end of a match, it fails only when the term's edge character and the neighbouring
  character are both alphanumeric and neither belongs to a script written without spaces (Han, Hiragana, Katakana,
  Hangul, Thai, by ``unicodedata.name`` prefix): "Art" is unmet in "Artikel", "翻译" is met in "机器翻译" and
  "회사" in "회사는";
- ``match="prefix"``: each word ``w`` of the term may match a hypothesis word that starts with ``w`` minus up to
  ``prefix_max_strip`` final characters, keeping at least 4 (so "Größe" matches "Größen", "Bund" matches "Bundes");
  words shorter than 4 characters must match whole;
- ``match="lemma"``: hypothesis and term words are compared as lemma sequences (``simplemma``; ImportError when it
  is not installed);
- ``overlap="independent"`` checks each constraint alone; ``"exclusive"`` assigns matches longest term first to
  non-overlapping character spans ("York" then needs its own occurrence beside "New York");
- ``count_occurrences``: a constraint needs as many target occurrences as its source term has in the source.

**Structural units** (:func:`extract_units`, :func:`check_structure`): elements ``<name attrs>...</name>``,
self-closing tags ``<name attrs/>`` and placeholders (``{0}``, ``{name}``, ``%s``, ``%d``, ``%1$s``, ``%(name)s``)
of the source. The hypothesis is parsed left to right with a stack: a closing tag matching the top closes it; one
matching a deeper element closes that element but marks it and every element above it *crossed*; one with no open
match is *stray*; elements open at the end are *unclosed*. A source element is met when the hypothesis has a closed,
uncrossed element with the same name and attributes whose nearest closed ancestor matches the source element's parent
(count-aware); self-closing tags and placeholders need only be present (count-aware). ``tag_order="strict"`` adds one
*order* unit per segment with two or more tag units, met iff the hypothesis's tag tokens equal the source's.
``&lt;b&gt;`` counts as missing unless ``unescape_html``.

:class:`ConstraintChecker` bundles the options and returns a :class:`CheckResult` per segment (one
:class:`UnitResult` per unit, with the human-readable fault fed to the revise prompt).
"""

from __future__ import annotations

import html
import importlib.util
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

__all__ = [
    "CheckResult",
    "ConstraintChecker",
    "Unit",
    "UnitResult",
    "check_lexical",
    "check_structure",
    "count_term",
    "extract_units",
    "normalize",
    "term_spans",
]

MATCH_MODES = ("exact", "prefix", "lemma")
OVERLAP_MODES = ("independent", "exclusive")
TAG_ORDER_MODES = ("strict", "nesting")

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\ufeff"), None)
_CHAR_MAP = {
    0x00A0: " ", 0x202F: " ", 0x2007: " ",  # NBSP, narrow NBSP, figure space
    0x2018: "'", 0x2019: "'",
    0x2010: "-", 0x2011: "-",
}
_WS = re.compile(r"\s+")
_LOOSE = re.compile(r"\s*(['-])\s*")
_UNSPACED_PREFIXES = ("CJK UNIFIED", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA", "HANGUL", "THAI")
_WORD = re.compile(r"\w+")

#: Markup tags: ``<b>``, ``</b>``, ``<a href="x">``, ``<br/>``, ``<x:y-z a='1' />``.
TAG_RE = re.compile(r"</?[A-Za-z][\w:.-]*(?:\s+[^<>]*?)?/?>")
#: Placeholders: ``{0}``, ``{name}``, ``%(name)s``, ``%1$s``, ``%s``, ``%d``.
PLACEHOLDER_RE = re.compile(r"\{[A-Za-z0-9_]+\}|%\([A-Za-z_]\w*\)[sd]|%\d+\$[sd]|%[sd]")
_TOKEN_RE = re.compile(f"(?P<tag>{TAG_RE.pattern})|(?P<ph>{PLACEHOLDER_RE.pattern})")
_TAG_PARTS = re.compile(r"<(/?)([A-Za-z][\w:.-]*)((?:\s+[^<>]*?)?)\s*(/?)>", re.DOTALL)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def normalize(text: str, casefold: bool = True, loose_punct_space: bool = True) -> str:
    """The checker's normal form of ``text`` (see the module docstring); applied to hypotheses and terms alike."""
    s = unicodedata.normalize("NFC", text).translate(_ZERO_WIDTH).translate(_CHAR_MAP)
    s = _WS.sub(" ", s).strip()
    if loose_punct_space:
        s = _LOOSE.sub(r"\1", s)
    if casefold:
        s = s.casefold()
    return s


@lru_cache(maxsize=65536)
def _unspaced(ch: str) -> bool:
    """True for characters of scripts written without spaces (Han, Hiragana, Katakana, Hangul, Thai)."""
    return unicodedata.name(ch, "").startswith(_UNSPACED_PREFIXES)


def _boundary_ok(a: str, b: str) -> bool:
    """May a match edge lie between characters ``a`` and ``b``?"""
    if not (a.isalnum() and b.isalnum()):
        return True
    return _unspaced(a) or _unspaced(b)


def _exact_spans(term: str, text: str, word_boundary: bool) -> list[tuple[int, int]]:
    """Every occurrence (overlapping ones included) of normalised ``term`` in normalised ``text`` as (start, end)."""
    spans = []
    if not term:
        return spans
    start = text.find(term)
    while start >= 0:
        end = start + len(term)
        ok = True
        if word_boundary:
            if start > 0 and not _boundary_ok(text[start - 1], term[0]):
                ok = False
            if end < len(text) and not _boundary_ok(term[-1], text[end]):
                ok = False
        if ok:
            spans.append((start, end))
        start = text.find(term, start + 1)
    return spans


def _prefix_stems(word: str, max_strip: int) -> list[str]:
    if len(word) < 4 or any(_unspaced(c) for c in word):
        return []
    return [word[: len(word) - k] for k in range(max_strip + 1) if len(word) - k >= 4]


def _word_seq_spans(
    term_words: list[str], text_words: list[tuple[str, int, int]], word_match: Callable[[str, str, int], bool]
) -> list[tuple[int, int]]:
    n = len(term_words)
    spans = []
    for i in range(len(text_words) - n + 1):
        if all(word_match(term_words[k], text_words[i + k][0], k) for k in range(n)):
            spans.append((text_words[i][1], text_words[i + n - 1][2]))
    return spans


@lru_cache(maxsize=1)
def _simplemma() -> Any:
    if importlib.util.find_spec("simplemma") is None:
        raise ImportError(
            "match='lemma' needs a lemmatiser: pip install simplemma (or use match='prefix' / 'exact')"
        )
    import simplemma

    return simplemma


def _lemma(word: str, lang: str) -> str:
    return _simplemma().lemmatize(word, lang=lang).casefold()


def term_spans(
    term: str,
    text: str,
    *,
    match: Literal["exact", "prefix", "lemma"] = "exact",
    prefix_max_strip: int = 2,
    word_boundary: bool = True,
    lemma_lang: str = "en",
    normalized: bool = True,
) -> list[tuple[int, int]]:
    """Character spans of ``term`` in ``text``, both already normalised (``normalized=True``; see :func:`normalize`).

    ``prefix`` and ``lemma`` fall back to exact matching for terms written in a script without spaces.

    Raises:
        ValueError: an unknown ``match``.
        ImportError: ``match="lemma"`` without ``simplemma``.
    """
    _check_choice("match", match, MATCH_MODES)
    if not normalized:
        term, text = normalize(term), normalize(text)
    if not term:
        return []
    if match == "exact" or any(_unspaced(c) for c in term):
        return _exact_spans(term, text, word_boundary)
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    term_words = _WORD.findall(term)
    if not term_words:
        return _exact_spans(term, text, word_boundary)
    if match == "prefix":
        stems = [_prefix_stems(w, prefix_max_strip) for w in term_words]

        def word_match(w: str, y: str, k: int) -> bool:
            return y == w or any(y.startswith(s) for s in stems[k])

        return sorted(set(_exact_spans(term, text, word_boundary)) | set(_word_seq_spans(term_words, words,
                                                                                          word_match)))
    lemmas = [_lemma(w, lemma_lang) for w in term_words]
    return _word_seq_spans(term_words, words, lambda w, y, k: y == w or _lemma(y, lemma_lang) == lemmas[k])


def count_term(term: str, text: str, **kwargs: Any) -> int:
    """Number of non-overlapping occurrences of normalised ``term`` in normalised ``text`` (options as
    :func:`term_spans`)."""
    count, last_end = 0, -1
    for start, end in term_spans(term, text, **kwargs):
        if start >= last_end:
            count, last_end = count + 1, end
    return count


def check_lexical(
    hypothesis: str,
    constraints: Sequence[dict[str, Any]],
    *,
    source: str | None = None,
    casefold: bool = True,
    match: Literal["exact", "prefix", "lemma"] = "exact",
    prefix_max_strip: int = 2,
    word_boundary: bool = True,
    loose_punct_space: bool = True,
    overlap: Literal["independent", "exclusive"] = "independent",
    count_occurrences: bool = False,
    lemma_lang: str = "en",
) -> list[bool]:
    """Which lexical constraints ``hypothesis`` meets.

    Args:
        hypothesis: the translation.
        constraints: ``[{"src": str, "tgt": str | list[str]}, ...]``; a ``tgt`` list holds alternatives (WMT21's
            ``a|b`` split on ``|``).
        source: the source sentence; needed only for ``count_occurrences`` (source occurrences of ``src``, at least 1).
        casefold, loose_punct_space: normalisation (see :func:`normalize`).
        match, prefix_max_strip, word_boundary, lemma_lang: see :func:`term_spans`.
        overlap: ``independent`` or ``exclusive`` (longest term first, non-overlapping spans).
        count_occurrences: require as many target occurrences as source occurrences.

    Returns:
        One bool per constraint, in order.

    Raises:
        ValueError: unknown ``match``/``overlap``.
    """
    _check_choice("match", match, MATCH_MODES)
    _check_choice("overlap", overlap, OVERLAP_MODES)

    def norm(s: str) -> str:
        return normalize(s, casefold=casefold, loose_punct_space=loose_punct_space)

    hyp = norm(hypothesis)
    opts: dict[str, Any] = {"match": match, "prefix_max_strip": prefix_max_strip, "word_boundary": word_boundary,
                            "lemma_lang": lemma_lang}
    src_norm = norm(source) if (count_occurrences and source is not None) else None
    needed, spans_per = [], []
    for c in constraints:
        tgts = [c["tgt"]] if isinstance(c["tgt"], str) else list(c["tgt"])
        spans: set[tuple[int, int]] = set()
        for t in tgts:
            spans.update(term_spans(norm(t), hyp, **opts))
        spans_per.append(sorted(spans))
        k = 1
        if src_norm is not None:
            k = max(1, count_term(norm(c["src"]), src_norm, **opts))
        needed.append(k)
    if overlap == "independent":
        return [_max_disjoint(spans) >= k for spans, k in zip(spans_per, needed)]
    # exclusive: longest term first (ties: constraint order) takes non-overlapping spans
    order = sorted(range(len(constraints)), key=lambda i: -max(len(norm(t)) for t in _alts(constraints[i])))
    taken: list[tuple[int, int]] = []
    met = [False] * len(constraints)
    for i in order:
        got = []
        for s, e in spans_per[i]:
            if all(e <= a or s >= b for a, b in taken + got):
                got.append((s, e))
                if len(got) == needed[i]:
                    break
        if len(got) >= needed[i]:
            met[i] = True
            taken += got
    return met


def _alts(c: dict[str, Any]) -> list[str]:
    return [c["tgt"]] if isinstance(c["tgt"], str) else list(c["tgt"])


def _max_disjoint(spans: list[tuple[int, int]]) -> int:
    """Largest number of pairwise non-overlapping spans (greedy by end)."""
    count, last = 0, -1
    for s, e in sorted(spans, key=lambda x: x[1]):
        if s >= last:
            count, last = count + 1, e
    return count


# --------------------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class Unit:
    """One structural unit of a source segment.

    ``kind`` is ``element`` (``<name attrs>...</name>``), ``selfclosing``, ``placeholder`` or ``order``; ``key`` is
    ``(name, attrs)`` for tags, the placeholder text for placeholders; ``parent`` the key of the enclosing element
    (None at top level); ``label`` the readable form (``<b>``, ``{0}``).
    """

    kind: str
    key: Any
    parent: Any
    label: str


@dataclass
class _Tag:
    closing: bool
    selfclosing: bool
    name: str
    attrs: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.attrs)

    @property
    def token(self) -> str:
        attrs = f" {self.attrs}" if self.attrs else ""
        if self.closing:
            return f"</{self.name}>"
        return f"<{self.name}{attrs}{'/' if self.selfclosing else ''}>"


def _tokens(text: str, unescape_html: bool) -> list[_Tag | str]:
    """Tags (as :class:`_Tag`) and placeholders (as str) of ``text`` in order."""
    if unescape_html:
        text = html.unescape(text)
    out: list[_Tag | str] = []
    for m in _TOKEN_RE.finditer(text):
        if m.group("ph") is not None:
            out.append(m.group("ph"))
            continue
        parts = _TAG_PARTS.fullmatch(m.group("tag"))
        if parts is None:  # pragma: no cover - TAG_RE and _TAG_PARTS accept the same strings
            continue
        closing, name, attrs, slash = parts.groups()
        out.append(_Tag(bool(closing), bool(slash) and not closing, name, _WS.sub(" ", attrs).strip(), m.group()))
    return out


@dataclass
class _Element:
    key: tuple[str, str]
    ancestors: list[int]
    status: str = "open"  # open (-> unclosed at the end), closed, crossed


def _parse(tokens: list[_Tag | str]) -> tuple[list[_Element], list[_Tag], Counter, list[str]]:
    """Stack parse: (elements with status, stray closing tags, Counter of self-closing keys, placeholders)."""
    elements: list[_Element] = []
    stack: list[int] = []
    stray: list[_Tag] = []
    selfclosing: Counter = Counter()
    placeholders: list[str] = []
    for tok in tokens:
        if isinstance(tok, str):
            placeholders.append(tok)
        elif tok.selfclosing:
            selfclosing[tok.key] += 1
        elif not tok.closing:
            elements.append(_Element(tok.key, list(stack)))
            stack.append(len(elements) - 1)
        else:
            depth = next((d for d in range(len(stack) - 1, -1, -1) if elements[stack[d]].key[0] == tok.name), None)
            if depth is None:
                stray.append(tok)
            elif depth == len(stack) - 1:
                elements[stack.pop()].status = "closed"
            else:
                for idx in stack[depth:]:
                    elements[idx].status = "crossed"
                del stack[depth:]
    for idx in stack:
        elements[idx].status = "unclosed"
    return elements, stray, selfclosing, placeholders


def _tag_sequence(tokens: list[_Tag | str]) -> list[str]:
    return [t.token for t in tokens if isinstance(t, _Tag)]


def extract_units(source: str, *, tag_order: Literal["strict", "nesting"] = "strict", unescape_html: bool = False,
                  item_id: Any = None) -> list[Unit]:
    """The structural units of a source segment (see the module docstring), in source order, the order unit last.

    Raises:
        ValueError: unknown ``tag_order``; unbalanced, stray or crossed tags in the source (naming ``item_id`` and
            the tag).
    """
    _check_choice("tag_order", tag_order, TAG_ORDER_MODES)
    tokens = _tokens(source, unescape_html)
    elements, stray, _, _ = _parse(tokens)
    where = f"item {item_id!r}: " if item_id is not None else ""
    bad = [e for e in elements if e.status != "closed"]
    if bad:
        article = "an" if bad[0].status == "unclosed" else "a"
        raise ValueError(f"{where}the source has {article} {bad[0].status} tag <{bad[0].key[0]}> (unbalanced markup)")
    if stray:
        raise ValueError(f"{where}the source has a closing tag {stray[0].text!r} without an opening tag")
    units: list[Unit] = []
    el_iter = iter(elements)
    for tok in tokens:
        if isinstance(tok, str):
            units.append(Unit("placeholder", tok, None, tok))
        elif tok.selfclosing:
            units.append(Unit("selfclosing", tok.key, None, tok.token))
        elif not tok.closing:
            el = next(el_iter)
            parent = elements[el.ancestors[-1]].key if el.ancestors else None
            units.append(Unit("element", el.key, parent, tok.token))
    n_tags = sum(u.kind in ("element", "selfclosing") for u in units)
    if tag_order == "strict" and n_tags >= 2:
        units.append(Unit("order", tuple(_tag_sequence(tokens)), None, "tag order"))
    return units


def check_structure(
    units: Sequence[Unit], hypothesis: str, *, unescape_html: bool = False
) -> list[tuple[bool, str]]:
    """``(met, fault)`` per unit of :func:`extract_units` for ``hypothesis``; ``fault`` is ``""`` when met, else
    ``missing``, ``not closed``, ``wrong nesting`` or ``out of order``."""
    tokens = _tokens(hypothesis, unescape_html)
    elements, _, selfclosing, placeholders = _parse(tokens)
    # hypothesis elements that count: closed, uncrossed; keyed with their nearest closed ancestor
    good: Counter = Counter()
    statuses: dict[tuple[str, str], set[str]] = defaultdict(set)
    for el in elements:
        statuses[el.key].add(el.status)
        if el.status == "closed":
            anc = next((elements[a].key for a in reversed(el.ancestors) if elements[a].status == "closed"), None)
            good[(el.key, anc)] += 1
    ph_count = Counter(placeholders)
    seen: Counter = Counter()
    out: list[tuple[bool, str]] = []
    for u in units:
        if u.kind == "order":
            ok = tuple(_tag_sequence(tokens)) == u.key
            out.append((ok, "" if ok else "out of order"))
            continue
        group = (u.kind, u.key, u.parent)
        seen[group] += 1
        if u.kind == "placeholder":
            ok = ph_count[u.key] >= seen[group]
            out.append((ok, "" if ok else "missing"))
        elif u.kind == "selfclosing":
            ok = selfclosing[u.key] >= seen[group]
            out.append((ok, "" if ok else "missing"))
        else:
            ok = good[(u.key, u.parent)] >= seen[group]
            if ok:
                out.append((True, ""))
            elif not statuses.get(u.key):
                out.append((False, "missing"))
            elif statuses[u.key] <= {"unclosed"}:
                out.append((False, "not closed"))
            else:
                out.append((False, "wrong nesting"))
    return out


# --------------------------------------------------------------------------------------------------- bundle
@dataclass
class UnitResult:
    """One checked unit: ``kind`` is ``lexical`` or a structural kind; ``index`` the constraint index (lexical);
    ``message`` the line for the revise prompt when unmet."""

    kind: str
    met: bool
    label: str
    message: str
    index: int | None = None


@dataclass
class CheckResult:
    """All units of one segment. ``n_units`` 0 means the segment has nothing to check (CSR ``None``)."""

    units: list[UnitResult] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def n_met(self) -> int:
        return sum(u.met for u in self.units)

    @property
    def all_met(self) -> bool:
        return all(u.met for u in self.units)

    @property
    def csr(self) -> float | None:
        return self.n_met / self.n_units if self.units else None

    @property
    def unmet(self) -> list[UnitResult]:
        return [u for u in self.units if not u.met]


def constraint_message(c: dict[str, Any]) -> str:
    """``"s" must be translated as "t"`` (alternatives joined with ``or``)."""
    return f'"{c["src"]}" must be translated as ' + " or ".join(f'"{t}"' for t in _alts(c))


class ConstraintChecker:
    """Checks lexical constraints and structural units of segments with fixed options (see module docstring).

    Raises:
        ValueError: an unknown ``match``/``overlap``/``tag_order``, ``prefix_max_strip < 0``.
        ImportError: ``match="lemma"`` without ``simplemma``.
    """

    def __init__(
        self,
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
    ) -> None:
        _check_choice("match", match, MATCH_MODES)
        _check_choice("overlap", overlap, OVERLAP_MODES)
        _check_choice("tag_order", tag_order, TAG_ORDER_MODES)
        if prefix_max_strip < 0:
            raise ValueError(f"prefix_max_strip must be >= 0, got {prefix_max_strip}")
        if match == "lemma":
            _simplemma()
        self.casefold, self.match, self.prefix_max_strip = casefold, match, prefix_max_strip
        self.word_boundary, self.loose_punct_space = word_boundary, loose_punct_space
        self.overlap, self.count_occurrences = overlap, count_occurrences
        self.tag_order, self.unescape_html, self.lemma_lang = tag_order, unescape_html, lemma_lang

    def normalize(self, text: str) -> str:
        return normalize(text, casefold=self.casefold, loose_punct_space=self.loose_punct_space)

    def units(self, source: str, item_id: Any = None) -> list[Unit]:
        """Structural units of ``source`` (ValueError on unbalanced source markup, naming ``item_id``)."""
        return extract_units(source, tag_order=self.tag_order, unescape_html=self.unescape_html, item_id=item_id)

    def src_found(self, source: str, constraints: Sequence[dict[str, Any]]) -> list[bool]:
        """Whether each constraint's ``src`` occurs in ``source`` (same matching options)."""
        src = self.normalize(source)
        return [bool(term_spans(self.normalize(c["src"]), src, match=self.match, prefix_max_strip=self.prefix_max_strip,
                                word_boundary=self.word_boundary, lemma_lang=self.lemma_lang)) for c in constraints]

    def check(self, source: str, hypothesis: str, constraints: Sequence[dict[str, Any]],
              units: Sequence[Unit] | None = None, item_id: Any = None) -> CheckResult:
        """Check one segment: lexical constraints first (in order), then the source's structural units."""
        met = check_lexical(
            hypothesis, constraints, source=source, casefold=self.casefold, match=self.match,
            prefix_max_strip=self.prefix_max_strip, word_boundary=self.word_boundary,
            loose_punct_space=self.loose_punct_space, overlap=self.overlap, count_occurrences=self.count_occurrences,
            lemma_lang=self.lemma_lang,
        )
        result = CheckResult()
        for i, (c, ok) in enumerate(zip(constraints, met)):
            result.units.append(UnitResult("lexical", ok, str(c["src"]), constraint_message(c), index=i))
        if units is None:
            units = self.units(source, item_id=item_id)
        for u, (ok, fault) in zip(units, check_structure(units, hypothesis, unescape_html=self.unescape_html)):
            if u.kind == "order":
                expected = "".join(u.key)
                msg = f"markup tags must appear in the same order as in the source: {expected}"
            elif u.kind == "placeholder":
                msg = f"placeholder {u.label} must be kept unchanged ({fault})"
            else:
                msg = f"tag {u.label} must be kept" + (f" and closed in the right place ({fault})" if
                                                       u.kind == "element" else f" ({fault})")
            result.units.append(UnitResult(u.kind, ok, u.label, msg))
        return result
