"""ForgettingCurve through a Trainer: oracle models with known memory lengths, failures, resume, outputs, real model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules.long_text import LongTextDataModule
from lit_models.forgetting_curve import ForgettingCurve
from tests.run_logs import read_metrics

RESERVED = 999  # never drawn: random_id_range stops at 998
HERE = "tests.lit_models.test_forgetting_curve"


# ----------------------------------------------------------------------------------- oracle "models" (forward_fn)
class _Oracle(torch.nn.Module):
    calls: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.calls = []


def oracle() -> torch.nn.Module:
    return _Oracle()


def _copy_from(ids: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Argmax ids [B, T]: at query q the token L positions back (``ids[q + 1 - L]`` predicts ``ids[q + 1]``)
    where ``ok[q]``, else RESERVED."""
    T = ids.shape[1]
    L = (T - 3) // 2
    pred = torch.full_like(ids, RESERVED)
    q = torch.arange(T - 1)
    src = q + 1 - (L + 1)  # the same token one copy earlier: distance L + 1 (the separator sits in between)
    keep = ok[: T - 1] & (src >= 0)
    pred[:, q[keep]] = ids[:, src[keep]]
    return pred


def window_forward(model: _Oracle, ids: torch.Tensor) -> torch.Tensor:
    """Copies across a distance of L + 1 only while L <= W - 1 (W = 40): a sliding-window model."""
    L = (ids.shape[1] - 3) // 2
    model.calls.append(L)
    return _copy_from(ids, torch.full((ids.shape[1],), L <= 39))


def context_forward(model: _Oracle, ids: torch.Tensor) -> torch.Tensor:
    """Copies only at query positions q <= 63: a model whose whole context is 64 tokens."""
    model.calls.append((ids.shape[1] - 3) // 2)
    return _copy_from(ids, torch.arange(ids.shape[1]) <= 63)


def oom_forward(model: _Oracle, ids: torch.Tensor) -> torch.Tensor:
    """Raises out-of-memory for inputs longer than 50 tokens (L >= 24)."""
    model.calls.append((ids.shape[1] - 3) // 2)
    if ids.shape[1] > 50:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated) for T={ids.shape[1]}")
    return _copy_from(ids, torch.ones(ids.shape[1], dtype=torch.bool))


def bad_shape_forward(model: _Oracle, ids: torch.Tensor) -> torch.Tensor:
    return ids[:, :-1]


# ----------------------------------------------------------------------------------------------- helpers
def _data(tmp_path: Path, **kwargs) -> LongTextDataModule:
    defaults = {"data_type": "random", "random_id_range": [17, RESERVED - 1], "lengths": list(range(4, 61, 4)),
                "repeats": 5, "batch_size": 5, "cache_dir": str(tmp_path / "cache")}
    return LongTextDataModule(**{**defaults, **kwargs})


def _run(tmp_path: Path, model: ForgettingCurve, dm: LongTextDataModule, logger: bool = False) -> ForgettingCurve:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="logs") if logger else False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(model, datamodule=dm, verbose=False)
    return model


def _oracle(tmp_path: Path, forward: str, **kwargs) -> ForgettingCurve:
    return ForgettingCurve(model=f"{HERE}.oracle", model_source="project", forward_fn=f"{HERE}.{forward}",
                           output_dir=str(tmp_path / "out"), title="oracle", **kwargs)


def _by_length(model: ForgettingCurve) -> dict[int, dict]:
    return {r["length"]: r for r in model.results}


# ------------------------------------------------------------------------------------------------- tests
def test_window_oracle_memory_length_is_window_minus_one(tmp_path: Path) -> None:
    """Spec test 4: copying reaches a distance of W - 1 = 39 tokens (L <= 39); on the grid 4..60 that is F = C = 36."""
    model = _run(tmp_path, _oracle(tmp_path, "window_forward"), _data(tmp_path))
    res = _by_length(model)
    for L_ in range(4, 61, 4):
        assert res[L_]["copy_mean"] == (1.0 if L_ <= 36 else 0.0), L_
        assert res[L_]["lm_mean"] < 0.15  # a Y token matches X only by chance (1 in 982)
    assert model.memory["fine_grained_length"] == 36
    assert model.memory["coarse_grained_length"] == 36
    assert model.memory["amnesia_length"] == 40
    assert not model.memory["fine_is_lower_bound"]


def test_context_oracle_gives_half_the_context(tmp_path: Path) -> None:
    """Spec test 5: context 64; copy_mean = min(h, max(0, 63 - 2L + h)) / h, so F = 28 (about 64 / 2) and C = 40."""
    model = _run(tmp_path, _oracle(tmp_path, "context_forward"), _data(tmp_path))
    res = _by_length(model)
    for L_ in range(4, 61, 4):
        h = (L_ + 1) // 2
        assert res[L_]["copy_mean"] == pytest.approx(min(h, max(0, 63 - 2 * L_ + h)) / h), L_
        assert res[L_]["n_scored"] == h
    assert [res[L_]["copy_mean"] for L_ in (28, 32, 40, 44)] == [1.0, 0.9375, 0.15, 0.0]
    assert model.memory["fine_grained_length"] == 28
    assert model.memory["coarse_grained_length"] == 40
    assert model.memory["amnesia_length"] == 44


