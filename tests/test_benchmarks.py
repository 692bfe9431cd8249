"""Smoke tests of the scripts in benchmarks/: each runs end to end on tiny settings and prints parseable JSON lines with
the expected keys. Speed is never asserted (benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import beam_search_speed, pcformer_vs_vanilla, train_throughput

ROOT = Path(__file__).resolve().parents[1]
FIGURE_KEYS = {"benchmark", "figure", "ours", "baseline", "baseline_value", "ratio"}
RUN_KEYS = {
    "variant",
    "seed",
    "params",
    "val_nll",
    "val_sacrebleu",
    "val_nll_avg",
    "val_sacrebleu_avg",
    "test_sacrebleu",
    "wall_s",
    "s_per_step",
    "s_per_step_incl_val",
    "train_step_s",
    "val_s",
    "alpha_trajectory",
    "status",
}


@pytest.fixture(scope="module")
def bible(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo corpus and a 500-piece tokenizer in a temporary directory, built once for the module."""
    from datamodules.translation import TranslationDataModule

    root = tmp_path_factory.mktemp("bench_bible")
    paths = {"data_dir": root / "data", "tokenizer": root / "spm500.model"}
    TranslationDataModule(
        demo="bible", data_dir=str(paths["data_dir"]), tokenizer_path=str(paths["tokenizer"]), vocab_size=500
    ).prepare_data()
    return paths


