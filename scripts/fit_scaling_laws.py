#!/usr/bin/env python
"""Fit dense / MoE scaling laws to a ``scripts/scaling_sweep.py`` results CSV (spec ``moe_scaling.md`` section 4).

Loss-law modes (``--law``):

- ``dense``: every family (CSV ``family`` column) is fitted on its own with L = L0 + A·N^(-α) + B·D^(-β). A MoE family
  with a single expert count fits this form too, its A holding E^(-γ).
- ``moe`` / ``moe_interaction``: one joint fit of all runs with the expert factor E^(-γ) (dense runs have E = 1), so
  γ is identified by the dense-vs-MoE offset; needs >= 2 distinct E.
- ``both`` (default): the per-family fits (a family with >= 2 distinct E uses the MoE law) **and** the joint MoE law
  when >= 2 distinct E exist, then MoE vs dense: allocation exponents a = β/(α+β), b = α/(α+β) per family, γ, and
  the efficiency ratio C_dense(L*)/C and relative loss gap at the largest observed C (section 3.4).

``--hparam-law`` instead fits the batch-size and learning-rate laws (section 3.5): per group (family, size, tokens)
the optimum over the batch_tokens x lr grid (``--opt-rule``), then per family B_opt = λ·X^p and lr_opt = λ·X^p by
log-log OLS with X = the group's best loss (``--x loss``) or C = 6·N·D (``--x compute``).

Outputs: a coefficient table with bootstrap CIs on stdout, ``--out`` JSON (written atomically) and, with ``--plots``,
PNG figures: ``loss_vs_compute.png`` (frontier per family), ``isoflop.png``, ``observed_vs_predicted.png``
(with residuals), ``bootstrap_hist.png`` (a and γ), or ``hparam_bopt.png`` / ``hparam_lropt.png`` (CI bands).

Examples::

    python scripts/fit_scaling_laws.py runs/demo/results.csv --law both --out fits.json --plots plots/
    python scripts/fit_scaling_laws.py --csv runs/hp/results.csv --hparam-law --x loss --bootstrap 200

Exit status: 0 on success, 2 on a missing or malformed input (the message names the file, columns or run_ids).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from scripts import scaling_fit_lib as sfl
except ModuleNotFoundError:  # run as ``python scripts/fit_scaling_laws.py``: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts import scaling_fit_lib as sfl
from lit_models.fileio import atomic_write

SIZE_COLUMNS = ("d_model", "n_layers", "n_heads")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="?", type=Path, help="results CSV of scripts/scaling_sweep.py")
    parser.add_argument("--csv", dest="csv_opt", type=Path, default=None, help="the results CSV (same as positional)")
    parser.add_argument("--law", choices=["dense", "moe", "moe_interaction", "both"], default="both")
    parser.add_argument("--loss-col", default="final_val_loss", help="fitted loss column (LM cross-entropy only)")
    parser.add_argument("--n-col", default="n_active_nonemb", help="parameter-count column (N)")
    parser.add_argument("--grid", choices=list(sfl.GRIDS), default="small", help="L-BFGS-B initialisation grid")
    parser.add_argument("--delta", type=float, default=1e-3, help="Huber threshold on log-loss residuals")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap replicates (0: none)")
    parser.add_argument("--holdout-largest-compute", action="store_true",
                        help="also fit without the largest-C runs and report the relative error on them")
    parser.add_argument("--hparam-law", action="store_true", help="fit batch-size and lr laws instead of loss laws")
    parser.add_argument("--x", choices=["loss", "compute"], default="loss", help="regressor of the hparam laws")
    parser.add_argument("--opt-rule", choices=["parabola", "argmin"], default="parabola",
                        help="per-group optimum over the batch/lr grid")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file with every fitted quantity (default: fits.json, or hparams.json with "
                             "--hparam-law, next to the CSV)")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write PNG figures here")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if args.csv is None and args.csv_opt is None:
        parser.error("give the results CSV (positional or --csv)")
    if args.csv is not None and args.csv_opt is not None and args.csv != args.csv_opt:
        parser.error(f"two different CSVs given: {args.csv} and --csv {args.csv_opt}")
    args.csv = args.csv or args.csv_opt
    if args.out is None:
        args.out = Path(args.csv).parent / ("hparams.json" if args.hparam_law else "fits.json")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    return args


# ------------------------------------------------------------------------------------------------- loss laws
def _families(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r["family"]), []).append(r)
    return out


def _fit_block(rows: Sequence[Mapping[str, Any]], law: str, args: argparse.Namespace, *, family: str | None,
               use_e: bool) -> dict[str, Any]:
    """One loss-law fit with its bootstrap and hold-out. ``use_e=False`` fits a single-E family (A absorbs E^-γ)."""
    arr = sfl.runs_to_arrays(rows)
    E = arr["E"] if use_e else None
    fit = sfl.fit_loss_law(arr["N"], arr["D"], arr["L"], E, law=law, delta=args.delta, grid=args.grid,
                           run_ids=arr["run_ids"])
    fit.update(family=family, E_values=sorted({float(e) for e in arr["E"]}), run_ids=arr["run_ids"],
               C_range=[float(arr["C"].min()), float(arr["C"].max())])
    if args.bootstrap:
        fit["bootstrap"] = sfl.bootstrap_loss_law(arr["N"], arr["D"], arr["L"], E, fit=fit, n_boot=args.bootstrap,
                                                  seed=args.seed)
    if args.holdout_largest_compute:
        budgets = [_positive_or_none(r.get("flops_budget")) for r in rows]  # IsoFLOP sweeps: the planned budget
        ho = sfl.holdout_largest_compute(arr["N"], arr["D"], arr["L"], E, law=law, delta=args.delta, grid=args.grid,
                                         run_ids=arr["run_ids"], budget=None if None in budgets else budgets)
        ho["fit"] = {k: ho["fit"][k] for k in ("params", "objective", "rmse", "n_points", "n_starts_at_best")}
        fit["holdout"] = ho
    return fit


def _positive_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def fit_loss_laws(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The fits of ``--law`` (see the module docstring), keyed by family name or ``unified_<law>``."""
    fits: dict[str, Any] = {}
    notes: list[str] = []
    if args.law in ("dense", "both"):
        for fam, frows in _families(rows).items():
            e_vals = {r["E"] for r in frows}
            if len(e_vals) > 1 and args.law == "dense":
                raise ValueError(f"family {fam!r} has several expert counts {sorted(e_vals)}: use --law moe or both")
            law = "moe" if len(e_vals) > 1 else "dense"
            fits[fam] = _fit_block(frows, law, args, family=fam, use_e=len(e_vals) > 1)
    if args.law in ("moe", "moe_interaction", "both"):
        joint = "moe" if args.law == "both" else args.law
        if len({r["E"] for r in rows}) >= 2:
            fits[f"unified_{joint}"] = _fit_block(rows, joint, args, family=None, use_e=True)
        elif args.law == "both":
            notes.append("joint MoE law skipped: all runs share one expert count, so γ is unidentifiable")
        else:
            raise ValueError("γ is unidentifiable: every run has the same expert count "
                             f"E = {rows[0]['E']:g} (--law {args.law} needs dense and MoE runs together)")
    return {"fits": fits, "notes": notes}


