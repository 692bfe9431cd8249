"""train.py end to end for ReMamba on mamba-tiny: the demo config fits and tests (predictions, test/avg, the
adapter-free checkpoint), the same checkpoint tests as plain Mamba with one switch, and the LongBench-E config
evaluates hand-made LongBench-E files with the official protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_models.cli import main
from lit_models.nn.longbench_metrics import score_sample
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "remamba" / "demo_needle.yaml"
LONGBENCH_E = ROOT / "configs" / "remamba" / "longbench_e.yaml"


def _common(run_dir: Path) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    return ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", json.dumps(logger), "--checkpoint.dirpath", str(run_dir / "checkpoints")]


def _demo_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO),
            "--data.init_args.demo_sizes", json.dumps({"train": 6, "validation": 2, "test": 2}),
            "--data.init_args.demo_needle_words", "[120, 200]", "--data.init_args.demo_verse_count", "[5, 8]",
            "--data.init_args.demo_cache_dir", str(cache),
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
            "--checkpoint.every_n_train_steps", "2", *_common(run_dir), *extra]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("remamba_demo")
    cli = main(["fit", *_demo_args(run_dir, run_dir / "cache")])
    assert cli.trainer.global_step == 2
    return run_dir


def test_demo_config_fits_and_tests_with_predictions(demo_run: Path) -> None:
    rows = read_metrics(demo_run)
    for key in ("train/loss", "val/loss"):
        assert metric(rows, key) > 0
    assert 1 <= metric(rows, "train/k") and 0.1 <= metric(rows, "train/compress_p") <= 0.3
    assert 0.05 <= metric(rows, "train/keep_rho") <= 0.2 and 0.0 <= metric(rows, "train/mean_weight") <= 1.0
    assert metric(rows, "test/prefill_tokens_per_s") > 0 and metric(rows, "test/decode_tokens_per_s") > 0
    pred_dir = next((demo_run / "logs").glob("version_*/predictions"))
    scores = {}
    for task in ("needle_austen", "verse_retrieval_bible"):
        preds = [json.loads(x) for x in (pred_dir / f"{task}.jsonl").open()]
        assert len(preds) == 2 and all(set(p) == {"pred", "answers", "all_classes", "length", "_id"} for p in preds)
        scores[task] = round(100 * sum(score_sample(task, p["pred"], p["answers"]) for p in preds) / 2, 2)
        assert metric(rows, f"test/{task}") == pytest.approx(scores[task])  # every length falls in 0-4k
        assert metric(rows, f"test/{task}/0-4k") == pytest.approx(scores[task])
    assert metric(rows, "test/avg") == pytest.approx(round(sum(scores.values()) / 2, 2))
    ckpt = torch.load(demo_run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("selector.q_proj") for k in keys) and sum(k.startswith("ret_bias.") for k in keys) == 4


def test_the_same_checkpoint_tests_as_plain_mamba(demo_run: Path, tmp_path: Path) -> None:
    ckpt = demo_run / "checkpoints" / "last.ckpt"
    cli = main(["test", *_demo_args(tmp_path, demo_run / "cache", "--model.init_args.remamba", "false"),
                "--ckpt_path", str(ckpt)])
    assert cli.model.hparams.remamba is False
    rows = read_metrics(tmp_path)
    assert 0.0 <= metric(rows, "test/avg") <= 100.0


def test_demo_baseline_trains_lora_without_selection(demo_run: Path, tmp_path: Path) -> None:
    cli = main(["fit", *_demo_args(tmp_path, demo_run / "cache", "--model.init_args.remamba", "false",
                                   "--model.init_args.lora_r", "4", "--test_after_fit", "false",
                                   "--trainer.limit_val_batches", "0")])
    rows = read_metrics(tmp_path)
    assert cli.trainer.global_step == 2 and metric(rows, "train/loss") > 0
    assert not any(r.get("train/k") for r in rows)
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("dt_proj.modules_to_save" in n for n in trainable)
    assert not any(n.endswith("in_proj.base_layer.weight") for n in trainable)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["litlab_adapter_only"] and set(ckpt["state_dict"]) == trainable  # adapter-only checkpoint


def _longbench_rows(task: str, n: int) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        rows.append({"input": f"What is item {i}?", "context": f"Item {i} is a red apple. " * (30 + 40 * i),
                     "answers": ["a red apple"] if task != "trec" else ["DESC"], "length": [1000, 5000, 9000][i % 3],
                     "dataset": task, "language": "en", "all_classes": ["DESC", "ENTY"] if task == "trec" else None,
                     "_id": f"{task}-{i}"})
    return rows


@pytest.mark.parametrize("remamba", ["true", "false"])
def test_longbench_e_config_evaluates_files_by_path(remamba: str, tmp_path: Path) -> None:
    data = tmp_path / "LongBench"
    data.mkdir()
    for task in ("hotpotqa", "trec"):
        (data / f"{task}_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _longbench_rows(task, 3)))
    main(["test", "--config", str(LONGBENCH_E), "--model.init_args.backbone", "mamba-tiny",
          "--model.init_args.dtype", "float32", "--model.init_args.lora_r", "4", "--model.init_args.max_new_tokens", "3",
          "--model.init_args.remamba", remamba, "--data.init_args.tokenizer", "mamba-tiny",
          "--data.init_args.data_dir", str(data), "--data.init_args.datasets", "[hotpotqa, trec]",
          "--data.init_args.max_length", "300", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          *_common(tmp_path)])
    rows = read_metrics(tmp_path)
    for task in ("hotpotqa", "trec"):
        buckets = [metric(rows, f"test/{task}/{b}") for b in ("0-4k", "4-8k", "8k+")]
        assert metric(rows, f"test/{task}") == pytest.approx(round(sum(buckets) / 3, 2), abs=0.011)
    assert 0.0 <= metric(rows, "test/avg") <= 100.0
    result = json.loads(next((tmp_path / "logs").glob("version_*/predictions/result.json")).read_text())
    assert result["test/avg"] == pytest.approx(metric(rows, "test/avg"))
