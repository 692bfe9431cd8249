"""Smoke tests of ``benchmarks/ndp_overhead.py`` and ``benchmarks/ndp_multiref.py`` on tiny slices of the real
``bible_multiref`` demo (16 training verses): both run end to end and print parseable JSON lines whose exact
invariants hold (same batches and initial losses in every step arm, dense = sparse loss, dense bytes = P x V x 4,
identical tables from both backends and from the run's own builder, exact R x growth of the supervised table,
ratios and means computed from the printed figures, every arm and seed present). Speeds, memory and model quality
are never asserted (benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import ndp_multiref, ndp_overhead

V = 49152  # the SmolLM2 tokenizer of llama-tiny


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ndp_bench")


def run_main(main: Callable[[list[str]], list[dict[str, Any]]], argv: list[str]) -> list[dict[str, Any]]:
    """``main(argv)``; returns the JSON lines of its stdout (checked equal to its return value, stdout JSON only)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = main(argv)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == returned and lines
    figures = [ln["figure"] for ln in lines]
    assert len(set(figures)) == len(figures)
    return lines


def check_ratio(ln: dict[str, Any]) -> None:
    if ln["baseline_value"] in (None, 0):
        assert ln["ratio"] is None
    else:
        assert ln["ratio"] == pytest.approx(ln["ours"] / ln["baseline_value"], rel=1e-12)


# ---------------------------------------------------------------------------------------------------- ndp_overhead
def overhead_args(work: Path, *extra: str) -> list[str]:
    return ["--steps", "2", "--warmup", "1", "--max-train", "16", "--replicate", "2", "--threads", "1",
            "--data-dir", str(work / "overhead_data"), "--tables-dir", str(work / "overhead_tables"), *extra]


