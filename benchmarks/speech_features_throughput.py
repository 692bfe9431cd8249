"""Feature-extraction throughput (utterances/s) of the two views, with and without the SSL feature cache.

Measured on the first ``--n`` dev utterances of a MuST-C tree (default: the offline demo, built if missing), one
utterance at a time on ``--threads`` CPU threads (the way :class:`datamodules.mustc.MuSTCDataModule` computes them):

- ``fbank``: read the segment with soundfile + Kaldi FBank (80 bins) + utterance CMVN (computed on the fly each epoch);
- ``ssl_<encoder>``: read + the frozen SSL encoder (``whisper_ct2`` padded to 30 s and ``whisper_ct2_unpadded``;
  ``hf`` when ``--hf_path`` is given) -- what a run without the cache would pay every epoch;
- ``ssl_cached``: loading the cached ``<id>.pt`` features (what every epoch after the first pays).

Output: one JSON line per figure, ``{"figure", "utt_per_s", "s_per_utt", "baseline", "baseline_utt_per_s", "ratio"}``
(baseline: the uncached padded Whisper encoder for the SSL lines, FBank for the first line).

Real figures (about 1-2 minutes, run on an otherwise idle machine):

    python benchmarks/speech_features_throughput.py --n 60 --threads 1

Quick check (seconds; a generated sine-tone tree instead of the demo):

    python benchmarks/speech_features_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.mustc import compute_fbank, load_waveform, read_mustc_split, utterance_cmvn


def _rate(fn: Any, items: list[Any]) -> float:
    fn(items[0])  # warm-up
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/mustc_demo", help="MuST-C root (the demo is built there if missing)")
    p.add_argument("--split", default="dev")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hf_path", default=None, help="also measure a local Wav2Vec2/HuBERT/WavLM model")
    p.add_argument("--hf_layer", type=int, default=-1)
    p.add_argument("--quick", action="store_true", help="generated sine-tone tree, 4 utterances")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lit_models.nn.ssl_encoders import SSLEncoder

    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        from tests.datamodules.test_mustc import make_tiny_mustc

        root = make_tiny_mustc(Path(tmp.name) / "m", splits={"dev": (2, 2)})
        a.n = 4
    else:
        root = Path(a.root)
        if not (root / "en-de" / "data" / a.split).is_dir():
            from datamodules.demo.mustc_demo import build_mustc_demo

            build_mustc_demo(root)
    utts = read_mustc_split(root, "en-de", a.split)[: a.n]
    waves = [load_waveform(u) for u in utts]
    seconds = sum(w.numel() for w in waves) / 16000
    lines: list[dict[str, Any]] = []

    def emit(figure: str, rate: float, baseline: str | None = None, base_rate: float | None = None) -> None:
        line = {"figure": figure, "utt_per_s": rate, "s_per_utt": 1 / rate, "n": len(utts),
                "audio_s_per_utt": seconds / len(utts), "threads": a.threads, "baseline": baseline,
                "baseline_utt_per_s": base_rate, "ratio": rate / base_rate if base_rate else None}
        print(json.dumps(line), flush=True)
        lines.append(line)

    fbank_rate = _rate(lambda u: utterance_cmvn(compute_fbank(load_waveform(u))), utts)
    emit("fbank", fbank_rate)
    encoders = {"whisper_ct2": SSLEncoder("whisper_ct2"), "whisper_ct2_unpadded": SSLEncoder("whisper_ct2",
                                                                                             pad_to_30s=False)}
    if a.hf_path:
        encoders["hf"] = SSLEncoder("hf", a.hf_path, layer=a.hf_layer)
    base = None
    cache = Path(tmp.name) / "cache"
    cache.mkdir(exist_ok=True)
    for name, enc in encoders.items():
        rate = _rate(lambda u, enc=enc: enc.encode_one(load_waveform(u)), utts)
        base = base or rate
        emit(f"ssl_{name}", rate, "ssl_whisper_ct2" if name != "whisper_ct2" else "fbank",
             base if name != "whisper_ct2" else fbank_rate)
    enc = encoders["whisper_ct2"]
    for u, w in zip(utts, waves):
        torch.save(enc.encode_one(w).half(), cache / f"{u.id}.pt")
    cached = _rate(lambda u: torch.load(cache / f"{u.id}.pt", weights_only=True).float(), utts)
    emit("ssl_cached", cached, "ssl_whisper_ct2", base)
    tmp.cleanup()
    return lines


if __name__ == "__main__":
    main()
