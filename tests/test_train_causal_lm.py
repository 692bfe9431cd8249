"""train.py end to end for the LLM foundation on the tiny random Llama (SmolLM2 tokenizer) and the real demo data:
every causal_lm config runs fit + test, LoRA resume is exact, test/predict work on an adapter checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "causal_lm").glob("*.yaml"))


class StopAtStep(L.Callback):
    """Ends fit after ``step`` optimiser steps, as a killed job would (its last checkpoint is at that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instruction")


def tiny_args(config: Path, data_dir: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    return [
        "--config", str(config),
        "--model.init_args.model", "llama-tiny",
        "--model.init_args.max_new_tokens", "4",
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.demo_kwargs", json.dumps({"max_train": 40, "max_eval": 4} if "translation" in config.stem else {}),
        "--data.init_args.max_train_samples", "24",
        "--data.init_args.max_eval_samples", "1",
        "--data.init_args.batch_size", "2",
        "--data.init_args.max_length", "384",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", "1",
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_every_causal_lm_config_fits_and_tests(config: Path, mode: str, data_dir: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(config, data_dir, tmp_path, "--model.init_args.mode", mode)])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    for key in ("train/loss", "val/loss", "lr-AdamW"):
        assert metric(rows, key) > 0.0
    predictions = [json.loads(x) for x in next((tmp_path / "logs").glob("version_*/predictions_test.jsonl")).open()]
    if "math" in config.stem:
        langs = {"bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"}
        assert {r["lang"] for r in predictions} == langs and len(predictions) == 11  # one held-out problem each
        for lang in langs:
            assert 0.0 <= metric(rows, f"test/acc_{lang}") <= 1.0
        assert metric(rows, "test/acc_avg") == pytest.approx(sum(r["correct"] for r in predictions) / 11, abs=1e-6)
    else:
        assert len(predictions) == 1 and predictions[0]["references"]  # max_eval_samples is per language pair
        assert 0.0 <= metric(rows, "test/sacrebleu") <= 100.0 and 0.0 <= metric(rows, "test/chrf") <= 100.0


def test_lora_resume_is_exact(data_dir: Path, tmp_path: Path) -> None:
    """6 steps straight vs 3 steps, kill, --ckpt_path last: same loss and LR at step 6 and identical adapters."""
    config = ROOT / "configs/causal_lm/sft_smollm2_math.yaml"
    common = ("--test_after_fit", "false", "--trainer.val_check_interval", "3", "--model.init_args.mode", "lora")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["fit", *tiny_args(config, data_dir, straight, *common, steps=6)])
    stop = json.dumps([{"class_path": "tests.test_train_causal_lm.StopAtStep", "init_args": {"step": 3}}])
    main(["fit", *tiny_args(config, data_dir, resumed, *common, "--trainer.callbacks", stop, steps=6)])
    assert torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    main(["fit", *tiny_args(config, data_dir, resumed, *common, "--ckpt_path", "last", steps=6)])
    a, b = read_metrics(straight), read_metrics(resumed)
    for key in ("train/loss", "lr-AdamW"):
        assert metric(a, key, step=5) == metric(b, key, step=5)
    sd_a = torch.load(straight / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    sd_b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert sd_a.keys() == sd_b.keys() and all("lora_" in k for k in sd_a)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_test_and_predict_on_an_adapter_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    config = ROOT / "configs/causal_lm/sft_smollm2_math.yaml"
    main(["fit", *tiny_args(config, data_dir, tmp_path, "--test_after_fit", "false", "--model.init_args.mode", "lora")])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cli = main(["test", *tiny_args(config, data_dir, tmp_path / "t"), "--ckpt_path", str(ckpt)])
    assert "test/acc_avg" in cli.trainer.callback_metrics
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"id": "q1", "prompt": "What is 2 + 3?"}\n{"id": "q2", "prompt": "Was ist 4 + 4?"}\n')
    main(
        ["predict", *tiny_args(config, data_dir, tmp_path / "p"), "--ckpt_path", str(ckpt),
         "--data.init_args.predict_files", json.dumps([str(questions)])]
    )
    rows = [json.loads(x) for x in next((tmp_path / "p" / "logs").glob("version_*/predictions.jsonl")).open()]
    assert [r["id"] for r in rows] == ["q1", "q2"] and all(isinstance(r["output"], str) for r in rows)


def test_bad_jsonl_line_is_an_error_naming_file_and_line(data_dir: Path, tmp_path: Path) -> None:
    config = ROOT / "configs/causal_lm/sft_smollm2_math.yaml"
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl.*line 2"):
        main(
            ["fit", *tiny_args(config, data_dir, tmp_path, "--data.init_args.demo", "none",
                               "--data.init_args.train_files", json.dumps([str(train)]), "--test_after_fit", "false")]
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("trainer_config", "mode"), [("gpu", "full"), ("gpu", "lora"), ("gpu", "qlora"), ("fsdp_llm", "full"), ("fsdp_llm", "lora")]
)
def test_fits_on_cuda(trainer_config: str, mode: str, data_dir: Path, tmp_path: Path) -> None:
    """bf16-mixed on one GPU (full, LoRA, QLoRA with bitsandbytes' CUDA kernels) and FSDP with decoder-layer
    auto-wrap and activation checkpointing (skipped without CUDA)."""
    config = ROOT / "configs/causal_lm/sft_smollm2_math.yaml"
    extra = ("--config", str(ROOT / f"configs/trainer/{trainer_config}.yaml"), "--trainer.devices", "1",
             "--model.init_args.mode", mode, "--test_after_fit", "false")
    cli = main(["fit", *tiny_args(config, data_dir, tmp_path, *extra)])
    assert cli.trainer.global_step == 2
    assert metric(read_metrics(tmp_path), "val/loss") > 0.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert all(("lora_" in k) == (mode != "full") for k in ckpt["state_dict"])