def test_overhead_in_process_step_and_build(work: Path) -> None:
    from datamodules.ndp_tables import NDPTables

    lines = run_main(ndp_overhead.main, overhead_args(work, "--inprocess"))
    by = {ln["figure"]: ln for ln in lines}
    arms, sets = ndp_overhead.ARMS, ("demo", "demo_x2")
    expected = {f"{m}_{a}" for m in ("s_per_step", "collate_ms", "peak_train_mem_mb") for a in arms}
    expected |= {f"{m}_{d}_{b}" for m in ("build_s", "tokens_per_s_count", "tokens_per_s_lookup", "build_mem_added_mb",
                                          "targets_npz_bytes") for d in sets for b in ("hash128", "trie")}
    expected |= {f"{m}_growth_{b}" for m in ("build_s", "build_mem_added_mb", "targets_npz_bytes")
                 for b in ("hash128", "trie")}
    assert set(by) == expected
    for ln in lines:
        assert ln["benchmark"] == "ndp_overhead" and ln["isolation"] == "inprocess"
        check_ratio(ln)

    # ---- step part: same batches and same initial model in every arm; dense loss = sparse loss
    res = {a: by[f"s_per_step_{a}"]["result"] for a in arms}
    for arm in arms:
        r = res[arm]
        assert len(r["losses"]) == len(r["losses_ntp"]) == 3 and len(r["batch_checksums"]) == 2
        assert r["s_per_step"] == pytest.approx(r["elapsed_s"] / 2)
        assert r["dense_target_bytes_per_batch"] == pytest.approx(r["positions_per_batch"] * V * 4)
        assert r["vocab_size"] == V
        assert r["batch_checksums"] == res["ntp"]["batch_checksums"]
        assert r["positions_per_batch"] == res["ntp"]["positions_per_batch"] > 0
        assert r["losses_ntp"][0] == pytest.approx(res["ntp"]["losses_ntp"][0], rel=1e-6)  # same init, same batch
        line = by[f"s_per_step_{arm}"]
        if arm == "ntp":
            assert line["baseline"] is line["ratio"] is line["goal"] is None
        else:
            assert line["baseline"] == "ntp" and line["baseline_value"] == res["ntp"]["s_per_step"]
    assert res["ntp"]["losses"] == res["ntp"]["losses_ntp"]  # NTP's objective is the one-hot CE
    assert res["ndp_dense"]["losses"] == pytest.approx(res["ndp_sparse"]["losses"], rel=1e-5)
    assert res["ndp_sparse"]["losses"][0] != pytest.approx(res["ndp_sparse"]["losses_ntp"][0], rel=1e-7)  # soft rows
    sparse = by["s_per_step_ndp_sparse"]
    assert sparse["goal"] == "<= 1.05" and sparse["meets_goal"] == (sparse["ratio"] <= 1.05)
    assert sparse["acceptance"] == "<= 1.10" and sparse["meets_acceptance"] == (sparse["ratio"] <= 1.10)
    assert by["s_per_step_ndp_dense"]["goal"] is None and "acceptance" not in by["s_per_step_ndp_dense"]

    # ---- build part: both backends agree, with each other and with the run's own table
    build = {(d, b): by[f"build_s_{d}_{b}"]["result"] for d in sets for b in ("hash128", "trie")}
    for (d, b), r in build.items():
        assert r["dense_bytes"] == r["n_positions"] * V * 4
        assert r["bytes_per_position"] == pytest.approx(r["targets_npz_bytes"] / r["n_positions"])
        assert by[f"targets_npz_bytes_{d}_{b}"]["baseline_value"] == r["dense_bytes"]
        assert r["copies"] == (2 if d == "demo_x2" else 1) and r["min_prefix"] == 1
        line = by[f"build_s_{d}_{b}"]
        assert line.get("meets_spec_target") == ((r["build_s"] < 60) if d == "demo" else None)
    for d in sets:
        h, t = build[(d, "hash128")], build[(d, "trie")]
        assert h["arrays_sha256"] == t["arrays_sha256"]
        for key in ("n_positions", "n_tokens", "sup_keys", "clm_keys", "sup_entries", "clm_entries"):
            assert h[key] == t[key]
        assert by[f"build_s_{d}_hash128"]["baseline"] == "trie" and by[f"build_s_{d}_trie"]["baseline"] is None
    run_table = NDPTables.load(work / "overhead_tables" / "train")
    assert ndp_overhead.arrays_digest(run_table) == build[("demo", "hash128")]["arrays_sha256"]
    demo, rep = build[("demo", "trie")], build[("demo_x2", "trie")]
    assert demo["n_positions"] == run_table.n_positions
    assert by["build_s_demo_trie"]["first_token_shared"] is True
    for key in ("n_examples", "n_positions", "n_tokens", "sup_keys", "sup_entries"):  # exact for the shift copies
        assert rep[key] == 2 * demo[key]
    assert demo["clm_keys"] <= rep["clm_keys"] <= 2 * demo["clm_keys"]
    assert rep["frac_multi_sup"] == pytest.approx(demo["frac_multi_sup"])
    assert 0 < demo["frac_multi_sup"] < demo["frac_multi_clm"] < 1
    growth = by["targets_npz_bytes_growth_trie"]
    assert growth["ours"] == rep["targets_npz_bytes"] and growth["baseline_value"] == demo["targets_npz_bytes"]


def test_overhead_build_in_subprocesses(work: Path) -> None:
    lines = run_main(ndp_overhead.main, overhead_args(work, "--part", "build", "--backends", "hash128"))
    by = {ln["figure"]: ln for ln in lines}
    assert set(by) == {f"{m}_{d}_hash128" for m in ("build_s", "tokens_per_s_count", "tokens_per_s_lookup",
                                                      "build_mem_added_mb", "targets_npz_bytes")
                       for d in ("demo", "demo_x2")} | {f"{m}_growth_hash128" for m in ("build_s", "build_mem_added_mb",
                                                                                          "targets_npz_bytes")}
    demo, rep = by["build_s_demo_hash128"]["result"], by["build_s_demo_x2_hash128"]["result"]
    assert by["build_s_demo_hash128"]["isolation"] == "subprocess" and "VmHWM" in demo["mem_kind"]
    assert rep["n_positions"] == 2 * demo["n_positions"] and rep["sup_keys"] == 2 * demo["sup_keys"]
    for ln in lines:
        check_ratio(ln)
        assert ln["baseline"] in (None, "dense", "demo")  # no trie run, so no hash128/trie ratio