def compare(rows: Sequence[Mapping[str, Any]], fits: Mapping[str, Any]) -> list[dict[str, Any]]:
    """MoE vs dense at the largest observed C (spec sections 3.4 and 7), one entry per MoE family or expert count."""
    c_max = max(r["C"] for r in rows)
    fam_ffn = {str(r["family"]): r["ffn"].strip() for r in rows}
    fam_e = {}
    for r in rows:
        fam_e.setdefault(str(r["family"]), set()).add(r["E"])
    out = []
    dense_fams = [f for f in fits if fam_ffn.get(f) == "dense"]
    unified = [k for k in fits if k.startswith("unified_")]
    for fam in fits:
        if fam_ffn.get(fam) != "moe" or not dense_fams:
            continue
        d, m = fits[dense_fams[0]], fits[fam]
        e_moe = max(fam_e[fam]) if m["law"] != "dense" else 1.0  # a single-E fit already holds E^-γ in A
        eff = sfl.efficiency_ratio(d["params"], m["params"], c_max, e_moe)
        entry = {"kind": "per_family", "dense": dense_fams[0], "moe": fam, "C": c_max,
                 **{f"{k}_{side}": f[k] for side, f in (("dense", d["params"]), ("moe", m["params"])) for k in "ab"},
                 **_ci_pair(d, m),
                 **{k: float(eff[k][0]) for k in ("ratio", "loss_gap_rel", "loss_moe", "loss_dense", "C_dense")}}
        if unified:
            u = fits[unified[0]]
            entry["gamma"] = u["params"]["gamma"]
            entry["gamma_ci"] = u.get("bootstrap", {}).get("ci", {}).get("gamma")
        out.append(entry)
    for name in unified:
        u = fits[name]
        for e in sorted({r["E"] for r in rows} - {1.0}):
            eff = sfl.efficiency_ratio(u["params"], u["params"], c_max, e)
            _, dense_b = _exponents(u["params"], 1.0)
            moe_a, moe_b = _exponents(u["params"], e)
            out.append({"kind": name, "E": e, "C": c_max, "a_dense": 1 - dense_b, "b_dense": dense_b,
                        "a_moe": moe_a, "b_moe": moe_b, "gamma": u["params"]["gamma"],
                        "gamma_ci": u.get("bootstrap", {}).get("ci", {}).get("gamma"),
                        **{k: float(eff[k][0]) for k in ("ratio", "loss_gap_rel", "loss_moe", "loss_dense", "C_dense")}})
    return out


