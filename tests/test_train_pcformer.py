"""train.py end to end on tiny slices of the real Bible demo corpus: every config parses, demo configs fit, resume is
exact, the subcommands work on a checkpoint, and bad input fails clearly (spec check 11, issue 'Tests')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
# Every train.py config (scaling-sweep grids, which name `families` of train.py configs, are checked by
# tests/test_scaling_sweep.py instead).
CONFIGS = [c for c in sorted((ROOT / "configs").rglob("*.yaml")) if "families" not in (yaml.safe_load(c.read_text()) or {})]
METHOD_CONFIGS = sorted((ROOT / "configs" / "pcformer").glob("*.yaml"))
DEMO_CONFIGS = [c for c in METHOD_CONFIGS if c.name.startswith("demo_")]


@pytest.fixture(scope="session")
def bible(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One shared demo corpus and a 500-piece tokenizer, built once for the session."""
    root = tmp_path_factory.mktemp("bible")
    return {"data_dir": root / "data", "tokenizer": root / "spm500.model"}


def tiny_args(config: Path, bible: dict[str, Path], run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    """Override a demo config down to 200 training pairs, a 500-piece vocabulary and a CSV logger in ``run_dir``."""
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    return [
        "--config", str(config),
        "--data.init_args.data_dir", str(bible["data_dir"]),
        "--data.init_args.tokenizer_path", str(bible["tokenizer"]),
        "--data.init_args.vocab_size", "500",
        "--data.init_args.max_train_pairs", "200",
        "--data.init_args.max_eval_pairs", "12",
        "--data.init_args.max_tokens", "512",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", "1",
        "--model.init_args.max_len_b", "5",
        "--model.init_args.max_len_a", "0.5",
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Method configs parse alone; trainer/logger configs compose after a method config."""
    composes = config.parent.name in ("trainer", "logger")
    base = ROOT / "configs/pcformer/demo_bible_en_de.yaml" if composes else config
    args = ["fit", "--config", str(base)] + (["--config", str(config)] if composes else []) + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    declared = yaml.safe_load(base.read_text())
    assert f"class_path: {declared['model']['class_path']}" in printed
    assert f"class_path: {declared['data']['class_path']}" in printed


def test_print_config_is_complete_and_rerunnable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The printed YAML parses again on its own and prints the same config (every default filled in)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/pcformer/demo_bible_en_de.yaml"), "--print_config"])
    first = capsys.readouterr().out
    assert "ema_alpha: 0.5" in first and "label_smoothing: 0.1" in first and "max_tokens: 2048" in first
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(printed), "--print_config"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("config", DEMO_CONFIGS, ids=lambda p: p.stem)
def test_demo_config_fits_validates_and_tests(config: Path, bible: dict[str, Path], tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(config, bible, tmp_path)])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    assert metric(rows, "data/train_pairs") == 200.0 and metric(rows, "data/skipped_too_long") >= 0.0
    for key in ("train/loss", "val/loss", "val/sacrebleu", "test/sacrebleu", "lr-AdamW"):
        metric(rows, key)
    assert 0.0 <= metric(rows, "test/sacrebleu") <= 100.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "averaged.ckpt").is_file()
    saved = list((tmp_path / "logs").glob("version_*/config.yaml"))
    assert saved, "the run's config.yaml was not saved"
    hyps = list((tmp_path / "logs").glob("version_*/hypotheses.test.txt"))
    assert hyps and len(hyps[0].read_text().splitlines()) == 12
    if "vanilla" in config.stem:
        assert not any(k.startswith("pc/alpha") for k in rows[0])


def test_validate_test_predict_on_a_checkpoint(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    main(["fit", *tiny_args(config, bible, tmp_path, "--test_after_fit", "false")])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cli = main(["validate", *tiny_args(config, bible, tmp_path / "v"), "--ckpt_path", str(ckpt)])
    assert "val/sacrebleu" in cli.trainer.callback_metrics
    cli = main(["test", *tiny_args(config, bible, tmp_path / "t"), "--ckpt_path", str(ckpt)])
    assert "test/sacrebleu" in cli.trainer.callback_metrics
    src = tmp_path / "input.en"
    src.write_text("In the beginning God created the heavens and the earth.\n\nJesus wept.\n")
    out = tmp_path / "out.de"
    main(
        ["predict", *tiny_args(config, bible, tmp_path / "p"), "--ckpt_path", str(ckpt),
         "--data.init_args.predict_file", str(src), "--model.init_args.predictions_file", str(out)]
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == "" and lines[0] and lines[2]  # one output per input line, in order
    assert src.read_text().startswith("In the beginning")  # input untouched


def test_resume_is_exact(bible: dict[str, Path], tmp_path: Path) -> None:
    """N steps straight vs N/2, kill, resume with --ckpt_path last: same loss, LR and weights at step N."""
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    common = ("--test_after_fit", "false", "--trainer.val_check_interval", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["fit", *tiny_args(config, bible, straight, *common, steps=6)])
    main(["fit", *tiny_args(config, bible, resumed, *common, steps=3)])
    main(["fit", *tiny_args(config, bible, resumed, *common, "--ckpt_path", "last", steps=6)])
    a, b = read_metrics(straight), read_metrics(resumed)
    for key in ("train/loss", "lr-AdamW"):
        assert metric(a, key, step=5) == metric(b, key, step=5)
    sd_a = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    sd_b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_missing_checkpoints_are_errors(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        main(["fit", *tiny_args(config, bible, tmp_path), "--ckpt_path", "last"])
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.ckpt"):
        main(["test", *tiny_args(config, bible, tmp_path), "--ckpt_path", str(tmp_path / "nope.ckpt")])


def test_fresh_fit_refuses_a_checkpoint_dir_of_another_run(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step0000002.ckpt").write_bytes(b"an earlier run")
    with pytest.raises(FileExistsError, match="already holds 1 checkpoint.*--ckpt_path last"):
        main(["fit", *tiny_args(config, bible, tmp_path)])


def test_corrupt_checkpoint_is_an_error_naming_the_file(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {bad}"):
        main(["test", *tiny_args(config, bible, tmp_path), "--ckpt_path", str(bad)])


def test_missing_test_split_fails_before_training(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    data = tmp_path / "corpus"
    data.mkdir()
    for split in ("train", "valid"):
        for lang in ("en", "de"):
            lines = (bible["data_dir"] / f"{split}.{lang}").read_text().splitlines()[:50]
            (data / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    args = tiny_args(config, bible, tmp_path / "run", "--data.init_args.demo", "null", "--data.init_args.data_dir", str(data))
    with pytest.raises(FileNotFoundError, match="test.en"):
        main(["fit", *args])
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_unknown_config_key_is_an_error(bible: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(config, bible, tmp_path), "--model.init_args.ordr", "2"])
    assert exit_info.value.code != 0
    assert "ordr" in capsys.readouterr().err


def test_checkpoint_from_another_tokenizer_is_refused(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    main(["fit", *tiny_args(config, bible, tmp_path / "a", "--test_after_fit", "false")])
    other = ["--data.init_args.tokenizer_path", str(tmp_path / "spm300.model"), "--data.init_args.vocab_size", "300"]
    with pytest.raises(ValueError, match="tokenizer does not match the checkpoint"):
        main(["test", *tiny_args(config, bible, tmp_path / "b"), *other, "--ckpt_path", str(tmp_path / "a/checkpoints/last.ckpt")])


def test_transformer_arch_requires_order_one(bible: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/pcformer/demo_vanilla_en_de.yaml"
    with pytest.raises(ValueError, match="arch=transformer requires order=1, corrector=none"):
        main(["fit", *tiny_args(config, bible, tmp_path), "--model.init_args.order", "2"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_with_the_global_batch(bible: dict[str, Path], tmp_path: Path) -> None:
    """2 gloo processes x 1 batch == 1 process x 2 accumulated batches (same batches, dropout off): same weights."""
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    no_dropout = ("--model.init_args.dropout", "0", "--model.init_args.attention_dropout", "0",
                  "--model.init_args.activation_dropout", "0")
    main(["fit", *tiny_args(config, bible, tmp_path / "single", *no_dropout, "--test_after_fit", "false",
                            "--trainer.accumulate_grad_batches", "2")])
    args = tiny_args(config, bible, tmp_path / "ddp", *no_dropout, "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--test_after_fit", "true")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "ddp")
    assert metric(rows, "val/sacrebleu") >= 0.0 and metric(rows, "test/sacrebleu") >= 0.0
    hyps = next((tmp_path / "ddp" / "logs").glob("version_*/hypotheses.test.txt"))
    assert len(hyps.read_text().splitlines()) == 12  # gathered over both ranks, each sentence once
    single = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=False)
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=False)
    assert single["global_step"] == ddp["global_step"] == 2
    for k, v in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["wmt14_en_de_base", "wmt14_en_de_big"])
def test_wmt_configs_run_on_raw_data_given_by_path(name: str, bible: dict[str, Path], tmp_path: Path) -> None:
    """The paper-scale configs read the WMT raw layout ({train,newstest2013,newstest2014}.{en,de}) by path; shrunk
    to a tiny model on CPU, they run two steps with their own architecture options (DLCL, order 4, relative attention)."""
    main(["fit", *tiny_args(ROOT / "configs/pcformer/demo_bible_en_de.yaml", bible, tmp_path / "warm", steps=1,
                            *("--test_after_fit", "false"))])  # make sure the shared Bible files exist
    wmt = tmp_path / "wmt14_en_de"
    wmt.mkdir()
    for split, n in (("train", 64), ("valid", 8), ("test", 8)):
        target = {"train": "train", "valid": "newstest2013", "test": "newstest2014"}[split]
        for lang in ("en", "de"):
            lines = (bible["data_dir"] / f"{split}.{lang}").read_text().splitlines()[:n]
            (wmt / f"{target}.{lang}").write_text("\n".join(lines) + "\n")
    inputs = {p: p.read_bytes() for p in wmt.iterdir()}
    run = tmp_path / "run"
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "logs"}}]
    cli = main([
        "fit", "--config", str(ROOT / f"configs/pcformer/{name}.yaml"), "--config", str(ROOT / "configs/trainer/cpu.yaml"),
        "--data.init_args.data_dir", str(wmt), "--data.init_args.vocab_size", "200", "--data.init_args.num_workers", "0",
        "--data.init_args.max_tokens", "512",
        "--model.init_args.d_model", "32", "--model.init_args.ffn_dim", "64", "--model.init_args.n_heads", "4",
        "--model.init_args.encoder_layers", "2", "--model.init_args.decoder_layers", "2",
        "--model.init_args.max_len_a", "0.5", "--model.init_args.max_len_b", "3",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.accumulate_grad_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", json.dumps(logger), "--checkpoint.dirpath", str(run / "checkpoints"),
        "--checkpoint.every_n_train_steps", "1",
    ])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.decoder_history == "learnable_dense"
    rows = read_metrics(run)
    metric(rows, "val/sacrebleu")
    metric(rows, "test/sacrebleu")
    for path, content in inputs.items():
        assert path.read_bytes() == content, f"{path} was modified"


@pytest.mark.gpu
@pytest.mark.parametrize("trainer_config", ["gpu", "fsdp"])
def test_demo_fits_on_cuda(trainer_config: str, bible: dict[str, Path], tmp_path: Path) -> None:
    """bf16-mixed on one GPU, and FSDP over the GPUs present (skipped without CUDA)."""
    config = ROOT / "configs/pcformer/demo_bible_en_de.yaml"
    extra = ("--config", str(ROOT / f"configs/trainer/{trainer_config}.yaml"), "--trainer.devices", "1")
    cli = main(["fit", *tiny_args(config, bible, tmp_path, *extra)])
    assert cli.trainer.global_step == 2
    assert metric(read_metrics(tmp_path), "test/sacrebleu") >= 0.0
