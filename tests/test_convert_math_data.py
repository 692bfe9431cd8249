"""``scripts/convert_math_data.py``: MetaMathQA / GSM8K / Alpaca / MGSM TSV -> instruction JSONL (SLAM spec section 6).

Hand-made inputs of every format in ``tmp_path``; exact output records; the output read back by
``read_instruction_file``, its golds parsed by ``parse_gold`` and scored by ``score_math``; an ``InstructionDataModule``
trained on converted MetaMathQA and tested on converted MGSM; errors naming file and line; ``--skip-bad`` counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from datamodules.instruction import (
    IGNORE_INDEX,
    InstructionDataModule,
    read_instruction_file,
)
from lit_models.nn.answer_extract import parse_gold, score_math

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_math_data.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("convert_math_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONVERT = _script()


def convert(*argv: str) -> dict[str, Any]:
    return CONVERT.main(list(argv))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- inputs
METAMATH = [
    {"query": "Janet has 3 apples and buys 2 more. How many apples does she have?",
     "response": "Janet has 3 + 2 = 5 apples.\nThe answer is: 5", "type": "GSM_AnsAug"},
    {"query": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
     "response": "We add: $\\frac{1}{4} + \\frac{1}{4} = \\frac{1}{2}$.\nThe answer is: \\frac{1}{2}",
     "type": "MATH_AnsAug"},
    {"query": "A shop sells 500 pens on Monday and 500 on Tuesday. How many pens in total?",
     "response": "It sells 500 + 500 = 1,000 pens.\nThe answer is: 1,000", "type": "GSM_Rephrased"},
]

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]

ALPACA = [
    {"instruction": "Löse die folgende Aufgabe.", "input": "Ein Buch kostet 4 Euro. Was kosten 3 Bücher?",
     "output": "3 * 4 = 12. The answer is 12.", "lang": "de"},
    {"instruction": "Tom has 7 marbles and loses 2. How many are left?", "input": "",
     "output": "7 - 2 = 5\n#### 5"},
    {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof", "lang": "eng"},
]

MGSM_EN = (
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends "
    "every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
    "dollars does she make every day at the farmers' market?\t18\n"
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?\t3\n"
)
MGSM_DE = (
    'Ein Laden verkauft einen "Super"-Apfel für 2,5 Euro. Wie viel kostet ein Apfel?\t2.5\n'
    "Tim hat 600 Murmeln und kauft 400 dazu. Wie viele hat er?\t1000\n"
)


@pytest.fixture
def mgsm_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mgsm"
    d.mkdir()
    (d / "mgsm_en.tsv").write_text(MGSM_EN, encoding="utf-8")
    (d / "mgsm_de.tsv").write_text(MGSM_DE, encoding="utf-8")
    return d


# ------------------------------------------------------------------------------------------------- formats
def test_metamath_json_array_exact_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "MetaMathQA.json"
    src.write_text(json.dumps(METAMATH, ensure_ascii=False, indent=1), encoding="utf-8")
    before = sha(src)
    out = tmp_path / "deep" / "dir" / "metamath.jsonl"
    stats = convert("--format", "metamath", "--input", str(src), "--out", str(out))
    assert read_jsonl(out) == [
        {"id": "metamath-en-1", "lang": "en", "prompt": METAMATH[0]["query"], "response": METAMATH[0]["response"],
         "answer": "5"},
        {"id": "metamath-en-2", "lang": "en", "prompt": METAMATH[1]["query"], "response": METAMATH[1]["response"],
         "answer": "\\frac{1}{2}"},
        {"id": "metamath-en-3", "lang": "en", "prompt": METAMATH[2]["query"], "response": METAMATH[2]["response"],
         "answer": "1000"},
    ]
    assert stats == {"format": "metamath", "input": str(src), "out": str(out), "records": 3, "per_lang": {"en": 3},
                     "skipped": 0, "skipped_by_reason": {}, "non_numeric_answers": 1, "no_answer": 0,
                     "dropped_non_numeric": 0}
    assert sha(src) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["metamath.jsonl"]  # no temporary file left
    assert f"metamath {src} -> {out}: 3 records (en 3); 0 bad skipped, 1 non-numeric answers" in capsys.readouterr().out


def test_metamath_jsonl_lang_max_records_numeric_only(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "mm.jsonl", [METAMATH[0], "", METAMATH[1], METAMATH[2]])  # a blank line 2
    out = tmp_path / "mm_de.jsonl"
    stats = convert("--format", "metamath", "--input", str(src), "--out", str(out), "--lang", "deu",
                    "--numeric-only")
    assert [(r["id"], r["lang"], r["answer"]) for r in read_jsonl(out)] == [("metamath-de-1", "de", "5"),
                                                                           ("metamath-de-4", "de", "1000")]
    assert (stats["records"], stats["dropped_non_numeric"], stats["non_numeric_answers"]) == (2, 1, 0)
    stats = convert("--format", "metamath", "--input", str(src), "--out", str(out), "--max-records", "2")
    assert [r["id"] for r in read_jsonl(out)] == ["metamath-en-1", "metamath-en-3"]
    assert stats["per_lang"] == {"en": 2}


def test_gsm8k_annotations_removed_answer_rewritten(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "gsm8k_train.jsonl", GSM8K)
    out = tmp_path / "gsm8k.jsonl"
    stats = convert("--format", "gsm8k", "--input", str(src), "--out", str(out))
    assert read_jsonl(out) == [
        {"id": "gsm8k-en-1", "lang": "en", "prompt": GSM8K[0]["question"],
         "response": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and "
                     "May.\nThe answer is: 72",
         "answer": "72"},
        {"id": "gsm8k-en-2", "lang": "en", "prompt": GSM8K[1]["question"],
         "response": "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n"
                     "The answer is: 10",
         "answer": "10"},
    ]
    assert (stats["records"], stats["skipped"]) == (2, 0)


def test_gsm8k_thousands_gold(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "500+500=<<500+500=1000>>1000\n"
                                                                                 "#### 1,000"}])
    out = tmp_path / "g_out.jsonl"
    convert("--format", "gsm8k", "--input", str(src), "--out", str(out))
    assert read_jsonl(out) == [{"id": "gsm8k-en-1", "lang": "en", "prompt": "How many?",
                                "response": "500+500=1000\nThe answer is: 1000", "answer": "1000"}]


def test_alpaca_prompt_join_lang_field_and_answers(tmp_path: Path) -> None:
    src = tmp_path / "mgsm8kinstruct.json"
    src.write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "alpaca.jsonl"
    stats = convert("--format", "alpaca", "--input", str(src), "--out", str(out), "--lang", "fr")
    assert read_jsonl(out) == [
        {"id": "alpaca-de-1", "lang": "de",
         "prompt": "Löse die folgende Aufgabe.\n\nEin Buch kostet 4 Euro. Was kosten 3 Bücher?",
         "response": "3 * 4 = 12. The answer is 12.", "answer": "12"},
        {"id": "alpaca-fr-2", "lang": "fr", "prompt": "Tom has 7 marbles and loses 2. How many are left?",
         "response": "7 - 2 = 5\n#### 5", "answer": "5"},
        {"id": "alpaca-en-3", "lang": "en", "prompt": "Write a haiku about rain.", "response": "Soft rain on the roof",
         "answer": None},
    ]
    assert (stats["per_lang"], stats["no_answer"]) == ({"de": 1, "fr": 1, "en": 1}, 1)
    stats = convert("--format", "alpaca", "--input", str(src), "--out", str(out), "--languages", "de", "en")
    assert [r["id"] for r in read_jsonl(out)] == ["alpaca-de-1", "alpaca-en-2", "alpaca-en-3"]


def test_mgsm_tsv_quotes_decimal_languages(mgsm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mgsm_test.jsonl"
    stats = convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out))
    en_q = MGSM_EN.split("\n")[0].split("\t")[0]
    assert read_jsonl(out) == [
        {"id": "mgsm-de-1", "lang": "de", "prompt": 'Ein Laden verkauft einen "Super"-Apfel für 2,5 Euro. Wie viel '
         "kostet ein Apfel?", "response": "The answer is: 2.5", "answer": "2.5"},
        {"id": "mgsm-de-2", "lang": "de", "prompt": "Tim hat 600 Murmeln und kauft 400 dazu. Wie viele hat er?",
         "response": "The answer is: 1000", "answer": "1000"},
        {"id": "mgsm-en-1", "lang": "en", "prompt": en_q, "response": "The answer is: 18", "answer": "18"},
        {"id": "mgsm-en-2", "lang": "en", "prompt": "A robe takes 2 bolts of blue fiber and half that much white "
         "fiber.  How many bolts in total does it take?", "response": "The answer is: 3", "answer": "3"},
    ]
    assert stats["per_lang"] == {"de": 2, "en": 2}
    # --languages keeps the given order; --max-records is per language
    stats = convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out), "--languages", "en", "deu",
                    "--max-records", "1")
    assert [r["id"] for r in read_jsonl(out)] == ["mgsm-en-1", "mgsm-de-1"]
    # one file as input
    convert("--format", "mgsm_tsv", "--input", str(mgsm_dir / "mgsm_en.tsv"), "--out", str(out))
    assert [r["id"] for r in read_jsonl(out)] == ["mgsm-en-1", "mgsm-en-2"]


# ------------------------------------------------------------------------------------------------- evaluation
def test_output_reads_back_and_golds_score(mgsm_dir: Path, tmp_path: Path) -> None:
    mm_src = tmp_path / "mm.json"
    mm_src.write_text(json.dumps(METAMATH), encoding="utf-8")
    gsm_src = write_jsonl(tmp_path / "gsm.jsonl", GSM8K)
    outs = {"metamath": tmp_path / "mm.jsonl", "gsm8k": tmp_path / "gsm_out.jsonl", "mgsm_tsv": tmp_path / "t.jsonl"}
    convert("--format", "metamath", "--input", str(mm_src), "--out", str(outs["metamath"]), "--numeric-only")
    convert("--format", "gsm8k", "--input", str(gsm_src), "--out", str(outs["gsm8k"]))
    convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(outs["mgsm_tsv"]))
    golds = {}
    for fmt, path in outs.items():
        records = read_instruction_file(path, require_response=True)
        golds[fmt] = [parse_gold(r["extra"]["answer"]) for r in records]
        assert all(set(r["extra"]) == {"answer"} for r in records)
        # a model that writes the reference response is scored correct by both extraction modes
        for mode in ("mathoctopus", "signed"):
            scored = score_math([r["response"] for r in records], [r["extra"]["answer"] for r in records], mode=mode)
            assert [s["correct"] for s in scored] == [True] * len(records)
    assert golds == {"metamath": [5.0, 1000.0], "gsm8k": [72.0, 10.0], "mgsm_tsv": [2.5, 1000.0, 18.0, 3.0]}


def test_instruction_datamodule_trains_on_metamath_tests_on_mgsm(mgsm_dir: Path, tmp_path: Path) -> None:
    mm_src = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    convert("--format", "metamath", "--input", str(mm_src), "--out", str(train))
    convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(test))
    dm = InstructionDataModule(tokenizer="smollm2-135m", train_files=[str(train)], test_files=[str(test)],
                               batch_size=3, eval_batch_size=4, max_length=512)
    tok = dm.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].shape == batch["input_ids"].shape
    responses = sorted(tok.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in batch["labels"])
    assert responses == sorted(r["response"] + "<|im_end|>" for r in METAMATH)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    metas = [m for b in batches for m in b["meta"]]
    assert [m["id"] for m in metas] == ["mgsm-de-1", "mgsm-de-2", "mgsm-en-1", "mgsm-en-2"]  # file order
    assert [(m["lang"], m["answer"], m["response"]) for m in metas] == [
        ("de", "2.5", "The answer is: 2.5"), ("de", "1000", "The answer is: 1000"), ("en", "18", "The answer is: 18"),
        ("en", "3", "The answer is: 3")]
    first = batches[0]
    assert first["input_ids"].shape[0] == 4 and first["attention_mask"][:, -1].tolist() == [1, 1, 1, 1]
    assert tok.decode(first["input_ids"][0, -4:]) == "<|im_start|>assistant\n"  # prompt only, left padded


# ------------------------------------------------------------------------------------------------- errors
def test_errors_name_file_and_line(mgsm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    mm = write_jsonl(tmp_path / "mm.jsonl", [METAMATH[0], {"query": "q", "response": "no final answer here"}])
    with pytest.raises(ValueError, match=rf"^{mm} line 2: response has no 'The answer is:'"):
        convert("--format", "metamath", "--input", str(mm), "--out", str(out))
    missing = write_jsonl(tmp_path / "missing.jsonl", [GSM8K[0], GSM8K[1], {"question": "q"}])
    with pytest.raises(ValueError, match=rf"^{missing} line 3: missing 'answer' \(keys found: \['question'\]\)"):
        convert("--format", "gsm8k", "--input", str(missing), "--out", str(out))
    no_hash = write_jsonl(tmp_path / "nohash.jsonl", [{"question": "q", "answer": "It is 5."}])
    with pytest.raises(ValueError, match=rf"^{no_hash} line 1: expected exactly one '#### N' gold line, found 0"):
        convert("--format", "gsm8k", "--input", str(no_hash), "--out", str(out))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([ALPACA[0], {"instruction": "x", "output": 3}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{arr} record 2: 'output' must be a string, got int"):
        convert("--format", "alpaca", "--input", str(arr), "--out", str(out))
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [METAMATH[0], '{"query": "q", '])
    with pytest.raises(ValueError, match=rf"^{bad_json} line 2: not valid JSON"):
        convert("--format", "metamath", "--input", str(bad_json), "--out", str(out))
    assert not out.exists()  # nothing written on failure

    (mgsm_dir / "mgsm_fr.tsv").write_text("Question une\t7\nQuestion deux\tsept\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{mgsm_dir / 'mgsm_fr.tsv'} line 2: answer 'sept' is not a number"):
        convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out))
    (mgsm_dir / "mgsm_fr.tsv").write_text("Question une\t7\nQuestion\tdeux\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{mgsm_dir / 'mgsm_fr.tsv'} line 2: expected exactly one tab .*found 2"):
        convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out))
    with pytest.raises(ValueError, match=r"no mgsm_<lang>.tsv for \['ja'\] .*present: \['de', 'en', 'fr'\]"):
        convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out), "--languages", "en", "ja")


def test_missing_input_and_refusals(mgsm_dir: Path, tmp_path: Path) -> None:
    gone = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"--input {gone} does not exist"):
        convert("--format", "metamath", "--input", str(gone), "--out", str(tmp_path / "o.jsonl"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no mgsm_<lang>.tsv files in {empty}"):
        convert("--format", "mgsm_tsv", "--input", str(empty), "--out", str(tmp_path / "o.jsonl"))
    src = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    before = sha(src)
    with pytest.raises(ValueError, match="is an input file"):
        convert("--format", "metamath", "--input", str(src), "--out", str(src))
    assert sha(src) == before
    with pytest.raises(SystemExit):
        convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(tmp_path / "o.jsonl"), "--lang", "de")


def test_skip_bad_counts_and_reports(mgsm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_jsonl(tmp_path / "mm.jsonl", [
        METAMATH[0], {"query": "q", "response": "no marker"}, "not json", {"response": "x\nThe answer is: 1"},
        ["a list"], METAMATH[2]])
    out = tmp_path / "o.jsonl"
    stats = convert("--format", "metamath", "--input", str(src), "--out", str(out), "--skip-bad")
    assert [r["id"] for r in read_jsonl(out)] == ["metamath-en-1", "metamath-en-6"]
    assert (stats["records"], stats["skipped"]) == (2, 4)
    assert stats["skipped_by_reason"] == {"no 'The answer is:'": 1, "invalid JSON": 1, "missing 'query'": 1,
                                          "not an object": 1}
    err = capsys.readouterr().err
    assert "warning: skipped 4 bad records" in err and f"{src} line 3: not valid JSON" in err

    (mgsm_dir / "mgsm_en.tsv").write_text(MGSM_EN + "Broken line without tab\n\nQ?\t12,5 Euro\nLast?\t4\n",
                                          encoding="utf-8")
    stats = convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out), "--skip-bad",
                    "--languages", "en")
    assert [r["id"] for r in read_jsonl(out)] == ["mgsm-en-1", "mgsm-en-2", "mgsm-en-6"]
    assert stats["skipped_by_reason"] == {"not one tab": 1, "non-numeric answer": 1}


def test_cli_from_repo_root(mgsm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    run = subprocess.run([sys.executable, "scripts/convert_math_data.py", "--format", "mgsm_tsv", "--input",
                          str(mgsm_dir), "--out", str(out), "--languages", "en"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert f"mgsm_tsv {mgsm_dir} -> {out}: 2 records (en 2)" in run.stdout
    assert [r["answer"] for r in read_jsonl(out)] == ["18", "3"]
    bad = subprocess.run([sys.executable, "scripts/convert_math_data.py", "--format", "gsm8k", "--input",
                          str(tmp_path / "missing.jsonl"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr == f"error: --input {tmp_path / 'missing.jsonl'} does not exist\n"


def test_alpaca_template_wraps_every_prompt(mgsm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mgsm_alpaca.jsonl"
    convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(out), "--languages", "en",
            "--template", "alpaca")
    plain = tmp_path / "mgsm_plain.jsonl"
    convert("--format", "mgsm_tsv", "--input", str(mgsm_dir), "--out", str(plain), "--languages", "en")
    for wrapped, raw in zip(read_jsonl(out), read_jsonl(plain)):
        assert wrapped["prompt"] == (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{raw['prompt']}\n\n### Response:\n"
        )
        assert {k: v for k, v in wrapped.items() if k != "prompt"} == {k: v for k, v in raw.items() if k != "prompt"}