def test_failed_lengths_are_recorded_and_later_lengths_attempted(tmp_path: Path) -> None:
    """Spec test 7: OOM above T = 50 marks L >= 24 failed with the error, the run goes on, nothing lands in the cwd."""
    cwd_before = sorted(os.listdir("."))
    model = _oracle(tmp_path, "oom_forward")
    _run(tmp_path, model, _data(tmp_path, lengths=[8, 16, 20, 24, 28, 32], repeats=3, batch_size=3))
    res = _by_length(model)
    assert [res[L_]["status"] for L_ in (8, 16, 20, 24, 28, 32)] == ["ok"] * 3 + ["failed"] * 3
    assert all(res[L_]["copy_mean"] == 1.0 for L_ in (8, 16, 20))
    assert "OutOfMemoryError" in res[28]["error"] and "T=59" in res[28]["error"]
    assert res[24]["copy_mean"] is None and res[24]["p_value"] is None
    assert sorted(set(model.model.calls)) == [8, 16, 20, 24, 28, 32]  # every length attempted
    assert model.memory["failed_lengths"] == [24, 28, 32]
    assert model.memory["fine_grained_length"] == 20 and model.memory["fine_is_lower_bound"]
    on_disk = json.loads((tmp_path / "out" / "oracle.json").read_text())
    assert [e["status"] for e in on_disk] == ["ok"] * 3 + ["failed"] * 3
    summary = json.loads((tmp_path / "out" / "oracle.summary.json").read_text())
    assert summary["n_failed_lengths"] == 3 and set(summary["failures"]) == {"24", "28", "32"}
    assert (tmp_path / "out" / "oracle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(".")) == cwd_before


def test_on_error_raise_names_the_length_and_keeps_the_partial_json(tmp_path: Path) -> None:
    model = _oracle(tmp_path, "oom_forward", on_error="raise")
    with pytest.raises(RuntimeError, match=r"length L=24 \(T=51\).*OutOfMemoryError"):
        _run(tmp_path, model, _data(tmp_path, lengths=[8, 16, 24, 32], repeats=3))
    partial = json.loads((tmp_path / "out" / "oracle.json").read_text())
    assert [(e["length"], e["status"]) for e in partial] == [(8, "ok"), (16, "ok"), (24, "failed")]


def test_resume_reuses_finished_lengths(tmp_path: Path) -> None:
    first = _run(tmp_path, _oracle(tmp_path, "window_forward"), _data(tmp_path, lengths=[8, 40], repeats=3))
    second = _oracle(tmp_path, "window_forward", resume=True)
    _run(tmp_path, second, _data(tmp_path, lengths=[8, 40, 48], repeats=3))
    assert second.model.calls == [48]  # 8 and 40 come from the first run's JSON
    assert _by_length(second)[8] == _by_length(first)[8]
    assert [r["length"] for r in second.results] == [8, 40, 48]
    # other settings: nothing is reused
    third = _oracle(tmp_path, "window_forward", resume=True)
    _run(tmp_path, third, _data(tmp_path, lengths=[8, 40, 48], repeats=3, seed=1))
    assert third.model.calls == [8, 40, 48]
    # ... and the seed-0 run that follows must not pick up the seed-1 results either
    fourth = _oracle(tmp_path, "window_forward", resume=True)
    _run(tmp_path, fourth, _data(tmp_path, lengths=[8, 40], repeats=3))
    assert fourth.model.calls == [8, 40]
    assert _by_length(fourth)[8]["copy_accs"] == _by_length(first)[8]["copy_accs"]


def test_an_interrupted_run_resumes_from_its_partial_json(tmp_path: Path) -> None:
    killed = _oracle(tmp_path, "oom_forward", on_error="raise")
    with pytest.raises(RuntimeError, match="L=24"):
        _run(tmp_path, killed, _data(tmp_path, lengths=[8, 16, 24], repeats=3))
    resumed = _oracle(tmp_path, "oom_forward", resume=True)
    _run(tmp_path, resumed, _data(tmp_path, lengths=[8, 16, 20], repeats=3))
    assert resumed.model.calls == [20]
    summary = json.loads((tmp_path / "out" / "oracle.summary.json").read_text())
    assert summary["status"] == "complete" and summary["lengths"] == [8, 16, 20]
    with pytest.raises(ValueError, match="resume=true needs a fixed model.init_args.output_dir"):
        model = ForgettingCurve(model=f"{HERE}.oracle", model_source="project", forward_fn=f"{HERE}.window_forward",
                                resume=True)
        _run(tmp_path, model, _data(tmp_path, lengths=[8], repeats=3))


def oracle_ctx50() -> torch.nn.Module:
    model = _Oracle()
    model.config = SimpleNamespace(max_position_embeddings=50)
    return model


def test_a_failure_past_the_position_limit_says_so(tmp_path: Path) -> None:
    model = ForgettingCurve(model=f"{HERE}.oracle_ctx50", model_source="project", forward_fn=f"{HERE}.oom_forward",
                            output_dir=str(tmp_path / "out"))
    _run(tmp_path, model, _data(tmp_path, lengths=[16, 24], repeats=3))
    assert _by_length(model)[24]["error"].endswith("(input T=51 > max_position_embeddings=50)")
    assert _by_length(model)[16]["status"] == "ok"


def test_a_tokenizer_that_is_not_the_models_is_rejected(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lit_models.hf import load_causal_lm, load_tokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a small corpus of words for a tiny tokenizer"] * 5,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    own = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model_dir = tmp_path / "model"
    load_causal_lm("llama-tiny", config_overrides={"vocab_size": 64, "num_hidden_layers": 1}).save_pretrained(model_dir)
    own.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="is not the tokenizer of model.init_args.model"):
        ForgettingCurve(model=str(model_dir), tokenizer=load_tokenizer("smollm2-135m"))
    ForgettingCurve(model=str(model_dir), tokenizer=load_tokenizer(str(model_dir)))  # its own: accepted


def test_llama_fast_path_equals_full_logits_and_batching(tmp_path: Path) -> None:
    """Scoring only the h positions through the LM head gives the same accuracies as full logits; batch size does
    not change them; the per-length metrics reach the logger at step=L."""
    overrides = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4}
    kwargs = {"data_type": "random", "random_id_range": [17, 1023], "lengths": [8, 33], "repeats": 4}

    def run(batch_size: int, forward_fn: str | None, sub: str) -> ForgettingCurve:
        model = ForgettingCurve(model="llama-tiny", model_config_overrides=overrides, forward_fn=forward_fn,
                                output_dir=str(tmp_path / sub), title="t")
        return _run(tmp_path / sub, model, _data(tmp_path, batch_size=batch_size, **kwargs), logger=True)

    fast = run(4, None, "fast")
    full = run(1, f"{HERE}.full_logits_forward", "full")
    for a, b in zip(fast.results, full.results):
        assert a["copy_accs"] == b["copy_accs"] and a["lm_accs"] == b["lm_accs"]
    assert fast.results[0]["length"] == 8 and len(fast.results[0]["copy_accs"]) == 4
    rows = read_metrics(tmp_path / "fast")
    at = {int(r["step"]): r for r in rows if r.get("test/copy_acc") not in (None, "")}
    assert sorted(at) == [8, 33]
    assert float(at[33]["test/copy_acc"]) == pytest.approx(fast.results[1]["copy_mean"])
    final = [r for r in rows if r.get("test/fine_grained_length") not in (None, "")]
    assert final and float(final[-1]["test/n_failed_lengths"]) == 0.0


