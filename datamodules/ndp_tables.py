"""Offline NDP count tables: build, save, load and validate (spec ``shared/methods/ndp.md`` sections 3, 4, 9, 11).

NDP trains against sparse next-token count rows instead of one-hot labels. This module turns tokenised training
examples (and an optional raw "mono" corpus) into the two tables of the spec and resolves, for every prediction
position of every example, the supervised row and the CLM row (fallback already applied), stored as CSR arrays.

Inputs (already tokenised):

- ``input_ids[i]``: the token ids ``x`` of example ``i`` (template and prompt included).
- ``spans[i]``: ascending, non-overlapping ``[start, end)`` ranges of answer tokens (``1 <= start <= end <= len(x)``).
  One span is one *region*: its answer prefix restarts at ``start``. Empty spans contribute nothing.

Prediction positions of example ``i`` (0-based): for each span in order, ``t in range(start - 1, end - 1)``;
position ``t`` predicts ``x[t + 1]``. This is the row-major order of ``labels[:, 1:] != -100`` in a right-padded
batch. At position ``t`` the full prefix is ``x[:t + 1]`` and the answer prefix is ``x[start:t + 1]`` of length
``L = t - start + 1`` (``L = 0`` at the region's first position).

Tables (spec section 3):

- supervised: ``C_sup[x[:t+1]][x[t+1]] += 1`` at every prediction position (duplicates counted each time).
- CLM: ``C_clm[x[start:t+1]][x[t+1]] += 1`` when ``L >= min_prefix``; each mono document ``d`` adds
  ``C_clm[d[:L]][d[L]] += 1`` for ``min_prefix <= L <= mono_max_prefix`` (one bound, pitfall 13).
- lookup: sup row = ``C_sup[x[:t+1]]``; CLM row = ``C_clm[x[start:t+1]]`` when ``L >= min_prefix`` and that row is
  non-empty, else the sup row (fallback).

Output layout (:class:`NDPTables`; ``N`` examples, ``P`` prediction positions, rows sorted by ascending token id)::

    example_ptr  int64 [N + 1]   positions of example i are example_ptr[i]:example_ptr[i+1]
    sup_ptr      int64 [P + 1]   entries of position p's supervised row are sup_ptr[p]:sup_ptr[p+1]
    sup_tok      int32 [E_sup]   token ids (ascending within a row, < vocab_size)
    sup_cnt      int32 [E_sup]   counts (> 0)
    clm_ptr      int64 [P + 1]   same for the resolved CLM rows
    clm_tok      int32 [E_clm]
    clm_cnt      int32 [E_clm]

Backends (spec section 4): ``hash128`` chains a 128-bit prefix hash (two 64-bit lanes: a splitmix64 mix and a
murmur3 ``fmix64`` mix, vectorised with numpy ``uint64`` over chunks of examples) and keeps only the keys of
prediction positions (prompt tokens cost no memory beyond the running hash; collision probability ~ n^2 / 2^129).
``trie`` is exact: a flat dict maps ``parent_id << 32 | token`` to a child id and only the node ids of prediction
positions are kept. Both feed the same aggregation, so they give identical CSR arrays unless a hash collides.

Two passes: (1) *count*: walk every example (and mono document) and record one ``(key, next token)`` entry per
counted position; (2) *lookup*: aggregate the entries into rows (``np.lexsort``) and resolve each position's rows.

Files (``NDPTables.save``/``load``): ``targets.npz`` (the 7 arrays, ``np.savez``) and ``meta.json`` (the caller's
meta at top level, ``stats`` and ``format_version``), each written atomically, ``meta.json`` last, so a directory
with ``meta.json`` is complete.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from lit_models.fileio import atomic_write

__all__ = ["FORMAT_VERSION", "NDPTables", "build_tables"]

FORMAT_VERSION = 1
BACKENDS = ("hash128", "trie")
TARGETS_FILE = "targets.npz"
META_FILE = "meta.json"
_BUILD_HINT = "run scripts/build_ndp_tables.py to build them"

# name -> dtype of the arrays in targets.npz, in file order
_ARRAYS: dict[str, type] = {
    "example_ptr": np.int64,
    "sup_ptr": np.int64,
    "sup_tok": np.int32,
    "sup_cnt": np.int32,
    "clm_ptr": np.int64,
    "clm_tok": np.int32,
    "clm_cnt": np.int32,
}
_ROW_KEYS = ("sup_ptr", "sup_tok", "sup_cnt", "clm_ptr", "clm_tok", "clm_cnt")

# hash128 lanes: lane A = splitmix64 finaliser over (state ^ token), lane B = murmur3 fmix64 over
# ((state + token * K) ^ seed); different initial states and constants make the lanes independent.
_U = np.uint64
_A0 = _U(0x243F6A8885A308D3)
_B0 = _U(0x13198A2E03707344)
_GOLDEN = _U(0x9E3779B97F4A7C15)
_SM1, _SM2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
_FM1, _FM2 = _U(0xFF51AFD7ED558CCD), _U(0xC4CEB9FE1A85EC53)
_KB, _SEEDB = _U(0xD6E8FEB86659FD93), _U(0x632BE59BD9B4E019)
_S27, _S30, _S31, _S33 = _U(27), _U(30), _U(31), _U(33)
_CHUNK_CELLS = 1 << 19  # padded tokens per hash128 chunk (~20 MB of work arrays)
_MIN_ROWS = 12  # below this many rows a chunk is hashed per token with Python ints (faster than per column)
_M64 = (1 << 64) - 1
_PY = {"A0": int(_A0), "B0": int(_B0), "G": int(_GOLDEN), "SM1": int(_SM1), "SM2": int(_SM2), "FM1": int(_FM1),
       "FM2": int(_FM2), "KB": int(_KB), "SEEDB": int(_SEEDB)}


def _hash_step(a: np.ndarray, b: np.ndarray, tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One token of the chained 128-bit prefix hash; all arrays ``uint64`` of the same shape."""
    z = (a ^ tok) + _GOLDEN
    z = (z ^ (z >> _S30)) * _SM1
    z = (z ^ (z >> _S27)) * _SM2
    a = z ^ (z >> _S31)
    y = (b + tok * _KB) ^ _SEEDB
    y = (y ^ (y >> _S33)) * _FM1
    y = (y ^ (y >> _S33)) * _FM2
    b = y ^ (y >> _S33)
    return a, b