def _exponents(params: Mapping[str, float], e: float) -> tuple[float, float]:
    """Allocation exponents (a, b) at E experts (the interaction law shifts α by -δ log E)."""
    alpha = params["alpha"] - params.get("delta_interaction", 0.0) * math.log(e)
    return params["beta"] / (alpha + params["beta"]), alpha / (alpha + params["beta"])


def _ci_pair(d: Mapping[str, Any], m: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for side, f in (("dense", d), ("moe", m)):
        ci = f.get("bootstrap", {}).get("ci", {})
        out[f"a_{side}_ci"], out[f"b_{side}_ci"] = ci.get("a"), ci.get("b")
    return out


# ------------------------------------------------------------------------------------------------- hparam laws
def _hparam_groups(rows: Sequence[Mapping[str, Any]], by_size: bool) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows grouped by (family, size, tokens). Token counts within 10% of a group's smallest join it: ``tokens`` is
    the tokens actually seen, which ceil(D / batch_tokens) steps round up differently for each batch size."""
    by_model: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        size = tuple(str(r[c]) for c in SIZE_COLUMNS) if by_size else (f"{r['N']:.0f}",)
        by_model.setdefault((str(r["family"]), *size), []).append(r)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for model, mrows in by_model.items():
        first = None
        for r in sorted(mrows, key=lambda r: r["D"]):
            if first is None or r["D"] > 1.1 * first:
                first = r["D"]
            groups.setdefault((*model, f"{first:.0f}"), []).append(r)
    return groups


def _slice_optimum(values: Sequence[float], losses: Sequence[float], rule: str) -> tuple[float, str]:
    if rule == "parabola":
        return sfl.optimum_parabola(values, losses)
    order = np.argsort(values)
    i = int(np.argmin(np.asarray(losses)[order]))
    return float(np.asarray(values)[order][i]), ("edge" if i in (0, len(values) - 1) else "argmin")


def fit_hparam_laws(rows: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per-group batch/lr optimum, then per-family B_opt and lr_opt power laws in X (spec section 3.5)."""
    by_size = all(c in rows[0] for c in SIZE_COLUMNS)
    groups = _hparam_groups(rows, by_size)
    out_groups = []
    for key, grows in groups.items():
        cells: dict[tuple[float, float], list[float]] = {}
        for r in grows:  # average seeds per (batch_tokens, lr) cell
            cells.setdefault((r["batch_tokens"], r["lr"]), []).append(r["L"])
        mean = {k: float(np.mean(v)) for k, v in cells.items()}
        (b_best, lr_best), l_best = min(mean.items(), key=lambda kv: kv[1])
        lr_slice = sorted((lr, v) for (b, lr), v in mean.items() if b == b_best)
        b_slice = sorted((b, v) for (b, lr), v in mean.items() if lr == lr_best)
        lr_opt, lr_flag = _slice_optimum([x for x, _ in lr_slice], [v for _, v in lr_slice], args.opt_rule)
        b_opt, b_flag = _slice_optimum([x for x, _ in b_slice], [v for _, v in b_slice], args.opt_rule)
        n, d = float(np.median([r["N"] for r in grows])), float(np.median([r["D"] for r in grows]))
        out_groups.append({"family": key[0], "key": list(key), "size": list(key[1:-1]), "N": n, "D": d,
                           "C": 6.0 * n * d, "best_loss": l_best, "best_cell": {"batch_tokens": b_best, "lr": lr_best},
                           "n_runs": len(grows), "n_cells": len(mean), "B_opt": b_opt, "B_flag": b_flag,
                           "lr_opt": lr_opt, "lr_flag": lr_flag,
                           "X": l_best if args.x == "loss" else 6.0 * n * d})
    laws: dict[str, Any] = {}
    for fam in sorted({g["family"] for g in out_groups}):
        fg = [g for g in out_groups if g["family"] == fam]
        x = np.array([g["X"] for g in fg])
        fam_laws: dict[str, Any] = {}
        for target in ("B_opt", "lr_opt"):
            if np.unique(x).size < 2:
                fam_laws[target] = {"skipped": f"{len(fg)} group(s) with {np.unique(x).size} distinct X: a law needs 2"}
                continue
            y = np.array([g[target] for g in fg])
            law = sfl.fit_power_law(x, y)
            if args.bootstrap and len(fg) >= 3:
                law["bootstrap"] = sfl.bootstrap_power_law(x, y, n_boot=args.bootstrap, seed=args.seed)
            fam_laws[target] = law
        laws[fam] = fam_laws
    pairs = []
    if by_size:  # MoE vs dense at the same size and tokens (the paper: MoE lr_opt larger, B_opt smaller at equal loss)
        dense = {tuple(g["key"][1:]): g for g in out_groups if _ffn_of(rows, g["family"]) == "dense"}
        for g in out_groups:
            ref = dense.get(tuple(g["key"][1:]))
            if ref is not None and _ffn_of(rows, g["family"]) == "moe":
                pairs.append({"size_tokens": g["key"][1:], "dense": ref["family"], "moe": g["family"],
                              "lr_opt_ratio": g["lr_opt"] / ref["lr_opt"], "B_opt_ratio": g["B_opt"] / ref["B_opt"],
                              "best_loss_dense": ref["best_loss"], "best_loss_moe": g["best_loss"]})
    return {"x": args.x, "opt_rule": args.opt_rule, "formula": sfl.POWER_LAW_FORMULA, "groups": out_groups,
            "laws": laws, "pairs": pairs}


def _ffn_of(rows: Sequence[Mapping[str, Any]], family: str) -> str:
    return next(r["ffn"].strip() for r in rows if str(r["family"]) == family)


# ------------------------------------------------------------------------------------------------- output
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.4e}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_loss_table(result: Mapping[str, Any]) -> str:
    lines = []
    for name, f in result["fits"].items():
        ci = f.get("bootstrap", {}).get("ci", {})
        lines.append(f"== {name}: law {f['law']}, {f['n_points']} runs, E {f['E_values']}, RMSE(log L) "
                     f"{f['rmse']:.4g}, R² {f['r2']:.4f}, {f['n_starts_at_best']}/{f['n_starts']} starts at best")
        lines.append(f"   {'param':<18}{'estimate':>14}{'2.5%':>14}{'97.5%':>14}")
        for k, v in f["params"].items():
            lo, hi = ci.get(k, (None, None))
            lines.append(f"   {k:<18}{_fmt(v):>14}{_fmt(lo):>14}{_fmt(hi):>14}")
        if "holdout" in f:
            h = f["holdout"]
            lines.append(f"   hold-out of {h['n_holdout']} largest-C run(s): mean |rel err| {h['mean_abs_rel_error']:.4%}, "
                         f"max {h['max_abs_rel_error']:.4%}")
        lines.extend(f"   warning: {w}" for w in f["warnings"])
    lines.extend(f"note: {n}" for n in result.get("notes", []))
    for c in result.get("comparison", []):
        who = f"{c['moe']} vs {c['dense']}" if c["kind"] == "per_family" else f"{c['kind']} at E={c['E']:g} vs E=1"
        gamma = "" if c.get("gamma") is None else f", gamma {c['gamma']:.4f}{_ci(c.get('gamma_ci'))}"
        lines.append(f"-- {who}: a {c['a_moe']:.4f}{_ci(c.get('a_moe_ci'))} vs {c['a_dense']:.4f}"
                     f"{_ci(c.get('a_dense_ci'))}; b {c['b_moe']:.4f} vs {c['b_dense']:.4f}{gamma}")
        lines.append(f"   at C = {c['C']:.4e}: L_moe {c['loss_moe']:.4f}, L_dense {c['loss_dense']:.4f}, "
                     f"loss gap {c['loss_gap_rel']:+.4%}, efficiency ratio C_dense(L*)/C = {c['ratio']:.4f}")
    return "\n".join(lines)


