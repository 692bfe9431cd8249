"""Scaling-law fitter: ``scripts/scaling_fit_lib.py`` and ``scripts/fit_scaling_laws.py`` (spec ``moe_scaling.md``).

Spec section 10 tests 5-9 on synthetic data with known parameters (loss-law recovery, allocation against a numerical
argmin, hyperparameter power laws and the parabola rule, Huber robustness, bootstrap coverage), the fitter's bad
inputs of section 11, and CLI runs on small synthetic results CSVs (fits.json content, PNG plots).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import check_grad, minimize_scalar

from scripts import fit_scaling_laws as cli
from scripts import scaling_fit_lib as sfl

# Spec section 10 test 5.
TRUE = {"A": 400.0, "alpha": 0.34, "gamma": 0.12, "B": 410.0, "beta": 0.28, "L0": 1.69}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def synthetic(noise: float = 0.01, seed: int = 0, n: int = 80, experts: tuple[int, ...] = (1, 4, 8, 16)):
    """80 points, log-uniform N in [1e6, 5e7], D in [2e7, 1e9], E from ``experts``, multiplicative noise."""
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(math.log(1e6), math.log(5e7), n))
    D = np.exp(rng.uniform(math.log(2e7), math.log(1e9), n))
    E = rng.choice(np.array(experts, dtype=float), n)
    L = sfl.predict(TRUE, N, D, E) * (1 + noise * rng.standard_normal(n))
    return N, D, E, L


# ------------------------------------------------------------------------------------------------- objective
@pytest.mark.parametrize("law", list(sfl.LAWS))
@pytest.mark.parametrize("delta", [1e-3, math.inf])
def test_analytic_gradient_matches_finite_differences(law: str, delta: float) -> None:
    N, D, E, L = synthetic()
    M, logL = sfl._design(law, N, D, E), np.log(L)
    theta = sfl._grid_starts(law, "tiny", L)[7] + 0.013  # a generic point, residuals beyond the Huber threshold
    f = lambda t: sfl._objective(t, M, logL, delta)[0]
    g = lambda t: sfl._objective(t, M, logL, delta)[1]
    assert check_grad(f, g, theta, epsilon=1e-7) < 1e-5 * max(1.0, np.linalg.norm(g(theta)))


# ------------------------------------------------------------------------------------------------- test 5
def test_loss_law_recovery_with_noise() -> None:
    N, D, E, L = synthetic(noise=0.01)
    fit = sfl.fit_loss_law(N, D, L, E, law="moe", grid="tiny")
    p = fit["params"]
    assert abs(p["alpha"] - TRUE["alpha"]) < 0.03
    assert abs(p["beta"] - TRUE["beta"]) < 0.03
    assert abs(p["gamma"] - TRUE["gamma"]) < 0.03
    assert abs(p["a"] - TRUE_A) < 0.01
    assert abs(p["a"] + p["b"] - 1) < 1e-12
    assert abs(p["L0"] / TRUE["L0"] - 1) < 0.05
    assert abs(p["A"] / TRUE["A"] - 1) < 0.15 and abs(p["B"] / TRUE["B"] - 1) < 0.15
    assert fit["n_starts"] == 3 * 3 * 2 * 2 * 2 and fit["n_starts_at_best"] >= 2
    assert fit["rmse"] < 0.015 and fit["r2"] > 0.9 and fit["warnings"] == []


def test_loss_law_recovery_noise_free() -> None:
    N, D, E, L = synthetic(noise=0.0)
    fit = sfl.fit_loss_law(N, D, L, E, law="moe", grid="tiny")
    for k, v in TRUE.items():
        assert fit["params"][k] == pytest.approx(v, rel=1e-3), k
    assert fit["params"]["a"] == pytest.approx(TRUE_A, rel=1e-3)
    assert fit["rmse"] < 1e-6 and fit["r2"] > 1 - 1e-9


def test_interaction_law_recovers_zero_interaction_and_predict_matches() -> None:
    N, D, E, L = synthetic(noise=0.0)
    fit = sfl.fit_loss_law(N, D, L, E, law="moe_interaction", grid="tiny")
    assert abs(fit["params"]["delta_interaction"]) < 1e-3
    assert np.allclose(sfl.predict(fit, N, D, E), L, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- test 6
@pytest.mark.parametrize("E", [1, 8])
def test_allocation_matches_numerical_argmin(E: int) -> None:
    C = np.array([1e15, 1e16, 1e17, 1e18, 1e19, 1e20])
    n_closed, d_closed = sfl.allocation(TRUE, C, E)
    assert np.allclose(6 * n_closed * d_closed, C, rtol=1e-12)
    n_num = []
    for c in C:
        res = minimize_scalar(lambda logn, c=c: float(sfl.predict(TRUE, math.exp(logn), c / (6 * math.exp(logn)), E)),
                              bounds=(0.0, 60.0), method="bounded", options={"xatol": 1e-10})
        n_num.append(math.exp(res.x))
    assert np.allclose(n_num, n_closed, rtol=0.01)
    slope = np.polyfit(np.log(C), np.log(n_num), 1)[0]
    assert abs(slope - TRUE_A) < 1e-3


# ------------------------------------------------------------------------------------------------- test 7
def test_power_law_recovery_exact_and_noisy() -> None:
    L = np.linspace(2.5, 5.0, 12)
    exact = sfl.fit_power_law(L, 2e5 * L ** -4.0)
    assert exact["lambda"] == pytest.approx(2e5, rel=1e-6) and exact["exponent"] == pytest.approx(-4.0, abs=1e-6)
    assert exact["alpha"] == pytest.approx(4.0, abs=1e-6) and exact["r2"] == pytest.approx(1.0, abs=1e-12)
    assert exact["formula"] == "Y = lambda * X^exponent"
    rng = np.random.default_rng(0)
    noisy = sfl.fit_power_law(L, 2e5 * L ** -4.0 * (1 + 0.02 * rng.standard_normal(L.size)))
    assert abs(noisy["exponent"] + 4.0) < 0.1


def test_parabola_rule_vertex_and_fallbacks() -> None:
    lr = np.geomspace(1e-4, 1e-1, 7)
    quad = 3.0 + 0.7 * (np.log(lr) - math.log(4.2e-3)) ** 2
    value, flag = sfl.optimum_parabola(lr[::-1], quad[::-1])  # any order
    assert flag == "parabola" and abs(math.log(value) - math.log(4.2e-3)) < 1e-9
    assert sfl.optimum_parabola(lr, 3.0 + 0.7 * (np.log(lr) - math.log(1e-5)) ** 2) == (pytest.approx(1e-4), "edge")
    # a tie between the best point and its right neighbour: the vertex lies halfway between them in log
    value, flag = sfl.optimum_parabola([1, 2, 4], [1.0, 0.5, 0.5])
    assert flag == "parabola" and value == pytest.approx(2**1.5, rel=1e-12)
    with pytest.raises(ValueError, match="duplicate"):
        sfl.optimum_parabola([1, 1, 2], [0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------------- test 8
def test_huber_is_robust_to_one_outlier() -> None:
    N, D, _, L = synthetic(noise=0.01, experts=(1,))
    bad = L.copy()
    bad[0] *= 1.5
    moved = {}
    for name, delta in (("huber", 1e-3), ("squared", math.inf)):
        before = sfl.fit_loss_law(N, D, L, law="dense", delta=delta, grid="tiny")["params"]["alpha"]
        after = sfl.fit_loss_law(N, D, bad, law="dense", delta=delta, grid="tiny")["params"]["alpha"]
        moved[name] = abs(after - before)
    assert moved["huber"] < 0.02
    assert moved["squared"] > moved["huber"]


# ------------------------------------------------------------------------------------------------- test 9
def test_bootstrap_ci_contains_truth() -> None:
    N, D, E, L = synthetic(noise=0.01)
    fit = sfl.fit_loss_law(N, D, L, E, law="moe", grid="tiny")
    boot = sfl.bootstrap_loss_law(N, D, L, E, fit=fit, n_boot=40, seed=0)
    lo, hi = boot["ci"]["alpha"]
    assert lo < TRUE["alpha"] < hi and hi - lo > 0
    assert boot["n_ok"] == 40 and len(boot["samples"]["gamma"]) == 40
    assert set(boot["ci"]) == set(fit["params"])
    assert all(abs(a + b - 1) < 1e-12 for a, b in zip(boot["samples"]["a"], boot["samples"]["b"], strict=True))


def test_bootstrap_is_seeded_and_generic() -> None:
    x = np.geomspace(2.0, 5.0, 8)
    y = 3.0 * x ** 1.5 * (1 + 0.05 * np.random.default_rng(1).standard_normal(8))
    one = sfl.bootstrap_power_law(x, y, n_boot=30, seed=3)
    two = sfl.bootstrap_power_law(x, y, n_boot=30, seed=3)
    assert one["ci"] == two["ci"] and one["ci"]["exponent"][0] < 1.5 < one["ci"]["exponent"][1]
    with pytest.raises(ValueError, match="n_boot"):
        sfl.bootstrap(lambda s, rng: {}, {"x": x}, n_boot=0)


# ------------------------------------------------------------------------------------------------- derived
def test_efficiency_ratio_and_holdout() -> None:
    same = sfl.efficiency_ratio(TRUE, TRUE, [1e18, 1e20], E=1)
    assert np.allclose(same["ratio"], 1.0, rtol=1e-8) and np.allclose(same["loss_gap_rel"], 0.0, atol=1e-12)
    moe = sfl.efficiency_ratio(TRUE, TRUE, 1e19, E=8)  # γ > 0: MoE lower loss, dense needs more compute
    assert moe["ratio"][0] > 1 and moe["loss_gap_rel"][0] > 0
    assert sfl.frontier_loss(TRUE, moe["C_dense"][0]) == pytest.approx(moe["loss_moe"][0], rel=1e-10)
    N, D, E, L = synthetic(noise=0.0)
    ho = sfl.holdout_largest_compute(N, D, L, E, law="moe", grid="tiny")
    assert ho["n_holdout"] == 1 and ho["n_train"] == 79 and ho["max_abs_rel_error"] < 1e-4
    budget = np.where(np.arange(80) < 3, 1e30, 6 * N * D)  # an IsoFLOP-style planned budget shared by 3 runs
    ho = sfl.holdout_largest_compute(N, D, L, E, law="moe", grid="tiny", budget=budget)
    assert [h["index"] for h in ho["held_out"]] == [0, 1, 2] and ho["max_abs_rel_error"] < 1e-4


# ------------------------------------------------------------------------------------------------- bad inputs
def test_fit_refuses_bad_inputs() -> None:
    N, D, E, L = synthetic(noise=0.0, n=12)
    with pytest.raises(ValueError, match="γ is unidentifiable"):
        sfl.fit_loss_law(N, D, L, np.ones_like(N), law="moe", grid="tiny")
    with pytest.raises(ValueError, match="points for 6 parameters"):
        sfl.fit_loss_law(N[:8], D[:8], L[:8], E[:8], law="moe", grid="tiny")
    with pytest.raises(ValueError, match="distinct N"):
        sfl.fit_loss_law(np.full(12, 1e6), D, L, grid="tiny")
    bad = L.copy()
    bad[[2, 5]] = [np.nan, -1.0]
    with pytest.raises(ValueError, match="run_ids r2, r5"):
        sfl.fit_loss_law(N, D, bad, grid="tiny", run_ids=[f"r{i}" for i in range(12)])
    with pytest.raises(ValueError, match="indices 3"):
        sfl.fit_loss_law(np.where(np.arange(12) == 3, 0.0, N), D, L, grid="tiny")
    with pytest.raises(ValueError, match="law='dense' ignores E"):
        sfl.fit_loss_law(N, D, L, E, law="dense", grid="tiny")
    with pytest.raises(ValueError, match="law must be one of"):
        sfl.fit_loss_law(N, D, L, law="kaplan")
    with pytest.raises(ValueError, match="grid must be one of"):
        sfl.fit_loss_law(N, D, L, grid="huge")


def test_identifiability_warnings() -> None:
    N = np.array([1e6, 2e6] * 5)
    D = np.array([1e8] * 5 + [2e8] * 5)
    warnings = sfl.identifiability_warnings(N, D)
    assert len(warnings) == 4 and "2 distinct D" in warnings[0] and "2 model sizes" in warnings[3]
    assert sfl.identifiability_warnings(np.geomspace(1e6, 1e7, 4), np.geomspace(1e8, 4e8, 3)) == []


# ------------------------------------------------------------------------------------------------- CSV + CLI
COLUMNS = ["run_id", "family", "ffn", "num_experts", "top_k", "d_model", "n_layers", "n_heads", "seed", "status",
           "git_sha", "n_active_nonemb", "n_total_nonemb", "n_embedding", "tokens", "batch_size", "batch_tokens",
           "seq_len", "lr", "steps", "flops_6nd", "flops_kaplan", "final_train_lm_loss", "final_val_loss",
           "best_val_loss", "wall_s", "moe_impl"]
SIZES = [(32, 2, 4), (48, 2, 4), (64, 2, 4), (96, 3, 4)]
N_OF = {32: 2.5e4, 48: 5.5e4, 64: 1.0e5, 96: 3.4e5}
TINY_TRUE = {"A": 30.0, "alpha": 0.3, "gamma": 0.15, "B": 60.0, "beta": 0.25, "L0": 2.0}


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    return path


def sweep_rows(noise: float = 0.002) -> list[dict]:
    """The demo sweep design (4 sizes x 3 D x dense/MoE E=8) with losses from ``TINY_TRUE`` and small noise."""
    rng = np.random.default_rng(0)
    rows = []
    for fam, ffn, e in (("dense", "dense", 1), ("moe", "moe", 8)):
        for d_model, n_layers, n_heads in SIZES:
            for tokens in (2**18, 2**19, 2**20):
                n = N_OF[d_model]
                loss = float(sfl.predict(TINY_TRUE, n, tokens, e)) * (1 + noise * rng.standard_normal())
                rows.append({"run_id": f"{fam}-d{d_model}-D{tokens}", "family": fam, "ffn": ffn, "num_experts": e,
                             "top_k": 2, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "seed": 0,
                             "status": "ok", "n_active_nonemb": n, "tokens": tokens, "batch_tokens": 2048,
                             "lr": 3e-3, "final_val_loss": loss, "moe_impl": "mixtral",
                             "flops_6nd": 6 * n * tokens})
    return rows


def test_load_runs_filters_and_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = sweep_rows()
    rows.append({**rows[0], "run_id": "broken", "status": "failed", "final_val_loss": ""})
    runs = sfl.load_runs(write_csv(tmp_path / "r.csv", rows))
    assert "excluded 1 of 25 runs" in capsys.readouterr().err
    assert len(runs) == 24 and {r["E"] for r in runs} == {1.0, 8.0}
    first = runs[0]
    assert (first["N"], first["D"], first["C"]) == (2.5e4, 2**18, 6 * 2.5e4 * 2**18)


def test_load_runs_errors(tmp_path: Path) -> None:
    rows = sweep_rows()
    path = tmp_path / "missing.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in COLUMNS if c not in ("tokens", "final_val_loss")])
        w.writeheader()
    with pytest.raises(KeyError, match=r"\['tokens', 'final_val_loss'\]"):
        sfl.load_runs(path)
    bad = [dict(r) for r in rows]
    bad[3]["n_active_nonemb"] = 0
    bad[5]["final_val_loss"] = "nan"
    with pytest.raises(ValueError, match="n_active_nonemb: run_ids dense-d48-D262144; final_val_loss: run_ids "
                                         "dense-d48-D1048576"):
        sfl.load_runs(write_csv(tmp_path / "bad.csv", bad))
    mixed = [dict(r) for r in rows]
    mixed[-1]["moe_impl"] = "qwen2_moe"
    with pytest.raises(ValueError, match="mixed moe_impl"):
        sfl.load_runs(write_csv(tmp_path / "mixed.csv", mixed))
    with pytest.raises(FileNotFoundError):
        sfl.load_runs(tmp_path / "nope.csv")


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_both_laws_fits_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = sweep_rows()
    rows.append({**rows[0], "run_id": "broken", "status": "failed"})
    csv_path = write_csv(tmp_path / "results.csv", rows)
    out, plots = tmp_path / "fits.json", tmp_path / "plots"
    rc = cli.main([str(csv_path), "--law", "both", "--grid", "tiny", "--bootstrap", "4", "--holdout-largest-compute",
                   "--out", str(out), "--plots", str(plots)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "excluded 1 of 25" in printed.err and "efficiency ratio" in printed.out
    res = json.loads(out.read_text())
    assert set(res["fits"]) == {"dense", "moe", "unified_moe"}
    dense, moe, uni = (res["fits"][k] for k in ("dense", "moe", "unified_moe"))
    assert dense["law"] == "dense" and dense["n_points"] == 12 and moe["n_points"] == 12 and uni["n_points"] == 24
    # equal α, β in both families (same truth): equal allocation exponents; γ from the joint fit
    assert abs(dense["params"]["a"] - TINY_TRUE["beta"] / (TINY_TRUE["alpha"] + TINY_TRUE["beta"])) < 0.05
    assert abs(uni["params"]["gamma"] - TINY_TRUE["gamma"]) < 0.03
    assert uni["bootstrap"]["n_boot"] == 4 and len(uni["bootstrap"]["ci"]["gamma"]) == 2
    assert dense["holdout"]["n_holdout"] == 1 and dense["holdout"]["max_abs_rel_error"] < 0.02
    comp = {c["kind"]: c for c in res["comparison"]}
    assert comp["per_family"]["moe"] == "moe" and comp["per_family"]["ratio"] > 1
    assert comp["per_family"]["loss_gap_rel"] > 0 and comp["per_family"]["C"] == 6 * 3.4e5 * 2**20
    assert comp["unified_moe"]["E"] == 8 and comp["unified_moe"]["ratio"] > 1
    assert res["source"] == {"csv": str(csv_path), "n_runs": 24, "loss_col": "final_val_loss",
                             "n_col": "n_active_nonemb", "moe_impl": "mixtral"}
    names = {"loss_vs_compute.png", "isoflop.png", "observed_vs_predicted.png", "bootstrap_hist.png"}
    assert {Path(p).name for p in res["plots"]} == names
    assert all(_is_png(plots / n) for n in names)


def test_cli_moe_law_refuses_single_expert_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense_only = [r for r in sweep_rows() if r["ffn"] == "dense"]
    csv_path = write_csv(tmp_path / "dense.csv", dense_only)
    assert cli.main(["--csv", str(csv_path), "--law", "moe", "--grid", "tiny", "--bootstrap", "0",
                     "--out", str(tmp_path / "f.json")]) == 2
    assert "γ is unidentifiable" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_cli_hparam_law_recovers_power_law(tmp_path: Path) -> None:
    """Loss quadratic in log lr and log B with optima λ·C^p: the parabola rule and OLS recover λ and p.

    Tokens seen differ slightly by batch size (whole steps), as in real sweeps: they still form one group per size.
    """
    rows = []
    batches, lrs = [2**11, 2**12, 2**13, 2**14, 2**15], [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    laws = {"dense": ((13.0, 0.25), (60.0, -0.35)), "moe": ((7.8, 0.25), (120.0, -0.35))}  # (λ, p) of B_opt, lr_opt
    for fam, ((lb, pb), (ll, pl)) in laws.items():
        for d_model, n_layers, n_heads in SIZES[:3]:
            n, tokens = N_OF[d_model], 2**19
            c = 6 * n * tokens
            b_star, lr_star = lb * c ** pb, ll * c ** pl
            for b, dt in zip(batches, (-128, -64, 0, 64, 128), strict=True):
                for lr in lrs:
                    loss = 3.0 + 0.05 * math.log(lr / lr_star) ** 2 + 0.02 * math.log(b / b_star) ** 2
                    rows.append({"run_id": f"{fam}-{d_model}-{b}-{lr}", "family": fam, "ffn": fam,
                                 "num_experts": 8 if fam == "moe" else 1, "d_model": d_model, "n_layers": n_layers,
                                 "n_heads": n_heads, "status": "ok", "n_active_nonemb": n, "tokens": tokens + dt,
                                 "batch_tokens": b, "lr": lr, "final_val_loss": loss})
    out, plots = tmp_path / "hp.json", tmp_path / "hp_plots"
    rc = cli.main([str(write_csv(tmp_path / "hp.csv", rows)), "--hparam-law", "--x", "compute", "--bootstrap", "10",
                   "--out", str(out), "--plots", str(plots)])
    assert rc == 0
    hp = json.loads(out.read_text())["hparam"]
    assert len(hp["groups"]) == 6 and all(g["B_flag"] == g["lr_flag"] == "parabola" for g in hp["groups"])
    for fam, ((lb, pb), (ll, pl)) in laws.items():
        fit_b, fit_lr = hp["laws"][fam]["B_opt"], hp["laws"][fam]["lr_opt"]
        assert fit_b["exponent"] == pytest.approx(pb, abs=1e-9) and fit_b["lambda"] == pytest.approx(lb, rel=1e-6)
        assert fit_lr["exponent"] == pytest.approx(pl, abs=1e-9) and fit_lr["lambda"] == pytest.approx(ll, rel=1e-6)
        assert fit_b["formula"] == "Y = lambda * X^exponent"
    assert all(p["lr_opt_ratio"] == pytest.approx(2.0) and p["B_opt_ratio"] == pytest.approx(0.6) for p in hp["pairs"])
    assert all(_is_png(plots / n) for n in ("hparam_bopt.png", "hparam_lropt.png"))
