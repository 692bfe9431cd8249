"""train.py end to end for NDP on tiny slices of the real demo data: every config fits (tables built on first use and
reused), batches carry count rows aligned with their prediction positions, the table builder script's tables are
accepted by a run, and mismatched or missing tables are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "ndp").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ndp_data")


def tiny_args(config: Path, data_dir: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    demo_kwargs = ({"languages": ["en", "de"], "n_val": 2, "n_test": 2} if "math" in config.stem
                   else {"max_train": 24, "max_eval": 4})
    return [
        "--config", str(config),
        "--data.init_args.data_dir", str(data_dir / config.stem),
        "--data.init_args.demo_kwargs", json.dumps(demo_kwargs),
        "--data.init_args.max_train_samples", "24",
        "--data.init_args.max_eval_samples", "2",
        "--data.init_args.batch_size", "4",
        "--model.init_args.max_new_tokens", "4",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        *extra,
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_two_steps_and_tests(config: Path, data_dir: Path, tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    extra = [] if "ntp" in config.stem else ["--data.init_args.tables_dir", str(tables)]
    cli = main(["fit", *tiny_args(config, data_dir, tmp_path, *extra)])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    ntp, loss = metric(rows, "train/loss_ntp"), metric(rows, "train/loss")
    assert 8.0 < ntp < 12.0  # a random 49,152-way model: about ln 49152 = 10.8 nats
    assert metric(rows, "val/loss_ntp") > 0
    if "ntp" in config.stem:
        assert loss == ntp
        assert not tables.exists()
    else:
        # soft targets have entropy, so the NDP objective (CE = KL + H) exceeds nothing it need not: just >= 0 and
        # different from the one-hot loss once a row has more than one token
        assert 0 <= metric(rows, "train/frac_multi_sup") <= metric(rows, "train/frac_multi_clm") <= 1
        assert metric(rows, "train/target_entropy") > 0 and loss != ntp
        assert (tables / "train" / "meta.json").is_file() and (tables / "validation" / "meta.json").is_file()
    key = "test/acc_avg" if "math" in config.stem else "test/sacrebleu"
    assert metric(rows, key) >= 0


def test_batches_carry_rows_aligned_with_prediction_positions(data_dir: Path, tmp_path: Path) -> None:
    from datamodules.ndp import NDPInstructionDataModule

    config = ROOT / "configs" / "ndp" / "translation_demo.yaml"
    dm = NDPInstructionDataModule(tokenizer="llama-tiny", demo="bible_multiref", data_dir=str(data_dir / config.stem),
                                  demo_kwargs={"max_train": 24, "max_eval": 4}, max_length=256, batch_size=4,
                                  min_prefix=1, tables_dir=str(tmp_path / "t"))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    positions = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][positions]
    assert batch["sup_ptr"].numel() == batch["clm_ptr"].numel() == int(positions.sum()) + 1
    ptr, tok = batch["sup_ptr"], batch["sup_tok"]
    for i, t in enumerate(targets.tolist()):  # every supervised row holds the true next token
        assert t in tok[ptr[i]:ptr[i + 1]].tolist()
    # the demo's prompts repeat with two references: some supervised rows branch
    assert dm.table_stats["train"]["frac_multi_sup"] > 0


def test_script_tables_are_used_and_mismatches_are_errors(data_dir: Path, tmp_path: Path) -> None:
    from scripts.build_ndp_tables import main as build

    config = ROOT / "configs" / "ndp" / "translation_demo.yaml"
    data = data_dir / config.stem
    main(["fit", *tiny_args(config, data_dir, tmp_path / "warm", "--data.init_args.tables_dir", str(tmp_path / "w"),
                            steps=1)])  # builds the demo files
    train = data / "bible_multiref" / "train.jsonl"
    val = data / "bible_multiref" / "validation.jsonl"
    out = tmp_path / "tables"
    assert build(["--data", str(train), "--val-data", str(val), "--tokenizer", "llama-tiny", "--max-length", "256",
                  "--min-prefix", "1", "--out", str(out)]) == 0
    common = ["--data.init_args.demo", "none", "--data.init_args.train_files", json.dumps([str(train)]),
              "--data.init_args.val_files", json.dumps([str(val)]), "--data.init_args.test_files",
              json.dumps([str(data / "bible_multiref" / "test.jsonl")]), "--data.init_args.tables_dir", str(out),
              "--data.init_args.build_tables_if_missing", "false", "--data.init_args.max_train_samples", "null",
              "--data.init_args.max_eval_samples", "null", "--test_after_fit", "false"]
    cli = main(["fit", *tiny_args(config, data_dir, tmp_path / "run", *common, steps=1)])
    assert cli.trainer.global_step == 1
    with pytest.raises(ValueError, match=r"min_prefix.*2.*1|min_prefix.*1.*2"):
        main(["fit", *tiny_args(config, data_dir, tmp_path / "bad", *common, "--data.init_args.min_prefix", "2",
                                steps=1)])
    with pytest.raises(FileNotFoundError, match="scripts/build_ndp_tables.py"):
        main(["fit", *tiny_args(config, data_dir, tmp_path / "none", *common[:-4], "--data.init_args.tables_dir",
                                str(tmp_path / "empty"), "--data.init_args.build_tables_if_missing", "false", steps=1)])


def test_ndp_model_on_plain_batches_says_how_to_get_targets(data_dir: Path, tmp_path: Path) -> None:
    config = ROOT / "configs" / "ndp" / "translation_demo.yaml"
    with pytest.raises(ValueError, match="model.init_args.target=ndp but data.init_args.target=ntp"):
        main(["fit", *tiny_args(config, data_dir, tmp_path, "--data.init_args.target", "ntp", steps=1)])
    # batches from a DataModule that knows nothing of NDP: the step says what is missing
    from lit_models.ndp import NextDistributionLM

    ids = torch.tensor([[1, 5, 6, 7, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, -100, 6, 7, 2]])}
    with pytest.raises(RuntimeError, match="NDP targets missing: run scripts/build_ndp_tables.py or set target: ntp"):
        NextDistributionLM(model="llama-tiny")._losses(batch)


def test_bad_settings_name_the_key() -> None:
    from lit_models.ndp import NextDistributionLM

    kw = {"model": "llama-tiny"}
    with pytest.raises(ValueError, match=r"mix_ratio must be in \[0, 1\], got 1.5"):
        NextDistributionLM(mix_ratio=1.5, **kw)
    with pytest.raises(ValueError, match=r"count_transform must be one of \['softmax', 'freq'\]"):
        NextDistributionLM(count_transform="argmax", **kw)
    with pytest.raises(ValueError, match="label_smoothing is the NTP control"):
        NextDistributionLM(label_smoothing=0.1, **kw)
    with pytest.raises(ValueError, match=r"zero_prob must be in \[0, 1\), got 1.0"):
        NextDistributionLM(zero_prob=1.0, **kw)
    assert torch.is_tensor(NextDistributionLM(target="ntp", label_smoothing=0.1, **kw)._val_ndp)


def test_mono_files_add_answer_only_counts(data_dir: Path, tmp_path: Path) -> None:
    """A domain corpus (JSONL 'text' and blank-line-separated plain text) enters the CLM table only."""
    from datamodules.ndp import NDPInstructionDataModule

    (tmp_path / "mono.jsonl").write_text('{"text": "In the beginning God created the heaven and the earth."}\n',
                                         encoding="utf-8")
    (tmp_path / "mono.txt").write_text("And God said, Let there be light.\n\nAnd there was light.\n", encoding="utf-8")
    common = {"tokenizer": "llama-tiny", "demo": "bible_multiref", "data_dir": str(data_dir / "translation_demo"),
              "demo_kwargs": {"max_train": 24, "max_eval": 4}, "max_length": 256, "min_prefix": 1}
    plain = NDPInstructionDataModule(**common, tables_dir=str(tmp_path / "plain"))
    mono = NDPInstructionDataModule(**common, tables_dir=str(tmp_path / "mono"),
                                    mono_files=[str(tmp_path / "mono.jsonl"), str(tmp_path / "mono.txt")])
    for dm in (plain, mono):
        dm.prepare_data()
        dm.setup("fit")
    a, b = plain.table_stats["train"], mono.table_stats["train"]
    assert b["mono_docs"] == 3 and a["mono_docs"] == 0
    assert b["sup_entries"] == a["sup_entries"] and b["clm_entries"] >= a["clm_entries"]
    with pytest.raises(FileNotFoundError, match="mono_files: .*missing.jsonl does not exist"):
        NDPInstructionDataModule(**common, tables_dir=str(tmp_path / "x"),
                                 mono_files=[str(tmp_path / "missing.jsonl")]).setup("fit")
