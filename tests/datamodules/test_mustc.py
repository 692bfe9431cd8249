"""MuSTCDataModule on a tiny generated MuST-C tree: exact segment boundaries, text alignment, fairseq round trip,
FBank frame counts and CMVN, the feature cache, and the bad inputs of spec section 11."""

from __future__ import annotations

import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from datamodules.mustc import (
    MuSTCDataModule,
    compute_fbank,
    fbank_num_frames,
    load_waveform,
    read_fairseq_tsv,
    read_mustc_split,
    utterance_cmvn,
    write_fairseq_tsv,
)
from lit_models.nn.speech_frontend import Conv1dSubsampler

GERMAN = [
    "Im Anfang schuf Gott die Himmel und die Erde.",
    "Und die Erde war wüst und leer.",
    "Und Gott sprach: Es werde Licht!",
    "Und es ward Licht.",
    "Und Gott sah das Licht, dass es gut war.",
    "Und Gott schied das Licht von der Finsternis.",
    "Und Gott nannte das Licht Tag.",
    "Und es ward Abend und es ward Morgen.",
]
ENGLISH = ["In the beginning.", "The earth was empty.", "Let there be light.", "There was light.",
           "God saw the light.", "God divided the light.", "God called the light day.", "There was evening."]
SPLITS = {"train": (2, 3), "dev": (1, 2), "tst-COMMON": (1, 2)}


def make_tiny_mustc(root: Path, sample_rate: int = 16000, splits: dict[str, tuple[int, int]] = SPLITS,
                    seed: int = 0) -> Path:
    """A MuST-C tree ``root/en-de/data/<split>`` of sine-tone talks: ``talks`` wavs x ``segments`` segments each,
    segment k of talk t lasting 0.6 + 0.15 k s, 0.3 s gaps. Returns ``root``."""
    rng = np.random.default_rng(seed)
    line = 0
    for split, (talks, segs) in splits.items():
        d = root / "en-de" / "data" / split
        (d / "wav").mkdir(parents=True, exist_ok=True)
        (d / "txt").mkdir(parents=True, exist_ok=True)
        entries, en, de = [], [], []
        for t in range(talks):
            pieces, cursor = [np.zeros(int(0.3 * sample_rate))], 0.3
            for k in range(segs):
                dur = 0.6 + 0.15 * k
                n = round(dur * sample_rate)
                tt = np.arange(n) / sample_rate
                tone = 0.3 * np.sin(2 * np.pi * (200 + 60 * k + 25 * t) * tt) + 0.01 * rng.standard_normal(n)
                entries.append({"duration": dur, "offset": round(cursor, 6), "rw": 0.0, "speaker_id": f"spk{t}",
                                "wav": f"{split}_talk{t}.wav"})
                en.append(ENGLISH[line % len(ENGLISH)])
                de.append(GERMAN[line % len(GERMAN)])
                line += 1
                pieces += [tone, np.zeros(int(0.3 * sample_rate))]
                cursor += n / sample_rate + 0.3
            sf.write(str(d / "wav" / f"{split}_talk{t}.wav"), np.concatenate(pieces).astype(np.float32), sample_rate,
                     subtype="FLOAT")
        (d / "txt" / f"{split}.yaml").write_text(yaml.safe_dump(entries))
        (d / "txt" / f"{split}.en").write_text("".join(s + "\n" for s in en))
        (d / "txt" / f"{split}.de").write_text("".join(s + "\n" for s in de))
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tiny_mustc(tmp_path / "mustc")


def test_reader_exact_segment_boundaries_and_alignment(tree: Path) -> None:
    utts = read_mustc_split(tree, "en-de", "train")
    entries = yaml.safe_load((tree / "en-de/data/train/txt/train.yaml").read_text())
    assert [u.id for u in utts] == ["train_talk0_0", "train_talk0_1", "train_talk0_2",
                                    "train_talk1_0", "train_talk1_1", "train_talk1_2"]
    for u, e, de in zip(utts, entries, GERMAN):
        assert u.offset == round(e["offset"] * 16000) and u.length == round(e["duration"] * 16000)
        assert u.tgt_text == de and u.speaker == e["speaker_id"]
        assert u.n_frames == 1 + (u.length - 400) // 160
    # the segment read is exactly those samples of the talk wav
    full, _ = sf.read(utts[1].audio, dtype="float32")
    wave = load_waveform(utts[1])
    assert wave.numel() == utts[1].length
    assert torch.equal(wave, torch.from_numpy(full[utts[1].offset : utts[1].offset + utts[1].length]))