def _hash_step_py(a: int, b: int, tok: int) -> tuple[int, int]:
    """:func:`_hash_step` on Python ints (same bits)."""
    z = ((a ^ tok) + _PY["G"]) & _M64
    z = ((z ^ (z >> 30)) * _PY["SM1"]) & _M64
    z = ((z ^ (z >> 27)) * _PY["SM2"]) & _M64
    a = z ^ (z >> 31)
    y = ((b + tok * _PY["KB"]) & _M64) ^ _PY["SEEDB"]
    y = ((y ^ (y >> 33)) * _PY["FM1"]) & _M64
    y = ((y ^ (y >> 33)) * _PY["FM2"]) & _M64
    return a, y ^ (y >> 33)


def _hash_example_py(x: list[int], spans: Sequence[tuple[int, int]]) -> tuple[list[int], ...]:
    """Keys of one example's prediction positions with Python ints: ``(sup_hi, sup_lo, clm_hi, clm_lo)`` lists."""
    out: tuple[list[int], ...] = ([], [], [], [])
    a, b, j = _PY["A0"], _PY["B0"], 0  # hash of x[:j]
    for start, end in spans:
        start, end = int(start), int(end)
        ca, cb = _PY["A0"], _PY["B0"]
        for t in range(start - 1, end - 1):
            while j <= t:
                a, b = _hash_step_py(a, b, x[j])
                j += 1
            if t >= start:
                ca, cb = _hash_step_py(ca, cb, x[t])
            for lane, value in zip(out, (a, b, ca, cb), strict=True):
                lane.append(value)
    return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[k], starts[k] + lens[k])`` over k, as int64 (vectorised)."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lens) - lens
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lens) + np.arange(total, dtype=np.int64)


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