def full_logits_forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.argmax(-1)


def test_bad_model_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="forward_fn='nowhere.fn'"):
        ForgettingCurve(model=f"{HERE}.oracle", model_source="project", forward_fn="nowhere.fn")
    with pytest.raises(ValueError, match="needs model.init_args.forward_fn"):
        ForgettingCurve(model=f"{HERE}.oracle", model_source="project")
    for key, value in (("fine_threshold", 0.0), ("fine_threshold", 1.5), ("alpha", 1.0), ("training_len", 0)):
        with pytest.raises(ValueError, match=key):
            _oracle(tmp_path, "window_forward", **{key: value})
    with pytest.raises(ValueError, match=r"forward_fn must return argmax ids of shape \[B, T\]"):
        _run(tmp_path, _oracle(tmp_path, "bad_shape_forward", on_error="raise"), _data(tmp_path, lengths=[8], repeats=3))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="output_dir"):
        model = ForgettingCurve(model=f"{HERE}.oracle", model_source="project", forward_fn=f"{HERE}.window_forward",
                                output_dir=str(blocker / "sub"))
        _run(tmp_path, model, _data(tmp_path, lengths=[8], repeats=3))
    # SmolLM2-vocabulary ids into a 1024-row model: caught before any forward pass
    small = ForgettingCurve(model="llama-tiny", model_config_overrides={"vocab_size": 1024, "num_hidden_layers": 1},
                            output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="random_id_range inside"):
        _run(tmp_path, small, _data(tmp_path, random_id_range=None, lengths=[8], repeats=3))


def test_smollm2_copies_real_text(tmp_path: Path) -> None:
    """Spec test 10 (real-data direction): SmolLM2-135M on Austen copies far better than it predicts, L in {8, 64, 256}."""
    model = ForgettingCurve(model="smollm2-135m", output_dir=str(tmp_path / "o"), title="smol")
    dm = LongTextDataModule(corpus="austen", lengths=[8, 64, 256], repeats=3, batch_size=3)
    res = _by_length(_run(tmp_path, model, dm))
    for L_ in (8, 64, 256):
        assert res[L_]["copy_mean"] > res[L_]["lm_mean"], L_
    assert res[256]["copy_mean"] >= 0.9
    assert res[256]["p_value"] < 0.05 and res[64]["p_value"] < 0.05
