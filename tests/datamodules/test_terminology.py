"""TerminologyDataModule: our JSONL, WMT21 SGML, WMT23 files and HF export, glossaries, bad input (file and line),
and the offline demos (Bible + FreeDict built from the installed packages, synthetic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from datamodules.demo.terminology import build_bible_terminology, parse_equivalents, synthetic_terminology
from datamodules.terminology import TerminologyDataModule, read_jsonl, read_wmt21_sgm, read_wmt23
from lit_models.nn.constraint_checker import ConstraintChecker


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def items_of(dm: TerminologyDataModule, stage: str = "test") -> list[dict]:
    dm.setup(stage)
    return [it for batch in (dm.test_dataloader() if stage == "test" else dm.predict_dataloader()) for it in batch]


def test_jsonl_with_string_and_list_targets(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", "\n".join([
        json.dumps({"id": "x", "source": "Das Haus", "target": "The house",
                    "constraints": [{"src": "Haus", "tgt": "house"}], "domain": "bible"}),
        "",
        json.dumps({"source": "Der Baum {0}", "constraints": [{"src": "Baum", "tgt": ["tree", " trunk "]}]}),
    ]) + "\n")
    dm = TerminologyDataModule(test_file=str(f), batch_size=2)
    items = items_of(dm)
    assert [(i["id"], i["index"], i["reference"], i["constraints"]) for i in items] == [
        ("x", 0, "The house", [{"src": "Haus", "tgt": ["house"]}]),
        ("a-3", 1, None, [{"src": "Baum", "tgt": ["tree", "trunk"]}]),
    ]
    assert items[0]["domain"] == "bible" and items[1]["line"] == 3
    assert dm.tokenizer is None and dm.src_term_missing == 0


@pytest.mark.parametrize(("line", "match"), [
    ('{"source": "a", "constraints": [}', r"b\.jsonl:2: not valid JSON"),
    ('["not", "an", "object"]', r"b\.jsonl:2: expected a JSON object"),
    ('{"constraints": []}', r"b\.jsonl:2: the record has no non-empty string 'source'"),
    ('{"source": "a", "constraints": {"src": "a"}}', r"b\.jsonl:2: 'constraints' must be a list"),
    ('{"source": "a", "constraints": [{"src": "a"}]}', r"b\.jsonl:2: constraint 0 must be an object with 'src'"),
    ('{"source": "a", "constraints": [{"src": " ", "tgt": "b"}]}', r"b\.jsonl:2: constraint 0 has an empty 'src'"),
    ('{"source": "a", "constraints": [{"src": "a", "tgt": ""}]}', r"b\.jsonl:2: constraint 0 has an empty 'tgt'"),
    ('{"source": "a", "constraints": [{"src": "a", "tgt": []}]}', r"b\.jsonl:2: constraint 0 has an empty 'tgt'"),
    ('{"source": "a", "constraints": [{"src": "a", "tgt": ["b", ""]}]}', r"b\.jsonl:2: .*empty alternative"),
])
def test_bad_jsonl_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    f = write(tmp_path / "b.jsonl", '{"source": "ok", "constraints": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_jsonl(f)


def test_source_checks(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", json.dumps({"id": "q", "source": "Das Haus", "constraints": [
        {"src": "Häuser", "tgt": "houses"}]}) + "\n" + json.dumps({"id": "t", "source": "<b>x", "constraints": []}))
    with pytest.raises(ValueError, match=r"c\.jsonl:2: item 't': the source has an unclosed tag <b>"):
        items_of(TerminologyDataModule(test_file=str(f)))
    write(f, f.read_text().splitlines()[0] + "\n")
    dm = TerminologyDataModule(test_file=str(f))
    with pytest.warns(UserWarning, match="1 constraint source term"):
        items_of(dm)
    assert dm.src_term_missing == 1
    with pytest.raises(ValueError, match=r"c\.jsonl:1: constraint source 'Häuser' does not occur.*strict_src"):
        items_of(TerminologyDataModule(test_file=str(f), strict_src=True))


T331 = '<term id="331" type="src_lemma_and_tgt_original" src="infection" tgt="infections|infectées|infection">'
T7 = '<term id="7" type="src_original_and_tgt_original" src="samples" tgt="échantillons">'
SRC_SGM = f"""<srcset setid="dev" srclang="en">
<doc docid="covid-1" genre="news">
<seg id="1">The {T331} infections </term> rise .</seg>
<seg id="2">Take d' {T7} samples </term> and {T7} samples </term> &amp; more .</seg>
</doc>
<doc docid="covid-2">
<seg id="1">No terms here .</seg>
</doc>
</srcset>
"""
REF_SGM = """<refset setid="dev" trglang="fr">
<doc docid="covid-1"><seg id="1">Les <term id="331" type="x" src="infection" tgt="infections">infections</term>
augmentent .</seg>
<seg id="2">Prenez d' échantillons &amp; plus .</seg></doc>
<doc docid="covid-2"><seg id="1">Pas de termes ici .</seg></doc>
</refset>
"""


def test_wmt21_sgm(tmp_path: Path) -> None:
    src, ref = write(tmp_path / "dev.en-fr.en.sgm", SRC_SGM), write(tmp_path / "dev.en-fr.fr.sgm", REF_SGM)
    dm = TerminologyDataModule(test_file=str(src), ref_file=str(ref))
    with pytest.warns(UserWarning, match="1 constraint source term"):
        items = items_of(dm)
    assert [i["id"] for i in items] == ["covid-1:1", "covid-1:2", "covid-2:1"]
    assert [i["source"] for i in items] == ["The infections rise .", "Take d' samples and samples & more .",
                                            "No terms here ."]
    assert [i["reference"] for i in items] == ["Les infections augmentent .", "Prenez d' échantillons & plus .",
                                               "Pas de termes ici ."]
    assert [[(c["src"], c["tgt"], c["type"]) for c in i["constraints"]] for i in items] == [
        [("infection", ["infections", "infectées", "infection"], "src_lemma_and_tgt_original")],
        [("samples", ["échantillons"], "src_original_and_tgt_original")], []]
    assert dm.src_term_missing == 1  # the lemma-typed "infection" is not in "infections" (a warning, not an error)
    bad = write(tmp_path / "bad.fr.sgm", REF_SGM.replace('docid="covid-2"', 'docid="covid-3"'))
    with pytest.raises(ValueError, match=r"first mismatch \(docid, seg id\): \('covid-2', '1'\) vs \('covid-3', '1'\)"):
        read_wmt21_sgm(src, bad)


def test_wmt23_directory_both_names_and_export(tmp_path: Path) -> None:
    for name in ("term", "terminology"):
        d = tmp_path / name
        d.mkdir()
        write(d / "deen.de", "Das Haus ist alt.\nKein Begriff.\n")
        write(d / "deen.en", "The house is old.\nNo term.\n")
        write(d / f"deen.{name}.proper", json.dumps([{"de": "Haus", "en": "house"}]) + "\n[]\n")
        items = read_wmt23(d, "deen")
        assert [(i["source"], i["reference"], i["constraints"]) for i in items] == [
            ("Das Haus ist alt.", "The house is old.", [{"src": "Haus", "tgt": ["house"]}]),
            ("Kein Begriff.", "No term.", [])]
    dm = TerminologyDataModule(test_file=str(tmp_path / "term"), wmt23_pair="deen")
    assert len(items_of(dm)) == 2
    write(tmp_path / "term" / "deen.term.proper", "[]\n")
    with pytest.raises(ValueError, match=r"different line counts: \{'deen.de': 2, 'deen.term.proper': 1, 'deen.en'"):
        read_wmt23(tmp_path / "term", "deen")
    write(tmp_path / "term" / "deen.term.proper", '[]\n{"de": "Haus"}\n')
    with pytest.raises(ValueError, match=r"deen\.term\.proper:2: a term line must be a JSON list"):
        read_wmt23(tmp_path / "term", "deen")
    export = write(tmp_path / "hf.jsonl", json.dumps({"src": "Das Haus", "ref": "The house", "langs": "de-en",
                                                      "hints": {"term": [{"de": "Haus", "en": "house"}],
                                                                "rand": [{"de": "Das", "en": "The"}]}}) + "\n")
    dm = TerminologyDataModule(test_file=str(export), wmt23_terms="random")
    assert [i["constraints"] for i in items_of(dm)] == [[{"src": "Das", "tgt": ["The"]}]]


def test_glossary_and_format_errors(tmp_path: Path) -> None:
    f = write(tmp_path / "blind.jsonl", json.dumps({"source": "Die New York Times und York", "constraints": []}))
    g = write(tmp_path / "g.tsv", "# glossary\nYork\tYork\nNew York Times\tNYT|New York Times\nParis\tParis\n")
    [item] = items_of(TerminologyDataModule(test_file=str(f), glossary_file=str(g)))
    assert item["constraints"] == [{"src": "New York Times", "tgt": ["NYT", "New York Times"]},
                                   {"src": "York", "tgt": ["York"]}]
    write(g, "York\n")
    with pytest.raises(ValueError, match=r"g\.tsv:1: expected 'src<TAB>tgt'"):
        items_of(TerminologyDataModule(test_file=str(f), glossary_file=str(g)))
    odd = write(tmp_path / "x.txt", "hello\n")
    with pytest.raises(ValueError, match=r"cannot tell the format.*\['jsonl', 'wmt21_sgm', 'wmt23'\]"):
        items_of(TerminologyDataModule(test_file=str(odd)))
    with pytest.raises(ValueError, match="give data.init_args.test_file or predict_file"):
        TerminologyDataModule()
    with pytest.raises(ValueError, match="data_format must be one of"):
        TerminologyDataModule(test_file="a", data_format="tmx")


def test_synthetic_demo() -> None:
    items = items_of(TerminologyDataModule(demo="synthetic", max_items=None))
    assert len(items) == 120 and items == items_of(TerminologyDataModule(demo="synthetic", max_items=None))
    checker = ConstraintChecker()
    for it in items:  # references meet every unit; tag items have structural units
        res = checker.check(it["source"], it["reference"], it["constraints"])
        assert res.all_met and res.n_units == (2 if it["index"] < 100 else 6 if it["index"] % 2 == 0 else 5)
    assert {"Größe", "Straße", "Brücke"} <= {c["tgt"][0] for it in items for c in it["constraints"]}
    assert synthetic_terminology()[0]["source"] == "We need the size and the bread today."


def test_freedict_entry_parsing() -> None:
    entry = "temple /tˈɛmpəl/\n [Am.] Brillenbügel <masc>, Bügel <masc> (Brille); Tempel…\n   Synonyms: {arm}\n"
    assert parse_equivalents(entry) == ["Brillenbügel", "Bügel"]
    assert parse_equivalents("king /kˈɪŋ/\nKönig <masc>\n see: {kings}\n", min_term_chars=4) == ["König"]


def test_bible_freedict_demo_is_built_once_and_references_meet_every_constraint(tmp_path: Path) -> None:
    dm = TerminologyDataModule(demo="bible_freedict", data_dir=str(tmp_path), max_items=30)
    dm.prepare_data()
    items = items_of(dm)
    assert len(items) == 30 and all(1 <= len(it["constraints"]) <= 3 for it in items)
    checker = ConstraintChecker()
    for it in items:
        assert it["id"].startswith("bible-40-")
        assert checker.check(it["source"], it["reference"], it["constraints"]).all_met
        assert all(checker.src_found(it["source"], it["constraints"]))
    assert dm.languages == ("German", "English") and dm.src_term_missing == 0
    [path] = list(tmp_path.glob("bible_freedict_de-en_*.jsonl"))
    mtime = os.stat(path).st_mtime_ns
    assert build_bible_terminology(tmp_path, max_items=30) == path and os.stat(path).st_mtime_ns == mtime
    en_de = build_bible_terminology(tmp_path, direction="en-de", max_items=30, verbose=False)
    first = json.loads(en_de.read_text().splitlines()[0])
    assert first["reference"] == items[0]["source"] and first["constraints"][0]["tgt"] == items[0]["constraints"][0][
        "src"]


def test_bible_freedict_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dict-freedict-eng-deu"):
        build_bible_terminology(tmp_path, dict_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"yields only \d+ items.*demo_books"):
        build_bible_terminology(tmp_path, books=[57], min_term_chars=12)  # Philemon, long terms only
    with pytest.raises(ValueError, match="demo_direction must be"):
        build_bible_terminology(tmp_path, direction="de-fr")
