"""LongBenchDataModule: LongBench JSONL validation, official templates and max lengths, middle truncation, the
offline needle / verse QA builder (real Austen and Bible text) and the training samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.demo.longbench_qa import build_longbench_qa
from datamodules.longbench import (
    DATASET2MAXLEN,
    DATASET2PROMPT,
    LongBenchDataModule,
    middle_truncate,
    read_longbench_jsonl,
    truncate_prompt,
)
from lit_models.hf import load_tokenizer


def _sample(i: int, **over: object) -> dict[str, object]:
    row = {"input": f"question {i}?", "context": f"context number {i} " * 5, "answers": [f"answer {i}"],
           "length": 1000 * (i + 1), "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": f"id{i}"}
    row.update(over)
    return row


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mamba-tiny")


def test_templates_and_max_lengths_are_longbench_v1() -> None:
    assert DATASET2PROMPT["hotpotqa"].endswith("Question: {input}\nAnswer:")
    assert DATASET2PROMPT["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert DATASET2PROMPT["trec"] == ("Please determine the type of the question below. Here are some examples of "
                                      "questions.\n\n{context}\n{input}")
    assert {t: DATASET2MAXLEN[t] for t in ("qasper", "samsum", "multifieldqa_en", "trec", "lcc", "repobench-p",
                                           "hotpotqa", "triviaqa", "passage_count", "gov_report", "multi_news")} == {
        "qasper": 128, "samsum": 128, "multifieldqa_en": 64, "trec": 64, "lcc": 64, "repobench-p": 64,
        "hotpotqa": 32, "triviaqa": 32, "passage_count": 32, "gov_report": 512, "multi_news": 512}


def test_middle_truncation_keeps_first_and_last_halves(tokenizer) -> None:
    assert middle_truncate(list(range(20)), 10) == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]
    assert middle_truncate(list(range(8)), 10) == list(range(8))
    text = " ".join(f"w{i}" for i in range(300))
    ids = tokenizer(text).input_ids
    cut = truncate_prompt(tokenizer, text, 100, "ids")
    assert cut == ids[:50] + ids[-50:]
    reenc = truncate_prompt(tokenizer, text, 100, "decode_reencode")
    decoded = tokenizer.decode(reenc)
    assert decoded.startswith(tokenizer.decode(ids[:50])) and decoded.endswith(tokenizer.decode(ids[-50:]))
    assert abs(len(reenc) - 100) <= 3


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    bad = _sample(1)
    del bad["answers"]
    path = _write(tmp_path / "hotpotqa_e.jsonl", [_sample(0), bad])
    with pytest.raises(ValueError, match=r"hotpotqa_e.jsonl:2: missing field 'answers'"):
        read_longbench_jsonl(path)
    _write(path, [_sample(0, answers="not a list")])
    with pytest.raises(ValueError, match=r":1: field 'answers' must be a list of strings"):
        read_longbench_jsonl(path)


def test_unknown_task_lists_the_known_ones_and_missing_file(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"no prompt template for \['my_task'\]; known tasks: narrativeqa, qasper"):
        LongBenchDataModule(data_dir=str(tmp_path), datasets=["my_task"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_length=64 must exceed"):
        LongBenchDataModule(data_dir=str(tmp_path), datasets=["qasper"], tokenizer=tokenizer, max_length=64)
    dm = LongBenchDataModule(data_dir=str(tmp_path), datasets=["qasper"], tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="qasper_e.jsonl"):
        dm.setup("test")


def test_test_items_follow_the_longbench_protocol(tmp_path: Path, tokenizer) -> None:
    long = {"context": "a long context of many words " * 60}
    _write(tmp_path / "hotpotqa_e.jsonl", [_sample(i, **long) for i in range(3)])
    _write(tmp_path / "samsum_e.jsonl", [_sample(0, dataset="samsum")])
    dm = LongBenchDataModule(data_dir=str(tmp_path), datasets=["hotpotqa", "samsum"], tokenizer=tokenizer,
                             max_length=200)
    dm.setup("test")
    items = list(dm.test_dataloader())
    assert len(items) == 4
    first = items[0]
    prompt = DATASET2PROMPT["hotpotqa"].format(**_sample(0, **long))
    assert len(tokenizer(prompt).input_ids) > 300
    assert first["input_ids"].tolist()[0] == truncate_prompt(tokenizer, prompt, 200)
    assert abs(first["input_ids"].shape[1] - 200) <= 3
    assert tokenizer.decode(first["input_ids"][0]).endswith("Question: question 0?\nAnswer:")
    assert first["meta"]["max_new_tokens"] == 32 and first["meta"]["answers"] == ["answer 0"]
    assert [it["meta"]["length"] for it in items[:3]] == [1000, 2000, 3000]
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert items[3]["meta"]["stop_ids"] == [tokenizer.eos_token_id, newline]
    assert items[0]["meta"]["stop_ids"] == [tokenizer.eos_token_id]


def test_offline_qa_builder_writes_real_needles_and_verses(tmp_path: Path) -> None:
    root = build_longbench_qa(tmp_path, sizes={"train": 6, "validation": 2, "test": 3}, needle_words=(120, 200),
                              verse_count=(5, 8))
    assert build_longbench_qa(tmp_path, sizes={"train": 6, "validation": 2, "test": 3}, needle_words=(120, 200),
                              verse_count=(5, 8)) == root  # cached
    needles = read_longbench_jsonl(root / "test" / "needle_austen.jsonl")
    assert len(needles) == 3
    for row in needles:
        name = row["input"].removeprefix("What is the secret number of ").removesuffix("?")
        digits = row["answers"][0]
        assert len(digits) == 5 and f"The secret number of {name} is {digits}." in row["context"]
        assert 120 + 8 <= row["length"] <= 200 + 8  # haystack words + the 8-word needle
    verses = read_longbench_jsonl(root / "train" / "verse_retrieval_bible.jsonl")
    for row in verses:
        paragraphs = row["context"].split("\n\n")
        assert 5 <= len(paragraphs) <= 8
        n = int(row["answers"][0].removeprefix("Paragraph "))
        assert paragraphs[n - 1] == f"Paragraph {n}: {row['input'][1:-1]}"


def test_demo_training_samples_supervise_only_the_answer(tmp_path: Path, tokenizer) -> None:
    dm = LongBenchDataModule(tokenizer=tokenizer, demo="needle", demo_sizes={"train": 3, "validation": 1, "test": 1},
                             demo_needle_words=(100, 150), demo_cache_dir=str(tmp_path), train_max_length=120,
                             train_keep_head=20)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_items) == 3 and len(dm.val_items) == 1
    for item in dm.train_items:
        ids, labels, n = item["input_ids"][0], item["labels"][0], item["prompt_len"]
        assert ids.numel() <= 120 and (labels[:n] == -100).all()
        answer = tokenizer.decode(labels[n:][labels[n:] != -100])
        assert answer.endswith("<|im_end|>") and answer[:-len("<|im_end|>")].strip().isdigit()
    dm.setup("test")
    assert dm.tasks == ["needle_austen"] and len(dm.test_items) == 1
