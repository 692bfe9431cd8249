"""Scaling-law fitting for dense and MoE language models (spec ``moe_scaling.md`` sections 3.2-3.6, 7, 9, 11).

Pure numpy / scipy; no torch. Used by ``scripts/fit_scaling_laws.py`` and ``tests/test_fit_scaling_laws.py``.

Loss laws (section 3.2), with N the non-embedding (active) parameters, D the training tokens, E the experts:

- ``dense``:           L = L0 + A·N^(-α) + B·D^(-β)
- ``moe``:             L = L0 + A·N^(-α)·E^(-γ) + B·D^(-β)                      (= dense at E = 1)
- ``moe_interaction``: L = L0 + A·exp(-α·log N - γ·log E + δ·log N·log E) + B·D^(-β)   (Clark et al.)

Fitting is Chinchilla approach 3 (section 3.3): the raw parameters are θ = (log A, α, log B, β, log L0[, γ[, δ]]),
the prediction of log L is LSE(log A - α log N - γ log E + δ log N log E, log B - β log D, log L0), the objective is
the **mean** Huber loss (δ_H = 1e-3) of predicted minus observed log-loss, minimised by L-BFGS-B with an analytic
gradient from every start of an initialisation grid; the best start is kept and the number of starts that reach it
is reported (pitfall 3).

Also here: compute-optimal allocation (3.4), the MoE/dense efficiency ratio (3.4), log-log power laws and the
parabola optimum rule for batch size / learning rate (3.5), the run bootstrap and the largest-compute hold-out (3.6),
and the CSV reader for ``scripts/scaling_sweep.py`` results (sections 4 and 11).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize

__all__ = [
    "GRIDS",
    "LAWS",
    "POWER_LAW_FORMULA",
    "allocation",
    "bootstrap",
    "bootstrap_loss_law",
    "bootstrap_power_law",
    "efficiency_ratio",
    "fit_loss_law",
    "fit_power_law",
    "frontier_loss",
    "holdout_largest_compute",
    "identifiability_warnings",
    "load_runs",
    "optimum_parabola",
    "predict",
    "runs_to_arrays",
]

# Raw parameter names per law, in the order of the optimisation vector θ.
LAWS: dict[str, tuple[str, ...]] = {
    "dense": ("log_A", "alpha", "log_B", "beta", "log_L0"),
    "moe": ("log_A", "alpha", "log_B", "beta", "log_L0", "gamma"),
    "moe_interaction": ("log_A", "alpha", "log_B", "beta", "log_L0", "gamma", "delta_interaction"),
}
GRIDS = ("tiny", "small", "chinchilla")

# Bounds of section 3.3 (our default). log L0's upper bound is log(min L) and is set per data set.
_BOUNDS: dict[str, tuple[float, float]] = {
    "log_A": (-10.0, 40.0),
    "alpha": (0.0, 2.5),
    "log_B": (-10.0, 40.0),
    "beta": (0.0, 2.5),
    "log_L0": (-5.0, math.nan),
    "gamma": (-1.0, 2.0),
    "delta_interaction": (-1.0, 1.0),  # not in the spec (our default): |δ|·log N·log E stays O(1) for N < 1e12, E <= 64
}

# Bootstrap jitter (standard deviation per raw parameter) around the point estimate (section 3.6; scales our default).
_JITTER: dict[str, float] = {
    "log_A": 0.5, "alpha": 0.05, "log_B": 0.5, "beta": 0.05, "log_L0": 0.05, "gamma": 0.05, "delta_interaction": 0.01,
}

_AT_BEST_RTOL = 1e-6  # a start "lands at the best" when its objective is within 1e-6 (relative) of the best one
_AT_BEST_ATOL = 1e-14  # ... or within this absolute distance (noise-free data, where the best objective is ~0)


# ------------------------------------------------------------------------------------------------- validation
def _as_1d(name: str, x: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values, expected {n} (one per run)")
    return arr


def _labels(run_ids: Sequence[Any] | None, idx: np.ndarray) -> str:
    """Offending rows as run_ids when known, else as indices (at most 20 shown)."""
    names = [str(run_ids[i]) for i in idx] if run_ids is not None else [str(int(i)) for i in idx]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return ("run_ids " if run_ids is not None else "indices ") + shown


def _check_positive(name: str, arr: np.ndarray, run_ids: Sequence[Any] | None) -> None:
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        raise ValueError(f"{name} must be finite and > 0; non-positive or NaN at {_labels(run_ids, bad)}")


def _prepare(N: Any, D: Any, L: Any, E: Any, law: str, run_ids: Sequence[Any] | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated float arrays (N, D, L, E), E defaulting to ones. Raises ValueError (section 11)."""
    if law not in LAWS:
        raise ValueError(f"law must be one of {sorted(LAWS)}, got {law!r}")
    N = _as_1d("N", N)
    n = N.shape[0]
    D, L = _as_1d("D", D, n), _as_1d("L", L, n)
    E = np.ones(n) if E is None else _as_1d("E", E, n)
    if run_ids is not None and len(run_ids) != n:
        raise ValueError(f"run_ids has {len(run_ids)} entries, expected {n}")
    for name, arr in (("N", N), ("D", D), ("L (loss)", L)):
        _check_positive(name, arr, run_ids)
    bad = np.flatnonzero(~np.isfinite(E) | (E < 1))
    if bad.size:
        raise ValueError(f"E (experts) must be finite and >= 1; bad at {_labels(run_ids, bad)}")
    return N, D, L, E


