"""Pure building blocks of the forgetting curve (no Lightning): length grid, copy/LM pairs, scoring, statistics, plots.

Method: Liu et al., *Forgetting Curve: A Reliable Method for Evaluating Memorization Capability for Long-context
Models*, EMNLP 2024, arXiv 2410.04727. Official code: ``1azybug/ForgettingCurve`` at commit ``e3b76dc`` (``draw.py``).
Project spec: ``shared/methods/forgetting_curve.md`` (section numbers below refer to it).

For a dependency length ``L`` every input has ``T = 2L + 3`` tokens:

* copy input ``[bos] + X + [bos] + X + [eos]`` (the target span X has appeared ``L + 1`` positions earlier);
* LM input ``[bos] + Y + [bos] + X + [eos]`` (an unrelated prefix Y of the same length).

Only the last ``h`` tokens of the second X are scored (``h = ceil(L/2)`` by default, the official
``src[-length//2:]``), with teacher-forced greedy predictions: the prediction for the token at position ``t`` is
``argmax logits[t - 1]``. Per length, the paired copy/LM accuracies of R repeats go through a two-sided paired t-test;
the fine-grained memory length is the largest L whose copy accuracy reaches 0.99, the coarse-grained one the largest L
whose copy accuracy is significantly above the LM accuracy (spec Step 6).

Statistics use numpy/scipy, plots matplotlib (Agg canvas, no pyplot state); torch only for the tensor functions.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_models.fileio import atomic_write

__all__ = [
    "build_pair",
    "load_results",
    "make_lengths",
    "memory_lengths",
    "num_scored",
    "paired_stats",
    "plot_comparison",
    "plot_curve",
    "scored_positions",
    "teacher_forced_acc",
    "validate_lengths",
]

_SCORE_HALVES = ("ceil", "floor")


# --------------------------------------------------------------------------------------------------------------------
# Step 2: length grid
# --------------------------------------------------------------------------------------------------------------------


def validate_lengths(lengths: Sequence[int]) -> list[int]:
    """Check an explicit list of dependency lengths (spec Step 2, pitfall 11) and return it as Python ints.

    Raises:
        ValueError: naming ``lengths`` and the offending value when the list is empty, a value is not an integer, a
            value is < 2 (``num_scored`` needs L >= 2), or the list is not strictly increasing (unsorted or duplicated).
    """
    if isinstance(lengths, (str, bytes)) or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty list of integers >= 2, got {lengths!r}")
    out: list[int] = []
    for i, value in enumerate(lengths):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"lengths[{i}] = {value!r} is not an integer")  # noqa: TRY004 (spec: ValueError)
        v = int(value)
        if v < 2:
            raise ValueError(f"lengths[{i}] = {v} is < 2 (at least 2 tokens are needed to score half a span)")
        if out and v == out[-1]:
            raise ValueError(f"lengths[{i}] = {v} is duplicated; lengths must be strictly increasing")
        if out and v < out[-1]:
            raise ValueError(f"lengths[{i}] = {v} is smaller than lengths[{i - 1}] = {out[-1]}; lengths must be sorted")
        out.append(v)
    return out


def make_lengths(test_max_length: int, granularity: int, granularity_type: str = "linear", start: int = 8) -> list[int]:
    """The official length grid (spec Step 2) as a list of Python ints.

    * ``"linear"``: ``numpy.linspace(start, test_max_length, granularity, dtype=int)``;
    * ``"log"``: ``numpy.unique(numpy.geomspace(start, test_max_length, granularity, dtype=int))`` (``unique`` drops the
      duplicates that integer truncation creates, so a log grid may have fewer than ``granularity`` points).

    Example: ``make_lengths(16000, 32)`` starts ``8, 523, 1039, 1555, ...`` and ends at 16000.

    Raises:
        ValueError: naming ``granularity`` (< 1, or so large that the linear grid repeats a length),
            ``granularity_type`` (not ``linear``/``log``) or ``test_max_length`` (< ``start``); naming ``start`` when
            it is < 2.
    """
    if isinstance(granularity, bool) or not isinstance(granularity, (int, np.integer)) or granularity < 1:
        raise ValueError(f"granularity must be an integer >= 1, got {granularity!r}")
    if granularity_type not in ("linear", "log"):
        raise ValueError(f"granularity_type must be 'linear' or 'log', got {granularity_type!r}")
    if start < 2:
        raise ValueError(f"start must be >= 2, got {start}")
    if test_max_length < start:
        raise ValueError(f"test_max_length={test_max_length} is smaller than the first length start={start}")
    if granularity_type == "linear":
        grid = np.linspace(start, test_max_length, int(granularity), dtype=int)
    else:
        grid = np.unique(np.geomspace(start, test_max_length, int(granularity), dtype=int))
    lengths = [int(v) for v in grid]
    dup = next((v for a, v in itertools.pairwise(lengths) if v == a), None)
    if dup is not None:
        raise ValueError(
            f"granularity={granularity} is too fine for the range [{start}, {test_max_length}]: the linear grid repeats "
            f"length {dup}; lower granularity or use granularity_type='log'"
        )
    return lengths


# --------------------------------------------------------------------------------------------------------------------
# Steps 3-4: inputs and teacher-forced scoring
# --------------------------------------------------------------------------------------------------------------------


def num_scored(L: int, score_half: str = "ceil") -> int:
    """Number of scored tokens ``h`` at length ``L`` (spec Step 4, pitfall 5).

    ``"ceil"`` gives ``ceil(L/2)`` (official ``src[-length//2:]``, the default), ``"floor"`` gives ``floor(L/2)``; the
    two agree for even L. Example: ``num_scored(9) == 5``, ``num_scored(9, "floor") == 4``.

    Raises:
        ValueError: ``L`` < 2, or ``score_half`` not ``ceil``/``floor``.
    """
    if score_half not in _SCORE_HALVES:
        raise ValueError(f"score_half must be 'ceil' or 'floor', got {score_half!r}")
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 2:
        raise ValueError(f"length L must be an integer >= 2, got {L!r}")
    return (int(L) + 1) // 2 if score_half == "ceil" else int(L) // 2


def build_pair(x: Tensor, y: Tensor, bos_id: int, eos_id: int) -> tuple[Tensor, Tensor]:
    """Copy and LM inputs for one span (spec Step 3).

    Args:
        x: target span X, ``[L]`` or batched ``[B, L]``, integer dtype.
        y: LM prefix Y, same shape as ``x``.
        bos_id, eos_id: separator ids.

    Returns:
        ``(copy_ids, lm_ids)``, each ``[T]`` (or ``[B, T]``) with ``T = 2L + 3``, dtype and device of ``x``:
        ``copy = [bos] + X + [bos] + X + [eos]`` and ``lm = [bos] + Y + [bos] + X + [eos]``.

    Raises:
        ValueError: shapes of ``x`` and ``y`` differ, the tensors are not 1-D/2-D, or ``L`` is 0.
        TypeError: a non-integer dtype.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"x must be [L] or [B, L] with L >= 1, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"x and y must be integer token ids, got dtype {x.dtype}")
    y = y.to(dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    bos = torch.full((*lead, 1), bos_id, dtype=x.dtype, device=x.device)
    eos = torch.full((*lead, 1), eos_id, dtype=x.dtype, device=x.device)
    copy_ids = torch.cat([bos, x, bos, x, eos], dim=-1)
    lm_ids = torch.cat([bos, y, bos, x, eos], dim=-1)
    return copy_ids, lm_ids


def scored_positions(L: int, score_half: str = "ceil") -> Tensor:
    """Target positions ``t = L + 2 + j`` for ``j`` in ``[L - h, L - 1]`` (spec Step 4), a LongTensor ``[h]``.

    The prediction for target ``t`` is ``argmax logits[t - 1]``. Example: ``L = 5`` under ``ceil`` gives
    ``[9, 10, 11]`` (X[2..4] in the second copy).

    Raises:
        ValueError: as :func:`num_scored`.
    """
    h = num_scored(L, score_half)
    return torch.arange(2 * L + 2 - h, 2 * L + 2, dtype=torch.long)


def teacher_forced_acc(pred_ids: Tensor, ids: Tensor, L: int, score_half: str = "ceil") -> Tensor:
    """Teacher-forced accuracy on the scored half of the second span (spec Step 4).

    Args:
        pred_ids: greedy predictions ``argmax logits`` at every position, ``[B, T]`` or ``[T]``.
        ids: the inputs the predictions were made on, same shape, ``T = 2L + 3``.
        L: dependency length.
        score_half: ``"ceil"`` (official) or ``"floor"``.

    Returns:
        float64 accuracies ``[B]`` (0-dim for 1-D inputs): mean over scored ``t`` of ``pred_ids[..., t-1] == ids[..., t]``.

    Raises:
        ValueError: shapes differ, inputs not 1-D/2-D, or ``T != 2L + 3``; as :func:`num_scored` for ``L``/``score_half``.
    """
    if pred_ids.shape != ids.shape:
        raise ValueError(f"pred_ids and ids must have the same shape, got {tuple(pred_ids.shape)} and {tuple(ids.shape)}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"ids must be [T] or [B, T], got shape {tuple(ids.shape)}")
    t = scored_positions(L, score_half).to(ids.device)
    if ids.shape[-1] != 2 * L + 3:
        raise ValueError(f"ids have T={ids.shape[-1]} positions but length L={L} needs T = 2L + 3 = {2 * L + 3}")
    hits = pred_ids.index_select(-1, t - 1) == ids.index_select(-1, t)
    return hits.to(torch.float64).mean(dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Step 5: per-length statistics
# --------------------------------------------------------------------------------------------------------------------


def _finite_or_nan(x: Any) -> float:
    x = float(x)
    return x if math.isfinite(x) else float("nan")


def paired_stats(lm_accs: Sequence[float], copy_accs: Sequence[float]) -> dict[str, Any]:
    """Per-length statistics in the official schema (spec Step 5, pitfall 10).

    Returns a JSON-serialisable dict of plain Python values: ``lm_mean``, ``lm_std``, ``copy_mean``, ``copy_std``
    (population std, ``numpy.std`` with ddof 0), ``lm_accs``, ``copy_accs`` (lists of float), ``p_value`` (two-sided
    ``scipy.stats.ttest_rel(lm_accs, copy_accs).pvalue``; NaN, i.e. all differences zero, becomes 1.0; constant
    non-zero differences give 0.0) and ``normality`` = ``{"normality": both Shapiro-Wilk p > 0.05,
    "variance_homogeneity": Levene p > 0.05}`` (diagnostics only; False when a statistic is NaN or cannot be computed,
    e.g. n < 3). Only scipy's warnings about constant input and small samples are silenced.

    Raises:
        ValueError: the two lists differ in length or have fewer than 2 values (a paired t-test needs >= 2).
    """
    from scipy import stats

    lm = np.asarray([float(v) for v in lm_accs], dtype=np.float64)
    cp = np.asarray([float(v) for v in copy_accs], dtype=np.float64)
    if lm.shape != cp.shape:
        raise ValueError(f"lm_accs has {lm.size} values but copy_accs has {cp.size}; they must be paired")
    if lm.size < 2:
        raise ValueError(f"paired t-test needs >= 2 repeats, got {lm.size}")

    with warnings.catch_warnings():
        for category in (stats.ConstantInputWarning, stats.NearConstantInputWarning, stats.DegenerateDataWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message=r".*[Pp]recision loss occurred", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=r".*[Ii]nput data has range zero", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*sample arguments? is too small", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=r"(invalid value|divide by zero) encountered",
                                category=RuntimeWarning, module=r"scipy\.")
        p = float(stats.ttest_rel(lm, cp).pvalue)
        normal = var_homo = False
        if lm.size >= 3:
            try:
                p_sh = (_finite_or_nan(stats.shapiro(lm).pvalue), _finite_or_nan(stats.shapiro(cp).pvalue))
                normal = all(v > 0.05 for v in p_sh)  # NaN > 0.05 is False
            except ValueError:
                normal = False
            try:
                var_homo = _finite_or_nan(stats.levene(lm, cp).pvalue) > 0.05
            except ValueError:
                var_homo = False
    return {
        "lm_mean": float(lm.mean()),
        "lm_std": float(lm.std()),
        "copy_mean": float(cp.mean()),
        "copy_std": float(cp.std()),
        "lm_accs": [float(v) for v in lm],
        "copy_accs": [float(v) for v in cp],
        "p_value": 1.0 if math.isnan(p) else p,
        "normality": {"normality": bool(normal), "variance_homogeneity": bool(var_homo)},
    }


# --------------------------------------------------------------------------------------------------------------------
# Step 6: memory lengths
# --------------------------------------------------------------------------------------------------------------------


def _status(entry: dict) -> str:
    status = entry.get("status", "ok")
    if status not in ("ok", "failed"):
        raise ValueError(f"length {entry.get('length')!r}: status must be 'ok' or 'failed', got {status!r}")
    return status


def _number(entry: dict, key: str) -> float:
    value = entry.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"length {entry.get('length')!r} has status ok but {key}={value!r} is not a number")
    return float(value)


def memory_lengths(results: list[dict], fine_threshold: float = 0.99, alpha: float = 0.05) -> dict[str, Any]:
    """Fine- and coarse-grained memory lengths over the successful lengths (spec Step 6).

    Args:
        results: per-length dicts with ``length``, ``status`` (``"ok"``/``"failed"``; missing means ok, as in the
            official JSON) and, for ok ones, ``copy_mean``, ``lm_mean``, ``p_value`` (NaN/None p counts as 1.0).
        fine_threshold: tau_f in (0, 1].
        alpha: significance level in (0, 1).

    Returns:
        ``fine_grained_length`` F = max L with ``copy_mean >= fine_threshold`` (0 if none; a maximum, not a
        contiguous run), ``coarse_grained_length`` C = max L with ``copy_mean > lm_mean`` and ``p_value < alpha``
        (0 if none), ``fine_is_lower_bound`` / ``coarse_is_lower_bound`` (the condition holds at the largest
        successful length, or a length above F / C failed), ``amnesia_length`` (smallest successful L above C where
        the coarse condition fails, else None), ``n_failed_lengths`` and ``failed_lengths`` (sorted).

    Raises:
        ValueError: threshold/alpha out of range, an entry without an integer ``length``, an unknown status, or an ok
            entry with a missing statistic (naming the length).
    """
    if not (0.0 < fine_threshold <= 1.0):
        raise ValueError(f"fine_threshold must be in (0, 1], got {fine_threshold}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ok: list[tuple[int, bool, bool]] = []  # (L, fine condition, coarse condition)
    failed: list[int] = []
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or isinstance(entry.get("length"), bool) \
                or not isinstance(entry.get("length"), (int, np.integer)):
            raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                f"results[{i}] must be a dict with an integer 'length', got {entry!r:.200}"
            )
        L = int(entry["length"])
        if _status(entry) == "failed":
            failed.append(L)
            continue
        copy_mean, lm_mean = _number(entry, "copy_mean"), _number(entry, "lm_mean")
        p = entry.get("p_value")
        p = 1.0 if p is None or (isinstance(p, float) and math.isnan(p)) else _number(entry, "p_value")
        ok.append((L, copy_mean >= fine_threshold, copy_mean > lm_mean and p < alpha))
    ok.sort()
    failed.sort()

    def _max_where(idx: int) -> int:
        return max((L for L, *cond in ok if cond[idx - 1]), default=0)

    fine, coarse = _max_where(1), _max_where(2)
    last = ok[-1] if ok else None
    fine_lb = bool((last is not None and last[1]) or any(L > fine for L in failed))
    coarse_lb = bool((last is not None and last[2]) or any(L > coarse for L in failed))
    amnesia = next((L for L, _, c in ok if L > coarse and not c), None)
    return {
        "fine_grained_length": fine,
        "coarse_grained_length": coarse,
        "fine_is_lower_bound": fine_lb,
        "coarse_is_lower_bound": coarse_lb,
        "amnesia_length": amnesia,
        "n_failed_lengths": len(failed),
        "failed_lengths": failed,
    }


# --------------------------------------------------------------------------------------------------------------------
# Results I/O and plots
# --------------------------------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a per-length result list: our ``<title>.json`` or the official ``draw.py`` JSON.

    Entries without ``status`` (the official schema) get ``status: "ok"``; the file itself is never modified.

    Raises:
        FileNotFoundError: the file does not exist (naming it).
        ValueError: naming the file, when it is not valid JSON, not a list of dicts, or an entry has no integer
            ``length`` (naming the index too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"forgetting-curve results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
            f"{path}: expected a JSON list of per-length dicts, got {type(data).__name__}"
        )
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or isinstance(entry.get("length"), bool) \
                or not isinstance(entry.get("length"), int):
            raise ValueError(  # noqa: TRY004 (bad data, not a bad argument)
                f"{path}: entry {i} must be a dict with an integer 'length', got {entry!r:.200}"
            )
        entry = dict(entry)
        entry.setdefault("status", "ok")
        out.append(entry)
    return out


def _ok_arrays(results: list[dict]) -> tuple[np.ndarray, ...]:
    """Sorted arrays (lengths, lm_mean, lm_std, copy_mean, copy_std) of the ok entries; missing std -> 0."""
    rows = sorted((e for e in results if e.get("status", "ok") == "ok"), key=lambda e: e["length"])
    cols = [[float(e["length"]) for e in rows]]
    for key in ("lm_mean", "lm_std", "copy_mean", "copy_std"):
        cols.append([float("nan") if e.get(key) is None else float(e[key]) for e in rows])
    arrays = tuple(np.asarray(c, dtype=np.float64) for c in cols)
    for i in (2, 4):  # std bands: a missing std draws no band
        arrays[i][np.isnan(arrays[i])] = 0.0
    return arrays


def _failed_lengths(results: list[dict]) -> list[int]:
    return sorted(int(e["length"]) for e in results if e.get("status", "ok") == "failed")


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save_atomic(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` atomically to ``path`` (format from the suffix) and free it."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=fig.dpi))
    finally:
        fig.clear()

def _style_axes(ax, log_x: bool, title: str | None) -> None:
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("dependency length L (tokens)")
    ax.set_ylabel("teacher-forced accuracy")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)


def plot_curve(results: list[dict], path: str | os.PathLike, training_len: int | None = None, log_x: bool = False,
               title: str | None = None, memory: dict | None = None) -> Path:
    """Draw one forgetting curve (spec section 4) and write it atomically to ``path`` (parent dirs created).

    10x5 in at 100 dpi (1000x500 px): blue ``lm_accuracy`` and orange ``copy_accuracy`` lines with +-1 std bands
    (alpha 0.1); red dashed line at ``training_len`` and green dashed at ``training_len // 2`` when given (only
    named in the legend when more than 1.5x beyond the longest length, so the curves keep the width); dotted
    lines at F and C from ``memory`` (a :func:`memory_lengths` dict) when > 0; failed lengths as grey markers at y=0.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: ``training_len`` <= 0, or no entry at all to draw.
    """
    if training_len is not None and training_len <= 0:
        raise ValueError(f"training_len must be > 0, got {training_len}")
    if not results:
        raise ValueError("results is empty: nothing to plot")
    x, lm, lm_std, cp, cp_std = _ok_arrays(results)
    failed = _failed_lengths(results)
    fig, ax = _new_figure()
    ax.plot(x, lm, color="tab:blue", marker=".", label="lm_accuracy")
    ax.fill_between(x, lm - lm_std, lm + lm_std, color="tab:blue", alpha=0.1)
    ax.plot(x, cp, color="tab:orange", marker=".", label="copy_accuracy")
    ax.fill_between(x, cp - cp_std, cp + cp_std, color="tab:orange", alpha=0.1)
    if training_len is not None:
        longest = max([*x.tolist(), *failed], default=0.0)
        for value, color, name in ((training_len, "red", "training_len"), (training_len // 2, "green",
                                                                           "training_len // 2")):
            if value <= 1.5 * longest:
                ax.axvline(value, color=color, linestyle="--", label=f"{name} = {value}")
            else:  # far beyond the grid: a line there would squeeze the curves into a corner; say it instead
                ax.plot([], [], color=color, linestyle="--", label=f"{name} = {value} (beyond the grid)")
    if memory:
        for kind, name, color in (("fine", "F", "tab:purple"), ("coarse", "C", "tab:brown")):
            value = memory.get(f"{kind}_grained_length") or 0
            if value > 0:
                bound = ">= " if memory.get(f"{kind}_is_lower_bound") else "= "
                ax.axvline(value, color=color, linestyle=":", label=f"{name} {bound}{value}")
    if failed:
        ax.plot(failed, [0.0] * len(failed), linestyle="none", marker="x", color="grey", markersize=8,
                label=f"failed ({len(failed)})")
    _style_axes(ax, log_x, title)
    ax.legend(loc="best", fontsize="small")
    return _save_atomic(fig, path)


def plot_comparison(curves: dict[str, list[dict]], path: str | os.PathLike, log_x: bool = False,
                    training_lens: dict[str, int] | None = None) -> Path:
    """Overlay several models' forgetting curves in one 10x5 in figure, written atomically to ``path``.

    One colour per model (``tab10`` cycle): solid copy curve, dashed LM curve, legend with the model names; a
    dash-dot vertical line at each model's training length from ``training_lens`` (keys = model names); failed
    lengths as ``x`` markers at y=0 in the model's colour.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: ``curves`` empty, or a ``training_lens`` key that is not a model name.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    training_lens = training_lens or {}
    unknown = sorted(set(training_lens) - set(curves))
    if unknown:
        raise ValueError(f"training_lens has keys {unknown} that are not in curves {sorted(curves)}")
    fig, ax = _new_figure()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for color, (name, results) in zip(colors, curves.items()):
        x, lm, _, cp, _ = _ok_arrays(results)
        ax.plot(x, cp, color=color, linestyle="-", marker=".", label=f"{name} copy")
        ax.plot(x, lm, color=color, linestyle="--", marker=".", label=f"{name} LM")
        failed = _failed_lengths(results)
        if failed:
            ax.plot(failed, [0.0] * len(failed), linestyle="none", marker="x", color=color,
                    label=f"{name} failed ({len(failed)})")
        if name in training_lens:
            ax.axvline(training_lens[name], color=color, linestyle="-.", alpha=0.7,
                       label=f"{name} training_len = {training_lens[name]}")
    _style_axes(ax, log_x, "forgetting curves (solid: copy, dashed: LM)")
    ax.legend(loc="best", fontsize="small")
    return _save_atomic(fig, path)