# ----------------------------------------------------------------------------------------------------------- tables
@dataclass
class NDPTables:
    """Resolved NDP rows of every prediction position, as CSR arrays (layout in the module docstring).

    Attributes:
        example_ptr: int64 ``[N + 1]`` offsets of each example's positions.
        sup_ptr, sup_tok, sup_cnt: supervised rows; int64 ``[P + 1]``, int32 ``[E_sup]``, int32 ``[E_sup]``.
        clm_ptr, clm_tok, clm_cnt: resolved CLM rows (fallback to the sup row applied); same dtypes.
        stats: build statistics (``n_examples``, ``n_positions``, ``sup_keys``, ``clm_keys``, ``sup_entries``,
            ``clm_entries``, ``frac_multi_sup``, ``frac_multi_clm``, ``tokens_per_s_count``,
            ``tokens_per_s_lookup``, ``peak_rss_mb``, ``backend``, ``min_prefix``, ...).
        meta: the caller's meta (tokenizer, template hash, ...) after :meth:`load`; empty after :func:`build_tables`.
    """

    example_ptr: np.ndarray
    sup_ptr: np.ndarray
    sup_tok: np.ndarray
    sup_cnt: np.ndarray
    clm_ptr: np.ndarray
    clm_tok: np.ndarray
    clm_cnt: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return len(self.example_ptr) - 1

    @property
    def n_positions(self) -> int:
        return int(self.example_ptr[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The 7 CSR arrays by name (the contents of ``targets.npz``)."""
        return {name: getattr(self, name) for name in _ARRAYS}

    def example_rows(self, i: int) -> dict[str, np.ndarray]:
        """Rows of example ``i``: ``sup_ptr``/``clm_ptr`` int64 ``[P_i + 1]`` rebased to start at 0, and
        ``sup_tok``/``sup_cnt``/``clm_tok``/``clm_cnt`` int32 (views where possible).

        Raises:
            IndexError: ``i`` outside ``[-N, N)``.
        """
        n = self.n_examples
        if not -n <= i < n:
            raise IndexError(f"example index {i} out of range for NDP tables with {n} examples")
        i %= n
        p0, p1 = int(self.example_ptr[i]), int(self.example_ptr[i + 1])
        out: dict[str, np.ndarray] = {}
        for table in ("sup", "clm"):
            ptr = getattr(self, f"{table}_ptr")[p0:p1 + 1]
            e0, e1 = int(ptr[0]), int(ptr[-1])
            out[f"{table}_ptr"] = ptr - e0
            out[f"{table}_tok"] = getattr(self, f"{table}_tok")[e0:e1]
            out[f"{table}_cnt"] = getattr(self, f"{table}_cnt")[e0:e1]
        return out

    def validate(self, vocab_size: int | None = None, source: str = "NDP tables") -> None:
        """Check the CSR invariants (spec section 11); ``source`` names the file or builder in messages.

        Raises:
            ValueError: wrong dtype/rank; ``example_ptr`` not starting at 0, decreasing or inconsistent with the
                row arrays; a ``ptr`` that decreases, an empty row, a count <= 0, a token id < 0 or >= ``vocab_size``,
                or tokens not strictly ascending within a row (all but the first give the example index).
        """
        for name, dtype in _ARRAYS.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != dtype:
                got = f"{arr.dtype}{list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"{source}: array {name!r} must be 1-D {np.dtype(dtype)}, got {got}")
        ex = self.example_ptr
        if len(ex) == 0 or ex[0] != 0:
            raise ValueError(f"{source}: example_ptr must start at 0 (got {ex[:1].tolist()})")
        bad = np.flatnonzero(np.diff(ex) < 0)
        if len(bad):
            raise ValueError(f"{source}: example_ptr decreases at example {int(bad[0])}")
        n_pos = int(ex[-1])
        for table in ("sup", "clm"):
            ptr, tok, cnt = (getattr(self, f"{table}_{k}") for k in ("ptr", "tok", "cnt"))
            if len(ptr) != n_pos + 1:
                raise ValueError(f"{source}: {table}_ptr has {len(ptr)} entries but example_ptr ends at {n_pos} "
                                 f"positions (expected {n_pos + 1})")
            if len(tok) != len(cnt):
                raise ValueError(f"{source}: {table}_tok has {len(tok)} entries but {table}_cnt has {len(cnt)}")
            if ptr[0] != 0 or ptr[-1] != len(tok):
                raise ValueError(f"{source}: {table}_ptr must run from 0 to {len(tok)} (the {table}_tok length), "
                                 f"got {int(ptr[0])}..{int(ptr[-1])}")
            lens = np.diff(ptr)

            def example_of_pos(p: int) -> int:
                return int(np.searchsorted(ex, p, side="right") - 1)

            def example_of_entry(e: int, ptr: np.ndarray = ptr) -> int:
                return example_of_pos(int(np.searchsorted(ptr, e, side="right") - 1))

            bad = np.flatnonzero(lens < 0)
            if len(bad):
                raise ValueError(f"{source}: {table}_ptr decreases at position {int(bad[0])} "
                                 f"(example {example_of_pos(int(bad[0]))})")
            bad = np.flatnonzero(lens == 0)
            if len(bad):
                raise ValueError(f"{source}: empty {table} row at position {int(bad[0])} "
                                 f"(example {example_of_pos(int(bad[0]))})")
            bad = np.flatnonzero(cnt <= 0)
            if len(bad):
                e = int(bad[0])
                raise ValueError(f"{source}: {table}_cnt has count {int(cnt[e])} <= 0 at entry {e} "
                                 f"(example {example_of_entry(e)})")
            bad = np.flatnonzero((tok < 0) | ((tok >= vocab_size) if vocab_size is not None else False))
            if len(bad):
                e = int(bad[0])
                raise ValueError(f"{source}: {table}_tok has token id {int(tok[e])} outside [0, vocab_size="
                                 f"{vocab_size}) at entry {e} (example {example_of_entry(e)})")
            if len(tok) > 1:
                row_start = np.zeros(len(tok), dtype=bool)
                row_start[ptr[:-1][lens > 0]] = True
                bad = np.flatnonzero((np.diff(tok) <= 0) & ~row_start[1:])
                if len(bad):
                    e = int(bad[0]) + 1
                    raise ValueError(f"{source}: {table}_tok not strictly ascending within a row at entry {e} "
                                     f"(example {example_of_entry(e)})")

    # ------------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path, meta: dict[str, Any]) -> Path:
        """Write ``targets.npz`` then ``meta.json`` (``meta`` + ``stats`` + ``format_version``) atomically.

        An existing ``meta.json`` is removed first, so a reader never pairs new arrays with old meta.

        Returns:
            The directory.

        Raises:
            ValueError: ``meta`` uses the reserved keys ``stats`` or ``format_version``, or is not JSON-serialisable.
        """
        directory = Path(directory)
        reserved = {"stats", "format_version"} & set(meta)
        if reserved:
            raise ValueError(f"NDP meta must not contain the reserved keys {sorted(reserved)}")
        doc = {**meta, "format_version": FORMAT_VERSION, "stats": self.stats}
        try:
            text = json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n"
        except TypeError as exc:
            raise ValueError(f"NDP meta/stats are not JSON-serialisable: {exc}") from exc
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        arrays = self.arrays()
        atomic_write(directory / TARGETS_FILE, lambda fh: np.savez(fh, **arrays))
        atomic_write(directory / META_FILE, text)
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected: dict[str, Any] | None = None,
             vocab_size: int | None = None) -> NDPTables:
        """Load and validate tables written by :meth:`save`.

        Args:
            directory: the table directory.
            expected: fields the run requires (tokenizer, vocab size, template hash, ``max_length``, ``min_prefix``,
                training-file hash, ...), compared with ``meta.json`` (top level first, then ``stats``) after a
                JSON round trip (so tuples equal lists).
            vocab_size: the model's vocabulary size; token ids must be below it (default: ``meta['vocab_size']``
                or ``stats['vocab_size']`` when present).

        Returns:
            The tables, with ``meta`` (top-level fields) and ``stats`` from ``meta.json``.

        Raises:
            FileNotFoundError: the directory, ``targets.npz`` or ``meta.json`` is missing (says to run
                ``scripts/build_ndp_tables.py``).
            ValueError: unreadable ``meta.json``; ``format_version`` mismatch; an ``expected`` field missing or
                different (naming the field and both values); a corrupt or truncated ``targets.npz`` (bad zip,
                missing arrays, wrong dtypes or lengths); any :meth:`validate` failure.
        """
        directory = Path(directory)
        meta_path, npz_path = directory / META_FILE, directory / TARGETS_FILE
        for path in (directory, meta_path, npz_path):
            if not path.exists():
                raise FileNotFoundError(f"NDP tables not found: {path} does not exist; {_BUILD_HINT} "
                                        f"(--out {directory})")
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {meta_path}: {exc}; {_BUILD_HINT}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(doc).__name__}")  # noqa: TRY004
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {version!r} but this code reads version {FORMAT_VERSION};"
                             f" {_BUILD_HINT}")
        stats = doc.pop("stats", None) or {}
        doc.pop("format_version")
        for key, want in (expected or {}).items():
            if key in doc:
                have = doc[key]
            elif key in stats:
                have = stats[key]
            else:
                raise ValueError(f"NDP tables at {directory} lack the field {key!r} in {meta_path} (this run uses "
                                 f"{key}={want!r}); {_BUILD_HINT}")
            want_norm = json.loads(json.dumps(want, default=_json_default))
            if have != want_norm:
                raise ValueError(f"NDP tables at {directory} were built with {key}={have!r} but this run uses "
                                 f"{key}={want!r}; rebuild them (scripts/build_ndp_tables.py)")
        arrays = _read_npz(npz_path)
        tables = cls(**arrays, stats=stats, meta=doc)
        if vocab_size is None:
            vocab_size = doc.get("vocab_size", stats.get("vocab_size"))
        tables.validate(vocab_size=vocab_size, source=str(npz_path))
        return tables


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and check the 7 arrays of ``targets.npz``; any decoding problem is a ValueError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in _ARRAYS if name not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing} (found {sorted(npz.files)}); {_BUILD_HINT}")
            arrays = {name: npz[name] for name in _ARRAYS}
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: corrupt or truncated NDP targets file ({exc}); {_BUILD_HINT}") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: corrupt or truncated NDP targets file ({type(exc).__name__}: {exc}); "
                         f"{_BUILD_HINT}") from exc
    return arrays


# ----------------------------------------------------------------------------------------------------- building
def build_tables(input_ids: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]], *, vocab_size: int,
                 min_prefix: int = 0, mono_docs: Iterable[Sequence[int]] = (), mono_max_prefix: int = -1,
                 backend: Literal["hash128", "trie"] = "hash128", progress: bool = False) -> NDPTables:
    """Build the supervised and CLM tables and resolve every prediction position's rows (spec sections 3-4).

    Args:
        input_ids: per example, its token ids (any int sequence or 1-D integer array).
        spans: per example, ascending non-overlapping ``(start, end)`` answer ranges, ``1 <= start <= end <= len``.
        vocab_size: every token id (training and mono) must lie in ``[0, vocab_size)``; at most ``2**31 - 1``.
        min_prefix: minimum answer-prefix length counted into / looked up in the CLM table (the repo's ``--ngram``;
            0 pools the empty prefix, i.e. every region's first answer token, across examples; pitfall 5).
        mono_docs: raw token documents added to the CLM table (consumed once, in chunks; may be a generator).
        mono_max_prefix: longest mono prefix recorded; -1 means the longest training example length + 5.
        backend: ``hash128`` (default; memory only for prediction positions) or ``trie`` (exact).
        progress: show tqdm progress bars.

    Returns:
        :class:`NDPTables` (``meta`` empty) whose ``stats`` hold ``n_examples``, ``n_positions``, ``n_tokens``,
        ``sup_keys``, ``clm_keys``, ``sup_entries``, ``clm_entries`` (distinct (key, token) pairs),
        ``frac_multi_sup``/``frac_multi_clm`` (share of positions whose row has > 1 token), ``mono_docs``,
        ``mono_tokens``, ``mono_entries``, ``mono_max_prefix`` (resolved), ``tokens_per_s_count`` (training + mono
        tokens / pass-1 seconds), ``tokens_per_s_lookup`` (training tokens / pass-2 seconds), ``seconds_count``,
        ``seconds_lookup``, ``peak_rss_mb``, ``backend``, ``min_prefix``, ``vocab_size``.

    Raises:
        ValueError: unknown ``backend``; ``min_prefix`` < 0; ``mono_max_prefix`` < -1; bad ``vocab_size``;
            ``input_ids``/``spans`` of different lengths; a non-1-D example; a bad span (giving the example index);
            a token id outside ``[0, vocab_size)`` (giving the example or mono document index); a failed
            :meth:`NDPTables.validate` of the result.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if isinstance(min_prefix, bool) or not isinstance(min_prefix, (int, np.integer)) or min_prefix < 0:
        raise ValueError(f"min_prefix must be an integer >= 0, got {min_prefix!r}")
    if isinstance(mono_max_prefix, bool) or not isinstance(mono_max_prefix, (int, np.integer)) or mono_max_prefix < -1:
        raise ValueError(f"mono_max_prefix must be an integer >= -1 (-1: longest training length + 5), "
                         f"got {mono_max_prefix!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size < 2**31:
        raise ValueError(f"vocab_size must be an integer in [1, 2**31), got {vocab_size!r}")
    if len(input_ids) != len(spans):
        raise ValueError(f"input_ids has {len(input_ids)} examples but spans has {len(spans)}")
    min_prefix, vocab_size = int(min_prefix), int(vocab_size)

    # ---- layout of the prediction positions (shared by both backends)
    t0 = time.perf_counter()
    examples, lens, span_ex, span_start, span_end = _check_examples(input_ids, spans, vocab_size)
    n = len(examples)
    span_len = span_end - span_start
    n_pos_ex = np.bincount(span_ex, weights=span_len, minlength=n).astype(np.int64) if n else np.zeros(0, np.int64)
    example_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_pos_ex, out=example_ptr[1:])
    n_positions = int(example_ptr[-1])
    pos_start = np.repeat(span_start, span_len)
    pos_t = _ranges(span_start - 1, span_len)  # 0-based position t (predicts x[t + 1])
    pos_len = pos_t - pos_start + 1  # answer-prefix length L
    nxt = np.empty(n_positions, dtype=np.int32)
    for i, x in enumerate(examples):
        p0, p1 = example_ptr[i], example_ptr[i + 1]
        if p1 > p0:
            nxt[p0:p1] = x[pos_t[p0:p1] + 1]
    max_len = int(lens.max()) if n else 0
    mono_max = max_len + 5 if mono_max_prefix == -1 else int(mono_max_prefix)

    # ---- pass 1: one (key, next token) entry per counted position
    if backend == "hash128":
        sup_key, clm_key = _hash_positions(examples, spans, example_ptr, span_ex, span_start, pos_t, pos_len, progress)
        mono = _hash_mono(mono_docs, min_prefix, mono_max, vocab_size, progress)
    else:
        children: dict[int, int] = {}
        sup_key, clm_key = _trie_positions(examples, spans, example_ptr, children, progress)
        mono = _trie_mono(mono_docs, min_prefix, mono_max, vocab_size, children, progress)
        n_nodes = len(children) + 1
        del children
    mono_key, mono_tok, mono_docs_n, mono_tokens = mono
    counted = pos_len >= min_prefix
    del examples, pos_t, pos_start, pos_len, mono  # free before the aggregation peaks
    t1 = time.perf_counter()

    # ---- pass 2: aggregate into rows and resolve each position's rows
    sup_gid, sup_gptr, sup_ptok, sup_pcnt = _aggregate(sup_key, nxt)
    del sup_key
    clm_keys_all = [np.concatenate([k[counted], m]) for k, m in zip(clm_key, mono_key, strict=True)]
    clm_tok_all = np.concatenate([nxt[counted], mono_tok])
    del clm_key, mono_key, nxt
    clm_gid, clm_gptr, clm_ptok, clm_pcnt = _aggregate(clm_keys_all, clm_tok_all)
    del clm_keys_all, clm_tok_all
    sup_glen = np.diff(sup_gptr)
    clm_glen = np.diff(clm_gptr)
    # sup row of position p = group sup_gid[p] (every position is counted into the sup table)
    row_sup_start, row_sup_len = sup_gptr[:-1][sup_gid], sup_glen[sup_gid]
    # clm row: own group when counted (then it exists and is non-empty), else the sup row (fallback)
    n_sup_pairs = len(sup_ptok)
    row_clm_start, row_clm_len = row_sup_start.copy(), row_sup_len.copy()
    own = clm_gid[: int(counted.sum())]
    row_clm_start[counted] = clm_gptr[:-1][own] + n_sup_pairs
    row_clm_len[counted] = clm_glen[own]
    pool_tok = np.concatenate([sup_ptok, clm_ptok])
    pool_cnt = np.concatenate([sup_pcnt, clm_pcnt])
    sup_ptr, clm_ptr = (np.concatenate([[0], np.cumsum(ln)]).astype(np.int64) for ln in (row_sup_len, row_clm_len))
    sup_idx, clm_idx = _ranges(row_sup_start, row_sup_len), _ranges(row_clm_start, row_clm_len)
    tables = NDPTables(example_ptr=example_ptr, sup_ptr=sup_ptr, sup_tok=sup_ptok[sup_idx],
                       sup_cnt=sup_pcnt[sup_idx], clm_ptr=clm_ptr, clm_tok=pool_tok[clm_idx], clm_cnt=pool_cnt[clm_idx])
    t2 = time.perf_counter()

    n_tokens = int(lens.sum())
    stats: dict[str, Any] = {
        "backend": backend,
        "min_prefix": min_prefix,
        "vocab_size": vocab_size,
        "n_examples": n,
        "n_positions": n_positions,
        "n_tokens": n_tokens,
        "max_example_length": max_len,
        "sup_keys": len(sup_glen),
        "clm_keys": len(clm_glen),
        "sup_entries": len(sup_ptok),
        "clm_entries": len(clm_ptok),
        "frac_multi_sup": float((row_sup_len > 1).mean()) if n_positions else 0.0,
        "frac_multi_clm": float((row_clm_len > 1).mean()) if n_positions else 0.0,
        "mono_docs": mono_docs_n,
        "mono_tokens": mono_tokens,
        "mono_entries": len(mono_tok),
        "mono_max_prefix": mono_max,
        "seconds_count": round(t1 - t0, 4),
        "seconds_lookup": round(t2 - t1, 4),
        "tokens_per_s_count": round((n_tokens + mono_tokens) / max(t1 - t0, 1e-9), 1),
        "tokens_per_s_lookup": round(n_tokens / max(t2 - t1, 1e-9), 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if backend == "trie":
        stats["trie_nodes"] = n_nodes
    tables.stats = stats
    tables.validate(vocab_size=vocab_size, source=f"build_tables(backend={backend!r})")
    return tables


def _check_examples(input_ids: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]],
                    vocab_size: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Convert the examples to int64 arrays and flatten/validate their spans.

    Returns:
        (examples, lens int64 [N], span_ex int64 [S], span_start int64 [S], span_end int64 [S]) over the non-empty
        spans, in example then span order.
    """
    examples: list[np.ndarray] = []
    lens = np.zeros(len(input_ids), dtype=np.int64)
    s_ex: list[int] = []
    s_start: list[int] = []
    s_end: list[int] = []
    for i, (ids, sp) in enumerate(zip(input_ids, spans, strict=True)):
        x = np.asarray(ids)
        if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"example {i}: input_ids must be a 1-D integer sequence, got shape {x.shape} "
                             f"dtype {x.dtype}")
        x = x.astype(np.int64, copy=False)
        if x.size and (x.min() < 0 or x.max() >= vocab_size):
            bad = int(x[(x < 0) | (x >= vocab_size)][0])
            raise ValueError(f"example {i}: token id {bad} outside [0, vocab_size={vocab_size})")
        examples.append(x)
        lens[i] = len(x)
        prev_end = 1
        for k, span in enumerate(sp):
            try:
                start, end = (int(v) for v in span)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"example {i}: span {k} must be a (start, end) pair of ints, got {span!r}") from exc
            if not (prev_end <= start <= end <= len(x)):
                raise ValueError(f"example {i}: span {k} = [{start}, {end}) must satisfy "
                                 f"{prev_end} <= start <= end <= {len(x)} (ascending, non-overlapping, start >= 1, "
                                 "inside the example)")
            prev_end = end
            if end > start:
                s_ex.append(i)
                s_start.append(start)
                s_end.append(end)
    return examples, lens, *(np.asarray(v, dtype=np.int64) for v in (s_ex, s_start, s_end))


def _aggregate(keys: list[np.ndarray], tok: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group ``(key, token)`` entries into count rows.

    Args:
        keys: key lanes, ``[node]`` int64 ``[M]`` (trie) or ``[hi, lo]`` uint64 ``[M]`` (hash128).
        tok: int32 ``[M]`` next tokens.

    Returns:
        ``gid`` int64 ``[M]`` (row of each entry; rows ordered by key), ``gptr`` int64 ``[G + 1]`` (offsets into the
        pairs), ``pair_tok`` int32 and ``pair_cnt`` int32 ``[E]`` (distinct tokens of each row, ascending, and their
        counts).
    """
    lanes = list(keys)
    m = len(tok)
    if m == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
    order = np.lexsort([tok, *reversed(lanes)])
    tok_s = tok[order]
    new_key = np.zeros(m, dtype=bool)
    new_key[0] = True
    for lane in lanes:
        lane_s = lane[order]
        new_key[1:] |= lane_s[1:] != lane_s[:-1]
        del lane_s
    new_pair = new_key.copy()
    new_pair[1:] |= tok_s[1:] != tok_s[:-1]
    pair_at = np.flatnonzero(new_pair)
    pair_tok = tok_s[pair_at].astype(np.int32)
    pair_cnt = np.diff(np.append(pair_at, m)).astype(np.int32)
    gptr = np.append(np.flatnonzero(new_key[pair_at]), len(pair_at)).astype(np.int64)
    gid = np.empty(m, dtype=np.int64)
    gid[order] = np.cumsum(new_key) - 1
    return gid, gptr, pair_tok, pair_cnt


# ---------------------------------------------------------------------------------------------------- hash128
def _hash_positions(examples: list[np.ndarray], spans: Sequence[Sequence[tuple[int, int]]], example_ptr: np.ndarray,
                    span_ex: np.ndarray, span_start: np.ndarray, pos_t: np.ndarray, pos_len: np.ndarray,
                    progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pass 1 of ``hash128``: the 128-bit sup and CLM keys of every prediction position.

    Examples are processed in chunks of similar length (a padded ``[rows, width]`` uint64 matrix) and hashed column
    by column, so the Python work is per column, not per token. The last few (longest) examples, too few to fill a
    chunk, are hashed one by one with Python ints (:func:`_hash_step_py`, bit-identical).

    Returns:
        ``([sup_hi, sup_lo], [clm_hi, clm_lo])``, uint64 ``[P]`` each.
    """
    n_pos = int(example_ptr[-1])
    sup = [np.empty(n_pos, dtype=np.uint64) for _ in range(2)]
    clm = [np.empty(n_pos, dtype=np.uint64) for _ in range(2)]
    # only examples with positions matter; hash each up to its last prediction position
    n_pos_ex = np.diff(example_ptr)
    need = np.zeros(len(examples), dtype=np.int64)  # tokens to hash = last t + 1
    if n_pos:
        last_p = example_ptr[1:][n_pos_ex > 0] - 1
        need[n_pos_ex > 0] = pos_t[last_p] + 1
    todo = np.flatnonzero(need > 0)
    todo = todo[np.argsort(need[todo], kind="stable")]
    span_first = np.searchsorted(span_ex, np.arange(len(examples) + 1))  # spans of example i: [first[i], first[i+1])
    bar = tqdm(total=len(examples), desc="ndp pass 1 (hash128)", unit="ex", disable=not progress)
    bar.update(len(examples) - len(todo))
    k = 0
    with np.errstate(over="ignore"):
        while k < len(todo):
            # largest row count r with r * (width of the r-th row) <= budget (widths ascend), at least 16
            cand = need[todo[k:k + max(16, _CHUNK_CELLS // int(need[todo[k]]))]]
            rows = max(16, int(np.count_nonzero(cand * np.arange(1, len(cand) + 1) <= _CHUNK_CELLS)))
            chunk = todo[k:k + rows]
            k += len(chunk)
            if len(chunk) < _MIN_ROWS:
                for i in chunk:
                    p0, p1 = int(example_ptr[i]), int(example_ptr[i + 1])
                    keys = _hash_example_py(examples[i].tolist(), spans[i])
                    for lane, values in zip((*sup, *clm), keys, strict=True):
                        lane[p0:p1] = values
                bar.update(len(chunk))
                continue
            width = int(need[chunk[-1]])
            x = np.zeros((len(chunk), width), dtype=np.uint64)
            reset = np.zeros((len(chunk), width), dtype=bool)
            for r, i in enumerate(chunk):
                x[r, :need[i]] = examples[i][:need[i]]
                starts = span_start[span_first[i]:span_first[i + 1]]
                reset[r, starts[starts < width]] = True
            sup_a, sup_b, clm_a, clm_b = (np.empty((len(chunk), width), dtype=np.uint64) for _ in range(4))
            a, b = np.full(len(chunk), _A0), np.full(len(chunk), _B0)
            ca, cb = a.copy(), b.copy()
            for j in range(width):
                col = x[:, j]
                a, b = _hash_step(a, b, col)
                sup_a[:, j], sup_b[:, j] = a, b
                rj = reset[:, j]
                ca, cb = _hash_step(np.where(rj, _A0, ca), np.where(rj, _B0, cb), col)
                clm_a[:, j], clm_b[:, j] = ca, cb
            gp = _ranges(example_ptr[chunk], n_pos_ex[chunk])
            r, t = np.repeat(np.arange(len(chunk)), n_pos_ex[chunk]), pos_t[gp]
            empty = pos_len[gp] == 0
            sup[0][gp], sup[1][gp] = sup_a[r, t], sup_b[r, t]
            clm[0][gp] = np.where(empty, _A0, clm_a[r, t])
            clm[1][gp] = np.where(empty, _B0, clm_b[r, t])
            bar.update(len(chunk))
    bar.close()
    return sup, clm


def _mono_chunks(mono_docs: Iterable[Sequence[int]], keep: int, vocab_size: int) -> Iterator[list[np.ndarray]]:
    """Yield lists of validated int64 mono documents cut to their first ``keep`` tokens (~``_CHUNK_CELLS`` cells)."""
    chunk: list[np.ndarray] = []
    width = 0
    for d, doc in enumerate(mono_docs):
        x = np.asarray(doc)
        if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"mono document {d}: must be a 1-D integer sequence, got shape {x.shape} dtype {x.dtype}")
        x = x[:keep].astype(np.int64, copy=False)
        if x.size and (x.min() < 0 or x.max() >= vocab_size):
            bad = int(x[(x < 0) | (x >= vocab_size)][0])
            raise ValueError(f"mono document {d}: token id {bad} outside [0, vocab_size={vocab_size})")
        chunk.append(x)
        width = max(width, len(x))
        if len(chunk) * width >= _CHUNK_CELLS:
            yield chunk
            chunk, width = [], 0
    if chunk:
        yield chunk


def _hash_mono(mono_docs: Iterable[Sequence[int]], min_prefix: int, mono_max: int, vocab_size: int,
               progress: bool) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    """Pass 1 of ``hash128`` for the mono corpus: entries ``(hash(d[:L]), d[L])`` for
    ``min_prefix <= L <= mono_max``.

    Returns:
        ``([hi, lo] uint64 [M], tok int32 [M], documents, tokens read)``.
    """
    his: list[np.ndarray] = []
    los: list[np.ndarray] = []
    toks: list[np.ndarray] = []
    n_docs = n_tokens = 0
    bar = tqdm(desc="ndp pass 1 (mono)", unit="doc", disable=not progress)
    with np.errstate(over="ignore"):
        for chunk in _mono_chunks(mono_docs, mono_max + 1, vocab_size):
            n_docs += len(chunk)
            bar.update(len(chunk))
            dl = np.array([len(x) for x in chunk], dtype=np.int64)
            n_tokens += int(dl.sum())
            width = int(dl.max())
            if width <= min_prefix:
                continue
            x = np.zeros((len(chunk), width), dtype=np.uint64)
            for r, doc in enumerate(chunk):
                x[r, :len(doc)] = doc
            key_a = np.empty((len(chunk), width), dtype=np.uint64)  # key_a[:, L] = hash of d[:L]
            key_b = np.empty_like(key_a)
            a, b = np.full(len(chunk), _A0), np.full(len(chunk), _B0)
            key_a[:, 0], key_b[:, 0] = a, b
            for j in range(width - 1):
                a, b = _hash_step(a, b, x[:, j])
                key_a[:, j + 1], key_b[:, j + 1] = a, b
            ell = np.arange(width)
            mask = (ell[None, :] >= min_prefix) & (ell[None, :] < dl[:, None])
            his.append(key_a[mask])
            los.append(key_b[mask])
            toks.append(x[mask].astype(np.int32))
    bar.close()
    if not toks:
        return [np.zeros(0, np.uint64), np.zeros(0, np.uint64)], np.zeros(0, np.int32), n_docs, n_tokens
    return [np.concatenate(his), np.concatenate(los)], np.concatenate(toks), n_docs, n_tokens


# ------------------------------------------------------------------------------------------------------- trie
def _trie_positions(examples: list[np.ndarray], spans: Sequence[Sequence[tuple[int, int]]], example_ptr: np.ndarray,
                    children: dict[int, int], progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pass 1 of ``trie``: the node ids of every position's full prefix and answer prefix (root = 0).

    ``children`` maps ``parent << 32 | token`` to a child id and is filled in place; nodes are created only along
    prefixes that end at or before a prediction position.

    Returns:
        ``([sup_key], [clm_key])``, int64 ``[P]`` each (one key lane).
    """
    n_pos = int(example_ptr[-1])
    sup_key = np.empty(n_pos, dtype=np.int64)
    clm_key = np.empty(n_pos, dtype=np.int64)
    for i in tqdm(range(len(examples)), desc="ndp pass 1 (trie)", unit="ex", disable=not progress):
        p0, p1 = int(example_ptr[i]), int(example_ptr[i + 1])
        if p1 == p0:
            continue
        x = examples[i].tolist()
        sup_nodes: list[int] = []
        clm_nodes: list[int] = []
        node, j = 0, 0  # node = prefix x[:j]
        for start, end in spans[i]:
            start, end = int(start), int(end)
            if end <= start:
                continue
            cnode = 0
            for t in range(start - 1, end - 1):
                while j <= t:
                    key = node << 32 | x[j]
                    child = children.get(key)
                    if child is None:
                        child = children[key] = len(children) + 1
                    node, j = child, j + 1
                sup_nodes.append(node)
                if t >= start:
                    key = cnode << 32 | x[t]
                    child = children.get(key)
                    if child is None:
                        child = children[key] = len(children) + 1
                    cnode = child
                clm_nodes.append(cnode)
        sup_key[p0:p1] = sup_nodes
        clm_key[p0:p1] = clm_nodes
    return [sup_key], [clm_key]


def _trie_mono(mono_docs: Iterable[Sequence[int]], min_prefix: int, mono_max: int, vocab_size: int,
               children: dict[int, int], progress: bool) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    """Pass 1 of ``trie`` for the mono corpus (same entries as :func:`_hash_mono`, keyed by node id).

    Returns:
        ``([node int64 [M]], tok int32 [M], documents, tokens read)``.
    """
    keys: list[int] = []
    toks: list[int] = []
    n_docs = n_tokens = 0
    bar = tqdm(desc="ndp pass 1 (mono)", unit="doc", disable=not progress)
    for chunk in _mono_chunks(mono_docs, mono_max + 1, vocab_size):
        n_docs += len(chunk)
        bar.update(len(chunk))
        for doc in chunk:
            d = doc.tolist()
            n_tokens += len(d)
            node = 0  # prefix d[:L]
            for ell in range(len(d)):
                if ell >= min_prefix:
                    keys.append(node)
                    toks.append(d[ell])
                if ell + 1 < len(d):
                    key = node << 32 | d[ell]
                    child = children.get(key)
                    if child is None:
                        child = children[key] = len(children) + 1
                    node = child
    bar.close()
    return [np.asarray(keys, dtype=np.int64)], np.asarray(toks, dtype=np.int32), n_docs, n_tokens