def identifiability_warnings(N: np.ndarray, D: np.ndarray) -> list[str]:
    """Pitfall 4: warnings for designs where L0 and B (or A) trade off.

    Warns when there are < 3 distinct D, D spans < 4x, N spans < 8x, or there are < 4 sizes (distinct N).
    """
    out = []
    n_d, n_n = np.unique(D).size, np.unique(N).size
    if n_d < 3:
        out.append(f"only {n_d} distinct D (token) values; < 3 makes L0 and B hard to separate")
    if D.max() / D.min() < 4:
        out.append(f"D spans only {D.max() / D.min():.2f}x (< 4x); L0 and B trade off")
    if N.max() / N.min() < 8:
        out.append(f"N spans only {N.max() / N.min():.2f}x (< 8x); L0 and A trade off")
    if n_n < 4:
        out.append(f"only {n_n} model sizes (distinct N); < 4 makes the N exponent poorly determined")
    return out


# ------------------------------------------------------------------------------------------------- objective
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative, elementwise; ``delta = inf`` is the squared loss r²/2."""
    if not np.isfinite(delta):
        return 0.5 * r * r, r
    a = np.abs(r)
    quad = a <= delta
    loss = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    return loss, np.clip(r, -delta, delta)


def _design(law: str, N: np.ndarray, D: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Design tensor M of shape (3, n, P) with the three log-terms t = M @ θ (shape (3, n)):

    t1 = log A - α log N - γ log E + δ log N log E (parameter term), t2 = log B - β log D (data term),
    t3 = log L0 (irreducible term). Being linear in θ, M is also the Jacobian of the terms.
    """
    logN, logD, logE = np.log(N), np.log(D), np.log(E)
    n, names = logN.shape[0], LAWS[law]
    M = np.zeros((3, n, len(names)))
    cols = {name: i for i, name in enumerate(names)}
    M[0, :, cols["log_A"]] = 1.0
    M[0, :, cols["alpha"]] = -logN
    if "gamma" in cols:
        M[0, :, cols["gamma"]] = -logE
    if "delta_interaction" in cols:
        M[0, :, cols["delta_interaction"]] = logN * logE
    M[1, :, cols["log_B"]] = 1.0
    M[1, :, cols["beta"]] = -logD
    M[2, :, cols["log_L0"]] = 1.0
    return M