def test_fairseq_manifest_round_trip(tree: Path, tmp_path: Path) -> None:
    utts = read_mustc_split(tree, "en-de", "dev")
    tsv = write_fairseq_tsv(utts, tmp_path / "dev_st.tsv")
    again = read_fairseq_tsv(tsv)
    assert [(u.id, u.audio, u.offset, u.length, u.n_frames, u.tgt_text, u.speaker) for u in again] == [
        (u.id, u.audio, u.offset, u.length, u.n_frames, u.tgt_text, u.speaker) for u in utts]
    # the data module serves identical ids/frames/targets from either format
    dm_a = MuSTCDataModule(root=str(tree), views=["fbank"], vocab_size=40, cache_dir=str(tmp_path / "ca"),
                           specaugment=False)
    for split in ("train", "dev", "tst-COMMON"):
        write_fairseq_tsv(read_mustc_split(tree, "en-de", split), tmp_path / "tsv" / f"{split}_st.tsv")
    dm_b = MuSTCDataModule(root=str(tmp_path / "tsv"), views=["fbank"], spm_model=dm_a.tokenizer.path,
                           cache_dir=str(tmp_path / "cb"), specaugment=False)
    a, b = dm_a.dataset("validation"), dm_b.dataset("validation")
    assert [u.id for u in a.utts] == [u.id for u in b.utts] and a.targets == b.targets
    assert torch.equal(a[1]["fbank"], b[1]["fbank"])
    # fairseq writes samples in n_frames for raw-audio manifests: wav entries get their FBank frames from the segment
    lines = tsv.read_text().splitlines()
    as_samples = [lines[0]] + ["\t".join(f if i != 2 else str(u.length) for i, f in enumerate(line.split("\t")))
                               for line, u in zip(lines[1:], utts, strict=True)]
    (tmp_path / "samples_st.tsv").write_text("\n".join(as_samples) + "\n")
    assert [u.n_frames for u in read_fairseq_tsv(tmp_path / "samples_st.tsv")] == [
        1 + (u.length - 400) // 160 for u in utts]


def test_zip_fbank_entries(tree: Path, tmp_path: Path) -> None:
    utts = read_mustc_split(tree, "en-de", "dev")
    feats = [compute_fbank(load_waveform(u)).numpy() for u in utts]
    zpath = tmp_path / "fbank80.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for u, f in zip(utts, feats):
            buf = io.BytesIO()
            np.save(buf, f)
            zf.writestr(f"{u.id}.npy", buf.getvalue())
    rows = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
    with zipfile.ZipFile(zpath) as zf:
        for u, f in zip(utts, feats):
            info = zf.getinfo(f"{u.id}.npy")
            offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            rows.append(f"{u.id}\tfbank80.zip:{offset}:{info.file_size}\t{f.shape[0]}\t{u.tgt_text}\t{u.speaker}")
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n")
    zutts = read_fairseq_tsv(tmp_path / "dev.tsv")
    assert all(u.is_zip for u in zutts)
    from datamodules.mustc import _read_zip_npy

    assert torch.equal(_read_zip_npy(zutts[0]), torch.from_numpy(feats[0]))
    # zip entries have no waveform: discrete SSL units come from the <split>.ssl.tsv sidecar
    from lit_models.nn.ssl_encoders import SSLEncoder, save_tiny_ssl_model

    enc = save_tiny_ssl_model(tmp_path / "w2v", "wav2vec2")
    km = tmp_path / "km.pt"
    torch.save({"centroids": torch.randn(5, 32), "fingerprint": SSLEncoder("hf", str(enc), layer=1).fingerprint()}, km)
    units = {u.id: [k % 5 for k in range(10 + i)] for i, u in enumerate(zutts)}
    (tmp_path / "dev.ssl.tsv").write_text("".join(f"{k}\t{' '.join(map(str, v))}\n" for k, v in units.items()))
    for split in ("train", "tst-COMMON"):
        write_fairseq_tsv(read_mustc_split(tree, "en-de", split), tmp_path / f"{split}.tsv")
    dm = MuSTCDataModule(root=str(tmp_path), ssl_encoder="hf", ssl_path=str(enc), ssl_layer=1, ssl_type="discrete",
                         kmeans_path=str(km), vocab_size=40, cache_dir=str(tmp_path / "c"))
    ds = dm.dataset("validation")
    assert all(u.is_zip for u in ds.utts)
    for i, u in enumerate(ds.utts):
        assert ds[i]["ssl"].tolist() == units[u.id]
        assert torch.equal(ds[i]["fbank"], utterance_cmvn(torch.from_numpy(feats[[x.id for x in zutts].index(u.id)])))
    (tmp_path / "dev.ssl.tsv").write_text("")
    with pytest.raises(FileNotFoundError, match=r"zip entry without a waveform: the SSL view needs .*dev.ssl.tsv"):
        MuSTCDataModule(root=str(tmp_path), ssl_encoder="hf", ssl_path=str(enc), ssl_layer=1, ssl_type="discrete",
                        kmeans_path=str(km), vocab_size=40, cache_dir=str(tmp_path / "c2")).dataset("validation")
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\taudio\tn_frames\ttgt_text\nx\tfbank80.zip:12:zz\t5\thallo\n")
    with pytest.raises(ValueError, match=r"bad.tsv line 2: malformed audio field"):
        read_fairseq_tsv(bad)
    bad.write_text("id\taudio\ttgt_text\nx\ta.wav\thallo\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['n_frames'\]"):
        read_fairseq_tsv(bad)


def test_fbank_frames_subsampler_lengths_and_cmvn() -> None:
    for seconds, frames, sub in ((1.0, 98, [49, 25]), (3.2, 318, [159, 80])):
        n = int(seconds * 16000)
        wave = torch.sin(torch.arange(n) * 0.05) * 0.5
        x = compute_fbank(wave)
        assert x.shape == (frames, 80) and fbank_num_frames(n) == frames
        conv = Conv1dSubsampler(80, 16, 8, (5,))
        assert conv(x[None], torch.tensor([frames]))[1].tolist() == [sub[0]]
        conv2 = Conv1dSubsampler(80, 16, 8, (5, 5))
        y, lengths = conv2(x[None], torch.tensor([frames]))
        assert lengths.tolist() == [sub[1]] and y.shape == (1, sub[1], 8)
    x = compute_fbank(torch.randn(16000) * 0.1)
    z = utterance_cmvn(x)
    assert torch.allclose(z.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(80), atol=1e-4)


def test_bad_inputs_name_files_and_counts(tree: Path) -> None:
    txt = tree / "en-de/data/dev/txt"
    de = (txt / "dev.de").read_text()
    (txt / "dev.de").write_text(de + "Noch eine Zeile.\n")
    with pytest.raises(ValueError, match=r"dev.yaml has 2 segments, .*dev.en has 2 lines, .*dev.de has 3 lines"):
        read_mustc_split(tree, "en-de", "dev")
    (txt / "dev.de").write_text(de)
    entries = yaml.safe_load((txt / "dev.yaml").read_text())
    entries[1]["duration"] = 99.0
    (txt / "dev.yaml").write_text(yaml.safe_dump(entries))
    with pytest.raises(ValueError, match=r"entry 1: talk dev_talk0.wav segment 1 ends at .* but the wav lasts"):
        read_mustc_split(tree, "en-de", "dev")
    entries[1]["duration"] = 0.5
    entries[1]["wav"] = "missing.wav"
    (txt / "dev.yaml").write_text(yaml.safe_dump(entries))
    with pytest.raises(FileNotFoundError, match=r"dev.yaml entry 1 references .*missing.wav"):
        read_mustc_split(tree, "en-de", "dev")


def test_resampling_notice_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_mustc(tmp_path / "m8k", sample_rate=8000, splits={"dev": (1, 2)})
    utts = read_mustc_split(root, "en-de", "dev")
    assert utts[0].sample_rate == 8000 and utts[0].length == round(0.6 * 8000)
    waves = [load_waveform(u) for u in utts]
    assert [w.numel() for w in waves] == [math.ceil(u.length * 2) for u in utts]
    assert [u.n_frames for u in utts] == [fbank_num_frames(w.numel()) for w in waves]
    out = capsys.readouterr().out
    assert out.count("is sampled at 8000 Hz: resampling to 16000 Hz") == 1


def test_frame_filtering_prints_dropped_count(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dm = MuSTCDataModule(root=str(tree), views=["fbank"], vocab_size=40, cache_dir=str(tmp_path / "c"),
                         min_frames=70, max_frames=85)
    ds = dm.dataset("train")
    assert all(70 <= n <= 85 for n in ds.n_frames) and len(ds) == 2  # 0.75 s segments: 73 frames
    assert "train: kept 2 of 6 utterances; dropped 4 with FBank frames outside [70, 85]" in capsys.readouterr().out
    batch = next(iter(dm.train_dataloader()))
    assert batch["fbank"].shape[0] == 2 and batch["fbank_lengths"].tolist() == [73, 73]
    refs = dm.references("train")
    assert [dm.tokenizer.decode(t) for t in ds.targets] == refs


def test_ssl_cache_is_keyed_by_extractor_and_rebuilt(tree: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from lit_models.nn.ssl_encoders import save_tiny_ssl_model

    enc_a = save_tiny_ssl_model(tmp_path / "w2v", "wav2vec2", seed=0)
    enc_b = save_tiny_ssl_model(tmp_path / "hub", "hubert", seed=1)
    cache = tmp_path / "cache"
    kw = {"root": str(tree), "views": ["fbank", "ssl"], "ssl_encoder": "hf", "ssl_layer": 1, "vocab_size": 40,
          "cache_dir": str(cache)}
    dm = MuSTCDataModule(ssl_path=str(enc_a), **kw)
    ds = dm.dataset("validation")
    item = ds[0]
    assert item["ssl"].shape == (int(dm.ssl_extractor().model._get_feat_extract_output_lengths(
        torch.tensor(ds.utts[0].length))), 32)
    direct = dm.ssl_extractor().encode_one(load_waveform(ds.utts[0]))
    assert torch.allclose(item["ssl"], direct.half().float())
    dir_a = dm.ssl_cache_dir()
    # a second run with the same extractor reads the cache: the encoder never runs again
    again = MuSTCDataModule(ssl_path=str(enc_a), **kw)
    again._encoder = dm.ssl_extractor()
    again._encoder.encode_one = None  # would raise TypeError if called
    assert torch.equal(again.dataset("validation")[1]["ssl"], ds[1]["ssl"])
    del again._encoder.encode_one
    # a rebuilt corpus with the same ids but other audio never reads the old features
    wav = Path(ds.utts[1].audio)
    audio, sr = sf.read(str(wav), dtype="float32")
    sf.write(str(wav), audio[::-1].copy(), sr, subtype="FLOAT")
    rebuilt = MuSTCDataModule(ssl_path=str(enc_a), **kw).dataset("validation")
    fresh = dm.ssl_extractor().encode_one(load_waveform(rebuilt.utts[1])).half().float()
    assert torch.equal(rebuilt[1]["ssl"], fresh) and not torch.equal(rebuilt[1]["ssl"], ds[1]["ssl"])
    dm_b = MuSTCDataModule(ssl_path=str(enc_b), **kw)
    dm_b.dataset("validation")
    assert dm_b.ssl_cache_dir() != dir_a and "other extractor configurations exist" in capsys.readouterr().out
    # a cache directory whose stored fingerprint differs is rebuilt with a notice, never mixed
    meta = dir_a / "fingerprint.json"
    meta.write_text(json.dumps({"kind": "something else"}))
    dm_c = MuSTCDataModule(ssl_path=str(enc_a), **kw)
    dm_c.dataset("validation")
    assert "written by another extractor configuration" in capsys.readouterr().out
    assert json.loads(meta.read_text()) == dm_c.ssl_fingerprint()


def test_missing_ssl_path_is_an_error(tree: Path, tmp_path: Path) -> None:
    dm = MuSTCDataModule(root=str(tree), ssl_encoder="hf", ssl_path=str(tmp_path / "nope"), vocab_size=40,
                         cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"ssl_path=.*nope.* no hub download is attempted"):
        dm.dataset("validation")


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")), reason="needs espeak-ng and flite")
def test_demo_builder_writes_the_mustc_layout_with_unseen_speakers(tmp_path: Path) -> None:
    from datamodules.demo.mustc_demo import build_mustc_demo

    pair = build_mustc_demo(tmp_path / "demo", n_train=6, n_dev=2, n_test=2, segments_per_talk=2,
                            bible_dir=tmp_path / "bible", verbose=False)
    assert pair == tmp_path / "demo" / "en-de"
    splits = {s: read_mustc_split(tmp_path / "demo", "en-de", s) for s in ("train", "dev", "tst-COMMON")}
    assert [len(v) for v in splits.values()] == [6, 2, 2]
    train_speakers = {u.speaker for u in splits["train"]}
    assert len(train_speakers) == 3  # 3 talks, voices rotate per talk
    for split in ("dev", "tst-COMMON"):
        assert not {u.speaker for u in splits[split]} & train_speakers
    for u in splits["train"]:
        wave = load_waveform(u)
        assert u.sample_rate == 16000 and wave.numel() == u.length > 1600
        assert float(wave.abs().max()) > 0.01  # speech, not the silence between segments
        assert 0 < len(u.src_text.split()) <= 20 and u.tgt_text
    mtime = (pair / "_SUCCESS.json").stat().st_mtime_ns
    build_mustc_demo(tmp_path / "demo", n_train=6, n_dev=2, n_test=2, segments_per_talk=2,
                     bible_dir=tmp_path / "bible", verbose=False)
    assert (pair / "_SUCCESS.json").stat().st_mtime_ns == mtime  # cached: not rebuilt


def test_demo_builder_names_missing_synthesisers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datamodules.demo.mustc_demo as demo

    monkeypatch.setattr(demo.shutil, "which", lambda tool: None if tool == "flite" else "/usr/bin/" + tool)
    with pytest.raises(FileNotFoundError, match="needs flite on PATH: sudo apt-get install -y espeak-ng flite"):
        demo.build_mustc_demo(tmp_path / "demo", n_train=2, n_dev=1, n_test=1, bible_dir=tmp_path / "bible")


def test_discrete_units_are_quantised_from_the_continuous_cache(tree: Path, tmp_path: Path) -> None:
    from lit_models.nn.ssl_encoders import KMeansQuantizer, SSLEncoder, save_tiny_ssl_model

    enc = save_tiny_ssl_model(tmp_path / "w2v", "wav2vec2")
    kw = {"root": str(tree), "ssl_encoder": "hf", "ssl_path": str(enc), "ssl_layer": 1, "vocab_size": 40,
          "cache_dir": str(tmp_path / "cache")}
    cont = MuSTCDataModule(**kw).dataset("validation")
    km = tmp_path / "km.pt"
    torch.manual_seed(0)
    torch.save({"centroids": torch.randn(6, 32), "fingerprint": SSLEncoder("hf", str(enc), layer=1).fingerprint()}, km)
    dm = MuSTCDataModule(ssl_type="discrete", kmeans_path=str(km), **kw)
    dm.ssl_extractor().encode_one = None  # the encoder must not run again: units come from the continuous cache
    disc = dm.dataset("validation")
    q = KMeansQuantizer.load(km)
    for i in range(len(disc)):
        assert disc[i]["ssl"].dtype == torch.long
        assert torch.equal(disc[i]["ssl"], q(cont[i]["ssl"]))
    assert dm.num_units == 6