def _ci(ci: Sequence[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.4f}, {ci[1]:.4f}]"


def format_hparam_table(h: Mapping[str, Any]) -> str:
    lines = [f"{'family':<10}{'size':<16}{'D':>10}{'best loss':>11}{'B_opt':>12}{'flag':>10}{'lr_opt':>12}{'flag':>10}"]
    for g in h["groups"]:
        lines.append(f"{g['family']:<10}{'x'.join(g['size']):<16}{g['D']:>10.0f}{g['best_loss']:>11.4f}"
                     f"{g['B_opt']:>12.4g}{g['B_flag']:>10}{g['lr_opt']:>12.4g}{g['lr_flag']:>10}")
    for fam, laws in h["laws"].items():
        for target, law in laws.items():
            if "skipped" in law:
                lines.append(f"{fam} {target}: skipped ({law['skipped']})")
                continue
            ci = law.get("bootstrap", {}).get("ci", {})
            lines.append(f"{fam} {target} = {law['lambda']:.4g} * X^{law['exponent']:+.4f}{_ci(ci.get('exponent'))}"
                         f" (X = {h['x']}, R² {law['r2']:.4f}, {law['n']} groups)")
    for p in h["pairs"]:
        lines.append(f"{p['moe']} vs {p['dense']} at {p['size_tokens']}: lr_opt x{p['lr_opt_ratio']:.3g}, "
                     f"B_opt x{p['B_opt_ratio']:.3g}")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to Python, NaN/inf to None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _curve_e(fit: Mapping[str, Any], e: float) -> float:
    return e if fit["law"] != "dense" else 1.0


