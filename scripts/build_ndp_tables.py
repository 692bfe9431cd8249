#!/usr/bin/env python
"""Build the NDP prefix-count tables offline (spec ``shared/methods/ndp.md`` section 4).

The tables are built from the data exactly as a run tokenises it (chat template, ``max_length`` rule), through
:class:`datamodules.ndp.NDPInstructionDataModule`, so they always match. Either reuse a run config's data section::

    python scripts/build_ndp_tables.py --config configs/ndp/translation_demo.yaml --out tables/bible

or name the data directly (the issue's form)::

    python scripts/build_ndp_tables.py --data train.jsonl --val-data dev.jsonl --tokenizer smollm2-135m \\
        --out tables/ --mono-files domain.jsonl --min-prefix 1

It writes ``<out>/train`` (and ``<out>/validation`` when there is validation data): ``targets.npz`` (sparse CSR rows
per prediction position) and ``meta.json`` (tokenizer, template and data fingerprints, counts), and prints tokens/s,
table sizes (keys, entries, bytes next to the dense P x V x 4 the official collator would build) and peak memory.
Point a run at them with ``--data.init_args.tables_dir <out>``; without it a run builds (and caches) its own tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.config:
        import yaml

        config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        try:
            kwargs = dict(config["data"]["init_args"])
        except (KeyError, TypeError):
            raise SystemExit(f"{args.config}: no data.init_args section") from None
    else:
        if not args.data:
            raise SystemExit("give --config RUN.yaml or --data TRAIN.jsonl (see --help)")
        kwargs = {"train_files": args.data, "val_files": args.val_data or [], "tokenizer": args.tokenizer,
                  "use_chat_template": not args.no_chat_template, "max_length": args.max_length}
    for key in ("min_prefix", "mono_files", "table_backend"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update({"target": "ndp", "tables_dir": None})
    return kwargs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a run config: its data section is used (demo data is built if needed)")
    p.add_argument("--data", nargs="+", help="training JSONL files (prompt/response or messages records)")
    p.add_argument("--val-data", nargs="+", help="validation JSONL files (their own table)")
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer name or path (default smollm2-135m)")
    p.add_argument("--max-length", type=int, default=512, help="the run's max_length (default 512)")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt + response + EOS")
    p.add_argument("--min-prefix", type=int, default=None, help="shortest answer prefix keying the CLM table")
    p.add_argument("--mono-files", nargs="+", default=None, help="domain corpus (JSONL 'text' or plain text)")
    p.add_argument("--backend", dest="table_backend", choices=["hash128", "trie"], default=None)
    p.add_argument("--out", required=True, help="output directory (gets train/ and validation/)")
    args = p.parse_args(argv)

    from datamodules.ndp import NDPInstructionDataModule

    kwargs = _data_kwargs(args)
    dm = NDPInstructionDataModule(**kwargs)
    dm.prepare_data()
    out = Path(args.out)
    splits = ["train"] + (["validation"] if dm.files["validation"] else [])
    for split in splits:
        t0 = time.perf_counter()
        tables = dm.build_tables(split, out / split, progress=True)
        seconds = time.perf_counter() - t0
        s = tables.stats
        n_bytes = sum((out / split / name).stat().st_size for name in ("targets.npz",))
        dense = int(s["n_positions"]) * dm.vocab_size * 4
        print(json.dumps({"split": split, "seconds": round(seconds, 2), **{k: s[k] for k in sorted(s)},
                          "targets_npz_bytes": n_bytes, "dense_bytes": dense,
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
        print(f"[ndp] {split}: {s['n_positions']:,} positions, sup {s['sup_keys']:,} keys / {s['sup_entries']:,} "
              f"entries, clm {s['clm_keys']:,} keys / {s['clm_entries']:,} entries, frac_multi_sup "
              f"{s['frac_multi_sup']:.4f}, frac_multi_clm {s['frac_multi_clm']:.4f}; {n_bytes / 1e6:.2f} MB on disk vs "
              f"{dense / 1e9:.2f} GB dense; {seconds:.1f}s -> {out / split}", file=sys.stderr)
    print(f"[ndp] use them with --data.init_args.tables_dir {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
