"""Smoke tests of ``benchmarks/slam_vs_full.py`` on ``llama-tiny`` (2 layers, d 64, d_ff 128, tied 49,152 x 64
embeddings): both parts run end to end and print parseable JSON lines with the expected keys; trainable counts and
optimizer-state bytes are exact. Speed, memory and accuracy values are never asserted (benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import slam_vs_full

FIGURE_KEYS = {"benchmark", "part", "figure", "metric", "mode", "ours", "baseline", "baseline_value", "ratio", "goal",
               "meets_goal"}
MODES = ("slam", "full", "lora")
TINY = ["--model", "llama-tiny", "--layers", "0,1", "--threads", "1", "--batch-size", "2"]
LANGS = {"bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"}

# llama-tiny: per layer q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x128, two norms of 64; a final norm.
LAYER = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
TOTAL = 49152 * 64 + 2 * LAYER + 64  # 3,219,776
SLAM_TRAINABLE = 2 * 64 * 128 * 2  # up_proj + down_proj of layers 0 and 1
# AdamW: exp_avg + exp_avg_sq (fp32) per trainable value, plus one 0-d float32 step per trainable tensor.
SLAM_OPT = 2 * 4 * SLAM_TRAINABLE + 4 * 4  # 4 trainable tensors
FULL_OPT = 2 * 4 * TOTAL + 4 * 20  # embeddings, 9 tensors per layer, final norm
# matched LoRA: sum(in + out) of the 7 linears per layer = 1,024, so r = 32,768 / 2,048 = 16 (A and B on 14 linears).
LORA_OPT = 2 * 4 * SLAM_TRAINABLE + 4 * 28


def run_main(argv: list[str]) -> list[dict[str, Any]]:
    """Call ``main(argv)``; returns the JSON lines parsed from its stdout (checked equal to its return value)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = slam_vs_full.main(argv)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # stdout holds JSON lines only
    assert lines == returned
    for ln in lines:
        assert FIGURE_KEYS <= set(ln), FIGURE_KEYS - set(ln)
        assert ln["benchmark"] == "slam_vs_full" and ln["model"] == "llama-tiny" and ln["layers"] == [0, 1]
        assert ln["figure"] == f"{ln['metric']}_{ln['mode']}"
        if ln["mode"] == "full" or ln["baseline"] is None:  # full itself, or full not run
            assert ln["baseline_value"] is ln["ratio"] is ln["goal"] is ln["meets_goal"] is None
        else:
            assert ln["baseline"] == "full" and ln["ratio_definition"] == "ours/full"
            if ln["baseline_value"] != 0:
                assert ln["ratio"] == pytest.approx(ln["ours"] / ln["baseline_value"])
    return lines