def plot_loss_laws(rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Loss vs C with frontiers, IsoFLOP curves, observed vs predicted with residuals, bootstrap histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits, fams, paths = result["fits"], _families(rows), []
    colors = {f: f"C{i}" for i, f in enumerate([*fams, *[k for k in fits if k not in fams]])}
    c_all = np.array([r["C"] for r in rows])
    c_grid = np.geomspace(c_all.min() / 2, c_all.max() * 2, 100)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fam, frows in fams.items():
        ax.scatter([r["C"] for r in frows], [r["L"] for r in frows], s=18, color=colors[fam], label=f"{fam} runs")
    for name, f in fits.items():
        for e in (f["E_values"] if f["law"] != "dense" else [1.0]):
            try:
                frontier = sfl.frontier_loss(f["params"], c_grid, e)
            except ValueError:  # no interior optimum (α or β at 0): nothing to draw
                continue
            ax.plot(c_grid, frontier, color=colors[name], ls="-" if name in fams else "--",
                    label=f"{name} frontier" + (f" E={e:g}" if f["law"] != "dense" else ""))
    ax.set(xscale="log", xlabel="C = 6·N·D (FLOPs)", ylabel="validation loss (nats/token)",
           title="Loss vs compute with fitted compute-optimal frontiers")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "loss_vs_compute.png"))

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4), squeeze=False)
    for ax, (name, f) in zip(axes[0], fits.items(), strict=True):
        e = max(f["E_values"]) if f["law"] != "dense" else 1.0
        budgets = np.geomspace(*f["C_range"], 4)
        n_obs = [r["N"] for r in rows if str(r["run_id"]) in set(f["run_ids"])]
        try:
            n_opt, d_opt = sfl.allocation(f["params"], budgets, e)
        except ValueError:  # no interior optimum: curves only
            n_opt = d_opt = None
        n_lo, n_hi = min(n_obs), max(n_obs)
        if n_opt is not None:
            n_lo, n_hi = min(n_lo, n_opt.min()), max(n_hi, n_opt.max())
        n_grid = np.geomspace(n_lo / 4, n_hi * 4, 100)
        for i, c in enumerate(budgets):
            ax.plot(n_grid, sfl.predict(f["params"], n_grid, c / (6 * n_grid), e), color=f"C{i}", label=f"C={c:.2e}")
            if n_opt is not None:
                ax.scatter([n_opt[i]], [sfl.predict(f["params"], n_opt[i], d_opt[i], e)], color=f"C{i}", marker="*",
                           s=60)
        label = f" (E={e:g})" if f["law"] != "dense" else ""
        ax.set(xscale="log", xlabel="N", ylabel="predicted loss", title=f"IsoFLOP: {name}{label} (stars: N_opt)")
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "isoflop.png"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    by_id = {str(r["run_id"]): r for r in rows}
    for name, f in fits.items():
        sub = [by_id[i] for i in f["run_ids"]]
        obs = np.array([r["L"] for r in sub])
        pred = sfl.predict(f["params"], [r["N"] for r in sub], [r["D"] for r in sub],
                           [_curve_e(f, r["E"]) for r in sub])
        ax1.scatter(obs, pred, s=14, color=colors[name], label=name)
        ax2.scatter([r["C"] for r in sub], np.log(obs) - np.log(pred), s=14, color=colors[name], label=name)
    lims = [min(r["L"] for r in rows) * 0.98, max(r["L"] for r in rows) * 1.02]
    ax1.plot(lims, lims, "k--", lw=1)
    ax1.set(xlabel="observed loss", ylabel="predicted loss", title="Observed vs predicted")
    ax2.axhline(0, color="k", lw=1)
    ax2.set(xscale="log", xlabel="C (FLOPs)", ylabel="log observed - log predicted", title="Residuals")
    ax1.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "observed_vs_predicted.png"))

    boot = {k: f["bootstrap"]["samples"] for k, f in fits.items() if "bootstrap" in f}
    if boot:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        a_all = np.concatenate([s["a"] for s in boot.values()])
        a_bins = np.linspace(np.nanmin(a_all), np.nanmax(a_all), 31)  # shared bins: families comparable
        for name, s in boot.items():
            ax1.hist(s["a"], bins=a_bins, alpha=0.5, color=colors[name], label=name)
            if "gamma" in s:
                ax2.hist(s["gamma"], bins=30, alpha=0.5, color=colors[name], label=name)
        ax1.set(xlabel="a = β/(α+β)  (N_opt ∝ C^a)", ylabel="bootstrap replicates", title="Bootstrap: a")
        ax2.set(xlabel="γ (expert exponent)", title="Bootstrap: γ")
        ax1.legend(fontsize=7)
        if ax2.has_data():
            ax2.legend(fontsize=7)
        else:
            ax2.text(0.5, 0.5, "no γ fitted (no joint MoE law)", ha="center", va="center", transform=ax2.transAxes)
        paths.append(_save(fig, out_dir / "bootstrap_hist.png"))
    return paths