def _log_predict(theta: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted log-loss LSE(t1, t2, t3), shape (n,), and the softmax weights of the terms (3, n) (its derivatives)."""
    t = M @ theta
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    return m + np.log(s), w / s


def _objective(theta: np.ndarray, M: np.ndarray, logL: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of (predicted - observed) log-loss and its analytic gradient with respect to θ, shape (P,).

    d(pred)/dθ = Σ_k w_k · dt_k/dθ = Σ_k w_k · M_k (softmax weights of the LSE times the terms' Jacobian), so the
    gradient is mean_i huber'(r_i) · Σ_k w_ki M_ki.
    """
    pred, w = _log_predict(theta, M)
    loss, dloss = _huber(pred - logL, delta)
    grad = np.einsum("kn,knp->p", w * (dloss / logL.shape[0]), M)
    return float(loss.mean()), grad


# ------------------------------------------------------------------------------------------------- grids
def _bounds(law: str, L: np.ndarray) -> list[tuple[float, float]]:
    out = []
    for name in LAWS[law]:
        lo, hi = _BOUNDS[name]
        if name == "log_L0":
            hi = float(np.log(L.min()))
            if hi <= lo:
                raise ValueError(f"min loss {L.min():.4g} is below exp({lo}); log L0 bounds [{lo}, log min L] are empty")
        out.append((lo, hi))
    return out


def _grid_starts(law: str, grid: str, L: np.ndarray) -> np.ndarray:
    """Initialisation grid of section 3.3, shape (n_starts, n_params), clipped to the bounds.

    ``small``: log A, log B ∈ {0, 5, 10, 15, 20}, α, β ∈ {0.1, 0.3, 0.6}, log L0 ∈ {log(0.5 min L), log(0.9 min L),
    0.5}, γ ∈ {0, 0.2}. ``chinchilla``: log A, log B ∈ {0, 5, ..., 25}, α, β ∈ {0, 0.5, ..., 2}, log L0 ∈ {-1, -0.5,
    ..., 1.5}, γ ∈ {0, 0.25}. ``tiny`` (tests; our reading of "3 x 3 x 2 x 2 x 2"): log A, log B ∈ {0, 5, 10},
    α, β ∈ {0.2, 0.5}, log L0 ∈ {log(0.5 min L), log(0.9 min L)}, γ ∈ {0.1}. δ (interaction) always starts at 0.
    Starts above log(min L) are clipped to it (pitfall 3 keeps the 0.9·min L start in every grid but chinchilla's).
    """
    lmin = float(L.min())
    if grid == "small":
        ab, ex, e0, gam = [0, 5, 10, 15, 20], [0.1, 0.3, 0.6], [np.log(0.5 * lmin), np.log(0.9 * lmin), 0.5], [0, 0.2]
    elif grid == "chinchilla":
        ab, ex, e0, gam = [0, 5, 10, 15, 20, 25], [0, 0.5, 1, 1.5, 2], [-1, -0.5, 0, 0.5, 1, 1.5], [0, 0.25]
    elif grid == "tiny":
        ab, ex, e0, gam = [0, 5, 10], [0.2, 0.5], [np.log(0.5 * lmin), np.log(0.9 * lmin)], [0.1]
    else:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {grid!r}")
    axes: list[list[float]] = [ab, ex, ab, ex, e0]
    if law != "dense":
        axes.append(gam)
    if law == "moe_interaction":
        axes.append([0.0])
    mesh = np.meshgrid(*[np.asarray(a, dtype=float) for a in axes], indexing="ij")
    starts = np.stack([m.ravel() for m in mesh], axis=1)
    return _clip(starts, _bounds(law, L))


def _clip(starts: np.ndarray, bounds: list[tuple[float, float]]) -> np.ndarray:
    lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
    return np.clip(starts, lo, hi)


def _theta_from_params(params: Mapping[str, float], law: str) -> np.ndarray:
    """Raw θ from a params dict (``A, alpha, B, beta, L0[, gamma[, delta_interaction]]``) or a raw dict."""
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    vals = []
    for name in LAWS[law]:
        if name in params:
            vals.append(float(params[name]))
        elif name.startswith("log_"):
            vals.append(math.log(float(params[name[4:]])))
        else:
            vals.append(float(params.get(name, 0.0)))
    return np.asarray(vals)


def _params_from_theta(theta: np.ndarray, law: str) -> dict[str, float]:
    raw = dict(zip(LAWS[law], (float(v) for v in theta), strict=True))
    out = {"A": math.exp(raw["log_A"]), "alpha": raw["alpha"], "B": math.exp(raw["log_B"]), "beta": raw["beta"],
           "L0": math.exp(raw["log_L0"])}
    if "gamma" in raw:
        out["gamma"] = raw["gamma"]
    if "delta_interaction" in raw:
        out["delta_interaction"] = raw["delta_interaction"]
    s = out["alpha"] + out["beta"]
    out["a"] = out["beta"] / s if s > 0 else math.nan  # N_opt ∝ C^a
    out["b"] = out["alpha"] / s if s > 0 else math.nan  # D_opt ∝ C^b
    return out


# ------------------------------------------------------------------------------------------------- fitting
def _run_starts(starts: np.ndarray, M: np.ndarray, logL: np.ndarray, delta: float, bounds: list[tuple[float, float]]
                ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """L-BFGS-B from every start (section 3.3 tolerances). Returns (objectives (S,), solutions (S, P), results)."""
    objs, sols, results = [], [], []
    for x0 in starts:
        res = minimize(_objective, x0, args=(M, logL, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"ftol": 1e-12, "gtol": 1e-10, "maxiter": 10000})
        objs.append(float(res.fun) if np.isfinite(res.fun) else np.inf)
        sols.append(res.x)
        results.append(res)
    return np.asarray(objs), np.asarray(sols), results


def fit_loss_law(N: Any, D: Any, L: Any, E: Any = None, law: str = "dense", delta: float = 1e-3,
                 grid: str = "small", init: Any = None, seed: int = 0, jitter: int = 0,
                 run_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """Fit a loss law by Chinchilla approach 3 (spec section 3.3).

    Args:
        N: non-embedding (active) parameters per run, shape (n,), > 0.
        D: training tokens per run, shape (n,), > 0.
        L: final loss per run (nats per token), shape (n,), > 0.
        E: experts per run, shape (n,), >= 1 (dense runs: 1); ``None`` means all 1. Ignored by ``law="dense"``,
            which therefore refuses E values other than 1.
        law: ``"dense"``, ``"moe"`` or ``"moe_interaction"`` (section 3.2).
        delta: Huber threshold on log-loss residuals (1e-3, Chinchilla); ``math.inf`` gives the squared loss.
        grid: initialisation grid, ``"tiny"``, ``"small"`` or ``"chinchilla"`` (see ``_grid_starts``).
        init: explicit starts instead of the grid: a params dict (or a previous fit result), a list of them, or raw
            θ vectors of shape (n_starts, n_params) in the order of ``LAWS[law]``. Clipped to the bounds.
        seed: seed of the jittered starts (only used with ``jitter``; the grids are deterministic).
        jitter: with ``init``, add this many starts drawn around the first one (section 3.6 uses 8).
        run_ids: labels of the runs, used in error messages instead of indices.

    Returns:
        dict with ``law``, ``params`` (A, alpha, B, beta, L0[, gamma[, delta_interaction]], a = β/(α+β),
        b = α/(α+β)), ``theta`` (raw vector), ``param_names``, ``objective`` (mean Huber), ``rmse`` and ``r2`` of
        log-loss, ``n_points``, ``n_starts``, ``n_starts_at_best`` (objective within 1e-6 relative of the best),
        ``converged``, ``message`` (the best start's optimiser status), ``delta``, ``grid``, ``warnings``
        (identifiability, pitfall 4; parameters on a bound, pitfall 3).

    Raises:
        ValueError: unknown law or grid; arrays of different lengths; non-positive or NaN N, D or loss (naming the
            run_ids or indices); E < 1; ``law="dense"`` with E != 1; ``law="moe"``/``"moe_interaction"`` with fewer
            than two distinct E values ("γ is unidentifiable"); fewer than 2 distinct N or D; points <= parameters + 2.
    """
    N, D, L, E = _prepare(N, D, L, E, law, run_ids)
    n_params = len(LAWS[law])
    e_vals = np.unique(E)
    if law == "dense" and np.any(E != 1):
        raise ValueError(f"law='dense' ignores E, but E has values {e_vals.tolist()}: use law='moe' for a joint fit "
                         "or fit each family separately")
    if law != "dense" and e_vals.size < 2:
        raise ValueError(f"γ is unidentifiable: every run has E = {e_vals[0]:g} (law={law!r} needs >= 2 distinct "
                         "expert counts, e.g. dense E=1 runs together with MoE runs)")
    if np.unique(N).size < 2 or np.unique(D).size < 2:
        raise ValueError(f"need >= 2 distinct N and D, got {np.unique(N).size} distinct N and {np.unique(D).size} "
                         "distinct D")
    if N.shape[0] <= n_params + 2:
        raise ValueError(f"{N.shape[0]} points for {n_params} parameters (law={law!r}): need more than "
                         f"{n_params + 2} (parameters + 2)")
    if not (delta > 0):
        raise ValueError(f"delta (Huber threshold) must be > 0, got {delta}")

    bounds = _bounds(law, L)
    if init is None:
        starts = _grid_starts(law, grid, L)
    else:
        starts = _init_starts(init, law, bounds, jitter, seed)
    M, logL = _design(law, N, D, E), np.log(L)
    objs, sols, results = _run_starts(starts, M, logL, delta, bounds)
    if not np.isfinite(objs).any():
        raise RuntimeError(f"every L-BFGS-B start failed (law={law!r}, {len(starts)} starts)")
    best = int(np.argmin(objs))
    theta = sols[best]
    f_best = objs[best]
    at_best = int(np.sum(np.abs(objs - f_best) <= _AT_BEST_RTOL * abs(f_best) + _AT_BEST_ATOL))

    pred, _ = _log_predict(theta, M)
    resid = pred - logL
    ss_tot = float(np.sum((logL - logL.mean()) ** 2))
    warnings = identifiability_warnings(N, D)
    for name, v, (lo, hi) in zip(LAWS[law], theta, bounds, strict=True):
        if min(abs(v - lo), abs(v - hi)) <= 1e-8 * max(1.0, abs(v)):
            warnings.append(f"{name} = {v:.6g} is on its bound [{lo:g}, {hi:g}]: the fit may be degenerate")
    return {
        "law": law,
        "params": _params_from_theta(theta, law),
        "theta": [float(v) for v in theta],
        "param_names": list(LAWS[law]),
        "objective": f_best,
        "rmse": float(np.sqrt(np.mean(resid ** 2))),
        "r2": float(1 - np.sum(resid ** 2) / ss_tot) if ss_tot > 0 else math.nan,
        "n_points": int(N.shape[0]),
        "n_starts": len(starts),
        "n_starts_at_best": at_best,
        "converged": bool(results[best].success),
        "message": str(results[best].message),
        "delta": float(delta),
        "grid": grid if init is None else "init",
        "warnings": warnings,
    }


def _init_starts(init: Any, law: str, bounds: list[tuple[float, float]], jitter: int, seed: int) -> np.ndarray:
    if isinstance(init, Mapping):
        starts = _theta_from_params(init, law)[None, :]
    elif isinstance(init, (list, tuple)) and init and isinstance(init[0], Mapping):
        starts = np.stack([_theta_from_params(p, law) for p in init])
    else:
        starts = np.atleast_2d(np.asarray(init, dtype=float))
        if starts.shape[1] != len(LAWS[law]):
            raise ValueError(f"init has {starts.shape[1]} columns, law={law!r} has parameters {LAWS[law]}")
    if jitter > 0:
        rng = np.random.default_rng(seed)
        scale = np.array([_JITTER[n] for n in LAWS[law]])
        starts = np.vstack([starts, starts[0] + rng.normal(size=(jitter, scale.size)) * scale])
    return _clip(starts, bounds)


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return params["params"] if "params" in params and isinstance(params["params"], Mapping) else params


def predict(params: Mapping[str, Any], N: Any, D: Any, E: Any = 1) -> np.ndarray:
    """Loss predicted by a fitted law: L0 + A·exp(-α log N - γ log E + δ log N log E) + B·D^(-β).

    Args:
        params: ``fit_loss_law(...)["params"]`` or the fit result itself; missing γ and δ count as 0 (dense law).
        N, D, E: broadcastable arrays (parameters, tokens, experts).

    Returns:
        the predicted loss, broadcast shape of N, D, E (nats per token).
    """
    p = _unwrap(params)
    logN, logD, logE = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(E, float))
    t1 = -p["alpha"] * logN - p.get("gamma", 0.0) * logE + p.get("delta_interaction", 0.0) * logN * logE
    return p["L0"] + p["A"] * np.exp(t1) + p["B"] * np.exp(-p["beta"] * logD)


def allocation(params: Mapping[str, Any], C: Any, E: float = 1) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal N and D under C = 6·N·D at fixed E (spec section 3.4, closed form).

    With A_E = A·E^(-γ) (and α_E = α - δ log E under the interaction law), G = (α_E A_E / (β B))^(1/(α_E+β)):
    N_opt = G·(C/6)^a, D_opt = (C/6)^b / G, a = β/(α_E+β), b = α_E/(α_E+β).

    Args:
        params: fitted params (or fit result). C: compute in FLOPs, any shape. E: experts (1 for dense).

    Returns:
        (N_opt, D_opt), each of C's shape.

    Raises:
        ValueError: α_E <= 0 or β <= 0 (no interior optimum).
    """
    p = _unwrap(params)
    logE = math.log(E)
    alpha = p["alpha"] - p.get("delta_interaction", 0.0) * logE
    beta = p["beta"]
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"allocation needs alpha_E > 0 and beta > 0, got alpha_E={alpha:.4g}, beta={beta:.4g}")
    a_e = p["A"] * math.exp(-p.get("gamma", 0.0) * logE)
    g = (alpha * a_e / (beta * p["B"])) ** (1.0 / (alpha + beta))
    c6 = np.asarray(C, dtype=float) / 6.0
    return g * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / g


def frontier_loss(params: Mapping[str, Any], C: Any, E: float = 1) -> np.ndarray:
    """Loss of the compute-optimal model at compute C (the fitted frontier), C's shape."""
    n_opt, d_opt = allocation(params, C, E)
    return predict(params, n_opt, d_opt, E)


def efficiency_ratio(dense_params: Mapping[str, Any], moe_params: Mapping[str, Any], C: Any, E: float = 1
                     ) -> dict[str, Any]:
    """MoE vs dense at equal compute (spec section 3.4).

    L* = MoE frontier loss at C (experts E; use E = 1 when ``moe_params`` come from a single-E fit whose A already
    holds E^(-γ)); C_dense = the compute at which the dense frontier reaches L* (``scipy.optimize.brentq`` in log C).

    Args:
        dense_params, moe_params: fitted params (or fit results). C: compute in FLOPs, scalar or 1-D. E: experts.

    Returns:
        dict of arrays with C's shape: ``C``, ``loss_moe`` (L*), ``loss_dense`` (dense frontier at C),
        ``C_dense``, ``ratio`` = C_dense / C (> 1: MoE needs less compute; ``inf`` when L* <= dense L0, i.e. dense
        never reaches it), ``loss_gap_rel`` = (loss_dense - loss_moe) / loss_dense (> 0: MoE lower at equal C).
    """
    dense = _unwrap(dense_params)
    C = np.atleast_1d(np.asarray(C, dtype=float))
    l_moe = frontier_loss(moe_params, C, E)
    l_dense = frontier_loss(dense, C, 1)
    c_dense = np.empty_like(C)
    for i, (c, target) in enumerate(zip(C, l_moe, strict=True)):
        if target <= dense["L0"]:
            c_dense[i] = math.inf
            continue

        def gap(log_c: float, target: float = target) -> float:
            return float(frontier_loss(dense, math.exp(log_c))[()] - target)

        lo, hi = math.log(c) - 5.0, math.log(c) + 5.0  # the dense frontier falls monotonically in C: widen to a sign change
        while gap(lo) < 0:
            lo -= 5.0
        while gap(hi) > 0:
            hi += 5.0
            if hi > math.log(c) + 700:
                raise RuntimeError(f"dense frontier does not reach L*={target:.6g} below C=exp({hi:.0f})")
        c_dense[i] = math.exp(brentq(gap, lo, hi, xtol=1e-12, rtol=1e-14))
    return {"C": C, "loss_moe": l_moe, "loss_dense": l_dense, "C_dense": c_dense, "ratio": c_dense / C,
            "loss_gap_rel": (l_dense - l_moe) / l_dense}


# ------------------------------------------------------------------------------------------------- hparam laws
POWER_LAW_FORMULA = "Y = lambda * X^exponent"


def fit_power_law(X: Any, Y: Any) -> dict[str, Any]:
    """OLS of log Y on log X (spec section 3.5): Y = λ·X^p with the **signed** exponent p (pitfall 10).

    Args:
        X: regressor per point (final loss or compute), shape (n,), > 0. Y: B_opt or lr_opt, shape (n,), > 0.

    Returns:
        ``lambda``, ``exponent`` (p), ``alpha`` (= -p, the spec's form Y = λ·X^(-α)), ``r2`` (of log Y), ``n``,
        ``formula`` ("Y = lambda * X^exponent").

    Raises:
        ValueError: shapes differ, fewer than 2 points, non-positive or NaN values, or all X equal.
    """
    X, Y = _as_1d("X", X), _as_1d("Y", Y)
    if X.shape != Y.shape:
        raise ValueError(f"X and Y have different lengths ({X.shape[0]} vs {Y.shape[0]})")
    if X.shape[0] < 2:
        raise ValueError(f"a power law needs >= 2 points, got {X.shape[0]}")
    _check_positive("X", X, None)
    _check_positive("Y", Y, None)
    lx, ly = np.log(X), np.log(Y)
    if np.ptp(lx) == 0:
        raise ValueError("all X values are equal: the exponent is unidentifiable")
    design = np.stack([np.ones_like(lx), lx], axis=1)
    (c0, p), *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - (c0 + p * lx)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    return {"lambda": float(np.exp(c0)), "exponent": float(p), "alpha": float(-p),
            "r2": float(1 - np.sum(resid ** 2) / ss_tot) if ss_tot > 0 else math.nan, "n": int(X.shape[0]),
            "formula": POWER_LAW_FORMULA}


def optimum_parabola(values: Any, losses: Any) -> tuple[float, str]:
    """Optimal hyperparameter on a 1-D grid by the parabola rule (spec section 3.5).

    A quadratic of loss in log(value) through the best grid point and its two neighbours; its vertex is returned.
    Falls back to the argmin when the curvature is <= 0 or the vertex leaves the grid; when the argmin is the first or
    last grid point there are no two neighbours and it is returned with flag ``edge``. (With a strict interior
    minimum the curvature is positive and the vertex lies between the neighbours, so the ``argmin`` fallbacks only
    guard against round-off.)

    Args:
        values: grid values (e.g. batch tokens or learning rates), shape (n,), > 0, distinct, any order.
        losses: loss at each value (seed-averaged), shape (n,).

    Returns:
        (optimal value, flag) with flag ``"parabola"``, ``"argmin"`` or ``"edge"``.

    Raises:
        ValueError: shapes differ, empty grid, duplicate or non-positive values, NaN losses.
    """
    v, y = _as_1d("values", values), _as_1d("losses", losses)
    if v.shape != y.shape or v.size == 0:
        raise ValueError(f"values and losses must be non-empty and of equal length, got {v.size} and {y.size}")
    _check_positive("values", v, None)
    if not np.all(np.isfinite(y)):
        raise ValueError("losses contain NaN or inf")
    if np.unique(v).size != v.size:
        raise ValueError(f"duplicate grid values in {v.tolist()}: average seeds before calling")
    order = np.argsort(v)
    x, y = np.log(v[order]), y[order]
    i = int(np.argmin(y))
    if i == 0 or i == x.size - 1:
        return float(np.exp(x[i])), "edge"
    x0, x1, x2 = x[i - 1: i + 2]
    y0, y1, y2 = y[i - 1: i + 2]
    # Newton form p(x) = y0 + d1 (x - x0) + c2 (x - x0)(x - x1); c2 is the curvature (half the second derivative).
    d1 = (y1 - y0) / (x1 - x0)
    c2 = ((y2 - y1) / (x2 - x1) - d1) / (x2 - x0)
    if c2 <= 0:
        return float(np.exp(x1)), "argmin"
    xv = 0.5 * (x0 + x1) - d1 / (2 * c2)
    if not (x[0] <= xv <= x[-1]):
        return float(np.exp(x1)), "argmin"
    return float(np.exp(xv)), "parabola"


# ------------------------------------------------------------------------------------------------- uncertainty
def bootstrap(fit_fn: Callable[[dict[str, np.ndarray], np.random.Generator], Mapping[str, float]],
              data: Mapping[str, Any], n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Bootstrap over runs (spec section 3.6): resample rows with replacement and refit ``n_boot`` times.

    Args:
        fit_fn: ``fit_fn(sample, rng) -> {name: value}``; ``sample`` has the keys of ``data`` with resampled rows.
            A ``ValueError`` (degenerate resample, e.g. a single distinct X) counts that replicate as failed.
        data: equal-length arrays, one row per run (or per group for hyperparameter laws).
        n_boot: replicates (200 by default). seed: the resampling seed.

    Returns:
        ``n_boot``, ``n_ok``, ``n_failed``, ``failures`` (first 5 messages), ``samples`` {name: list},
        ``ci`` {name: [2.5th, 97.5th percentile]}.

    Raises:
        ValueError: ``n_boot < 1`` or arrays of different lengths. RuntimeError: more than half the replicates failed.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    cols = {k: np.asarray(v) for k, v in data.items()}
    sizes = {v.shape[0] for v in cols.values()}
    if len(sizes) != 1:
        raise ValueError(f"bootstrap data columns have different lengths: { {k: v.shape[0] for k, v in cols.items()} }")
    n = sizes.pop()
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failures: list[str] = []
    n_ok = 0
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            out = fit_fn({k: v[idx] for k, v in cols.items()}, rng)
        except ValueError as e:  # a degenerate resample: counted and reported, not hidden
            failures.append(str(e))
            continue
        n_ok += 1
        for k, v in out.items():
            samples.setdefault(k, []).append(float(v))
    if n_ok < n_boot / 2:
        raise RuntimeError(f"{n_boot - n_ok} of {n_boot} bootstrap replicates failed; first: {failures[:1]}")
    ci = {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in samples.items()}
    return {"n_boot": n_boot, "n_ok": n_ok, "n_failed": n_boot - n_ok, "failures": failures[:5], "samples": samples,
            "ci": ci}


def bootstrap_loss_law(N: Any, D: Any, L: Any, E: Any = None, *, fit: Mapping[str, Any], n_boot: int = 200,
                       seed: int = 0, n_jitter: int = 8) -> dict[str, Any]:
    """Bootstrap CIs of a loss law: each replicate refits from the point estimate plus ``n_jitter`` jittered starts.

    Args:
        N, D, L, E: the data the point estimate ``fit`` (a ``fit_loss_law`` result) was fitted on.

    Returns:
        :func:`bootstrap`'s dict over every parameter of ``fit["params"]`` (A, alpha, B, beta, L0, gamma, a, b, ...).
    """
    law, delta = fit["law"], fit["delta"]
    N, D, L, E = _prepare(N, D, L, E, law, None)

    def refit(s: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
        bounds = _bounds(law, s["L"])
        starts = _init_starts(fit["params"], law, bounds, n_jitter, int(rng.integers(2**31)))
        objs, sols, _ = _run_starts(starts, _design(law, s["N"], s["D"], s["E"]), np.log(s["L"]), delta, bounds)
        return _params_from_theta(sols[int(np.argmin(objs))], law)

    return bootstrap(refit, {"N": N, "D": D, "L": L, "E": E}, n_boot=n_boot, seed=seed)


def bootstrap_power_law(X: Any, Y: Any, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Bootstrap CIs of ``lambda`` and ``exponent`` of :func:`fit_power_law` (resampling points/groups)."""
    def refit(s: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
        out = fit_power_law(s["X"], s["Y"])
        return {"lambda": out["lambda"], "exponent": out["exponent"]}

    return bootstrap(refit, {"X": _as_1d("X", X), "Y": _as_1d("Y", Y)}, n_boot=n_boot, seed=seed)


def holdout_largest_compute(N: Any, D: Any, L: Any, E: Any = None, *, law: str = "dense", rtol: float = 1e-6,
                            run_ids: Sequence[Any] | None = None, budget: Any = None, **fit_kwargs: Any
                            ) -> dict[str, Any]:
    """Fit without the largest-compute runs and report the relative error on them (spec section 3.6).

    Held out: every run with C >= (1 - rtol)·max C, where C is ``budget`` when given (e.g. the sweep's planned
    ``flops_budget``, so that all runs of the largest IsoFLOP budget go together even when their token counts were
    rounded to whole steps) and 6·N·D otherwise. ``fit_kwargs`` go to :func:`fit_loss_law` (delta, grid, ...).

    Returns:
        ``C_max``, ``n_train``, ``n_holdout``, ``held_out`` (per run: index, run_id, N, D, E, loss, predicted,
        rel_error = (predicted - loss) / loss), ``max_abs_rel_error``, ``mean_abs_rel_error``, ``fit`` (the fit on the
        remaining runs).

    Raises:
        ValueError: as :func:`fit_loss_law` for the remaining runs (e.g. too few points left).
    """
    N, D, L, E = _prepare(N, D, L, E, law, run_ids)
    C = 6.0 * N * D if budget is None else _as_1d("budget", budget, N.shape[0])
    _check_positive("budget (compute)", C, run_ids)
    held = C >= (1 - rtol) * C.max()
    keep = ~held
    ids = None if run_ids is None else [run_ids[i] for i in np.flatnonzero(keep)]
    try:
        fit = fit_loss_law(N[keep], D[keep], L[keep], E[keep], law=law, run_ids=ids, **fit_kwargs)
    except ValueError as e:
        raise ValueError(f"hold-out of the {int(held.sum())} largest-compute runs leaves too little data: {e}") from e
    pred = predict(fit["params"], N[held], D[held], E[held])
    rel = (pred - L[held]) / L[held]
    rows = [{"index": int(i), "run_id": None if run_ids is None else run_ids[i], "N": float(N[i]), "D": float(D[i]),
             "E": float(E[i]), "loss": float(L[i]), "predicted": float(p), "rel_error": float(r)}
            for i, p, r in zip(np.flatnonzero(held), pred, rel, strict=True)]
    return {"C_max": float(C.max()), "n_train": int(keep.sum()), "n_holdout": int(held.sum()), "held_out": rows,
            "max_abs_rel_error": float(np.max(np.abs(rel))), "mean_abs_rel_error": float(np.mean(np.abs(rel))),
            "fit": fit}


# ------------------------------------------------------------------------------------------------- CSV
LOSS_LAW_COLUMNS = ("run_id", "family", "ffn", "num_experts", "status", "tokens")
HPARAM_COLUMNS = ("batch_tokens", "lr")


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load_runs(csv_path: str | Path, loss_col: str = "final_val_loss", n_col: str = "n_active_nonemb",
              extra_columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a ``scripts/scaling_sweep.py`` results CSV (spec section 4) for fitting.

    Rows with ``status != ok`` are excluded and their count printed to stderr. Each kept row is the CSV dict plus
    typed fields ``N`` (from ``n_col``), ``D`` (``tokens``), ``L`` (``loss_col``), ``E`` (``num_experts`` for
    ``ffn=moe``, 1 for dense), ``C`` (6·N·D), and ``batch_tokens``/``lr`` as floats when present.

    Args:
        csv_path: the CSV file. loss_col: fitted loss column (``final_val_loss``: LM cross-entropy, pitfall 1).
        n_col: parameter-count column (``n_active_nonemb`` by default, or ``n_total_nonemb``).
        extra_columns: further required columns (``batch_tokens``, ``lr`` for hyperparameter laws).

    Raises:
        FileNotFoundError: no such file. KeyError: missing columns (listed). ValueError: no ``ok`` rows; ``ffn`` not
        in {dense, moe}; bad ``num_experts``; non-positive or NaN N, D or loss (listing run_ids); more than one
        ``moe_impl`` among MoE rows (pitfall 6).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"results CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    required = [*LOSS_LAW_COLUMNS, n_col, loss_col, *extra_columns]
    missing = [c for c in dict.fromkeys(required) if c not in header]
    if missing:
        raise KeyError(f"{path}: missing required columns {missing} (have {header})")
    ok = [r for r in rows if (r.get("status") or "").strip() == "ok"]
    excluded = len(rows) - len(ok)
    if excluded:
        statuses = sorted({(r.get("status") or "").strip() or "<empty>" for r in rows} - {"ok"})
        print(f"{path}: excluded {excluded} of {len(rows)} runs with status != ok ({', '.join(statuses)})",
              file=sys.stderr)
    if not ok:
        raise ValueError(f"{path}: no runs with status ok")
    out: list[dict[str, Any]] = []
    bad: dict[str, list[str]] = {}
    for line, r in enumerate(ok, start=2):
        ffn = (r["ffn"] or "").strip()
        if ffn not in ("dense", "moe"):
            raise ValueError(f"{path}: run_id {r['run_id']}: ffn must be one of ['dense', 'moe'], got {ffn!r}")
        e = _float(r["num_experts"]) if ffn == "moe" else 1.0
        if not (np.isfinite(e) and e >= 1):
            raise ValueError(f"{path}: run_id {r['run_id']}: num_experts must be >= 1 for ffn=moe, got "
                             f"{r['num_experts']!r}")
        row: dict[str, Any] = dict(r)
        row.update(N=_float(r[n_col]), D=_float(r["tokens"]), L=_float(r[loss_col]), E=e, _line=line)
        for key, name in (("N", n_col), ("D", "tokens"), ("L", loss_col)):
            if not (np.isfinite(row[key]) and row[key] > 0):
                bad.setdefault(name, []).append(str(r["run_id"]))
        for col in HPARAM_COLUMNS:
            if col in r:
                row[col] = _float(r[col])
        row["C"] = 6.0 * row["N"] * row["D"]
        out.append(row)
    if bad:
        detail = "; ".join(f"{col}: run_ids {', '.join(ids)}" for col, ids in bad.items())
        raise ValueError(f"{path}: non-positive or NaN values ({detail})")
    impls = sorted({(r.get("moe_impl") or "").strip() for r in out if r["ffn"].strip() == "moe"} - {""})
    if len(impls) > 1:
        raise ValueError(f"{path}: mixed moe_impl {impls} among MoE runs; fit one implementation at a time (pitfall 6)")
    for col in extra_columns:
        vals = np.array([_float(r[col]) for r in out])
        if not np.all(np.isfinite(vals) & (vals > 0)):
            ids = [str(r["run_id"]) for r, v in zip(out, vals, strict=True) if not (np.isfinite(v) and v > 0)]
            raise ValueError(f"{path}: non-positive or NaN {col} at run_ids {', '.join(ids)}")
    return out


def runs_to_arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``N, D, L, E, C`` float arrays (n,) and ``run_ids`` (list) from :func:`load_runs` rows."""
    return {k: np.array([r[k] for r in rows], dtype=float) for k in ("N", "D", "L", "E", "C")} | {
        "run_ids": [str(r["run_id"]) for r in rows]}
