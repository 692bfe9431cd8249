"""Smoke test of ``benchmarks/moe_throughput.py``: a tiny dense and MoE pair train in their subprocesses on real
blocks and print JSON lines whose parameter counts are exact (speed and memory are never asserted)."""

from __future__ import annotations

import contextlib
import io
import json

from benchmarks import moe_throughput


def test_moe_throughput_smoke_prints_exact_counts_and_a_ratio() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lines = moe_throughput.main(["--sizes", "32x1", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                                     "--seq-len", "16", "--experts-impls", "batched_mm", "--threads", "1"])
    assert [json.loads(s) for s in out.getvalue().splitlines()] == lines
    dense, moe = lines
    assert (dense["model"], moe["model"]) == ("dense", "moe_batched_mm")
    # d 32, one layer, 4 heads: attention 4 * 32 * 32, SwiGLU f = 96 (ceil(8/3 * 32) to 16), two norms, final norm
    assert dense["n_active_nonemb"] == dense["n_total_nonemb"] == 4 * 32 * 32 + 3 * 32 * 96 + 2 * 32 + 32
    # 8 experts of width 48, top-2: the router (32 x 8) is the only active addition; 6 idle experts are not active
    assert moe["n_active_nonemb"] == dense["n_active_nonemb"] + 32 * 8
    assert moe["n_total_nonemb"] - moe["n_active_nonemb"] == 6 * 3 * 32 * 48
    assert moe["ratio"] == round(moe["tokens_per_s"] / dense["tokens_per_s"], 3) and moe["baseline"] == "dense"
    assert dense["n_embedding"] == 2048 * 32
