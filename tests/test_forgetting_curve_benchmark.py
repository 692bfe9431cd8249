"""Smoke test of ``benchmarks/forgetting_curve_speed.py`` on a tiny random Llama: it prints parseable JSON lines with
the expected keys, and our batched evaluation scores every sample exactly as the one-at-a-time loop does. Speed is
never asserted (benchmarks are not tests)."""

from __future__ import annotations

import contextlib
import io
import json

from benchmarks import forgetting_curve_speed

TINY = json.dumps({"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4})


def test_benchmark_runs_and_matches_the_one_sample_loop() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = forgetting_curve_speed.main([
            "--model", "llama-tiny", "--model-config-overrides", TINY, "--data-type", "random",
            "--lengths", "8,21", "--repeats", "3", "--batch-sizes", "1,3", "--threads", "1",
        ])
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert lines == json.loads(json.dumps(returned))
    speed = [line for line in lines if line["figure"] == "samples_per_s"]
    parity = [line for line in lines if line["figure"] == "parity"]
    assert [line["runner"] for line in speed] == ["ours_b1", "ours_b3"]
    for line in speed:
        assert {"benchmark", "ours", "baseline", "baseline_value", "ratio", "goal", "meets_goal"} <= set(line)
        assert line["samples"] == 6 and line["ours"] > 0 and line["baseline_value"] > 0
        assert abs(line["ratio"] - line["ours"] / line["baseline_value"]) < 0.01
    assert all(line["identical"] and line["samples_differing"] == 0 for line in parity)
