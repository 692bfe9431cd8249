"""Language-modelling text: plain text, JSON Lines, JSON lists, local HF datasets and the offline long-text sources.

Contents:

- :class:`TextDataModule`: reads documents, tokenizes them once with a pretrained tokenizer (cached as ``.npy``), and
  serves packed ``seq_len`` blocks (or one padded document per row) with a fixed by-document validation split and
  exact mid-epoch resume.
- :class:`TokenBlockDataset`: rows of a token matrix as ``input_ids``/``attention_mask``/``labels``.
- :class:`BlockBatchSampler`: fixed-size batches of rows, shuffled per (seed, epoch), sharded over DDP ranks,
  resumable mid-epoch (``start_batch``).
- :func:`read_documents`: the file readers (``.txt``, ``.jsonl``, ``.json``).

Batch layout (``torch.long``; ``B`` rows, ``T = seq_len``)::

    input_ids       [B, T]  token ids (right-padded with the tokenizer's pad id when pack=False)
    attention_mask  [B, T]  1 on tokens, 0 on padding (all ones when packed)
    labels          [B, T]  = input_ids, -100 on padding; NOT shifted (HF causal LMs shift inside the loss)

Token stream. Every document is encoded with the tokenizer's own special tokens (``add_special_tokens=True``, so a
tokenizer that prepends BOS gives one BOS per document and none is added here) and with ``split_special_tokens=True``
(a literal ``<|im_end|>`` inside a text is encoded as text, never as the control token). With
``add_eos_between_docs`` one EOS is appended after each document unless the tokenizer's template already ends with
EOS, so a document boundary carries exactly one BOS (if the tokenizer has one) and one EOS. Packing concatenates these
documents and cuts the stream into consecutive ``seq_len`` blocks, dropping the tail shorter than ``seq_len``; a block
can span a document boundary and attention is **not** masked across documents (the usual GPT-style choice: the EOS
tells the model a new document starts).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from datamodules.batching import ResumableBatchSampler
from datamodules.demo.long_text import Document
from datamodules.resumable import ResumableDataLoader, shard_context, trainer_progress
from lit_models.fileio import atomic_dir, build_once
from lit_models.hf import default_cache_dir, load_tokenizer, tokenizer_fingerprint

__all__ = [
    "BlockBatchSampler",
    "TextDataModule",
    "TokenBlockDataset",
    "expand_paths",
    "fingerprint_files",
    "offline_fingerprint",
    "read_documents",
    "read_offline",
]

#: Bump when the cached layout or the tokenization rules change, so old caches are rebuilt.
CACHE_VERSION = 1
_META = "meta.json"
_SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
_JSON_SUFFIXES = (".jsonl", ".json")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_NOT_TEXT = (".parquet", ".arrow", ".csv", ".gz", ".zst", ".npy", ".bin")
_OFFLINE = ("austen", "essays", "bible")
#: Version of the ``bpe:<V>`` tokenizer recipe (bump to retrain cached tokenizers).
BPE_VERSION = 1
_BPE_PREFIX = "bpe:"
_BPE_EOS = "<|endoftext|>"
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@rank_zero_only
def _print0(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================================== file readers
def _doc_text(value: Any, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
            f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string (data.init_args.text_field)"
        )
    return value


def _row_document(row: Any, where: str, default_id: str, text_field: str, title_field: str = "title") -> Document:
    if isinstance(row, str):
        return Document(id=default_id, source="files", title=default_id, text=row)
    if not isinstance(row, dict):
        raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
            f"{where}: a {type(row).__name__}, expected a JSON object with a {text_field!r} field"
        )
    if text_field not in row:
        raise ValueError(
            f"{where}: no {text_field!r} field (fields: {sorted(row)}); set data.init_args.text_field to the field "
            "that holds the text"
        )
    text = _doc_text(row[text_field], where, text_field)
    doc_id = str(row["id"]) if row.get("id") is not None else default_id
    source = row["source"] if isinstance(row.get("source"), str) else "files"
    title = str(row[title_field]) if row.get(title_field) is not None else doc_id
    return Document(id=doc_id, source=source, title=title, text=text)


def read_documents(
    path: str | Path,
    text_field: str = "text",
    doc_split: Literal["file", "blank_line"] = "file",
    title_field: str = "title",
) -> list[Document]:
    """Documents of one file, read-only.

    - ``.jsonl``: one JSON object per non-empty line, its text in ``text_field``; optional ``id``, ``title_field``
      (default ``title``) and ``source`` fields are kept (default id ``<file name>:<line>``, default title the id).
    - ``.json``: a JSON list of such objects (or of strings); default id ``<file name>:<index>``.
    - anything else (``.txt``): UTF-8 plain text, one document per file (``doc_split="file"``, id = file name) or one
      per blank-line-separated block (``"blank_line"``, id ``<file name>#<k>``). Universal newlines.

    Texts are stripped of surrounding whitespace; empty documents are kept (the caller drops and counts them).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: invalid UTF-8 (byte offset), invalid JSON or a missing/non-string ``text_field`` (file and line
            or item), a ``.json`` file that is not a list, a binary/columnar file (use ``hf_dataset``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {path}")
    name = path.name
    suffix = path.suffix.lower()
    if suffix in _NOT_TEXT:
        raise ValueError(f"{path}: {suffix} files are not read as text; load them through data.init_args.hf_dataset")
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from exc
    docs: list[Document] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            doc = _row_document(row, f"{path} line {lineno}", f"{name}:{lineno}", text_field, title_field)
            docs.append(Document(doc.id, doc.source, doc.title, doc.text.strip()))
    elif suffix == ".json":
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a JSON {type(rows).__name__}, expected a list of objects with {text_field!r}")
        for i, row in enumerate(rows):
            doc = _row_document(row, f"{path} item {i}", f"{name}:{i}", text_field, title_field)
            docs.append(Document(doc.id, doc.source, doc.title, doc.text.strip()))
    elif doc_split == "blank_line":
        blocks = [b.strip() for b in _BLANK_LINES.split(content)]
        docs = [Document(f"{name}#{k}", "files", f"{name}#{k}", b) for k, b in enumerate(x for x in blocks if x)]
    else:
        docs = [Document(name, "files", path.stem, content.strip())]
    return docs


def expand_paths(paths: Sequence[str], key: str) -> list[Path]:
    """Files named by ``paths`` (files, directories searched recursively, glob patterns), in the given order.

    Raises:
        FileNotFoundError: naming ``data.init_args.<key>[i]`` for a missing path or a pattern/directory with no file.
    """
    out: list[Path] = []
    for i, raw in enumerate(paths):
        p = Path(raw).expanduser()
        if any(ch in str(raw) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"data.init_args.{key}[{i}]: pattern {raw!r} matches no file")
            out.extend(m.resolve() for m in matches)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _JSON_SUFFIXES + _TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"data.init_args.{key}[{i}]: directory {p.resolve()} holds no .txt/.jsonl/.json file"
                )
            out.extend(f.resolve() for f in found)
        elif p.is_file():
            out.append(p.resolve())
        else:
            raise FileNotFoundError(f"data.init_args.{key}[{i}]: file not found: {p.resolve()}")
    return out


def fingerprint_files(files: Sequence[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: a cache key that changes when a file is replaced or edited."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def offline_fingerprint(names: Sequence[str], bible_code: str = "4") -> list[Any]:
    """Cache key of the offline sources ``names`` (``austen``, ``essays``, ``bible``): their package files."""
    parts: list[Any] = []
    if "austen" in names:
        from datamodules.demo.long_text import janeaustenr_dir

        parts.append(["austen", *fingerprint_files([janeaustenr_dir() / "data" / "Rdata.rdb"])])
    if "essays" in names:
        from datamodules.demo.long_text import essays_dir

        parts.append(["essays", *fingerprint_files(sorted(essays_dir().glob("*.txt")))])
    if "bible" in names:
        from datamodules.demo.bible import default_bible_db

        parts.append(["bible", bible_code, *fingerprint_files([default_bible_db()])])
    return parts


def read_offline(names: Sequence[str], bible_code: str = "4", austen_reflow: bool = True) -> list[Document]:
    """Documents of the offline sources ``names`` in the order austen, essays, bible (see
    :mod:`datamodules.demo.long_text`; ``austen_reflow`` is :func:`~datamodules.demo.long_text.austen_novels`'s
    ``reflow``)."""
    from datamodules.demo import long_text

    docs: list[Document] = []
    if "austen" in names:
        docs += long_text.austen_novels(reflow=austen_reflow)
    if "essays" in names:
        docs += long_text.essays()
    if "bible" in names:
        docs += long_text.bible_books(bible_code)
    return docs


# ====================================================================================== dataset, sampler
class TokenBlockDataset(Dataset):
    """Rows of a token matrix as LM examples (layout in the module docstring).

    Args:
        rows: ``[N, T]`` integer array (a view of the memory-mapped cache is fine).
        lengths: ``[N]`` real tokens per row (the rest is padding), or None when every row is full (packed).

    ``dataset[i]`` is ``{"input_ids", "attention_mask", "labels"}``, each a ``[T]`` LongTensor.
    """

    def __init__(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D [N, T], got shape {rows.shape}")
        if lengths is not None and len(lengths) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
        self.rows = rows
        self.lengths = lengths

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.rows[index], dtype=np.int64))
        labels = ids.clone()
        mask = torch.ones_like(ids)
        if self.lengths is not None:
            n = int(self.lengths[index])
            mask[n:] = 0
            labels[n:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BlockBatchSampler(ResumableBatchSampler):
    """Batches of ``batch_size`` row indices, shuffled per epoch, sharded across ranks, resumable mid-epoch.

    Order: with ``shuffle`` a permutation of all rows drawn from a ``torch.Generator`` seeded with ``seed + epoch``
    (rows are reshuffled every epoch, not only the batch order); otherwise ``0..N-1``. Sharding (``num_replicas > 1``):
    with ``even_shards`` (training) the order is padded by wrapping around to a multiple of ``num_replicas`` (as
    :class:`~torch.utils.data.DistributedSampler` does) so every rank runs the same number of steps; without it
    (evaluation) no row is repeated. Rank ``r`` takes ``order[r::num_replicas]`` and cuts it into batches; the last
    batch may be smaller (``drop_last=False``).

    Resume: ``start_batch`` skips that many batches of this rank's order in the next iteration only; ``len()`` still
    reports the full count, matching the progress counters a restored trainer resumes from.

    Raises:
        ValueError: ``batch_size < 1``, negative ``num_rows``/``start_batch``, ``rank`` outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
        even_shards: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        super().__init__(seed, epoch, num_replicas, rank, start_batch, even_shards)
        self.num_rows = int(num_rows)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)

    def _rank_rows(self) -> int:
        n, r = self.num_rows, self.num_replicas
        if r == 1 or n == 0:
            return n
        total = math.ceil(n / r) * r if self.even_shards else n
        return len(range(self.rank, total, r))

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one) in iteration order, ignoring ``start_batch``."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle and self.num_rows > 1:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        if self.num_replicas > 1 and order:
            if self.even_shards:
                total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
                order = [order[i % len(order)] for i in range(total)]
            order = order[self.rank :: self.num_replicas]
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:  # rows, not batches, are sharded
        return math.ceil(self._rank_rows() / self.batch_size)


# ====================================================================================== data module
class TextDataModule(LightningDataModule):
    """Documents for causal language modelling, tokenized once, packed into ``seq_len`` blocks.

    The tokenizer is loaded in ``__init__`` (:attr:`tokenizer`, :attr:`vocab_size`, :attr:`pad_id`, :attr:`bos_id`,
    :attr:`eos_id`), so LightningCLI can link it into the model at instantiation. Input files are only ever read.

    **Sources** (``source``):

    - ``files``: ``train_files`` (and optional ``val_files``, ``test_files``): ``.txt`` (``doc_split``), ``.jsonl``
      and ``.json`` lists read through ``text_field`` (see :func:`read_documents`); a directory stands for the
      ``.txt``/``.jsonl``/``.json`` files under it (sorted) and a glob pattern for its matches. Or ``hf_dataset``
      instead of ``train_files``: a local ``save_to_disk`` directory (a ``DatasetDict`` with ``train`` and optional
      ``validation``/``valid``/``val``/``dev`` and ``test`` splits, or a single ``Dataset`` used as ``train``), or a
      local data directory / file that ``datasets.load_dataset`` reads offline (``train.jsonl``, ``*.parquet``, ...;
      its Arrow conversion goes to ``<cache_dir>/hf``).
    - ``austen``, ``essays``, ``bible``: the offline long documents of :mod:`datamodules.demo.long_text` (six Austen
      novels, 49 Paul Graham essays, the 66 books of Bible translation ``bible_code``); ``mixed``: all three.

    **Splits.** Validation comes from ``val_files`` (or the HF ``validation`` split) when given; otherwise whole
    documents are held out from the training documents: those named in ``val_documents`` (matching a document's id,
    title or the last part of its id, case-insensitively), else a fraction ``val_fraction`` of each source group
    (``Document.source``: ``austen``/``essays``/``bible``, a JSONL ``source`` field, else ``files``; at least one
    document per group of two or more) chosen by ranking ``sha256(f"{seed}:{id}")``. The split depends only on the
    document ids and the seed: identical in every run, and a document's rank does not depend on the other documents.
    No document is in both splits. The test split exists only with ``test_files`` or an HF ``test`` split.

    **Training order.** Training documents are concatenated in a fixed seeded order (the same hash ranking), so
    ``max_train_tokens=D`` takes exactly the first ``D`` tokens of that stream (``D // seq_len`` blocks) and a smaller
    ``D`` is a prefix of a larger one, as scaling sweeps need. Blocks are then shuffled per epoch with
    ``seed + epoch`` by :class:`BlockBatchSampler`; validation and test keep document order, unshuffled.

    **Cache.** The token stream of every split (documents with their BOS/EOS, uint16 when the vocabulary fits, else
    uint32) is saved as ``<cache_dir>/<group>-<key>/<split>.npy`` with ``<split>.offsets.npy`` (document boundaries)
    and ``meta.json`` (documents, counts, the key's inputs), built in a temporary directory renamed into place under
    a ``FileLock`` (DDP ranks, parallel runs), and memory-mapped when read. Groups are ``trainval`` (train and
    validation together, since validation may come from training documents) and ``test``. The key hashes the
    sources (paths with sizes and mtimes; the package files of the offline sources), the tokenizer (its full
    ``tokenizer.json``), ``text_field``, ``doc_split``, ``add_eos_between_docs``, ``seed`` and the split rule.
    ``seq_len``, ``pack``, ``max_blocks``, ``max_train_tokens`` and ``batch_size`` are not in the key: they are
    applied to the cached streams in ``setup`` without re-tokenizing. The whole corpus is tokenized in memory once,
    which suits corpora of up to a few hundred million tokens.

    **Resume.** Under a Trainer the training loader is a :class:`~datamodules.resumable.ResumableDataLoader`: Lightning
    stores its position in checkpoints and restores it, so a resumed run sees exactly the remaining batches of the
    epoch (``_resume_batch`` sets the skip by hand outside Lightning). The sampler shards across DDP ranks itself:
    run the Trainer with ``use_distributed_sampler: false`` on more than one device.

    After ``setup``: :attr:`train_tokens_available` (tokens in the whole training stream, the largest usable
    ``max_train_tokens``), :attr:`stats` (``data/train_tokens``, ``data/val_tokens``, ``data/test_tokens``: tokens
    served per epoch; ``data/<split>_documents``: documents contributing tokens; ``data/<split>_blocks``;
    ``data/dropped_empty_documents``), logged to the trainer's loggers at ``fit`` and printed.

    Args:
        tokenizer: a :func:`lit_models.hf.load_tokenizer` name (``smollm2-135m``; tiny model names use the same
            tokenizer), a local tokenizer directory, a hub name in the local HF cache, or ``bpe:<V>`` (e.g.
            ``bpe:2048``): a byte-level BPE of ``V`` tokens (``<|endoftext|>`` = EOS = pad, id 0, no BOS) trained with
            the ``tokenizers`` library on this DataModule's **training** documents and cached as
            ``<cache_dir>/tokenizers/bpe<V>-<key>/`` (key: the sources, split rule and seed), so every run of a
            scaling sweep shares one vocabulary and the validation text never shapes it.
        source: ``files``, ``austen``, ``essays``, ``bible`` or ``mixed`` (see above).
        train_files: training files, directories or glob patterns (``source="files"``).
        val_files: validation files; empty: hold out documents of the training set.
        test_files: test files; empty: no test split (unless ``hf_dataset`` has one).
        text_field: JSON/HF field holding the text.
        doc_split: ``.txt`` files: ``file`` (one document per file) or ``blank_line`` (blank-line-separated blocks).
        hf_dataset: local HF dataset (see above), instead of ``train_files``; never downloaded.
        seq_len: tokens per row (block length, or the truncation length when ``pack=False``); at least 2.
        pack: pack documents into full blocks; ``False``: one document per row, truncated to ``seq_len`` and
            right-padded (``attention_mask`` 0 and ``labels`` -100 on padding).
        add_eos_between_docs: end every document with one EOS (unless the tokenizer already adds one).
        val_fraction: fraction of the documents of each source group held out for validation, in (0, 1).
        val_documents: documents (ids, titles or id tails, e.g. ``persuasion``) held out for validation instead of
            ``val_fraction``; empty: use ``val_fraction``.
        max_blocks: keep at most this many rows of every split (the first ones); None keeps all.
        max_train_tokens: train on exactly the first ``D`` tokens of the fixed-order training stream (``D //
            seq_len`` blocks; needs ``pack``); None uses all.
        max_val_tokens: validate on the first ``max_val_tokens // seq_len`` validation rows (the same rows in every
            run); None uses all (``max_blocks`` still applies).
        batch_size: rows per batch, per device.
        num_workers: DataLoader worker processes (``persistent_workers`` when > 0).
        seed: seed of the validation split, the training document order and the per-epoch block shuffle.
        cache_dir: token cache root; default ``<LITLAB cache>/text`` (``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``).
        bible_code: translation of the ``bible`` source (``4`` = World English Bible, ``k`` = KJV).

    Raises:
        ValueError: ``seq_len < 2``, bad fractions/limits, a source with the wrong inputs (naming the config key),
            ``max_train_tokens`` with ``pack=False``; in ``setup``: an empty corpus, too few documents to hold one
            out, unknown ``val_documents``, ``max_train_tokens`` above the available tokens, a split shorter than
            ``seq_len``, a test split that does not exist.
        FileNotFoundError: missing files (naming ``data.init_args.<key>[i]``), missing offline packages (with the
            install command).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        source: Literal["files", "austen", "essays", "bible", "mixed"] = "files",
        train_files: list[str] = [],  # noqa: B006
        val_files: list[str] = [],  # noqa: B006
        test_files: list[str] = [],  # noqa: B006
        text_field: str = "text",
        doc_split: Literal["file", "blank_line"] = "file",
        hf_dataset: str | None = None,
        seq_len: int = 256,
        pack: bool = True,
        add_eos_between_docs: bool = True,
        val_fraction: float = 0.05,
        val_documents: list[str] = [],  # noqa: B006
        max_blocks: int | None = None,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        bible_code: str = "4",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sources = ("files", *_OFFLINE, "mixed")
        if source not in sources:
            raise ValueError(f"data.init_args.source must be one of {', '.join(sources)}; got {source!r}")
        if doc_split not in ("file", "blank_line"):
            raise ValueError(f"data.init_args.doc_split must be 'file' or 'blank_line'; got {doc_split!r}")
        if seq_len < 2:
            raise ValueError(f"data.init_args.seq_len must be >= 2 (an input and its next token), got {seq_len}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.init_args.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"data.init_args.max_blocks must be >= 1 or null, got {max_blocks}")
        if max_train_tokens is not None:
            if not pack:
                raise ValueError("data.init_args.max_train_tokens needs pack=true (it counts tokens of packed blocks)")
            if max_train_tokens < seq_len:
                raise ValueError(
                    f"data.init_args.max_train_tokens={max_train_tokens} is less than one block (seq_len={seq_len})"
                )
        if max_val_tokens is not None and max_val_tokens < seq_len:
            raise ValueError(
                f"data.init_args.max_val_tokens={max_val_tokens} is less than one block (seq_len={seq_len})"
            )
        if source == "files":
            if hf_dataset is not None and train_files:
                raise ValueError("set data.init_args.train_files or data.init_args.hf_dataset, not both")
            if hf_dataset is None and not train_files:
                raise ValueError(
                    "source='files' needs data.init_args.train_files (or data.init_args.hf_dataset); for the offline "
                    "demo set data.init_args.source to austen, essays, bible or mixed"
                )
        else:
            if train_files:
                raise ValueError(f"data.init_args.train_files is only read with source='files' (source={source!r})")
            if hf_dataset is not None:
                raise ValueError(f"data.init_args.hf_dataset is only read with source='files' (source={source!r})")
        if hf_dataset is not None and (val_files or test_files):
            raise ValueError("with data.init_args.hf_dataset the splits come from the dataset: leave val_files and "
                             "test_files empty")
        if val_files and val_documents:
            raise ValueError("set data.init_args.val_files or data.init_args.val_documents, not both")

        self.tokenizer_name = tokenizer
        self.source = source
        self.train_files = list(train_files)
        self.val_files = list(val_files)
        self.test_files = list(test_files)
        self.text_field = text_field
        self.doc_split = doc_split
        self.hf_dataset = hf_dataset
        self.seq_len = int(seq_len)
        self.pack = bool(pack)
        self.add_eos_between_docs = bool(add_eos_between_docs)
        self.val_fraction = float(val_fraction)
        self.val_documents = list(val_documents)
        self.max_blocks = max_blocks
        self.max_train_tokens = max_train_tokens
        self.max_val_tokens = max_val_tokens
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "text"
        self.bible_code = bible_code

        self.tokenizer = self._load_tokenizer(tokenizer)
        specials = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self._adds_eos = bool(specials) and specials[-1] == self.tokenizer.eos_token_id
        if self.add_eos_between_docs and self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no EOS token; set data.init_args.add_eos_between_docs=false")

        self._streams: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, TokenBlockDataset] = {}
        self._cache_paths: dict[str, Path] = {}
        self._dropped: dict[str, int] = {}
        self._resume_batch = 0
        self.train_tokens_available: int | None = None
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ tokenizer facts
    @property
    def vocab_size(self) -> int:
        """Number of token ids (embedding rows the model needs), added tokens included."""
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """Padding id (the tokenizer's pad token; SmolLM2: ``<|im_end|>`` = 2)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int | None:
        """End-of-document id."""
        return self.tokenizer.eos_token_id

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (only in the stream if the tokenizer adds it itself)."""
        return self.tokenizer.bos_token_id

    # ------------------------------------------------------------------ tokenizer
    def _load_tokenizer(self, name: str) -> Any:
        """A pretrained tokenizer by name, or the cached BPE of ``bpe:<V>`` (trained here on first use)."""
        if not name.startswith(_BPE_PREFIX):
            return load_tokenizer(name)
        try:
            vocab = int(name[len(_BPE_PREFIX):])
        except ValueError:
            raise ValueError(f"data.init_args.tokenizer={name!r}: write bpe:<vocabulary size>, e.g. bpe:2048") from None
        if not 258 <= vocab <= 65536:
            raise ValueError(f"data.init_args.tokenizer={name!r}: the BPE vocabulary must be in [258, 65536] (256 bytes, "
                             "<|endoftext|> and at least one merge; uint16 token cache)")
        inputs = {"version": BPE_VERSION, "vocab_size": vocab, **self._trainval_inputs()}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        root = self.cache_dir / "tokenizers"
        target = root / f"bpe{vocab}-{digest}"
        build_once(root, target.name, (target / "tokenizer.json").is_file,
                   lambda: self._train_bpe(vocab, target, inputs))
        return load_tokenizer(str(target))

    def _train_bpe(self, vocab: int, target: Path, inputs: dict[str, Any]) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        t0 = time.perf_counter()
        docs = self._collect("trainval")[0]["train"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[_BPE_EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_BPE_EOS, pad_token=_BPE_EOS)

        def fill(tmp: Path) -> None:
            fast.save_pretrained(str(tmp))
            (tmp / "litlab_bpe.json").write_text(json.dumps(inputs, indent=1) + "\n", encoding="utf-8")

        atomic_dir(target, fill)
        _print0(f"[data] trained a byte-level BPE of {len(fast)} tokens on {len(docs)} training documents -> {target} "
                f"({time.perf_counter() - t0:.1f}s)")

    # ------------------------------------------------------------------ sources
    def _offline_fingerprint(self) -> list[Any]:
        return offline_fingerprint(_OFFLINE if self.source == "mixed" else (self.source,), self.bible_code)

    def _hf_path(self) -> Path:
        assert self.hf_dataset is not None
        path = Path(self.hf_dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.init_args.hf_dataset: not found: {path.resolve()}")
        return path.resolve()

    def _hf_fingerprint(self) -> list[Any]:
        path = self._hf_path()
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        return [["hf", str(path)], *fingerprint_files(files)]

    def _read_offline(self) -> list[Document]:
        return read_offline(_OFFLINE if self.source == "mixed" else (self.source,), self.bible_code)

    def _read_files(self, files: Sequence[Path]) -> list[Document]:
        docs: list[Document] = []
        for f in files:
            docs += read_documents(f, self.text_field, self.doc_split)
        return docs

    def _read_hf(self) -> dict[str, list[Document]]:
        """Documents of each split of ``hf_dataset`` (``train`` always present)."""
        path = self._hf_path()
        where = f"data.init_args.hf_dataset={path}"
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            from datasets import DatasetDict, load_from_disk

            loaded = load_from_disk(str(path))
            dsd = loaded if isinstance(loaded, DatasetDict) else {"train": loaded}
        else:
            from datasets import load_dataset

            if path.is_file():
                builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv",
                           ".arrow": "arrow"}.get(path.suffix.lower())
                if builder is None:
                    raise ValueError(f"{where}: cannot tell the format of {path.name} (jsonl, json, txt, parquet, csv, "
                                     "arrow)")
                dsd = load_dataset(builder, data_files=str(path), cache_dir=str(self.cache_dir / "hf"))
            else:
                dsd = load_dataset(str(path), cache_dir=str(self.cache_dir / "hf"))
        out: dict[str, list[Document]] = {}
        for key in dsd:
            split = _SPLIT_ALIASES.get(str(key))
            if split is None:
                continue
            if split in out:
                raise ValueError(f"{where}: two splits map to {split!r} ({sorted(dsd)})")
            table = dsd[key].with_format("arrow")[:]
            columns = list(table.column_names)
            if self.text_field not in columns:
                raise ValueError(
                    f"{where} split {key!r}: no {self.text_field!r} column (columns: {columns}); set "
                    "data.init_args.text_field"
                )
            texts = table.column(self.text_field).to_pylist()
            ids = table.column("id").to_pylist() if "id" in columns else [None] * len(texts)
            titles = table.column("title").to_pylist() if "title" in columns else [None] * len(texts)
            srcs = table.column("source").to_pylist() if "source" in columns else [None] * len(texts)
            docs = []
            for i, text in enumerate(texts):
                text = _doc_text(text, f"{where} split {key!r} row {i}", self.text_field)
                doc_id = str(ids[i]) if ids[i] is not None else f"{key}:{i}"
                docs.append(Document(doc_id, srcs[i] if isinstance(srcs[i], str) else "files",
                                     str(titles[i]) if titles[i] is not None else doc_id, text.strip()))
            out[split] = docs
        if "train" not in out:
            raise ValueError(f"{where}: no 'train' split (splits: {sorted(dsd)})")
        return out

    # ------------------------------------------------------------------ cache keys
    def _key(self, group: str) -> tuple[str, dict[str, Any]]:
        inputs: dict[str, Any] = {
            "version": CACHE_VERSION,
            "group": group,
            "tokenizer": self.tokenizer_name,
            "tokenizer_sha": tokenizer_fingerprint(self.tokenizer),
            "add_eos_between_docs": self.add_eos_between_docs,
            "text_field": self.text_field,
            "doc_split": self.doc_split,
        }
        if group == "trainval":
            inputs.update(self._trainval_inputs())
        else:
            inputs["sources"] = (
                self._hf_fingerprint() if self.hf_dataset is not None
                else fingerprint_files(expand_paths(self.test_files, "test_files"))
            )
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        return f"{group}-{digest}", inputs

    # ------------------------------------------------------------------ splitting and tokenizing
    def _trainval_inputs(self) -> dict[str, Any]:
        """What the training and validation documents depend on (sources, validation files, split rule)."""
        if self.hf_dataset is not None:
            sources = self._hf_fingerprint()
        elif self.source == "files":
            sources = fingerprint_files(expand_paths(self.train_files, "train_files"))
        else:
            sources = self._offline_fingerprint()
        return {
            "sources": sources,
            "val_files": fingerprint_files(expand_paths(self.val_files, "val_files")),
            "split_rule": {"seed": self.seed, "val_fraction": self.val_fraction, "val_documents": self.val_documents},
        }

    def _rank(self, doc: Document) -> str:
        return hashlib.sha256(f"{self.seed}:{doc.id}".encode()).hexdigest()

    def _seeded_order(self, docs: list[Document]) -> list[Document]:
        order = sorted(range(len(docs)), key=lambda i: (self._rank(docs[i]), i))
        return [docs[i] for i in order]

    def _hold_out(self, docs: list[Document]) -> tuple[list[Document], list[Document]]:
        """(train, validation) documents when no validation source is given (see the class docstring)."""
        if self.val_documents:
            wanted = [v.lower() for v in self.val_documents]

            def matches(doc: Document, w: str) -> bool:
                return w in (doc.id.lower(), doc.title.lower(), doc.id.lower().rsplit("/", 1)[-1])

            unknown = [v for v, w in zip(self.val_documents, wanted) if not any(matches(d, w) for d in docs)]
            if unknown:
                sample = ", ".join(d.id for d in docs[:20]) + (" ..." if len(docs) > 20 else "")
                raise ValueError(f"data.init_args.val_documents: {unknown} match no document (ids: {sample})")
            is_val = [any(matches(d, w) for w in wanted) for d in docs]
            if all(is_val):
                raise ValueError("data.init_args.val_documents holds out every document: nothing is left to train on")
            return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]
        if len(docs) < 2:
            raise ValueError(
                f"only {len(docs)} training document(s): cannot hold out a validation document; set "
                "data.init_args.val_files, or doc_split=blank_line / JSONL with one document per line"
            )
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(docs):
            groups.setdefault(d.source, []).append(i)
        held: set[int] = set()
        for members in groups.values():
            if len(members) >= 2:
                k = min(len(members) - 1, max(1, round(self.val_fraction * len(members))))
                held.update(sorted(members, key=lambda i: (self._rank(docs[i]), i))[:k])
        if not held:  # only single-document groups: rank all documents together
            k = min(len(docs) - 1, max(1, round(self.val_fraction * len(docs))))
            held.update(sorted(range(len(docs)), key=lambda i: (self._rank(docs[i]), i))[:k])
        return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]

    def _tokenize(self, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token stream, offsets [n+1]) of ``docs``, each with its BOS/EOS (see the module docstring)."""
        eos = self.tokenizer.eos_token_id
        append_eos = self.add_eos_between_docs and not self._adds_eos
        dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        pieces: list[np.ndarray] = []
        lengths: list[int] = []
        chunk = 64
        for start in range(0, len(docs), chunk):
            texts = [d.text for d in docs[start : start + chunk]]
            encoded = self.tokenizer(
                texts, add_special_tokens=True, split_special_tokens=True, return_attention_mask=False, verbose=False
            )["input_ids"]
            for ids in encoded:
                if append_eos:
                    ids = [*ids, eos]
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                    raise ValueError(f"token id {int(arr.max())} does not fit the cache dtype {np.dtype(dtype).name}")
                pieces.append(arr.astype(dtype))
                lengths.append(arr.size)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
        return stream, offsets

    def _collect(self, group: str) -> tuple[dict[str, list[Document]], int]:
        """Documents of each split of ``group`` in stream order, and the number of empty documents dropped."""
        dropped = 0

        def keep(docs: list[Document]) -> list[Document]:
            nonlocal dropped
            kept = [d for d in docs if d.text.strip()]
            dropped += len(docs) - len(kept)
            return kept

        if group == "test":
            if self.hf_dataset is not None:
                hf = self._read_hf()
                if "test" not in hf:
                    raise ValueError(f"data.init_args.hf_dataset={self._hf_path()} has no test split")
                return {"test": keep(hf["test"])}, dropped
            if not self.test_files:
                raise ValueError(
                    "no test split: set data.init_args.test_files (or give data.init_args.hf_dataset a 'test' split); "
                    "the offline sources have no test split"
                )
            docs = keep(self._read_files(expand_paths(self.test_files, "test_files")))
            if not docs:
                raise ValueError(f"the test files {self.test_files} hold no non-empty document")
            return {"test": docs}, dropped

        hf = self._read_hf() if self.hf_dataset is not None else None
        if hf is not None:
            train = hf["train"]
        elif self.source == "files":
            train = self._read_files(expand_paths(self.train_files, "train_files"))
        else:
            train = self._read_offline()
        train = keep(train)
        if not train:
            raise ValueError(f"empty corpus: the training sources of source={self.source!r} hold no non-empty document")
        if self.val_files:
            val = keep(self._read_files(expand_paths(self.val_files, "val_files")))
        elif hf is not None and "validation" in hf and not self.val_documents:
            val = keep(hf["validation"])
        else:
            train, val = self._hold_out(train)
        if not val:
            raise ValueError("the validation split holds no non-empty document")
        return {"train": self._seeded_order(train), "validation": val}, dropped

    def _build(self, group: str, target: Path, inputs: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        splits, dropped = self._collect(group)
        meta: dict[str, Any] = {"key_inputs": inputs, "dropped_empty_documents": dropped, "splits": {}}

        def fill(tmp: Path) -> None:
            for split, docs in splits.items():
                stream, offsets = self._tokenize(docs)
                np.save(tmp / f"{split}.npy", stream)
                np.save(tmp / f"{split}.offsets.npy", offsets)
                meta["splits"][split] = {
                    "tokens": int(stream.size),
                    "documents": [{"id": d.id, "source": d.source, "title": d.title} for d in docs],
                }
            (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        atomic_dir(target, fill)
        counts = ", ".join(f"{s} {len(m['documents'])} docs / {m['tokens']:,} tokens" for s, m in meta["splits"].items())
        _print0(f"[data] tokenized {group} ({counts}; {dropped} empty dropped) -> {target} "
                f"({time.perf_counter() - t0:.1f}s)")

    def _ensure_cache(self, group: str) -> Path:
        """The cache directory of ``group``, built under a lock if it does not exist yet."""
        if group in self._cache_paths:
            return self._cache_paths[group]
        name, inputs = self._key(group)
        target = self.cache_dir / name
        build_once(self.cache_dir, name, (target / _META).is_file, lambda: self._build(group, target, inputs))
        self._cache_paths[group] = target
        return target

    def _stream(self, split: str) -> dict[str, Any]:
        """``{"tokens", "offsets", "documents"}`` of ``split`` from the cache (memory-mapped)."""
        if split not in self._streams:
            root = self._ensure_cache("test" if split == "test" else "trainval")
            meta = json.loads((root / _META).read_text(encoding="utf-8"))
            self._dropped[root.name.split("-", 1)[0]] = int(meta["dropped_empty_documents"])
            self.stats["data/dropped_empty_documents"] = sum(self._dropped.values())
            for name, info in meta["splits"].items():
                self._streams[name] = {
                    "tokens": np.load(root / f"{name}.npy", mmap_mode="r"),
                    "offsets": np.load(root / f"{name}.offsets.npy"),
                    "documents": info["documents"],
                }
        return self._streams[split]

    # ------------------------------------------------------------------ public data access
    def documents(self, split: str) -> list[dict[str, Any]]:
        """``{"id", "source", "title", "num_tokens"}`` of every document of ``split``, in stream order."""
        s = self._stream(_canonical(split))
        return [{**d, "num_tokens": int(s["offsets"][i + 1] - s["offsets"][i])} for i, d in enumerate(s["documents"])]

    def document_tokens(self, split: str, index: int) -> np.ndarray:
        """Token ids of document ``index`` of ``split`` (with its BOS/EOS), as an int64 array."""
        s = self._stream(_canonical(split))
        return np.asarray(s["tokens"][s["offsets"][index] : s["offsets"][index + 1]], dtype=np.int64)

    def token_stream(self, split: str) -> np.ndarray:
        """The whole token stream of ``split`` (documents with their BOS/EOS, concatenated), memory-mapped."""
        return self._stream(_canonical(split))["tokens"]

    def dataset(self, split: str) -> TokenBlockDataset:
        """The :class:`TokenBlockDataset` of ``split`` (built on first use)."""
        split = _canonical(split)
        if split not in self._datasets:
            self._datasets[split] = self._make_dataset(split)
        return self._datasets[split]

    def _make_dataset(self, split: str) -> TokenBlockDataset:
        s = self._stream(split)
        tokens, offsets = s["tokens"], s["offsets"]
        T = self.seq_len
        short = "val" if split == "validation" else split
        if split == "train":
            self.train_tokens_available = int(tokens.size)
        if self.pack:
            usable = int(tokens.size)
            if split == "train" and self.max_train_tokens is not None:
                if self.max_train_tokens > usable:
                    raise ValueError(
                        f"data.init_args.max_train_tokens={self.max_train_tokens} exceeds the {usable} tokens of the "
                        f"training stream (source={self.source!r}); lower it or add data"
                    )
                usable = self.max_train_tokens
                if usable % T:
                    _print0(f"[data] max_train_tokens={usable} is not a multiple of seq_len={T}: training on "
                            f"{usable // T * T} tokens ({usable // T} blocks)")
            n = usable // T
            if self.max_blocks is not None:
                n = min(n, self.max_blocks)
            if split == "validation" and self.max_val_tokens is not None:
                n = min(n, self.max_val_tokens // T)
            if n == 0:
                raise ValueError(
                    f"the {split} split has {int(tokens.size)} tokens, fewer than one block of seq_len={T}; lower "
                    "data.init_args.seq_len or add documents"
                )
            rows = tokens[: n * T].reshape(n, T)
            dataset = TokenBlockDataset(rows)
            served = n * T
            n_docs = int(np.searchsorted(offsets[:-1], served, side="left"))  # documents starting before the end
        else:
            n = len(offsets) - 1
            if self.max_blocks is not None:
                n = min(n, self.max_blocks)
            if split == "validation" and self.max_val_tokens is not None:
                n = min(n, max(1, self.max_val_tokens // T))
            lengths = np.minimum(np.diff(offsets[: n + 1]), T).astype(np.int64)
            rows = np.full((n, T), self.pad_id, dtype=tokens.dtype)
            for i in range(n):
                rows[i, : lengths[i]] = tokens[offsets[i] : offsets[i] + lengths[i]]
            dataset = TokenBlockDataset(rows, lengths)
            served = int(lengths.sum())
            n_docs = n
        self.stats[f"data/{short}_tokens"] = served
        self.stats[f"data/{short}_documents"] = n_docs
        self.stats[f"data/{short}_blocks"] = len(dataset)
        if split == "train":
            self.stats["data/train_tokens_available"] = int(tokens.size)
        _print0(f"[data] {split}: {len(dataset)} rows of {T} tokens ({served:,} tokens, {n_docs} documents, "
                f"pack={self.pack}) of {len(offsets) - 1} documents / {int(tokens.size):,} tokens")
        return dataset

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Tokenize and cache the training and validation documents (idempotent, safe across processes)."""
        self._ensure_cache("trainval")

    def setup(self, stage: str | None = None) -> None:
        """Load the cached streams and build the datasets ``stage`` needs (fit: train+validation, validate, test)."""
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"],
                  None: ["train", "validation"]}.get(stage)
        if needed is None:
            raise ValueError(f"TextDataModule supports the fit, validate and test stages, not {stage!r}")
        for split in needed:
            self.dataset(split)
        if stage in ("fit", "validate") and self.train_tokens_available is None:
            self.train_tokens_available = int(self._stream("train")["tokens"].size)
        if stage == "fit" and self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in self.stats.items()}, step=0)

    # ------------------------------------------------------------------ loaders
    def _replicas(self) -> tuple[int, int, int]:
        return shard_context(self.trainer, "TextDataModule")

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        replicas, rank, epoch = self._replicas()
        sampler = BlockBatchSampler(
            len(ds), self.batch_size, shuffle=train, seed=self.seed, epoch=epoch if train else 0,
            num_replicas=replicas, rank=rank, start_batch=self._resume_batch if train else 0, even_shards=train,
        )
        kwargs: dict[str, Any] = {
            "batch_sampler": sampler,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if train and self.trainer is not None:
            # Lightning saves this loader's position in checkpoints and restores it on resume (exact mid-epoch).
            return ResumableDataLoader(ds, progress=trainer_progress(self.trainer), **kwargs)
        return DataLoader(ds, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seed, epoch) batches of training blocks, this rank's shard, resumed at ``_resume_batch``."""
        loader = self._loader("train", train=True)
        self._resume_batch = 0
        return loader

    def val_dataloader(self) -> DataLoader:
        """Validation rows in order (this rank's shard, no duplicates)."""
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test rows in order (this rank's shard, no duplicates)."""
        return self._loader("test", train=False)


def _canonical(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; use train, validation or test") from None
