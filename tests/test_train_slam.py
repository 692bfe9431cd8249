"""train.py end to end for SLAM on llama-tiny and the real multilingual math demo data: the config fits and tests,
only the selected layers' FFN matrices change, and full / LoRA are one switch away on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_models.cli import main
from lit_models.hf import load_causal_lm
from tests.run_logs import metric, read_metrics
from tests.test_train_causal_lm import tiny_args

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "slam" / "demo_smollm2.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instruction")


def test_slam_config_trains_only_the_selected_ffn(data_dir: Path, tmp_path: Path) -> None:
    # llama-tiny has 2 layers; SLAM trains layer 1's up/down projections only
    cli = main(["fit", *tiny_args(CONFIG, data_dir, tmp_path, "--model.init_args.layers", "[1]")])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    assert metric(rows, "trainable_params") == 2 * 64 * 128
    assert metric(rows, "trainable_fraction") == pytest.approx(2 * 64 * 128 / metric(rows, "total_params"))
    assert 0.0 <= metric(rows, "test/acc_avg") <= 1.0 and metric(rows, "train/loss") > 0
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    initial = load_causal_lm("llama-tiny").state_dict()
    selected = {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, value in initial.items():
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        after = trained[f"model.{name}"]
        assert torch.equal(after, value) != (name in selected), name


@pytest.mark.parametrize(("mode", "trainable"), [("full", None), ("lora", "lora_")])
def test_full_and_lora_are_one_switch_away(mode: str, trainable: str | None, data_dir: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(CONFIG, data_dir, tmp_path, "--model.init_args.mode", mode, "--test_after_fit",
                                  "false")])
    names = [n for n, p in cli.model.model.named_parameters() if p.requires_grad]
    total = [n for n, _ in cli.model.model.named_parameters()]
    if trainable is None:
        assert names == total
    else:
        assert names and all(trainable in n for n in names)


def test_layer_out_of_range_names_the_layer_count(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: the model has 2 decoder layers"):
        main(["fit", *tiny_args(CONFIG, data_dir, tmp_path, "--model.init_args.layers", "[0, 5]")])


def test_paper_config_runs_on_converted_metamath_and_mgsm(tmp_path: Path) -> None:
    """metamath_mgsm.yaml on MetaMathQA-style and MGSM-TSV files converted by scripts/convert_math_data.py, shrunk
    to llama-tiny on the CPU."""
    import json

    from scripts.convert_math_data import main as convert

    metamath = [{"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}. The answer is: {a + b}"}
                for a, b in ((2, 3), (4, 4), (7, 1), (5, 6))]
    (tmp_path / "MetaMathQA.json").write_text(json.dumps(metamath), encoding="utf-8")
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text('Tom has 3 "red" apples and buys 2. How many?\t5\n', encoding="utf-8")
    (mgsm / "mgsm_de.tsv").write_text("Tom hat 3 Äpfel und kauft 2. Wie viele?\t5\n", encoding="utf-8")
    convert(["--format", "metamath", "--input", str(tmp_path / "MetaMathQA.json"), "--template", "alpaca",
             "--out", str(tmp_path / "metamath.jsonl")])
    convert(["--format", "mgsm_tsv", "--input", str(mgsm), "--template", "alpaca", "--out", str(tmp_path / "mgsm.jsonl")])
    config = ROOT / "configs" / "slam" / "metamath_mgsm.yaml"
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs"}}]
    main(["fit", "--config", str(config),
          "--model.init_args.model", "llama-tiny", "--model.init_args.dtype", "float32",
          "--model.init_args.layers", "[0]", "--model.init_args.max_new_tokens", "4",
          "--data.init_args.tokenizer", "llama-tiny", "--data.init_args.batch_size", "2",
          "--data.init_args.train_files", json.dumps([str(tmp_path / "metamath.jsonl")]),
          "--data.init_args.test_files", json.dumps([str(tmp_path / "mgsm.jsonl")]),
          "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
          "--trainer.precision", "32-true", "--trainer.max_epochs", "1", "--trainer.accumulate_grad_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", json.dumps(logger), "--checkpoint.dirpath", str(tmp_path / "checkpoints")])
    rows = read_metrics(tmp_path)
    assert metric(rows, "trainable_params") == 2 * 64 * 128
    assert 0.0 <= metric(rows, "test/acc_en") <= 1.0 and 0.0 <= metric(rows, "test/acc_de") <= 1.0
    assert metric(rows, "test/acc_avg") == pytest.approx((metric(rows, "test/acc_en") + metric(rows, "test/acc_de")) / 2)
