"""train.py end to end for latent preference alignment on llama-tiny and a 20-problem slice of the real offline demo:
each shipped config fits 2 steps (CLaP, then Latent DPO from that CLaP checkpoint, then the LoRA-DPO baseline),
logs TRL's metric names and the time per user, and predict writes generations with the user's latent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "latent_preference"
TRL = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def tiny_args(config: str, data_dir: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    return [
        "--config", str(CONFIGS / f"{config}.yaml"),
        "--model.init_args.model", "llama-tiny",
        "--data.init_args.tokenizer", "llama-tiny",
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.demo_kwargs", json.dumps({"max_problems": 20}),
        "--data.init_args.max_prompt_len", "48",
        "--data.init_args.max_response_len", "24",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        *extra,
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lp_data")


@pytest.fixture(scope="module")
def clap_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("clap")
    cli = main(["fit", *tiny_args("clap_demo", data_dir, run, "--data.init_args.group_size", "4")])
    assert cli.trainer.global_step == 2
    return run


def test_clap_config_fits(clap_run: Path) -> None:
    rows = read_metrics(clap_run)
    k = 4
    assert metric(rows, "train/clap/rec_nll") > 0 and metric(rows, "val/clap/rec_nll") > 0
    assert 0 <= metric(rows, "train/clap/contrastive_acc") <= 1 and 0 <= metric(rows, "train/clap/active_units") <= 32
    assert metric(rows, "time/llm_block_calls_per_step") > 0  # CLaP runs the frozen LM (counted, not an error)
    # a 2-step CLaP on a random LM has barely moved: the contrastive loss is still near log K
    assert abs(metric(rows, "val/clap/contrastive") - __import__("math").log(k)) < 0.5
    import torch

    ckpt = torch.load(clap_run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["stage"] == "clap"
    assert not any(key.startswith("model.") for key in ckpt["state_dict"])  # the frozen LM is not stored


def test_latent_dpo_config_fits_from_clap_and_predicts(clap_run: Path, data_dir: Path, tmp_path: Path) -> None:
    ckpt = str(clap_run / "checkpoints" / "last.ckpt")
    run = tmp_path / "ldpo"
    cli = main(["fit", *tiny_args("latent_dpo_demo", data_dir, run, "--model.init_args.clap_ckpt", ckpt,
                                  "--data.init_args.batch_size", "4")])
    assert cli.trainer.global_step == 2 and cli.model.user_time["time/llm_block_calls_per_step"] == 0
    rows = read_metrics(run)
    for key in TRL:
        metric(rows, f"train/{key}")
        metric(rows, f"val/{key}")
        metric(rows, f"val/seq/{key}")
    assert metric(rows, "time/llm_block_calls_per_step") == 0.0 and metric(rows, "time/seconds_per_user") > 0
    assert metric(rows, "time/seconds_checkpointing") > 0  # last.ckpt was written inside fit, and not counted
    assert metric(rows, "train/ldpo/kept_pairs") > 0 and 0 <= metric(rows, "val/ldpo/expected_latent_reward") <= 1
    assert json.loads(next(run.glob("logs/version_*/user_time.json")).read_text())["stage"] == "latent_dpo"
    out = tmp_path / "predict"
    main(["predict", *tiny_args("latent_dpo_demo", data_dir, out, "--model.init_args.clap_ckpt", ckpt,
                                "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                                "--model.init_args.max_new_tokens", "3")])
    preds = [json.loads(x) for x in next(out.glob("logs/version_*/predictions.jsonl")).read_text().splitlines()]
    assert len(preds) == 2 and {p["user"] for p in preds} == {"lang:de"} and all(p["stage"] == "latent_dpo"
                                                                               for p in preds)


def test_lora_dpo_config_fits(data_dir: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args("lora_dpo_demo", data_dir, tmp_path)])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    for key in TRL:
        assert metric(rows, f"val/seq/{key}") == metric(rows, f"val/{key}")
        metric(rows, f"train/{key}")
    assert metric(rows, "time/seconds_per_user") > 0


def test_latent_dpo_without_clap_checkpoint_says_what_to_run(data_dir: Path, tmp_path: Path) -> None:
    # the CLI re-raises constructor errors as ValueError (lit_models.cli.union_error_reason); the message is kept
    with pytest.raises((FileNotFoundError, ValueError), match=r"nothing.ckpt does not exist; train the CLaP stage "
                       r"first \(python train.py fit --config configs/latent_preference/clap_demo.yaml\)"):
        main(["fit", *tiny_args("latent_dpo_demo", data_dir, tmp_path, "--model.init_args.clap_ckpt",
                                str(tmp_path / "nothing.ckpt"))])
