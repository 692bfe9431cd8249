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
