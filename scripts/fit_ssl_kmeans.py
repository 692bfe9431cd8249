"""Fit k-means units on SSL features of a MuST-C / fairseq training split (scikit-learn MiniBatchKMeans).

    python scripts/fit_ssl_kmeans.py --root data/MUSTC_v1.0 --ssl_encoder hf --ssl_path /models/hubert-base \
        --ssl_layer 9 --num_units 500 --out data/hubert_l9_k500.pt

The continuous features are computed through :class:`datamodules.mustc.MuSTCDataModule` (so they land in its feature
cache and are computed once), at most ``--max_frames`` frames (uniformly sampled with ``--seed``) are clustered with
``MiniBatchKMeans`` (k-means++ init), and ``{"centroids" [K, D], "fingerprint", "num_units", "inertia", "frames"}`` is
saved with ``torch.save`` (loadable with ``weights_only=True``). The fingerprint (encoder kind, weights sha256, layer,
padding) is checked by :class:`lit_models.nn.ssl_encoders.KMeansQuantizer.load`: centroids fitted on another
extractor are refused. Then train with ``data.ssl_type: discrete``, ``data.kmeans_path: <out>`` and
``model.ssl_type: discrete``, ``model.num_units: K``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.mustc import MuSTCDataModule
from lit_models.fileio import atomic_write


def fit_kmeans(
    root: str,
    out: str,
    num_units: int = 100,
    ssl_encoder: str = "whisper_ct2",
    ssl_path: str | None = None,
    ssl_layer: int = -1,
    ssl_pad_to_30s: bool = True,
    split: str = "train",
    lang_pair: str = "en-de",
    max_frames: int = 200_000,
    max_utterances: int | None = None,
    cache_dir: str | None = None,
    demo: str | None = None,
    demo_sizes: tuple[int, int, int] = (600, 60, 60),
    seed: int = 0,
) -> dict[str, Any]:
    """Fit and save the centroids (see module docstring); returns a summary.

    Raises:
        ValueError: fewer frames than ``num_units``.
    """
    from sklearn.cluster import MiniBatchKMeans

    dm = MuSTCDataModule(
        root=root, lang_pair=lang_pair, train_split=split, views=["ssl"],
        ssl_encoder=ssl_encoder,  # type: ignore[arg-type]
        ssl_path=ssl_path, ssl_layer=ssl_layer, ssl_type="continuous", ssl_pad_to_30s=ssl_pad_to_30s,
        cache_dir=cache_dir, demo=demo, demo_sizes=tuple(demo_sizes),  # type: ignore[arg-type]
        max_train_utterances=max_utterances,
    )
    ds = dm.dataset("train")
    feats = torch.cat([ds.ssl_source(i) for i in range(len(ds))]).float().numpy()
    if feats.shape[0] < num_units:
        raise ValueError(f"only {feats.shape[0]} SSL frames in split {split!r}, fewer than num_units={num_units}")
    rng = np.random.default_rng(seed)
    if feats.shape[0] > max_frames:
        feats = feats[np.sort(rng.choice(feats.shape[0], max_frames, replace=False))]
    km = MiniBatchKMeans(n_clusters=num_units, init="k-means++", random_state=seed, batch_size=min(4096, len(feats)),
                         n_init=1, max_iter=100)
    km.fit(feats)
    fingerprint = dm.ssl_extractor().fingerprint()
    obj = {"centroids": torch.from_numpy(km.cluster_centers_.astype(np.float32)), "fingerprint": fingerprint,
           "num_units": num_units, "inertia": float(km.inertia_), "frames": int(feats.shape[0])}
    atomic_write(Path(out), lambda fh: torch.save(obj, fh))
    summary = {"out": str(out), "num_units": num_units, "frames": int(feats.shape[0]), "dim": int(feats.shape[1]),
               "inertia_per_frame": float(km.inertia_) / feats.shape[0], "fingerprint": fingerprint}
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="MuST-C root or directory of fairseq TSVs (data.init_args.root)")
    p.add_argument("--out", required=True, help="output .pt file (data.init_args.kmeans_path)")
    p.add_argument("--num_units", type=int, default=100)
    p.add_argument("--ssl_encoder", choices=["hf", "whisper_ct2"], default="whisper_ct2")
    p.add_argument("--ssl_path", default=None)
    p.add_argument("--ssl_layer", type=int, default=-1)
    p.add_argument("--ssl_pad_to_30s", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--split", default="train")
    p.add_argument("--lang_pair", default="en-de")
    p.add_argument("--max_frames", type=int, default=200_000)
    p.add_argument("--max_utterances", type=int, default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--demo", choices=["bible_tts"], default=None, help="build the offline demo in --root first")
    p.add_argument("--demo_sizes", nargs=3, type=int, default=[600, 60, 60], help="train/dev/test demo segments")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = fit_kmeans(**vars(args))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