def test_overhead_rejects_bad_arguments() -> None:
    for argv in (["--arms", "ntp,bogus"], ["--replicate", "1"], ["--steps", "0"], ["--backends", "btree"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            ndp_overhead.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- ndp_multiref
def test_multiref_two_arms_one_seed(work: Path) -> None:
    out, tables = work / "multiref_out", work / "multiref_tables"
    argv = ["--seeds", "0", "--arms", "ndp,ntp", "--steps", "2", "--max-train", "16", "--max-eval", "4",
            "--max-new-tokens", "8", "--threads", "1", "--data-dir", str(work / "multiref_data"), "--tables-dir",
            str(tables), "--out", str(out)]
    lines = run_main(ndp_multiref.main, argv)
    by = {ln["figure"]: ln for ln in lines}
    metrics = ndp_multiref.METRICS
    assert set(by) == ({f"{m}_{a}" for m in metrics for a in ("ndp", "ntp")}
                       | {"frac_multi_sup", "frac_multi_clm", "expect_val_loss_ntp", "expect_coverage"})
    for arm in ("ndp", "ntp"):
        result = json.loads((out / arm / "seed0" / "result.json").read_text())
        assert result["arm"] == arm and result["seed"] == 0 and result["steps"] == 2
        assert not (out / arm / "seed0" / "checkpoints").exists()  # deleted after scoring
        for metric in metrics:
            ln = by[f"{metric}_{arm}"]
            assert ln["ours_runs"] == [result[metric]] and ln["ours"] == result[metric] and ln["ours_std"] is None
            assert ln["seeds"] == [0] and ln["steps"] == 2
            if arm == "ntp":
                assert ln["baseline"] is ln["ratio"] is ln["diff"] is None
            else:
                base = by[f"{metric}_ntp"]["ours"]
                assert ln["baseline"] == "ntp" and ln["baseline_value"] == base
                assert ln["diff"] == pytest.approx(ln["ours"] - base)
                check_ratio(ln)
        assert result["coverage"] == pytest.approx(result["p_web"] + result["p_kjv"], abs=1e-6)
        assert 0 <= result["coverage"] <= 1 and 0 <= result["top1_in_refs"] <= 1
        assert 0 < result["entropy"] <= math.log(V) + 1e-4
        assert result["val_loss_ntp"] > 0 and result["test_sacrebleu"] >= 0 and result["test_chrf"] >= 0
    counts = by["coverage_ndp"]["coverage_counts"]
    assert counts["verses"] == 4 and counts["positions"] == 4  # Mark 1:1-4: WEB and KJV differ in each
    assert counts["positions"] + counts["identical"] + counts["too_long"] + counts["no_pair"] == counts["verses"]
    stats = json.loads((tables / "train" / "meta.json").read_text())["stats"]
    for key in ("frac_multi_sup", "frac_multi_clm"):
        assert by[key]["ours"] == stats[key]
    assert 0 < by["frac_multi_sup"]["ours"] < by["frac_multi_clm"]["ours"]
    loss = by["expect_val_loss_ntp"]
    assert loss["ntp_std"] is None and loss["bound"] == loss["ntp"] == by["val_loss_ntp_ntp"]["ours"]
    assert loss["holds"] == (by["val_loss_ntp_ndp"]["ours"] <= loss["bound"])
    cov = by["expect_coverage"]
    assert cov["holds"] == (by["coverage_ndp"]["ours"] >= by["coverage_ntp"]["ours"])
    assert [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] == lines


def test_multiref_rejects_bad_arguments() -> None:
    for argv in (["--arms", "ndp,ndp"], ["--arms", "mle"], ["--seeds", "0,0"], ["--steps", "0"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            ndp_multiref.parse_args(argv)