def plot_hparam_laws(h: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """B_opt and lr_opt vs X, log-log, per family: optima, fitted law and bootstrap CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for target, fname, ylabel in (("B_opt", "hparam_bopt.png", "B_opt (tokens/step)"),
                                  ("lr_opt", "hparam_lropt.png", "lr_opt")):
        fig, ax = plt.subplots(figsize=(6, 4.3))
        for i, fam in enumerate(sorted({g["family"] for g in h["groups"]})):
            fg = [g for g in h["groups"] if g["family"] == fam]
            x = np.array([g["X"] for g in fg])
            ax.scatter(x, [g[target] for g in fg], color=f"C{i}", label=fam, s=24)
            law = h["laws"][fam][target]
            if "skipped" in law:
                continue
            xg = np.geomspace(x.min() / 1.05, x.max() * 1.05, 50)
            ax.plot(xg, law["lambda"] * xg ** law["exponent"], color=f"C{i}", label=f"{fam}: X^{law['exponent']:+.2f}")
            if "bootstrap" in law:
                s = law["bootstrap"]["samples"]
                curves = np.array(s["lambda"])[:, None] * xg[None, :] ** np.array(s["exponent"])[:, None]
                ax.fill_between(xg, *np.percentile(curves, [2.5, 97.5], axis=0), color=f"C{i}", alpha=0.2)
        ax.set(xscale="log", yscale="log", xlabel="final loss" if h["x"] == "loss" else "C = 6·N·D (FLOPs)",
               ylabel=ylabel, title=f"{target} vs {h['x']} ({h['opt_rule']} rule)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / fname))
    return paths


# ------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        extra = ("batch_tokens", "lr") if args.hparam_law else ()
        rows = sfl.load_runs(args.csv, loss_col=args.loss_col, n_col=args.n_col, extra_columns=extra)
        if args.hparam_law:
            hp = fit_hparam_laws(rows, args)
            result: dict[str, Any] = {"hparam": hp}
            print(format_hparam_table(hp))
        else:
            result = fit_loss_laws(rows, args)
            result["comparison"] = compare(rows, result["fits"])
            print(format_loss_table(result))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    impls = sorted({(r.get("moe_impl") or "").strip() for r in rows if r["ffn"].strip() == "moe"} - {""})
    result["source"] = {"csv": str(args.csv), "n_runs": len(rows), "loss_col": args.loss_col, "n_col": args.n_col,
                        "moe_impl": impls[0] if impls else None}
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "csv_opt"}
    if args.plots is not None:
        paths = plot_hparam_laws(result["hparam"], args.plots) if args.hparam_law else \
            plot_loss_laws(rows, result, args.plots)
        result["plots"] = [str(p) for p in paths]
    atomic_write(args.out, json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out}" + (f" and {len(result['plots'])} plots in {args.plots}" if args.plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
