"""Pure building blocks of the forgetting curve (spec ``forgetting_curve.md`` sections 3, 9, 10 tests 1, 2, 4, 5, 6).

The oracle tests replace a model by a function ``ids [B, T] -> predicted ids [B, T]`` whose memory limits are known
exactly, so the expected copy accuracies, F and C follow from the scoring rule alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lit_models.nn.forgetting_curve import (
    build_pair,
    load_results,
    make_lengths,
    memory_lengths,
    num_scored,
    paired_stats,
    plot_comparison,
    plot_curve,
    scored_positions,
    teacher_forced_acc,
    validate_lengths,
)

ROOT = Path(__file__).resolve().parents[3]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The `length` values of the official Meta-Llama-3-8B.json (linspace(8, 16000, 32), run stopped after 19 points);
# spec section 8 lists 8, 523, 1039, ..., 3619, 4134, 4650, 5166, 5682, 6198, ..., 9293.
OFFICIAL_LLAMA3_LENGTHS = [8, 523, 1039, 1555, 2071, 2587, 3103, 3619, 4134, 4650, 5166, 5682, 6198, 6714, 7230, 7746,
                           8261, 8777, 9293]


# ============================================================================================ layout (spec test 1)
def test_layout_l5_copy_lm_and_scored_positions() -> None:
    x, y = torch.arange(11, 16), torch.arange(21, 26)
    copy_ids, lm_ids = build_pair(x, y, bos_id=1, eos_id=2)
    assert copy_ids.tolist() == [1, 11, 12, 13, 14, 15, 1, 11, 12, 13, 14, 15, 2]
    assert lm_ids.tolist() == [1, 21, 22, 23, 24, 25, 1, 11, 12, 13, 14, 15, 2]
    assert copy_ids.dtype == torch.long and copy_ids.shape == (13,)
    pos = scored_positions(5)
    assert pos.dtype == torch.long and pos.tolist() == [9, 10, 11]
    assert copy_ids[pos].tolist() == [13, 14, 15] == lm_ids[pos].tolist()  # X[2..4] in both settings
    assert scored_positions(5, "floor").tolist() == [10, 11]
    assert (num_scored(9), num_scored(9, "floor"), num_scored(8), num_scored(8, "floor")) == (5, 4, 4, 4)
    assert scored_positions(9).tolist() == [15, 16, 17, 18, 19]  # T = 21, last X token at 19, eos at 20


def test_build_pair_batched_matches_rows_and_rejects_bad_shapes() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(10, 100, (3, 7), generator=g)
    y = torch.randint(10, 100, (3, 7), generator=g)
    copy_ids, lm_ids = build_pair(x, y, bos_id=1, eos_id=2)
    assert copy_ids.shape == lm_ids.shape == (3, 17)
    for b in range(3):
        c, m = build_pair(x[b], y[b], 1, 2)
        assert torch.equal(copy_ids[b], c) and torch.equal(lm_ids[b], m)
    with pytest.raises(ValueError, match=r"same shape, got \(3, 7\) and \(3, 6\)"):
        build_pair(x, y[:, :6], 1, 2)
    with pytest.raises(ValueError, match=r"\[L\] or \[B, L\]"):
        build_pair(x[None], y[None], 1, 2)
    with pytest.raises(TypeError, match="integer token ids"):
        build_pair(x.float(), y.float(), 1, 2)
    with pytest.raises(ValueError, match="score_half"):
        num_scored(8, "round")
    with pytest.raises(ValueError, match="L must be an integer >= 2"):
        scored_positions(1)


# ============================================================================================ grid (spec test 2)
def test_linear_grid_matches_official_llama3_run() -> None:
    lengths = make_lengths(16000, 32, "linear")
    assert lengths[:6] == [8, 523, 1039, 1555, 2071, 2587]
    assert lengths[:19] == OFFICIAL_LLAMA3_LENGTHS and lengths[18] == 9293
    assert len(lengths) == 32 and lengths[-1] == 16000
    assert all(type(v) is int for v in lengths)
    assert validate_lengths(lengths) == lengths


def test_log_grid_is_unique_and_errors_name_the_key() -> None:
    log = make_lengths(64, 20, "log")
    assert log[0] == 8 and log[-1] == 64 and log == sorted(set(log)) and len(log) < 20  # unique() dropped repeats
    assert make_lengths(64, 1) == [8]
    with pytest.raises(ValueError, match="granularity must be an integer >= 1"):
        make_lengths(64, 0)
    with pytest.raises(ValueError, match="granularity_type must be 'linear' or 'log', got 'cubic'"):
        make_lengths(64, 4, "cubic")
    with pytest.raises(ValueError, match="test_max_length=4"):
        make_lengths(4, 4)
    with pytest.raises(ValueError, match="granularity=20 is too fine .* repeats length 8"):
        make_lengths(16, 20, "linear")


@pytest.mark.parametrize(("lengths", "message"), [
    ([], "non-empty"),
    ([8, 4], r"lengths\[1\] = 4 is smaller than lengths\[0\] = 8"),
    ([8, 8], r"lengths\[1\] = 8 is duplicated"),
    ([1, 8], r"lengths\[0\] = 1 is < 2"),
    ([8, 9.5], r"lengths\[1\] = 9.5 is not an integer"),
])
def test_validate_lengths_rejects(lengths: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_lengths(lengths)


# ============================================================================================ teacher-forced accuracy
def test_teacher_forced_acc_perfect_shifted_and_unscored_positions() -> None:
    L = 6  # h = 3: targets X[3..5] at positions 11, 12, 13
    x = torch.tensor([5, 5, 5, 7, 7, 9])
    copy_ids, _ = build_pair(x, torch.arange(20, 26), bos_id=1, eos_id=2)
    perfect = torch.full_like(copy_ids, 999)
    perfect[:-1] = copy_ids[1:]  # predicts the next token everywhere
    acc = teacher_forced_acc(perfect, copy_ids, L)
    assert acc.dtype == torch.float64 and acc.dim() == 0 and acc.item() == 1.0
    # only the scored half counts: wrong predictions elsewhere change nothing
    partial = perfect.clone()
    partial[:10] = 999
    assert teacher_forced_acc(partial, copy_ids, L).item() == 1.0
    # shifted by one more (predicts the token after next): hit only when X_{j+1} == X_j, i.e. j = 3 (7, 7); j = 5
    # compares eos with 9
    shifted = torch.full_like(copy_ids, 999)
    shifted[:-2] = copy_ids[2:]
    assert teacher_forced_acc(shifted, copy_ids, L).item() == 1 / 3
    # under floor, h = 3 as well for even L; batched rows give one accuracy each
    batch = teacher_forced_acc(torch.stack([perfect, shifted]), torch.stack([copy_ids, copy_ids]), L, "floor")
    assert batch.dtype == torch.float64 and batch.tolist() == [1.0, 1 / 3]
    # odd L: ceil scores 4 of 7, floor 3 of 7; a miss on the first scored target only shows under ceil
    x7 = torch.arange(30, 37)
    ids7, _ = build_pair(x7, x7 + 10, 1, 2)
    pred7 = torch.full_like(ids7, 999)
    pred7[:-1] = ids7[1:]
    pred7[scored_positions(7)[0] - 1] = 999
    assert teacher_forced_acc(pred7, ids7, 7).item() == 0.75
    assert teacher_forced_acc(pred7, ids7, 7, "floor").item() == 1.0
    with pytest.raises(ValueError, match=r"T=15 positions but length L=5 needs T = 2L \+ 3 = 13"):
        teacher_forced_acc(perfect, copy_ids, 5)
    with pytest.raises(ValueError, match="same shape"):
        teacher_forced_acc(perfect[:-1], copy_ids, L)


# ============================================================================================ statistics (spec test 6)
def test_paired_stats_edge_cases_are_exact_and_silent() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        const = paired_stats([0.0] * 10, [1.0] * 10)
        same = paired_stats([0.5] * 10, [0.5] * 10)
        two = paired_stats([0.0, 1.0], [1.0, 1.0])
    assert [str(w.message) for w in caught] == []
    assert const["p_value"] == 0.0  # constant non-zero differences
    assert (const["lm_mean"], const["copy_mean"], const["lm_std"], const["copy_std"]) == (0.0, 1.0, 0.0, 0.0)
    assert same["p_value"] == 1.0  # NaN (all differences zero) -> 1.0
    assert two["lm_std"] == 0.5 and two["lm_mean"] == 0.5  # population std of [0, 1]
    assert two["normality"] == {"normality": False, "variance_homogeneity": False}  # n < 3: tests cannot run
    assert const["normality"]["variance_homogeneity"] is False  # Levene is NaN on constant groups
    assert set(const) == {"lm_mean", "lm_std", "copy_mean", "copy_std", "lm_accs", "copy_accs", "p_value", "normality"}
    assert const["lm_accs"] == [0.0] * 10 and const["copy_accs"] == [1.0] * 10
    assert json.loads(json.dumps(const, allow_nan=False)) == const
    assert all(type(const[k]) is float for k in ("lm_mean", "lm_std", "copy_mean", "copy_std", "p_value"))


def test_paired_stats_matches_a_hand_computed_t_test() -> None:
    lm, cp = [0.1, 0.2, 0.3], [0.2, 0.4, 0.3]
    # differences lm - cp = [-0.1, -0.2, 0.0]: mean -0.1, sample std 0.1, t = -0.1 / (0.1 / sqrt 3) = -sqrt 3, df 2;
    # two-sided p for Student t with 2 df: 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(3/5)
    stats = paired_stats(lm, cp)
    assert stats["p_value"] == pytest.approx(1 - math.sqrt(3 / 5), rel=1e-12)
    assert stats["copy_mean"] == pytest.approx(0.3, abs=1e-15)
    assert stats["lm_std"] == pytest.approx(math.sqrt(2 / 300), rel=1e-12)
    assert stats["normality"] == {"normality": True, "variance_homogeneity": True}
    with pytest.raises(ValueError, match="lm_accs has 3 values but copy_accs has 2"):
        paired_stats(lm, cp[:2])
    with pytest.raises(ValueError, match="needs >= 2 repeats, got 1"):
        paired_stats([0.1], [0.2])


# ============================================================================================ memory lengths (Step 6)
def _ok(length: int, copy_mean: float, lm_mean: float, p: float | None) -> dict:
    return {"length": length, "status": "ok", "copy_mean": copy_mean, "lm_mean": lm_mean, "p_value": p}


def test_memory_lengths_fine_is_a_maximum_not_a_contiguous_run() -> None:
    # Llama-3-8B-like: 4 scored tokens at L = 8 give 0.95; F must still reach 4134
    results = [_ok(8, 0.95, 0.2, 1e-6), _ok(523, 1.0, 0.509, 1e-12), _ok(4134, 0.999, 0.527, 1e-12),
               _ok(4650, 0.845, 0.437, 1e-8), _ok(9293, 0.07, 0.05, 0.016)]
    m = memory_lengths(results)
    assert m == {"fine_grained_length": 4134, "coarse_grained_length": 9293, "fine_is_lower_bound": False,
                 "coarse_is_lower_bound": True, "amnesia_length": None, "n_failed_lengths": 0, "failed_lengths": []}
    only_two = memory_lengths(results[:2])
    assert only_two["fine_grained_length"] == 523 and only_two["fine_is_lower_bound"] is True
    assert memory_lengths(results, alpha=0.01)["coarse_grained_length"] == 4650  # p = 0.016 is not < 0.01
    assert memory_lengths(results, alpha=0.01)["amnesia_length"] == 9293
    assert memory_lengths(results, fine_threshold=1.0)["fine_grained_length"] == 523


def test_memory_lengths_failures_amnesia_and_missing_p() -> None:
    results = [_ok(8, 1.0, 0.1, 1e-9), _ok(16, 0.6, 0.1, 1e-4), _ok(24, 0.3, 0.3, 1.0),
               {"length": 48, "status": "failed", "copy_mean": None, "lm_mean": None, "p_value": None},
               _ok(32, 0.2, 0.1, float("nan")), {"length": 40, "status": "failed"}]
    m = memory_lengths(results)
    assert (m["fine_grained_length"], m["coarse_grained_length"], m["amnesia_length"]) == (8, 16, 24)
    assert m["fine_is_lower_bound"] is True and m["coarse_is_lower_bound"] is True  # lengths 40, 48 failed above
    assert m["n_failed_lengths"] == 2 and m["failed_lengths"] == [40, 48]
    # without the failed lengths the flags drop: the conditions fail at the largest successful length 32 (NaN p)
    clean = memory_lengths([r for r in results if r["status"] == "ok"])
    assert clean["fine_is_lower_bound"] is False and clean["coarse_is_lower_bound"] is False
    none = memory_lengths([_ok(8, 0.2, 0.3, 0.5), _ok(16, 0.1, 0.1, 1.0)])
    assert (none["fine_grained_length"], none["coarse_grained_length"], none["amnesia_length"]) == (0, 0, 8)
    official = memory_lengths([{"length": 8, "copy_mean": 1.0, "lm_mean": 0.1, "p_value": 0.0}])  # no status: ok
    assert official["coarse_grained_length"] == 8 and official["coarse_is_lower_bound"] is True


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fine_threshold": 0.0}, r"fine_threshold must be in \(0, 1\]"),
    ({"fine_threshold": 1.5}, r"fine_threshold must be in \(0, 1\]"),
    ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
])
def test_memory_lengths_rejects_bad_thresholds(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        memory_lengths([_ok(8, 1.0, 0.0, 0.0)], **kwargs)


def test_memory_lengths_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="length 16 has status ok but copy_mean=None"):
        memory_lengths([{"length": 16, "status": "ok", "lm_mean": 0.1, "p_value": 0.1}])
    with pytest.raises(ValueError, match="status must be 'ok' or 'failed', got 'skipped'"):
        memory_lengths([{"length": 16, "status": "skipped"}])
    with pytest.raises(ValueError, match=r"results\[0\] must be a dict with an integer 'length'"):
        memory_lengths([{"len": 16}])


# ============================================================================================ oracles (spec tests 4, 5)
RESERVED = 999  # never drawn: ids come from [0, 999)
ORACLE_LENGTHS = list(range(4, 61, 4))


def _random_mode_pairs(seed: int = 0, repeats: int = 5) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Random mode, vocab 1000: per L, X then Y i.i.d. from [0, 999) for each repeat; bos 1, eos 2 -> [R, 2L+3]."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for L in ORACLE_LENGTHS:
        xs, ys = [], []
        for _ in range(repeats):
            xs.append(torch.randint(0, RESERVED, (L,), generator=g))
            ys.append(torch.randint(0, RESERVED, (L,), generator=g))
        pairs[L] = build_pair(torch.stack(xs), torch.stack(ys), bos_id=1, eos_id=2)
    return pairs


def _oracle(ids: torch.Tensor, window: int | None = None, context: int | None = None) -> torch.Tensor:
    """Predict ``ids[q - L]`` at query q (the copy of the next token, L = (T - 3) / 2), else the reserved id.

    ``window``: copy only when the distance L + 1 fits, i.e. L <= window - 1 (sliding-window model).
    ``context``: copy only at query positions q <= context - 1 (a model whose whole context is limited).
    """
    T = ids.shape[-1]
    L = (T - 3) // 2
    q = torch.arange(T)
    ok = q >= L
    if window is not None and L > window - 1:
        ok = torch.zeros_like(ok)
    if context is not None:
        ok = ok & (q <= context - 1)
    src = (q - L).clamp(min=0)
    return torch.where(ok, ids[:, src], torch.full_like(ids, RESERVED))


def _evaluate(oracle) -> tuple[list[dict], dict]:
    results = []
    for L, (copy_ids, lm_ids) in _random_mode_pairs().items():
        copy_accs = teacher_forced_acc(oracle(copy_ids), copy_ids, L).tolist()
        lm_accs = teacher_forced_acc(oracle(lm_ids), lm_ids, L).tolist()
        results.append({"length": L, "status": "ok", **paired_stats(lm_accs, copy_accs)})
    return results, memory_lengths(results)


def test_context_limited_oracle_gives_half_the_context() -> None:
    results, memory = _evaluate(lambda ids: _oracle(ids, context=64))
    by_len = {r["length"]: r for r in results}
    for L in ORACLE_LENGTHS:  # spec formula: min(h, max(0, 63 - 2L + h)) / h for every repeat
        h = num_scored(L)
        expected = min(h, max(0, 63 - 2 * L + h)) / h
        assert by_len[L]["copy_accs"] == [expected] * 5, L
        assert by_len[L]["lm_mean"] < 0.05  # LM setting: the "copy" is Y, a chance match at most
    assert all(by_len[L]["copy_mean"] == 1.0 for L in ORACLE_LENGTHS if L <= 28)
    assert by_len[32]["copy_accs"] == [0.9375] * 5  # 15 of 16
    assert by_len[36]["copy_accs"] == [0.5] * 5  # 9 of 18
    assert by_len[40]["copy_accs"] == [0.15] * 5  # 3 of 20
    assert all(by_len[L]["copy_mean"] == 0.0 for L in ORACLE_LENGTHS if L >= 44)
    assert by_len[40]["p_value"] < 1e-3
    assert memory["fine_grained_length"] == 28 and memory["coarse_grained_length"] == 40
    assert memory["amnesia_length"] == 44 and memory["fine_is_lower_bound"] is False
    assert memory["coarse_is_lower_bound"] is False


def test_window_oracle_gives_the_window() -> None:
    results, memory = _evaluate(lambda ids: _oracle(ids, window=40))
    by_len = {r["length"]: r for r in results}
    assert all(by_len[L]["copy_accs"] == [1.0] * 5 for L in ORACLE_LENGTHS if L <= 36)
    assert all(by_len[L]["copy_accs"] == [0.0] * 5 for L in ORACLE_LENGTHS if L >= 40)
    assert all(by_len[L]["p_value"] == 1.0 for L in ORACLE_LENGTHS if L >= 40)  # LM predictions reserved as well
    assert (memory["fine_grained_length"], memory["coarse_grained_length"], memory["amnesia_length"]) == (36, 36, 40)


# ============================================================================================ plots and files
def _run_results() -> list[dict]:
    """Our schema: F = 16, C = 32 (p ~ 0.038), amnesia 64 (copy below LM), length 128 failed."""
    results = []
    lm = [0.3, 0.4, 0.2]
    for L, cp in ((8, [1.0] * 3), (16, [1.0] * 3), (32, [0.6, 0.55, 0.5]), (64, [0.3, 0.25, 0.2])):
        results.append({"length": L, "status": "ok", "error": None, "n_scored": num_scored(L),
                        **paired_stats(lm, cp)})
    results.append({"length": 128, "status": "failed", "error": "OutOfMemoryError: CUDA out of memory",
                    "lm_mean": None, "lm_std": None, "copy_mean": None, "copy_std": None, "lm_accs": None,
                    "copy_accs": None, "p_value": None, "normality": None})
    return results


def _read_png(path: Path):
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return image.imread(path)


def test_plot_curve_writes_a_1000x500_png_atomically(tmp_path: Path) -> None:
    results = _run_results()
    memory = memory_lengths(results)
    assert memory["failed_lengths"] == [128] and memory["fine_grained_length"] == 16
    out = plot_curve(results, tmp_path / "nested" / "dir" / "curve.png", training_len=64, log_x=True,
                     title="tiny", memory=memory)
    assert out == tmp_path / "nested" / "dir" / "curve.png"
    assert _read_png(out).shape == (500, 1000, 4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png"]  # no temporary file left
    with pytest.raises(ValueError, match="training_len must be > 0"):
        plot_curve(results, tmp_path / "x.png", training_len=0)


def test_plot_comparison_writes_one_png(tmp_path: Path) -> None:
    a = _run_results()
    b = [dict(r, copy_mean=r["lm_mean"]) if r["status"] == "ok" else r for r in a]
    out = plot_comparison({"model-a": a, "model-b": b}, tmp_path / "cmp.png", log_x=True,
                          training_lens={"model-a": 32})
    assert _read_png(out).shape == (500, 1000, 4)
    with pytest.raises(ValueError, match=r"training_lens has keys \['other'\]"):
        plot_comparison({"model-a": a}, tmp_path / "cmp.png", training_lens={"other": 8})


def test_load_results_accepts_official_schema_and_names_bad_files(tmp_path: Path) -> None:
    official = tmp_path / "official.json"
    rows = [{"length": 8, "lm_mean": 0.2, "lm_std": 0.1, "copy_mean": 0.95, "copy_std": 0.1, "lm_accs": [0.2],
             "copy_accs": [0.95], "p_value": 1e-6, "normality": {"normality": False, "variance_homogeneity": True}}]
    official.write_text(json.dumps(rows))
    loaded = load_results(official)
    assert loaded == [dict(rows[0], status="ok")]
    assert json.loads(official.read_text()) == rows  # the file is not modified
    bad = tmp_path / "bad.json"
    bad.write_text('{"length": 8}')
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON list"):
        load_results(bad)
    bad.write_text('[{"length": 8}, {"len": 9}]')
    with pytest.raises(ValueError, match=r"bad\.json: entry 1 must be a dict with an integer 'length'"):
        load_results(bad)
    bad.write_text("[{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        load_results(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_results(tmp_path / "missing.json")


# ============================================================================================ script
def _script():
    spec = importlib.util.spec_from_file_location("plot_forgetting_curves", ROOT / "scripts" / "plot_forgetting_curves.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _write_runs(tmp_path: Path) -> tuple[Path, Path]:
    ours = tmp_path / "runs" / "tiny_run.json"
    ours.parent.mkdir()
    ours.write_text(json.dumps(_run_results()))
    (tmp_path / "runs" / "tiny_run.summary.json").write_text(json.dumps({"model": "llama-tiny", "training_len": 64}))
    official = tmp_path / "Meta-Llama-3-8B.json"  # official schema (no status), spec section 8 values
    rows = [(8, 0.200, 0.950, 1e-6), (523, 0.509, 0.999, 1e-9), (4134, 0.527, 0.999, 1e-9),
            (4650, 0.437, 0.845, 1e-8), (6198, 0.066, 0.092, 5.7e-5), (9293, 0.05, 0.07, 1.6e-2)]
    official.write_text(json.dumps([{"length": L, "lm_mean": lm, "lm_std": 0.01, "copy_mean": cp, "copy_std": 0.01,
                                     "p_value": p} for L, lm, cp, p in rows]))
    return ours, official


def test_script_prints_memory_lengths_and_writes_comparison(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ours, official = _write_runs(tmp_path)
    out = tmp_path / "figs" / "comparison.png"
    assert _script().main([str(ours), str(official), "--out", str(out), "--log-x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["label", "fine_F", "fine_lb", "coarse_C", "coarse_lb", "amnesia", "failed"]
    assert lines[1].split() == ["llama-tiny", "16", "True", "32", "True", "64", "128"]  # label from the summary
    assert lines[2].split() == ["Meta-Llama-3-8B", "4134", "False", "9293", "True", "-", "-"]  # label = file stem
    assert lines[3] == f"wrote {out}"
    assert _read_png(out).shape == (500, 1000, 4)


def test_script_single_labels_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ours, official = _write_runs(tmp_path)
    script = _script()
    out = tmp_path / "single.png"
    assert script.main([str(official), "--out", str(out), "--single", "--labels", "llama3", "--alpha", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["llama3", "4134", "False", "6198", "False", "9293", "-"]
    assert _read_png(out).shape == (500, 1000, 4)
    missing = tmp_path / "nope.json"
    assert script.main([str(ours), str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert script.main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{bad}: expected a JSON list" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as exc:
        script.main([str(ours), str(official), "--out", str(out), "--labels", "only-one"])
    assert exc.value.code == 2 and "--labels has 1 values but 2 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(ours), str(official), "--out", str(out), "--single"])
