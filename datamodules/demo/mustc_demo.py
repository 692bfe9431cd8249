"""Offline speech-translation demo in the real MuST-C layout: synthetic English speech of Bible verses -> German text.

Source: spec ``speech_fusion.md`` section 6 ("Offline demo recipe"), DESIGN.md section 4. The English side of the
WEB (``4``) -> Elberfelder 1932 (``e``) verse pairs of :mod:`datamodules.demo.bible` (dev and test from held-out
books) is spoken with ``espeak-ng`` and ``flite`` (Debian packages; ``apt-get install espeak-ng flite``), resampled
to 16 kHz mono with torchaudio and written exactly as a MuST-C release::

    <out_dir>/en-de/data/{train,dev,tst-COMMON}/wav/<talk>.wav
    <out_dir>/en-de/data/<split>/txt/<split>.{yaml,en,de}

``segments_per_talk`` verses make one talk wav, separated by ``silence_s`` of silence; the yaml lists
``{duration, offset, rw, speaker_id, wav}`` per segment (offset/duration in seconds, rounded to the sample), line
aligned with the text files. Voices rotate per talk; dev and test voices are never used in training (unseen
speakers). Only verses of at most ``max_words`` English words are used. About 0.05 s of synthesis per utterance.

The build is cached: ``<out_dir>/en-de/_SUCCESS.json`` (arguments + counts) is written last; a matching manifest
means "already built". Built under a lock (:func:`lit_models.fileio.build_once`), so DDP ranks build it once.

This is synthetic speech of real translated text: BLEU on it is Bible-domain, not comparable with MuST-C/TED.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from datamodules.demo.bible import build_bible_corpus
from lit_models.fileio import atomic_dir, build_once

__all__ = ["DEMO_VOICES", "build_mustc_demo", "check_tts_tools"]

SAMPLE_RATE = 16000
#: (engine, voice, words per minute) per split; dev/test voices never appear in train.
DEMO_VOICES: dict[str, list[tuple[str, str, int]]] = {
    "train": [
        ("espeak-ng", "en-us+m1", 165),
        ("flite", "slt", 0),
        ("espeak-ng", "en-gb+f2", 155),
        ("flite", "kal16", 0),
        ("espeak-ng", "en-gb-x-rp+m3", 170),
        ("espeak-ng", "en-029+f1", 160),
    ],
    "dev": [("espeak-ng", "en-gb-scotland+m4", 160), ("flite", "awb", 0)],
    "tst-COMMON": [("espeak-ng", "en-gb-x-gbclan+f3", 165), ("flite", "rms", 0)],
}
_BUILD_VERSION = 1


def check_tts_tools() -> None:
    """Raise ``FileNotFoundError`` naming the missing synthesiser(s) and the apt-get line that installs them."""
    missing = [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]
    if missing:
        raise FileNotFoundError(
            f"the offline speech demo needs {' and '.join(missing)} on PATH: "
            "sudo apt-get install -y espeak-ng flite (or point data.root at a real MuST-C release)"
        )


def _synthesize(engine: str, voice: str, wpm: int, text: str, tmp: Path) -> np.ndarray:
    """Speak ``text`` -> float32 mono waveform at 16 kHz."""
    out = tmp / "tts.wav"
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(out), text]
    else:
        cmd = ["flite", "-voice", voice, "-t", text, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    wave, sr = sf.read(str(out), dtype="float32", always_2d=True)
    x = torch.from_numpy(wave.mean(axis=1))
    if sr != SAMPLE_RATE:
        x = torchaudio.functional.resample(x, sr, SAMPLE_RATE)
    return x.numpy()


def _pick(src: list[str], tgt: list[str], n: int, max_words: int) -> list[tuple[str, str]]:
    """``n`` pairs with 1..max_words English words, evenly spaced over the file (deterministic)."""
    ok = [i for i, s in enumerate(src) if 0 < len(s.split()) <= max_words and tgt[i].strip()]
    if len(ok) < n:
        raise ValueError(f"only {len(ok)} verse pairs have at most {max_words} words; {n} requested")
    idx = np.linspace(0, len(ok) - 1, n).round().astype(int)
    return [(src[ok[i]], tgt[ok[i]]) for i in idx]


def build_mustc_demo(
    out_dir: str | Path,
    n_train: int = 600,
    n_dev: int = 60,
    n_test: int = 60,
    max_words: int = 20,
    segments_per_talk: int = 20,
    silence_s: float = 0.5,
    bible_dir: str | Path | None = None,
    verbose: bool = True,
) -> Path:
    """Build (or reuse) the demo under ``out_dir`` and return the ``<out_dir>/en-de`` directory.

    Args:
        out_dir: root of the MuST-C tree (``<out_dir>/en-de/data/...`` is written).
        n_train, n_dev, n_test: segments per split (dev/test from held-out Bible books).
        max_words: longest English verse used, in words.
        segments_per_talk: segments per talk wav.
        silence_s: silence between segments.
        bible_dir: where the Bible text corpus is built/cached (default ``<out_dir>/bible_en_de``).
        verbose: print what was built.

    Raises:
        FileNotFoundError: ``espeak-ng``/``flite`` missing (with the apt-get line).
        ValueError: too few short verses for the requested counts.
    """
    root = Path(out_dir)
    pair_dir = root / "en-de"
    args = {
        "n_train": n_train, "n_dev": n_dev, "n_test": n_test, "max_words": max_words,
        "segments_per_talk": segments_per_talk, "silence_s": silence_s, "voices": DEMO_VOICES,
        "version": _BUILD_VERSION,
    }
    manifest = pair_dir / "_SUCCESS.json"

    def ready() -> bool:
        try:
            return json.loads(manifest.read_text(encoding="utf-8")).get("args") == json.loads(json.dumps(args))
        except (OSError, json.JSONDecodeError):
            return False

    def build() -> None:
        check_tts_tools()
        bdir = Path(bible_dir) if bible_dir is not None else root / "bible_en_de"
        corpus = build_bible_corpus(bdir, verbose=False)
        files = corpus["files"]
        wanted = {"train": ("train", n_train), "dev": ("valid", n_dev), "tst-COMMON": ("test", n_test)}
        counts: dict[str, Any] = {}

        def fill(tmp_dir: Path) -> None:
            with tempfile.TemporaryDirectory() as scratch:
                for split, (bible_split, n) in wanted.items():
                    src = Path(files[bible_split]["en"]).read_text(encoding="utf-8").splitlines()
                    tgt = Path(files[bible_split]["de"]).read_text(encoding="utf-8").splitlines()
                    pairs = _pick(src, tgt, n, max_words)
                    counts[split] = _write_split(tmp_dir / "data" / split, split, pairs, segments_per_talk,
                                                 silence_s, Path(scratch))
            (tmp_dir / "_SUCCESS.json").write_text(json.dumps({"args": args, "counts": counts}, indent=2) + "\n")

        atomic_dir(pair_dir, fill)
        if verbose:
            print(f"[demo] built the MuST-C-layout speech demo in {pair_dir}: {counts}", flush=True)

    build_once(root, "mustc_demo", ready, build, key="data.init_args.root")
    return pair_dir


def _write_split(split_dir: Path, split: str, pairs: list[tuple[str, str]], per_talk: int, silence_s: float,
                 scratch: Path) -> dict[str, Any]:
    """One split: talk wavs, ``<split>.yaml`` and the aligned ``.en``/``.de`` files; returns counts and seconds."""
    import yaml

    (split_dir / "wav").mkdir(parents=True)
    (split_dir / "txt").mkdir(parents=True)
    voices = DEMO_VOICES[split]
    entries, en_lines, de_lines = [], [], []
    gap = np.zeros(round(silence_s * SAMPLE_RATE), dtype=np.float32)
    total = 0.0
    for talk_idx, start in enumerate(range(0, len(pairs), per_talk)):
        engine, voice, wpm = voices[talk_idx % len(voices)]
        talk = f"{split.lower().replace('-', '_')}_talk{talk_idx:03d}"
        speaker = f"{engine}:{voice}"
        chunks: list[np.ndarray] = [gap]
        cursor = gap.size
        for en, de in pairs[start : start + per_talk]:
            wave = _synthesize(engine, voice, wpm, en, scratch)
            entries.append({
                "duration": round(wave.size / SAMPLE_RATE, 6),
                "offset": round(cursor / SAMPLE_RATE, 6),
                "rw": 0.0,
                "speaker_id": speaker,
                "wav": f"{talk}.wav",
            })
            en_lines.append(en)
            de_lines.append(de)
            chunks += [wave, gap]
            cursor += wave.size + gap.size
        audio = np.concatenate(chunks)
        total += audio.size / SAMPLE_RATE
        sf.write(str(split_dir / "wav" / f"{talk}.wav"), audio, SAMPLE_RATE, subtype="PCM_16")
    (split_dir / "txt" / f"{split}.yaml").write_text(
        yaml.safe_dump(entries, default_flow_style=True, width=10**6).replace("}, {", "},\n  {"), encoding="utf-8"
    )
    (split_dir / "txt" / f"{split}.en").write_text("".join(s + "\n" for s in en_lines), encoding="utf-8")
    (split_dir / "txt" / f"{split}.de").write_text("".join(s + "\n" for s in de_lines), encoding="utf-8")
    return {"segments": len(entries), "talks": -(-len(pairs) // per_talk), "hours": round(total / 3600, 4)}
