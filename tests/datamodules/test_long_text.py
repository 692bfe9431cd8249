"""LongTextDataModule: the official sample layout and draw order, random-mode ids, corpus readers and bad input."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from datamodules.long_text import LongTextDataModule, allowed_random_ids
from lit_models.hf import load_tokenizer

BOS, EOS = 1, 2  # SmolLM2: <|im_start|>, <|im_end|>


def _pt(path: Path, n: int) -> str:
    torch.save(torch.arange(n, dtype=torch.long), path)
    return str(path)


def _dm(tmp_path: Path, **kwargs) -> LongTextDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = LongTextDataModule(**kwargs)
    dm.setup("test")
    return dm


def test_begin_values_follow_the_official_draw_order(tmp_path: Path) -> None:
    """Spec test 3: one randint(0, N-3L) per sample, L-major, from random.Random(seed)."""
    n = 1000
    lengths = [8, 40, 100, 333]
    dm = _dm(tmp_path, corpus=_pt(tmp_path / "s.pt", n), lengths=lengths, repeats=4, seed=0)
    rng = random.Random(0)
    expected = [rng.randint(0, n - 3 * L) for L in lengths for _ in range(4)]
    assert [s["begin"] for s in dm.samples] == expected
    assert [s["length"] for s in dm.samples] == [L for L in lengths for _ in range(4)]
    assert [s["sample_idx"] for s in dm.samples] == [0, 1, 2, 3] * 4


def test_copy_and_lm_inputs_have_the_official_layout(tmp_path: Path) -> None:
    n = 600
    dm = _dm(tmp_path, corpus=_pt(tmp_path / "s.pt", n), lengths=[5, 50], repeats=3, batch_size=2)
    batches = list(dm.test_dataloader())
    # never mixing lengths: repeats 3 in batches of 2 -> 2 + 1 per length
    assert [(b["length"], b["copy_ids"].shape[0]) for b in batches] == [(5, 2), (5, 1), (50, 2), (50, 1)]
    for b in batches:
        L = b["length"]
        assert b["copy_ids"].shape == b["lm_ids"].shape == (b["copy_ids"].shape[0], 2 * L + 3)
        for row, lm, begin in zip(b["copy_ids"], b["lm_ids"], b["begin"].tolist()):
            x = torch.arange(begin, begin + L)
            assert torch.equal(row, torch.cat([torch.tensor([BOS]), x, torch.tensor([BOS]), x, torch.tensor([EOS])]))
            y = torch.arange(n - L, n)  # the corpus tail
            assert torch.equal(lm, torch.cat([torch.tensor([BOS]), y, torch.tensor([BOS]), x, torch.tensor([EOS])]))
            assert begin + L <= n - L  # the LM prefix never overlaps the target span


def test_random_span_prefix_is_disjoint_and_keeps_the_official_spans(tmp_path: Path) -> None:
    n = 300
    tail = _dm(tmp_path, corpus=_pt(tmp_path / "s.pt", n), lengths=[20, 90], repeats=6)
    span = _dm(tmp_path, corpus=_pt(tmp_path / "s.pt", n), lengths=[20, 90], repeats=6, lm_prefix="random_span")
    assert [s["begin"] for s in span.samples] == [s["begin"] for s in tail.samples]
    starts = set()
    for s in span.samples:
        c, b, L = int(s["y"][0]), s["begin"], s["length"]
        assert torch.equal(s["y"], torch.arange(c, c + L))
        assert c + L <= b or c >= b + L
        starts.add(c)
    assert len(starts) > 2  # not the same span every time


def test_random_mode_never_emits_special_ids_and_matches_official_draws(tmp_path: Path) -> None:
    tok = load_tokenizer("smollm2-135m")
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert set(range(17)) <= special and max(special) < 100  # SmolLM2: ids 0-16 are special tokens
    dm = _dm(tmp_path, data_type="random", lengths=[64, 256], repeats=3)
    ids = torch.cat([torch.cat([s["x"], s["y"]]) for s in dm.samples])
    assert not set(ids.tolist()) & special
    assert int(ids.max()) < len(tok)
    # a range without special ids: the draws are exactly the official randint(lo, hi), X then Y per sample
    lo, hi = 100, 999
    dm = _dm(tmp_path, data_type="random", lengths=[4, 9], repeats=3, random_id_range=[lo, hi], seed=3)
    rng = random.Random(3)
    for s in dm.samples:
        assert s["x"].tolist() == [rng.randint(lo, hi) for _ in range(s["length"])]
        assert s["y"].tolist() == [rng.randint(lo, hi) for _ in range(s["length"])]
    allowed = allowed_random_ids(tok, [0, 20])
    assert allowed.tolist() == [i for i in range(21) if i not in special]


def test_jsonl_corpus_with_titles_is_tokenized_per_piece(tmp_path: Path) -> None:
    """PG-19 order: title + "\\n", then text + "\\n", each piece tokenized on its own; the file is not modified."""
    tok = load_tokenizer("smollm2-135m")
    rows = [{"short_book_title": "A Tale", "text": "It was the best of times, it was the worst of times."},
            {"short_book_title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich."}]
    path = tmp_path / "books.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    dm = LongTextDataModule(corpus=str(path), title_field="short_book_title", lengths=[4], repeats=3,
                            cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    expected = []
    for r in rows:
        expected += tok(r["short_book_title"] + "\n")["input_ids"] + tok(r["text"] + "\n")["input_ids"]
    assert dm.stream.tolist() == expected
    assert dm.info["N"] == len(expected) and dm.info["documents"] == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    # the cached stream is reused (same key) and max_corpus_tokens truncates it
    again = LongTextDataModule(corpus=str(path), title_field="short_book_title", lengths=[4], repeats=3,
                               max_corpus_tokens=12, cache_dir=str(tmp_path / "cache"))
    again.prepare_data()
    assert again.stream.tolist() == expected[:12]
    assert len(list((tmp_path / "cache").glob("stream-*.pt"))) == 1


def test_austen_stream_is_real_and_long(tmp_path: Path) -> None:
    dm = LongTextDataModule(corpus="austen", lengths=[8], repeats=3)
    dm.prepare_data()
    tok = load_tokenizer("smollm2-135m")
    head = tok("Sense & Sensibility\n")["input_ids"]
    assert dm.stream[: len(head)].tolist() == head
    assert dm.info["documents"] == 6
    assert 700_000 < dm.info["N"] < 1_200_000  # spec: about 0.7-1 M tokens


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lengths": [8, 4]}, ValueError, "lengths"),
        ({"lengths": [8, 8]}, ValueError, "lengths"),
        ({"lengths": [1, 8]}, ValueError, "lengths"),
        ({"granularity": 0}, ValueError, "granularity"),
        ({"granularity_type": "cubic"}, ValueError, "granularity_type"),
        ({"repeats": 1}, ValueError, "paired t-test"),
        ({"data_type": "random", "random_id_range": [0, 49152]}, ValueError, "random_id_range"),
        ({"data_type": "random", "random_id_range": [0, 2]}, ValueError, "random_id_range"),
        ({"bos_id": 10**6}, ValueError, "bos_id"),
        ({"corpus": "/nonexistent/corpus.txt"}, FileNotFoundError, "corpus"),
    ],
)
def test_bad_configuration_is_rejected(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    kwargs = {"lengths": [8], "repeats": 3, "cache_dir": str(tmp_path), **kwargs}
    with pytest.raises(error, match=match):
        dm = LongTextDataModule(**kwargs)
        dm.setup("test")


def test_bad_corpora_name_the_problem(tmp_path: Path) -> None:
    short = _pt(tmp_path / "short.pt", 100)
    with pytest.raises(ValueError, match=r"corpus has 100 tokens; data_type=order needs at least 3\*test_max_length=150"):
        _dm(tmp_path, corpus=short, lengths=[8, 50], repeats=3)
    torch.save(torch.zeros(3, 4, dtype=torch.long), tmp_path / "matrix.pt")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        _dm(tmp_path, corpus=str(tmp_path / "matrix.pt"), lengths=[8], repeats=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: no 'text' field"):
        _dm(tmp_path, corpus=str(bad), lengths=[8], repeats=3)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        _dm(tmp_path, corpus=str(empty), lengths=[8], repeats=3)
    with pytest.raises(ValueError, match="only serves the test stage"):
        LongTextDataModule(corpus=short, lengths=[8], repeats=3, cache_dir=str(tmp_path)).setup("fit")


def test_pg19_style_hf_dataset_and_parquet(tmp_path: Path) -> None:
    """A ``save_to_disk`` DatasetDict (its ``test`` split) and a parquet file give the same stream as the JSONL reader."""
    import datasets

    tok = load_tokenizer("smollm2-135m")
    rows = {"short_book_title": ["Book A", "Book B"], "text": ["First book text.", "Second book, longer text here."]}
    train = datasets.Dataset.from_dict({"short_book_title": ["Other"], "text": ["not this split"]})
    datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "pg19"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pg19.parquet"))
    expected = []
    for title, text in zip(rows["short_book_title"], rows["text"]):
        expected += tok(title + "\n")["input_ids"] + tok(text + "\n")["input_ids"]
    for corpus in (tmp_path / "pg19", tmp_path / "pg19.parquet"):
        dm = LongTextDataModule(corpus=str(corpus), title_field="short_book_title", lengths=[4], repeats=3,
                                cache_dir=str(tmp_path / "cache"))
        dm.prepare_data()
        assert dm.stream.tolist() == expected, corpus
    with pytest.raises(ValueError, match="no 'book_title' column"):
        LongTextDataModule(corpus=str(tmp_path / "pg19"), title_field="book_title", lengths=[4], repeats=3,
                           cache_dir=str(tmp_path / "cache")).prepare_data()
