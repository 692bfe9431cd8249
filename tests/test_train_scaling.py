"""train.py end to end for the scaling-law LMs on the real offline mixed corpus (Austen, Bible, essays) with the
trained byte-level BPE: both configs run, the run summary is what the sweep reads, an interrupted run resumes
exactly, and bad data settings are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "scaling").glob("*_tiny.yaml"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


def tiny_args(config: Path, cache: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    return [
        "--config", str(config),
        "--data.init_args.cache_dir", str(cache),
        "--data.init_args.seq_len", "32",
        "--data.init_args.batch_size", "4",
        "--data.init_args.max_train_tokens", str(32 * 4 * 8),
        "--data.init_args.max_val_tokens", "512",
        "--trainer.max_steps", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", "1",
        "--model.init_args.summary_file", str(run_dir / "run_summary.json"),
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_two_steps_and_writes_its_summary(config: Path, cache_dir: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(config, cache_dir, tmp_path)])
    assert cli.trainer.global_step == 2
    assert len(cli.datamodule.tokenizer) == 2048 and cli.model.model.config.vocab_size == 2048
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    moe = config.stem.startswith("moe")
    assert summary["status"] == "ok" and summary["ffn"] == ("moe" if moe else "dense")
    assert summary["n_active_nonemb"] == (101_696 if moe else 100_672)
    assert summary["n_embedding"] == 2048 * 64
    assert summary["tokens_seen"] == 2 * 4 * 32 and summary["batch_tokens"] == 4 * 32
    assert summary["flops_6nd"] == 6 * summary["n_active_nonemb"] * summary["tokens_seen"]
    assert summary["unique_train_tokens"] == 32 * 4 * 8 and summary["passes"] == 0.25
    rows = read_metrics(tmp_path)
    # 16 validation rows of 32 tokens, 31 scored each; the loss of a barely trained model is near ln 2048 = 7.62
    assert metric(rows, "val/tokens") == 16 * 31
    assert 6.5 < summary["final_val_loss"] < 8.0
    assert metric(rows, "val/bpb") > 0 and metric(rows, "data/val_tokens") == 512
    if moe:
        assert metric(rows, "train/aux_loss") >= 2.0 - 1e-4  # >= k, equality at perfect balance


class StopAt(Callback):
    """Interrupts a run after ``step`` optimizer steps (a checkpoint was written every step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_exactly(cache_dir: Path, tmp_path: Path) -> None:
    """6 steps straight vs interrupted after 3 and resumed with --ckpt_path last: same losses, LR, tokens and
    weights at step 6 (the data position, schedule and token counter are all restored)."""
    config = ROOT / "configs" / "scaling" / "moe_tiny.yaml"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["fit", *tiny_args(config, cache_dir, straight, steps=6)])
    stop = json.dumps([{"class_path": "tests.test_train_scaling.StopAt", "init_args": {"step": 3}}])
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit status 1 after a graceful shutdown
        main(["fit", *tiny_args(config, cache_dir, resumed, "--trainer.callbacks", stop, steps=6)])
    assert not (resumed / "run_summary.json").exists()
    main(["fit", *tiny_args(config, cache_dir, resumed, "--ckpt_path", "last", steps=6)])
    a, b = read_metrics(straight), read_metrics(resumed)
    for key in ("train/loss", "lr", "tokens_seen", "flops/cumulative"):
        assert metric(a, key, step=5) == metric(b, key, step=5), key
    sa, sb = (json.loads((d / "run_summary.json").read_text()) for d in (straight, resumed))
    for key in ("tokens_seen", "steps", "final_val_loss", "final_train_lm_loss"):
        assert sa[key] == sb[key], key
    wa = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_data_settings_are_clear_errors(cache_dir: Path, tmp_path: Path) -> None:
    config = ROOT / "configs" / "scaling" / "dense_tiny.yaml"
    with pytest.raises(ValueError, match=r"max_train_tokens=999999999 exceeds the \d+ tokens of the training stream"):
        main(["fit", *tiny_args(config, cache_dir, tmp_path, "--data.init_args.max_train_tokens", "999999999")])
    with pytest.raises(ValueError, match=r"tokenizer='bpe:big': write bpe:<vocabulary size>"):
        main(["fit", *tiny_args(config, cache_dir, tmp_path, "--data.init_args.tokenizer", "bpe:big")])
    with pytest.raises(ValueError, match=r"seq_len=4096 exceeds model.init_args.max_position_embeddings=2048"):
        main(["fit", *tiny_args(config, cache_dir, tmp_path, "--data.init_args.seq_len", "4096",
                                "--data.init_args.max_train_tokens", "8192", "--data.init_args.max_val_tokens", "4096")])


def test_sweep_smoke_run_trains_two_real_points(cache_dir: Path, tmp_path: Path) -> None:
    """Spec test 10's smoke run: the launcher runs 2 real train.py fits (3 steps, 2,048-token data) and writes 2 CSV
    rows with status ok and the counts of the summaries."""
    import csv
    import subprocess
    import sys

    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "scripts" / "scaling_sweep.py"), "--grid", str(ROOT / "configs/scaling/sweep_demo.yaml"),
           "--out", str(out), "--max-runs", "2", "--wandb", "disabled", "--",
           "--trainer.max_steps=3", "--data.init_args.max_train_tokens=2048", "--data.init_args.max_val_tokens=1024",
           f"--data.init_args.cache_dir={cache_dir}", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    log = (out / rows[0]["run_id"] / "train.log").read_text()
    assert "the data repeats 3.00 times" in log  # 3 steps of 2,048 tokens over 2,048 unique tokens
    for row in rows:
        assert int(row["steps"]) == 3 and int(row["tokens"]) == 3 * 16 * 128
        assert int(row["flops_6nd"]) == 6 * int(row["n_active_nonemb"]) * int(row["tokens"])
        assert 6.0 < float(row["final_val_loss"]) < 8.0