def by_figure(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    figures = {ln["figure"]: ln for ln in lines}
    assert len(figures) == len(lines)
    return figures


def test_parse_int_list() -> None:
    assert slam_vs_full.parse_int_list("0-5") == [0, 1, 2, 3, 4, 5]
    assert slam_vs_full.parse_int_list("0,2, 7-8") == [0, 2, 7, 8]
    for bad in ("0,0", "3-1", "a", ""):
        with pytest.raises(ValueError):
            slam_vs_full.parse_int_list(bad)


def test_speed_part_inprocess() -> None:
    argv = [*TINY, "--part", "speed", "--steps", "2", "--warmup", "1", "--seq-len", "32", "--inprocess"]
    figures = by_figure(run_main(argv))
    metrics = ("s_per_step", "peak_train_mem_mb", "optimizer_state_bytes", "trainable_params")
    assert set(figures) == {f"{m}_{mode}" for m in metrics for mode in MODES}
    for ln in figures.values():
        assert ln["lora_r"] == 16 and ln["lora_alpha"] == 32  # matched to SLAM's count
        assert ln["part"] == "speed" and ln["batch_shape"] == [2, 32] and ln["isolation"] == "inprocess"
        assert ln["goal"] == ("< 1" if ln["metric"] == "optimizer_state_bytes" and ln["mode"] != "full" else None)
        assert len(ln["result"]["losses"]) == 3 and all(math.isfinite(x) for x in ln["result"]["losses"])
        assert ln["result"]["s_per_step_median"] > 0 and ln["result"]["peak_train_mem_mb"] >= 0
    expected = {"slam": (SLAM_TRAINABLE, SLAM_OPT, 4), "full": (TOTAL, FULL_OPT, 20),
                "lora": (SLAM_TRAINABLE, LORA_OPT, 28)}
    for mode, (trainable, opt, tensors) in expected.items():
        result = figures[f"trainable_params_{mode}"]["result"]
        assert figures[f"trainable_params_{mode}"]["ours"] == result["params_trainable"] == trainable
        assert figures[f"optimizer_state_bytes_{mode}"]["ours"] == result["optimizer_state_bytes"] == opt
        assert result["optimizer_moment_bytes"] == 8 * trainable and result["optimizer_state_tensors"] == tensors
        assert result["params_total"] == TOTAL + (trainable if mode == "lora" else 0)  # LoRA adds its adapters
    assert figures["optimizer_state_bytes_slam"]["meets_goal"] is True
    assert figures["optimizer_state_bytes_slam"]["ratio"] == pytest.approx(SLAM_OPT / FULL_OPT)
    # The same weights and batch: the first loss is the same in every mode (fresh LoRA adapters are zero).
    first = {mode: figures[f"s_per_step_{mode}"]["result"]["losses"][0] for mode in MODES}
    assert first["slam"] == pytest.approx(first["full"], rel=1e-6) and first["lora"] == pytest.approx(first["full"])


def test_accuracy_part(tmp_path: Path) -> None:
    argv = [*TINY, "--part", "accuracy", "--seeds", "0", "--train-steps", "1", "--eval-per-lang", "1",
            "--max-new-tokens", "4", "--accumulate", "2", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "runs")]
    figures = by_figure(run_main(argv))
    metrics = ("acc_avg", "val_loss", "train_s", "fit_optimizer_state_bytes")
    assert set(figures) == {f"{m}_{mode}" for m in metrics for mode in MODES}
    for mode in MODES:
        acc = figures[f"acc_avg_{mode}"]
        assert acc["part"] == "accuracy" and acc["seeds"] == [0] and acc["ours_std"] is None
        assert acc["lora_r"] == 16 and acc["train_steps"] == 1 and acc["accumulate"] == 2
        assert acc["goal"] == (">= 1.0" if mode == "slam" else None)
        # One test problem per language: acc_<lang> is 0 or 1 and acc_avg their macro mean, as in the predictions.
        per_lang = acc["per_lang_ours"]
        assert set(per_lang) == LANGS and set(per_lang.values()) <= {0.0, 1.0}
        assert acc["ours"] == pytest.approx(sum(per_lang.values()) / 11)
        preds = [json.loads(x) for x in (tmp_path / "runs" / mode / "seed0" / "logs" / "version_0"
                                         / "predictions_test.jsonl").open()]
        assert sorted(p["lang"] for p in preds) == sorted(LANGS)
        assert {p["lang"]: float(p["correct"]) for p in preds} == per_lang
        assert math.isfinite(figures[f"val_loss_{mode}"]["ours"]) and figures[f"val_loss_{mode}"]["ours"] > 0
        assert figures[f"train_s_{mode}"]["ours"] > 0
    if figures["acc_avg_full"]["ours"] == 0:  # no ratio to a zero baseline; the goal compares the means
        assert figures["acc_avg_slam"]["ratio"] is None
        assert figures["acc_avg_slam"]["meets_goal"] == (figures["acc_avg_slam"]["ours"] >= 0)
    assert figures["acc_avg_slam"]["per_lang_baseline"] == figures["acc_avg_full"]["per_lang_ours"]
    # The demo-config runs (2 micro-batches per update) hold the same optimizer state as the speed part.
    assert figures["fit_optimizer_state_bytes_slam"]["ours"] == SLAM_OPT
    assert figures["fit_optimizer_state_bytes_full"]["ours"] == FULL_OPT
    assert figures["fit_optimizer_state_bytes_lora"]["ours"] == LORA_OPT
    assert figures["fit_optimizer_state_bytes_slam"]["meets_goal"] is True
    assert figures["acc_avg_slam"]["params_trainable"] == SLAM_TRAINABLE


@pytest.mark.slow
def test_speed_part_subprocess() -> None:
    """The default isolation: each mode in a fresh ``python`` subprocess (about 10 s each, mostly imports)."""
    argv = [*TINY, "--part", "speed", "--modes", "slam", "--steps", "1", "--warmup", "1", "--seq-len", "16"]
    figures = by_figure(run_main(argv))
    assert figures["optimizer_state_bytes_slam"]["ours"] == SLAM_OPT
    assert figures["optimizer_state_bytes_slam"]["baseline"] is None  # full not run: no ratio
    assert figures["trainable_params_slam"]["result"]["mem_kind"] == "cpu peak RSS (VmHWM reset)"
