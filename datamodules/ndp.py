"""Instruction data with NDP prefix-count targets (Ruan et al., arXiv 2408.17377; spec ``shared/methods/ndp.md``).

:class:`NDPInstructionDataModule` is :class:`~datamodules.instruction.InstructionDataModule` whose training and
validation batches also carry, for ``target: ndp``, the raw next-token counts of the two NDP tables at every
prediction position (a position ``t`` with ``labels[:, 1:][t] != -100``), concatenated in row-major order::

    sup_ptr [P+1] long   sup_tok [M_s] long   sup_cnt [M_s] long    supervised table: key = the full prefix
    clm_ptr [P+1] long   clm_tok [M_c] long   clm_cnt [M_c] long    answer-only table (+ mono corpus), with the
                                                                    supervised row where the answer prefix has none

``P`` = number of prediction positions of the batch. Counts travel, not probabilities, so the count transform, the
smoothing and the mixing stay model hyper-parameters (:class:`lit_models.ndp.NextDistributionLM`). Nothing dense is
ever built: a row holds only the tokens that followed its prefix in the data.

**Tables** (:mod:`datamodules.ndp_tables`) are built from the tokenised split itself (after the chat template and the
length rule, so they can never drift from what the model sees): the training table from the training set, the
validation table from the validation set alone. They are cached under ``tables_dir`` (default
``<LITLAB cache>/ndp/<split>-<key>``, the key hashing the tokenised examples, ``min_prefix``, the backend and the mono
files) and built on first use when ``build_tables_if_missing`` (under a file lock, once for all DDP ranks), or
beforehand by ``scripts/build_ndp_tables.py``. Loading checks ``meta.json`` against the run (tokenizer, vocabulary
size, chat-template hash, ``max_length``, ``min_prefix``, the hash of the tokenised examples) and names the first
field that differs.

``target: ntp`` serves the plain InstructionDataModule batches (the one-hot baseline on identical data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Dataset

from datamodules.instruction import (
    IGNORE_INDEX,
    InstructionDataModule,
    PackedDataset,
    SupervisedDataset,
    collate_packed,
    collate_supervised,
)
from lit_models.fileio import build_once
from lit_models.hf import default_cache_dir, tokenizer_fingerprint

__all__ = ["COUNT_KEYS", "NDPCollator", "NDPInstructionDataModule", "examples_fingerprint"]

#: The count arrays an NDP batch carries (see the module docstring).
COUNT_KEYS = ("sup_ptr", "sup_tok", "sup_cnt", "clm_ptr", "clm_tok", "clm_cnt")


def examples_fingerprint(dataset: SupervisedDataset) -> str:
    """sha256 of a tokenised split (every example's ids and supervised spans, in order): what tables depend on."""
    h = hashlib.sha256()
    for ids, spans in zip(dataset.input_ids, dataset.spans):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(spans, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class _Indexed(Dataset):
    """Items of a supervised (or packed) dataset with their example indices attached."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.lengths = base.lengths

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        if isinstance(self.base, PackedDataset):
            return [{**self.base.base[i], "index": i} for i in self.base.rows[index]]
        return {**self.base[index], "index": index}


class NDPCollator:
    """Picklable ``collate_fn``: the supervised (or packed) batch plus the count arrays of its examples' rows.

    Raises:
        RuntimeError: an example's table rows do not match its prediction positions (tables of other data).
    """

    def __init__(self, pad_id: int, tables: Any, packed: bool = False) -> None:
        self.pad_id = pad_id
        self.tables = tables
        self.packed = packed

    def __call__(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self.packed:
            batch = collate_packed(samples, self.pad_id)
            examples = [ex for row in samples for ex in row]
        else:
            batch = collate_supervised(samples, self.pad_id)
            examples = list(samples)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in COUNT_KEYS}
        offsets = {"sup": 0, "clm": 0}
        for ex in examples:
            rows = self.tables.example_rows(int(ex["index"]))
            n_pos = sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX)
            if len(rows["sup_ptr"]) - 1 != n_pos:
                raise RuntimeError(
                    f"NDP tables give {len(rows['sup_ptr']) - 1} rows for training example {ex['index']} but it has "
                    f"{n_pos} prediction positions: the tables belong to other data; rebuild them"
                )
            for t in ("sup", "clm"):
                ptr = rows[f"{t}_ptr"]
                parts[f"{t}_ptr"].append((ptr[1:] if parts[f"{t}_ptr"] else ptr) + offsets[t])
                parts[f"{t}_tok"].append(rows[f"{t}_tok"])
                parts[f"{t}_cnt"].append(rows[f"{t}_cnt"])
                offsets[t] += int(ptr[-1])
        for key, chunks in parts.items():
            batch[key] = torch.from_numpy(np.concatenate(chunks).astype(np.int64)) if chunks else torch.zeros(
                1 if key.endswith("ptr") else 0, dtype=torch.long)
        return batch


class NDPInstructionDataModule(InstructionDataModule):
    """:class:`~datamodules.instruction.InstructionDataModule` with NDP count targets (see the module docstring).

    Args:
        target: ``ndp`` (batches carry the count arrays) or ``ntp`` (plain batches: the one-hot baseline).
        tables_dir: where the tables live: ``<tables_dir>/train`` and ``<tables_dir>/validation`` (as written by
            ``scripts/build_ndp_tables.py``); None: the project cache, keyed by the data (see the module docstring).
        build_tables_if_missing: build absent tables at ``setup``; False: a missing table is an error.
        min_prefix: shortest answer prefix that keys the answer-only (CLM) table (the official ``--ngram``; 0 pools
            every region's first token under the empty prefix).
        mono_files: JSONL (``mono_text_field``) or plain-text files of a domain corpus whose continuations are
            added to the CLM table (training table only), tokenised without special tokens.
        mono_text_field: the JSONL field of ``mono_files``.
        mono_max_prefix: longest mono prefix counted; -1: the longest training example + 5 (the official bound).
        table_backend: ``hash128`` (128-bit prefix hashes, counts at answer positions only) or ``trie`` (exact).
        **kwargs: everything of :class:`~datamodules.instruction.InstructionDataModule`.

    Raises:
        ValueError: unknown ``target``/``table_backend``, ``min_prefix < 0``; at setup: tables that disagree with
            the run (naming the field and both values), corrupt tables (naming the file).
        FileNotFoundError: a missing table with ``build_tables_if_missing: false``, missing mono files.
    """

    def __init__(
        self,
        *args: Any,
        target: Literal["ntp", "ndp"] = "ndp",
        tables_dir: str | None = None,
        build_tables_if_missing: bool = True,
        min_prefix: int = 0,
        mono_files: list[str] = [],  # noqa: B006
        mono_text_field: str = "text",
        mono_max_prefix: int = -1,
        table_backend: Literal["hash128", "trie"] = "hash128",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if target not in ("ntp", "ndp"):
            raise ValueError(f"data.init_args.target must be one of ['ntp', 'ndp'], got {target!r}")
        if table_backend not in ("hash128", "trie"):
            raise ValueError(f"data.init_args.table_backend must be one of ['hash128', 'trie'], got {table_backend!r}")
        if min_prefix < 0:
            raise ValueError(f"data.init_args.min_prefix must be >= 0, got {min_prefix}")
        self.target = target
        self.tables_dir = Path(tables_dir) if tables_dir else None
        self.build_tables_if_missing = build_tables_if_missing
        self.min_prefix = int(min_prefix)
        self.mono_files = [Path(f) for f in mono_files]
        self.mono_text_field = mono_text_field
        self.mono_max_prefix = int(mono_max_prefix)
        self.table_backend = table_backend
        self._tables: dict[str, Any] = {}
        self.table_stats: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ table identity
    def table_meta(self, split: str) -> dict[str, Any]:
        """What the ``split`` table must agree with (checked field by field when loading)."""
        dataset = self.dataset(split)
        template = getattr(self.tokenizer, "chat_template", None) if self.use_chat_template else None
        return {
            "tokenizer": str(self.tokenizer_name),
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            "vocab_size": self.vocab_size,
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest() if template else None,
            "max_length": self.max_length,
            "min_prefix": self.min_prefix,
            "backend": self.table_backend,
            "split": split,
            "n_examples": len(dataset),
            "examples_sha256": examples_fingerprint(dataset),
            "mono_files": self._mono_fingerprint() if split == "train" else [],
        }

    def _mono_fingerprint(self) -> list[list[Any]]:
        out = []
        for path in self.mono_files:
            if not path.is_file():
                raise FileNotFoundError(f"data.init_args.mono_files: {path} does not exist")
            out.append([str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest()])
        return out

    def table_path(self, split: str) -> Path:
        """The directory of the ``split`` table (see ``tables_dir``)."""
        if self.tables_dir is not None:
            return self.tables_dir / split
        meta = self.table_meta(split)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        return default_cache_dir() / "ndp" / f"{split}-{key}"

    # ------------------------------------------------------------------ building and loading
    def _mono_docs(self) -> list[list[int]]:
        """Token ids (no special tokens) of every ``mono_files`` document: JSONL through ``mono_text_field``, plain
        text split at blank lines (:func:`datamodules.text.read_documents`, whose errors name file and line)."""
        from datamodules.text import read_documents

        texts: list[str] = []
        for path in self.mono_files:
            if not path.is_file():
                raise FileNotFoundError(f"data.init_args.mono_files: {path} does not exist")
            texts += [d.text for d in read_documents(path, self.mono_text_field, "blank_line") if d.text.strip()]
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def build_tables(self, split: str, out_dir: str | Path | None = None, progress: bool = True) -> Any:
        """Build the ``split`` table from the tokenised split and save it to ``out_dir`` (default
        :meth:`table_path`); returns the :class:`~datamodules.ndp_tables.NDPTables`."""
        from datamodules.ndp_tables import build_tables

        dataset = self.dataset(split)
        tables = build_tables(
            dataset.input_ids, dataset.spans, vocab_size=self.vocab_size, min_prefix=self.min_prefix,
            mono_docs=self._mono_docs() if split == "train" else (), mono_max_prefix=self.mono_max_prefix,
            backend=self.table_backend, progress=progress,
        )
        tables.save(Path(out_dir) if out_dir is not None else self.table_path(split), self.table_meta(split))
        return tables

    def tables(self, split: str) -> Any:
        """The loaded (built if missing and allowed) table of ``split``, checked against this run."""
        if split in self._tables:
            return self._tables[split]
        from datamodules.ndp_tables import NDPTables

        path = self.table_path(split)
        if not (path / "meta.json").is_file():
            if not self.build_tables_if_missing:
                raise FileNotFoundError(
                    f"no NDP {split} table at {path}: run scripts/build_ndp_tables.py, or set "
                    "data.init_args.build_tables_if_missing=true"
                )
            build_once(path.parent, path.name, (path / "meta.json").is_file,
                       lambda: self.build_tables(split, path, progress=rank_zero_only.rank == 0),
                       key="data.init_args.tables_dir")
        # The tokenizer is compared by its definition (names differ for one tokenizer: llama-tiny uses SmolLM2's),
        # and both backends build identical tables.
        expected = {k: v for k, v in self.table_meta(split).items() if k not in ("tokenizer", "backend")}
        tables = NDPTables.load(path, expected=expected, vocab_size=self.vocab_size)
        self._tables[split] = tables
        self.table_stats[split] = dict(tables.stats)
        stats = tables.stats
        for name in ("frac_multi_sup", "frac_multi_clm"):
            self.stats[f"data/{split}_{name}"] = float(stats.get(name, float("nan")))
        if rank_zero_only.rank == 0:
            print(f"[litlab] NDP {split} table {path}: {stats.get('n_positions')} positions, "
                  f"frac_multi_sup {stats.get('frac_multi_sup', float('nan')):.4f}, "
                  f"frac_multi_clm {stats.get('frac_multi_clm', float('nan')):.4f}", flush=True)
        return tables

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.target != "ndp":
            return
        for split in {"fit": ("train", "validation"), "validate": ("validation",)}.get(stage or "fit", ()):
            if split == "validation" and not self.files["validation"]:
                continue
            self.tables(split)

    # ------------------------------------------------------------------ loaders
    def _with_targets(self, split: str, dataset: Dataset, collate: Any) -> tuple[Dataset, Any]:
        """Training and validation batches of ``target: ndp`` carry the count rows of their examples."""
        if self.target != "ndp" or split not in ("train", "validation"):
            return dataset, collate
        packed = isinstance(dataset, PackedDataset)
        return _Indexed(dataset), NDPCollator(self.pad_token_id, self.tables(split), packed=packed)
