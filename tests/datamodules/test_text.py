"""TextDataModule: readers, packing, BOS/EOS handling, padding, by-document split, token budget, cache, resume, HF."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.text import BlockBatchSampler, TextDataModule, TokenBlockDataset, read_documents
from lit_models.hf import load_tokenizer

WORDS = [
    "the", "river", "runs", "past", "old", "mills", "and", "green", "fields", "while", "a", "quiet", "town", "sleeps",
    "under", "grey", "sky", "full", "of", "rain", "letters", "arrive", "late", "every", "morning", "carrying", "news",
    "distant", "cousins", "ships", "storms", "weddings", "debts",
]
EOS = 2
BOS = 1


def _texts(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


def _jsonl(path: Path, texts: list[str], **extra: object) -> Path:
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _dm(tmp_path: Path, **kwargs: object) -> TextDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return TextDataModule(**kwargs)


def _seeded_ids(ids: list[str], seed: int) -> list[str]:
    order = sorted(range(len(ids)), key=lambda i: (hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest(), i))
    return [ids[i] for i in order]


# ----------------------------------------------------------------------------------------- readers
def test_readers_txt_jsonl_json(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("First para\nline two\n\n \n\nSecond para\r\n\nThird\n", encoding="utf-8")
    assert [d.text for d in read_documents(txt, doc_split="file")] == [
        "First para\nline two\n\n \n\nSecond para\n\nThird"
    ]
    blocks = read_documents(txt, doc_split="blank_line")
    assert [(d.id, d.text) for d in blocks] == [
        ("a.txt#0", "First para\nline two"),
        ("a.txt#1", "Second para"),
        ("a.txt#2", "Third"),
    ]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"body": "x y", "id": 7, "title": "T"}\n\n{"body": " z "}\n', encoding="utf-8")
    docs = read_documents(jl, text_field="body")
    assert [(d.id, d.title, d.text, d.source) for d in docs] == [
        ("7", "T", "x y", "files"),
        ("b.jsonl:3", "b.jsonl:3", "z", "files"),
    ]
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"text": "one", "source": "austen"}, "two"]), encoding="utf-8")
    assert [(d.id, d.source, d.text) for d in read_documents(js)] == [("c.json:0", "austen", "one"),
                                                                      ("c.json:1", "files", "two")]


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: invalid JSON"):
        read_documents(bad)
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing_field\.jsonl line 2: no 'text' field .*data\.init_args\.text_field"):
        read_documents(missing)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"wrong\.jsonl line 1: field 'text' is a int"):
        read_documents(wrong)
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"obj\.json: a JSON dict, expected a list"):
        read_documents(notlist)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not valid UTF-8 at byte 3"):
        read_documents(latin)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------- packing
def test_packing_is_the_eos_joined_stream(tmp_path: Path, tok) -> None:
    train = _texts(30, seed=1)
    val = _texts(4, seed=2)
    _jsonl(tmp_path / "train.jsonl", train)
    _jsonl(tmp_path / "val.jsonl", val)
    dm = _dm(tmp_path, train_files=[str(tmp_path / "train.jsonl")], val_files=[str(tmp_path / "val.jsonl")],
             seq_len=16, batch_size=3)
    dm.setup("fit")

    ids = [f"train.jsonl:{i + 1}" for i in range(len(train))]
    order = _seeded_ids(ids, seed=0)
    assert [d["id"] for d in dm.documents("train")] == order  # fixed seeded document order
    by_id = dict(zip(ids, train))
    expected = [t for i in order for t in tok(by_id[i])["input_ids"] + [EOS]]
    stream = dm.token_stream("train")
    assert stream.dtype == np.uint16
    assert stream.tolist() == expected
    assert int((stream == EOS).sum()) == len(train)  # one EOS per document, no BOS (SmolLM2 adds none)
    assert int((stream == BOS).sum()) == 0

    ds = dm.dataset("train")
    n = len(expected) // 16
    assert len(ds) == n and dm.stats["data/train_blocks"] == n
    rows = [ds[i] for i in range(n)]
    assert all(r["input_ids"].shape == (16,) for r in rows)
    assert torch.cat([r["input_ids"] for r in rows]).tolist() == expected[: n * 16]  # tail dropped
    assert all(torch.equal(r["labels"], r["input_ids"]) and int(r["attention_mask"].sum()) == 16 for r in rows)
    assert dm.stats["data/train_tokens"] == n * 16
    assert dm.train_tokens_available == len(expected)
    assert dm.stats["data/train_documents"] == sum(1 for k, _ in enumerate(order)
                                                   if sum(len(tok(by_id[i])["input_ids"]) + 1
                                                          for i in order[:k]) < n * 16)

    val_expected = [t for text in val for t in tok(text)["input_ids"] + [EOS]]  # validation keeps file order
    assert dm.token_stream("validation").tolist() == val_expected
    assert dm.stats["data/val_tokens"] == len(val_expected) // 16 * 16

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    val_batches = list(dm.val_dataloader())
    assert torch.cat([b["input_ids"] for b in val_batches]).flatten().tolist() == val_expected[: len(val_expected)
                                                                                               // 16 * 16]


def test_literal_special_token_text_is_not_a_control_token(tmp_path: Path) -> None:
    _jsonl(tmp_path / "t.jsonl", ["a <|im_end|> b", "c <|im_start|> d"])
    dm = _dm(tmp_path, train_files=[str(tmp_path / "t.jsonl")], val_files=[str(tmp_path / "t.jsonl")], seq_len=4)
    dm.setup("validate")
    stream = dm.token_stream("validation").tolist()
    assert stream.count(EOS) == 2 and stream.count(BOS) == 0


def _bos_tokenizer_dir(tmp_path: Path, with_eos: bool) -> str:
    from tokenizers.processors import TemplateProcessing

    t = load_tokenizer("smollm2-135m")
    single = "<|im_start|> $A <|im_end|>" if with_eos else "<|im_start|> $A"
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, special_tokens=[("<|im_start|>", BOS), ("<|im_end|>", EOS)]
    )
    out = tmp_path / f"tok_bos{'_eos' if with_eos else ''}"
    t.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("with_eos", [False, True])
def test_one_bos_and_one_eos_per_document(tmp_path: Path, tok, with_eos: bool) -> None:
    texts = _texts(6, seed=3)
    _jsonl(tmp_path / "d.jsonl", texts)
    dm = _dm(tmp_path, tokenizer=_bos_tokenizer_dir(tmp_path, with_eos), train_files=[str(tmp_path / "d.jsonl")],
             val_files=[str(tmp_path / "d.jsonl")], seq_len=8)
    dm.setup("validate")
    stream = dm.token_stream("validation").tolist()
    expected = [t for text in texts for t in [BOS, *tok(text)["input_ids"], EOS]]
    assert stream == expected  # never <bos><bos> nor <eos><eos>
    assert stream.count(BOS) == len(texts) and stream.count(EOS) == len(texts)


def test_unpacked_rows_are_padded_documents(tmp_path: Path, tok) -> None:
    texts = ["Short one.", " ".join(WORDS), "Two words"]
    _jsonl(tmp_path / "v.jsonl", texts)
    dm = _dm(tmp_path, train_files=[str(tmp_path / "v.jsonl")], val_files=[str(tmp_path / "v.jsonl")], seq_len=12,
             pack=False, batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    for row, text in enumerate(texts):
        ids = (tok(text)["input_ids"] + [EOS])[:12]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["input_ids"][row, n:].tolist() == [dm.pad_id] * (12 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (12 - n)
        assert batch["labels"][row].tolist() == ids + [-100] * (12 - n)  # the real EOS (= pad id) keeps its label
    assert len(tok(texts[1])["input_ids"]) > 12  # the long document is truncated, not padded
    assert dm.stats["data/val_tokens"] == sum(min(len(tok(t)["input_ids"]) + 1, 12) for t in texts)


# ----------------------------------------------------------------------------------------- split
def test_validation_split_by_document_is_fixed(tmp_path: Path) -> None:
    texts = _texts(40, seed=4)
    path = _jsonl(tmp_path / "corpus.jsonl", texts)
    runs = []
    for k in range(2):  # two instantiations, two caches: built twice from scratch
        dm = _dm(tmp_path, train_files=[str(path)], val_fraction=0.1, seq_len=8, cache_dir=str(tmp_path / f"c{k}"))
        dm.setup("fit")
        runs.append(dm)
    val_ids = [d["id"] for d in runs[0].documents("validation")]
    train_ids = [d["id"] for d in runs[0].documents("train")]
    all_ids = [f"corpus.jsonl:{i + 1}" for i in range(40)]
    assert len(val_ids) == 4 and not set(val_ids) & set(train_ids)
    assert sorted(val_ids + train_ids) == sorted(all_ids)
    assert set(val_ids) == set(_seeded_ids(all_ids, 0)[:4])
    assert val_ids == [d["id"] for d in runs[1].documents("validation")]
    assert np.array_equal(runs[0].token_stream("validation"), runs[1].token_stream("validation"))
    assert np.array_equal(runs[0].token_stream("train"), runs[1].token_stream("train"))
    other = _dm(tmp_path, train_files=[str(path)], val_fraction=0.1, seq_len=8, seed=1)
    other.setup("validate")
    assert {d["id"] for d in other.documents("validation")} == set(_seeded_ids(all_ids, 1)[:4]) != set(val_ids)


def test_split_is_stratified_by_source_and_val_documents(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [{"id": f"a/{i}", "source": "a", "title": f"A{i}", "text": t} for i, t in enumerate(_texts(6, 5))]
    rows += [{"id": f"b/{i}", "source": "b", "title": f"B{i}", "text": t} for i, t in enumerate(_texts(30, 6))]
    rows += [{"id": "c/0", "source": "c", "title": "Lonely", "text": "Only one."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dm = _dm(tmp_path, train_files=[str(path)], val_fraction=0.1, seq_len=4)
    dm.setup("validate")
    val = [d["id"] for d in dm.documents("validation")]
    assert sum(v.startswith("a/") for v in val) == 1 and sum(v.startswith("b/") for v in val) == 3
    assert "c/0" not in val  # a single-document group stays in training
    named = _dm(tmp_path, train_files=[str(path)], val_documents=["a/2", "lonely", "7"], seq_len=4)
    named.setup("fit")
    assert [d["id"] for d in named.documents("validation")] == ["a/2", "b/7", "c/0"]  # id, title, id tail
    assert not {"a/2", "b/7", "c/0"} & {d["id"] for d in named.documents("train")}
    bad = _dm(tmp_path, train_files=[str(path)], val_documents=["persuasion"], seq_len=4)
    with pytest.raises(ValueError, match=r"val_documents: \['persuasion'\] match no document"):
        bad.setup("fit")


# ----------------------------------------------------------------------------------------- token budget
def test_max_train_tokens_is_an_exact_prefix(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", _texts(30, seed=7))
    common = {"train_files": [str(path)], "seq_len": 16, "cache_dir": str(tmp_path / "cache")}
    full = TextDataModule(**common)
    full.setup("fit")
    stream = full.token_stream("train")
    small, big = TextDataModule(max_train_tokens=48, **common), TextDataModule(max_train_tokens=160, **common)
    small.setup("fit")
    big.setup("fit")
    assert small.stats["data/train_tokens"] == 48 and big.stats["data/train_tokens"] == 160
    assert torch.cat([small.dataset("train")[i]["input_ids"] for i in range(3)]).tolist() == stream[:48].tolist()
    assert torch.cat([big.dataset("train")[i]["input_ids"] for i in range(10)]).tolist() == stream[:160].tolist()
    assert small.train_tokens_available == big.train_tokens_available == stream.size
    assert np.array_equal(small.token_stream("validation"), full.token_stream("validation"))  # same val blocks
    ragged = TextDataModule(max_train_tokens=170, **common)
    ragged.setup("fit")
    assert len(ragged.dataset("train")) == 10  # 170 // 16 blocks
    capped = TextDataModule(max_blocks=2, **common)
    capped.setup("fit")
    assert len(capped.dataset("train")) == 2 and len(capped.dataset("validation")) <= 2
    too_many = TextDataModule(max_train_tokens=int(stream.size) + 1, **common)
    with pytest.raises(ValueError, match=r"max_train_tokens=\d+ exceeds the \d+ tokens"):
        too_many.setup("fit")
    with pytest.raises(ValueError, match="max_train_tokens needs pack=true"):
        TextDataModule(max_train_tokens=64, pack=False, **common)


# ----------------------------------------------------------------------------------------- cache
def test_token_cache_reuse_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _jsonl(tmp_path / "a.jsonl", _texts(10, seed=8))
    b = _jsonl(tmp_path / "b.jsonl", _texts(10, seed=9))
    before = a.read_bytes()
    first = _dm(tmp_path, train_files=[str(a)], seq_len=8)
    first.setup("fit")
    root = first._cache_paths["trainval"]
    assert root.parent == tmp_path / "cache" and (root / "meta.json").is_file()
    assert json.loads((root / "meta.json").read_text())["splits"]["train"]["tokens"] == first.token_stream("train").size

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(TextDataModule, "_build", no_build)
    again = _dm(tmp_path, train_files=[str(a)], seq_len=8)
    again.setup("fit")  # loaded from the cache, not rebuilt
    assert again._cache_paths["trainval"] == root
    assert np.array_equal(again.token_stream("train"), first.token_stream("train"))
    longer = _dm(tmp_path, train_files=[str(a)], seq_len=12)  # blocks are cut at setup: same token cache
    longer.setup("fit")
    assert longer._cache_paths["trainval"] == root and longer.dataset("train").rows.shape[1] == 12
    monkeypatch.undo()

    keys = {root}
    for kwargs in ({"train_files": [str(a), str(b)]}, {"train_files": [str(a)], "seed": 1},
                   {"train_files": [str(a)], "add_eos_between_docs": False}):
        dm = _dm(tmp_path, seq_len=8, **kwargs)
        dm.setup("validate")
        keys.add(dm._cache_paths["trainval"])
    assert len(keys) == 4  # sources, split seed and the EOS rule are in the key
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # a touched file is re-read
    touched = _dm(tmp_path, train_files=[str(a)], seq_len=8)
    touched.setup("validate")
    assert touched._cache_paths["trainval"] not in keys
    assert a.read_bytes() == before  # inputs are never modified
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # no half-written directory left behind


# ----------------------------------------------------------------------------------------- errors
def test_configuration_errors(tmp_path: Path) -> None:
    one = _jsonl(tmp_path / "one.jsonl", ["just one document"])
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        _dm(tmp_path, train_files=[str(one)], seq_len=1)
    with pytest.raises(ValueError, match=r"needs data\.init_args\.train_files"):
        _dm(tmp_path)
    with pytest.raises(ValueError, match=r"train_files is only read with source='files'"):
        _dm(tmp_path, source="essays", train_files=[str(one)])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        _dm(tmp_path, train_files=[str(one)], val_fraction=1.0)
    missing = _dm(tmp_path, train_files=[str(one), str(tmp_path / "gone.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.train_files\[1\]: file not found: .*gone\.jsonl"):
        missing.setup("fit")
    empty = _jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(ValueError, match="empty corpus"):
        _dm(tmp_path, train_files=[str(empty)]).setup("fit")
    with pytest.raises(ValueError, match="only 1 training document"):
        _dm(tmp_path, train_files=[str(one)]).setup("fit")
    with pytest.raises(ValueError, match=r"no test split: set data\.init_args\.test_files"):
        _dm(tmp_path, train_files=[str(one)], val_files=[str(one)]).setup("test")
    with pytest.raises(ValueError, match="fewer than one block of seq_len=64"):
        _dm(tmp_path, train_files=[str(one)], val_files=[str(one)], seq_len=64).setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: invalid JSON"):
        _dm(tmp_path, train_files=[str(bad)]).setup("fit")


def test_directories_globs_and_test_split(tmp_path: Path, tok) -> None:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    texts = _texts(4, seed=10)
    for i, t in enumerate(texts):
        (d / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(t + "\n", encoding="utf-8")
    (d / "notes.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored in a directory
    _jsonl(tmp_path / "test_a.jsonl", texts[:2])
    _jsonl(tmp_path / "test_b.jsonl", texts[2:])
    dm = _dm(tmp_path, train_files=[str(d)], val_fraction=0.25, test_files=[str(tmp_path / "test_*.jsonl")],
             seq_len=4)
    dm.setup("test")
    assert dm.token_stream("test").tolist() == [t for x in texts for t in tok(x)["input_ids"] + [EOS]]
    assert [x["id"] for x in dm.documents("test")] == ["test_a.jsonl:1", "test_a.jsonl:2", "test_b.jsonl:1",
                                                       "test_b.jsonl:2"]
    dm.setup("fit")
    names = sorted(x["id"] for x in dm.documents("train") + dm.documents("validation"))
    assert names == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt"]
    assert len(list(dm.test_dataloader())) == len(dm.dataset("test")) // 4 + (len(dm.dataset("test")) % 4 > 0)


# ----------------------------------------------------------------------------------------- sampler, resume
def test_block_sampler_shuffle_shard_and_resume() -> None:
    full = BlockBatchSampler(37, 4, shuffle=True, seed=3, epoch=2)
    batches = full.rank_batches()
    assert len(full) == len(batches) == 10 and sorted(i for b in batches for i in b) == list(range(37))
    assert batches == BlockBatchSampler(37, 4, shuffle=True, seed=3, epoch=2).rank_batches()  # (seed, epoch) only
    assert batches != full.rank_batches(epoch=3)
    for k in (0, 1, 5, 9, 10):
        resumed = BlockBatchSampler(37, 4, shuffle=True, seed=3, epoch=2, start_batch=k)
        assert list(resumed) == batches[k:] and len(resumed) == 10
        assert list(resumed) == batches  # the offset applies to one iteration only
    shards = [BlockBatchSampler(37, 4, True, 3, 2, num_replicas=2, rank=r) for r in range(2)]
    rows = [[i for b in s for i in b] for s in shards]
    assert len(rows[0]) == len(rows[1]) == 19 and set(rows[0]) | set(rows[1]) == set(range(37))
    evals = [BlockBatchSampler(37, 4, num_replicas=2, rank=r, even_shards=False) for r in range(2)]
    assert sorted(i for s in evals for b in s for i in b) == list(range(37))  # no duplicates in evaluation
    assert list(BlockBatchSampler(5, 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="rank must be in"):
        BlockBatchSampler(5, 2, num_replicas=2, rank=2)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"][:, :2].flatten().tolist())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_exact_mid_epoch_resume_through_lightning(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", _texts(30, seed=11))
    kwargs = {"train_files": [str(path)], "seq_len": 8, "batch_size": 4, "max_blocks": 20,
              "cache_dir": str(tmp_path / "cache")}  # 5 batches per epoch: 7 steps cross an epoch boundary

    def trainer(max_steps: int, callbacks: list) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         enable_checkpointing=bool(callbacks), default_root_dir=tmp_path)

    straight = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(7, [ckpt]).fit(straight, datamodule=TextDataModule(**kwargs))
    assert len(straight.seen) == 7 and straight.seen[5:] != straight.seen[:2]  # epoch 1 is reshuffled
    resumed = _Recorder()
    trainer(7, []).fit(resumed, datamodule=TextDataModule(**kwargs), ckpt_path=str(tmp_path / "ckpt" /
                                                                                 "epoch=0-step=3.ckpt"))
    assert resumed.seen == straight.seen[3:]  # the rest of epoch 0, then epoch 1 in its own order

    dm = TextDataModule(**kwargs)
    dm.setup("fit")
    order = [b["input_ids"][:, :2].flatten().tolist() for b in dm.train_dataloader()]
    dm._resume_batch = 2
    assert [b["input_ids"][:, :2].flatten().tolist() for b in dm.train_dataloader()] == order[2:]
    assert dm._resume_batch == 0


def test_dataset_rows_shape_checks() -> None:
    rows = np.arange(12, dtype=np.uint16).reshape(3, 4)
    item = TokenBlockDataset(rows, np.array([4, 2, 1]))[1]
    assert item["input_ids"].tolist() == [4, 5, 6, 7] and item["labels"].tolist() == [4, 5, -100, -100]
    with pytest.raises(ValueError, match="3 rows but 2 lengths"):
        TokenBlockDataset(rows, np.array([1, 2]))


# ----------------------------------------------------------------------------------------- HF datasets
def test_hf_dataset_save_to_disk_and_local_files(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    train, val, test = _texts(12, 12), _texts(3, 13), _texts(2, 14)
    files_dm = _dm(tmp_path, train_files=[str(_jsonl(tmp_path / "train.jsonl", train))],
                   val_files=[str(_jsonl(tmp_path / "val.jsonl", val))],
                   test_files=[str(_jsonl(tmp_path / "test.jsonl", test))], seq_len=8)
    files_dm.setup("fit")
    files_dm.setup("test")

    def ds(texts: list[str], name: str) -> Dataset:
        return Dataset.from_dict({"text": texts, "id": [f"{name}.jsonl:{i + 1}" for i in range(len(texts))]})

    saved = tmp_path / "hf_dict"
    DatasetDict({"train": ds(train, "train"), "validation": ds(val, "val"), "test": ds(test, "test")}).save_to_disk(
        str(saved)
    )
    hf_dm = _dm(tmp_path, hf_dataset=str(saved), seq_len=8)
    hf_dm.setup("fit")
    hf_dm.setup("test")
    for split in ("train", "validation", "test"):  # same ids and texts: the same token streams as the files
        assert np.array_equal(hf_dm.token_stream(split), files_dm.token_stream(split))

    single = tmp_path / "hf_single"
    Dataset.from_dict({"content": train}).save_to_disk(str(single))
    one = _dm(tmp_path, hf_dataset=str(single), text_field="content", seq_len=8, val_fraction=0.25)
    one.setup("fit")
    assert len(one.documents("validation")) == 3 and len(one.documents("train")) == 9
    with pytest.raises(ValueError, match="has no test split"):
        one.setup("test")
    wrong = _dm(tmp_path, hf_dataset=str(single), seq_len=8)
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        wrong.setup("fit")

    local = tmp_path / "local_files"
    local.mkdir()
    _jsonl(local / "train.jsonl", train)
    _jsonl(local / "validation.jsonl", val)
    loaded = _dm(tmp_path, hf_dataset=str(local), seq_len=8)  # datasets.load_dataset on a local directory
    loaded.setup("fit")
    assert len(loaded.documents("validation")) == 3
    assert sorted(loaded.token_stream("train").tolist()) == sorted(files_dm.token_stream("train").tolist())
    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.hf_dataset: not found"):
        _dm(tmp_path, hf_dataset=str(tmp_path / "absent"), seq_len=8).setup("fit")