def run_main(main: Any, argv: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Call a benchmark's ``main(argv)``; returns (JSON lines parsed from its stdout, its return value)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = main(argv)
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert lines, f"no JSON line printed:\n{out.getvalue()[-2000:]}"
    return lines, returned


def tiny_sweep_args(bible: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--seeds",
        "1",
        "--max_steps",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
        "--data_dir",
        str(bible["data_dir"]),
        "--tokenizer_path",
        str(bible["tokenizer"]),
        "--vocab_size",
        "500",
        "--max_train_pairs",
        "200",
        "--max_eval_pairs",
        "12",
        "--max_tokens",
        "512",
        "--extra",
        "--model.init_args.max_len_b 5 --model.init_args.max_len_a 0.5",
        *extra,
    ]


@pytest.fixture(scope="module")
def sweep(bible: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench_sweep")
    argv = tiny_sweep_args(bible, out, "--launcher", "inprocess", "--variants", "vanilla", "pcformer")
    lines, _ = run_main(pcformer_vs_vanilla.main, argv)
    return {"out": out, "argv": argv, "lines": lines}


def test_pcformer_vs_vanilla_smoke(sweep: dict[str, Any]) -> None:
    lines = sweep["lines"]
    runs = [ln for ln in lines if ln["figure"] == "run"]
    assert {(r["variant"], r["seed"]) for r in runs} == {("vanilla", 1), ("pcformer", 1)}
    for r in runs:
        assert r["status"] == "ok", r
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["steps"] == 2 and r["params"] > 0
        for key in ("val_nll", "val_nll_avg", "test_sacrebleu", "s_per_step"):
            assert isinstance(r[key], float), (key, r[key])
    pc = next(r for r in runs if r["variant"] == "pcformer")
    assert pc["alpha_trajectory"] and pc["encoder_block_evals"] == 9
    assert next(r for r in runs if r["variant"] == "vanilla")["alpha_trajectory"] == []
    compared = [ln for ln in lines if ln["figure"] != "run" and ln["baseline"] == "vanilla"]
    assert {ln["figure"] for ln in compared} >= {"val_nll", "test_sacrebleu", "params", "s_per_step"}
    for ln in compared:
        assert FIGURE_KEYS <= set(ln) and ln["variant"] == "pcformer"
    assert (sweep["out"] / "summary.json").is_file()
    assert (sweep["out"] / "pcformer" / "seed1" / "checkpoints" / "averaged.ckpt").is_file()


def test_pcformer_vs_vanilla_resume_skips_finished_runs(sweep: dict[str, Any]) -> None:
    lines, _ = run_main(pcformer_vs_vanilla.main, [*sweep["argv"], "--resume"])
    runs = [ln for ln in lines if ln["figure"] == "run"]
    assert runs and all(r.get("resumed") for r in runs)
    before = {r["variant"]: r["val_nll"] for r in sweep["lines"] if r["figure"] == "run"}
    assert {r["variant"]: r["val_nll"] for r in runs} == before


def test_train_throughput_smoke() -> None:
    argv = [
        "--batch",
        "synthetic",
        "--synthetic_shape",
        "4",
        "8",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    lines, _ = run_main(train_throughput.main, argv)
    assert {(ln["arch"], ln["baseline"]) for ln in lines} == {
        (a, b) for a in ("vanilla", "pcformer") for b in ("bare_pytorch", "hf_marian")
    }
    for ln in lines:
        assert FIGURE_KEYS | {"goal", "batch", "batch_shape", "ntokens"} <= set(ln)
        assert ln["benchmark"] == "train_throughput" and ln["figure"] == "tokens_per_s"
        assert ln["ours"] > 0 and ln["baseline_value"] > 0 and ln["batch_shape"] == [4, 8, 8]
        if ln["baseline"] == "bare_pytorch":
            assert ln["params_ours"] == ln["params_baseline"]  # the same network


def test_train_throughput_bible_batch(bible: dict[str, Path]) -> None:
    argv = [
        "--arch",
        "vanilla",
        "--no_marian",
        "--data_dir",
        str(bible["data_dir"]),
        "--tokenizer_path",
        str(bible["tokenizer"]),
        "--vocab_size",
        "500",
        "--max_train_pairs",
        "300",
        "--max_tokens",
        "256",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    lines, _ = run_main(train_throughput.main, argv)
    assert len(lines) == 1 and lines[0]["batch"] == "bible" and lines[0]["ntokens"] > 0


def test_beam_search_speed_smoke() -> None:
    argv = [
        "--source",
        "synthetic",
        "--num_sentences",
        "4",
        "--batch_size",
        "2",
        "--output_len",
        "3",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    lines, _ = run_main(beam_search_speed.main, argv)
    assert {(ln["arch"], ln["figure"]) for ln in lines} == {
        (a, f) for a in ("vanilla", "pcformer") for f in ("sentences_per_s", "output_tokens_per_s")
    }
    for ln in lines:
        assert FIGURE_KEYS | {"avg_output_len_ours", "avg_output_len_baseline", "length_mode"} <= set(ln)
        assert ln["baseline"] == "hf_marian_generate" and ln["ours"] > 0 and ln["baseline_value"] > 0
        # fixed mode: both sides produce exactly output_len tokens + EOS
        assert ln["lengths_match"] and ln["avg_output_len_ours"] == ln["avg_output_len_baseline"] == 4


def test_beam_search_speed_on_a_checkpoint(sweep: dict[str, Any], bible: dict[str, Path]) -> None:
    ckpt = sweep["out"] / "vanilla" / "seed1" / "checkpoints" / "averaged.ckpt"
    argv = [
        "--checkpoint",
        str(ckpt),
        "--data_dir",
        str(bible["data_dir"]),
        "--tokenizer_path",
        str(bible["tokenizer"]),
        "--num_sentences",
        "4",
        "--batch_size",
        "2",
        "--max_len_a",
        "0.2",
        "--max_len_b",
        "3",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    lines, _ = run_main(beam_search_speed.main, argv)
    assert len(lines) == 2 and all(ln["length_mode"] == "natural" for ln in lines)
    assert all(ln["arch"] == "checkpoint:transformer" and ln["avg_output_len_ours"] > 0 for ln in lines)


@pytest.mark.slow
def test_pcformer_vs_vanilla_cli_subprocesses(bible: dict[str, Path], tmp_path: Path) -> None:
    """The default launcher: every run is a ``python train.py`` subprocess, all three default variants."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pcformer_vs_vanilla.py"), *tiny_sweep_args(bible, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    runs = [ln for ln in lines if ln["figure"] == "run"]
    assert sorted(r["variant"] for r in runs) == sorted(pcformer_vs_vanilla.DEFAULT_VARIANTS)
    assert all(r["status"] == "ok" and r["val_nll_avg"] is not None for r in runs)
    matched = next(r for r in runs if r["variant"] == "vanilla_compute_matched")
    assert matched["encoder_layers"] == 9 and matched["encoder_block_evals"] == 9
    assert any(ln["variant"] == "pcformer" and ln.get("baseline") == "vanilla_compute_matched" for ln in lines)
    assert "mean +- std over seeds" in proc.stderr
