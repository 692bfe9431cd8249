"""train.py end to end for early exit: every shipped config runs (validate / fit / predict) on a tiny random Llama
with tiny data, writes its JSON, PNG and CSV outputs, and a gates-only checkpoint decodes through predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "early_exit"
TINY = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def tiny_args(config: str, run_dir: Path, *extra: str) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    data = ["--data.init_args.tokenizer", "llama-tiny"]
    if config != "decode_demo.yaml":
        data += ["--data.init_args.max_val_tokens", "256", "--data.init_args.seq_len", "64",
                 "--data.init_args.batch_size", "2"]
    else:
        data += ["--data.init_args.data_dir", str(run_dir / "data"), "--data.init_args.demo_kwargs",
                 json.dumps({"max_train": 4, "max_eval": 2})]
    return [
        "--config", str(CONFIGS / config),
        "--model.init_args.model", "llama-tiny",
        "--model.init_args.model_config_overrides", json.dumps(TINY),
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        *data,
        *extra,
    ]


def _log_dir(run_dir: Path) -> Path:
    return max((run_dir / "logs").glob("version_*"))


def test_analysis_config_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = tiny_args("analysis_smollm2.yaml", tmp_path)
    loggers = json.loads(args[args.index("--trainer.logger") + 1])
    loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"save_dir": str(tmp_path), "project": "litlab-test", "offline": True}})
    args[args.index("--trainer.logger") + 1] = json.dumps(loggers)
    main(["validate", *args])
    rows = read_metrics(tmp_path)
    rep = json.loads((_log_dir(tmp_path) / "early_exit_val.json").read_text())
    assert rep["n_tokens"] == 4 * 63 and rep["n_layers"] == 4 and len(rep["exit_units"]) == 8  # sub-layer exits
    assert sum(rep["hist_stable"]) == sum(rep["hist_first"]) == rep["n_tokens"]
    assert rep["agreement_with_final"][-1] == 1.0
    assert sum(v["count"] for v in rep["by_category"].values()) == rep["n_tokens"]
    assert metric(rows, "val/oracle/mean_exit") == pytest.approx(rep["oracle/mean_exit"])
    # first match <= stable oracle, among whole layers and among the half-layer exit points alike
    assert sum(rep["hist_first_layer"]) == rep["n_tokens"]
    assert metric(rows, "val/oracle/mean_exit_first") <= metric(rows, "val/oracle/mean_exit") + 1e-9
    assert metric(rows, "val/oracle/mean_exit_first_sublayer") <= metric(rows, "val/oracle/mean_exit_sublayer") + 1e-9
    assert 0.5 <= metric(rows, "val/oracle/mean_exit_sublayer") <= 4.0
    png = _log_dir(tmp_path) / "early_exit_val.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # W&B (offline run directory): the histogram table (one row per exit point), the sub-word table and the image
    media = next((tmp_path / "wandb").glob("offline-run-*/files/media"))
    table = json.loads(next((media / "table" / "val" / "oracle").glob("hist_[0-9]*.table.json")).read_text())
    assert table["columns"][:3] == ["exit_layer", "stable", "first"] and len(table["data"]) == 8
    assert [r[1] for r in table["data"]] == rep["hist_stable"]
    sub = json.loads(next((media / "table" / "val" / "oracle").glob("hist_subword_*.table.json")).read_text())
    assert [r[0] for r in sub["data"]] == ["single", "first", "middle", "last", "other"]
    assert list((media / "images" / "val").glob("early_exit_plot_*.png"))


def test_gate_config_fits_and_checkpoint_predicts(tmp_path: Path) -> None:
    run = tmp_path / "fit"
    cli = main(["fit", *tiny_args("gate_demo.yaml", run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                                  "2", "--trainer.log_every_n_steps", "1", "--checkpoint.dirpath",
                                  str(run / "checkpoints"), "--model.init_args.eval_decode_prompts", "2",
                                  "--model.init_args.eval_max_new_tokens", "6", "--model.init_args.decode_prompt_tokens",
                                  "8")])
    assert cli.trainer.global_step == 2
    rows = read_metrics(run)
    assert metric(rows, "train/gate_bce") > 0 and metric(rows, "train/loss") == metric(rows, "train/gate_bce")
    assert 0 <= metric(rows, "val/gate_acc") <= 1 and 1 <= metric(rows, "val/ee/avg_exit_layer") <= 4
    assert metric(rows, "val/ee/layer_speedup") == pytest.approx(4 / metric(rows, "val/ee/avg_exit_layer"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["litlab_gates_only"] and all(k.startswith("gates.") for k in ckpt["state_dict"])

    pred = tmp_path / "predict"
    main(["predict", *tiny_args("decode_demo.yaml", pred, "--model.init_args.max_new_tokens", "5",
                                "--model.init_args.gate_threshold", "1.0"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    summary = json.loads((_log_dir(pred) / "early_exit_decode.json").read_text())
    records = [json.loads(line) for line in (_log_dir(pred) / "predictions.jsonl").read_text().splitlines()]
    assert summary["n_prompts"] == len(records) == 2
    # threshold 1.0 never exits early: the early-exit output is the full output at full depth
    assert summary["ee/avg_exit_layer"] == 4.0 and summary["ee/token_agreement"] == 1.0
    assert summary["ee/prefix_match"] == 1.0 and all(r["output_ee"] == r["output_full"] for r in records)
    assert all(r["exits"] == [4.0] * 5 for r in records)

    # gates belong to their base model: a checkpoint for another model (here 4 vs 3 layers) is refused by train.py,
    # naming the setting, instead of silently decoding with the checkpoint's model
    other = {**TINY, "num_hidden_layers": 3}
    args = tiny_args("decode_demo.yaml", tmp_path / "other", "--model.init_args.max_new_tokens", "2")
    args[args.index("--model.init_args.model_config_overrides") + 1] = json.dumps(other)
    with pytest.raises(ValueError, match="model_config_overrides: checkpoint"):
        main(["predict", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])


def test_speed_benchmark_quick_run(tmp_path: Path) -> None:
    """benchmarks/early_exit_speed.py end to end on a tiny random Llama: JSON lines with the figures, the full loop
    equal to generate, the ratio consistent with the two tokens/s (speed itself is never asserted)."""
    import contextlib
    import io

    from benchmarks import early_exit_speed

    threads = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lines = early_exit_speed.main(["--model", "llama-tiny", "--model-config-overrides", json.dumps(TINY),
                                           "--quick", "--threads", "1", "--train-seq", "32", "--prompt-tokens", "8",
                                           "--kv-modes", "propagate,lazy"])
    finally:
        torch.set_num_threads(threads)
    assert [json.loads(x) for x in out.getvalue().splitlines()] == lines
    assert [x["figure"] for x in lines] == ["full_tokens_per_s", "ee_tokens_per_s", "ee_tokens_per_s"]
    assert lines[0]["full_equals_generate"] is True and lines[0]["train_steps"] == 3
    for line in lines[1:]:
        assert line["ratio"] == pytest.approx(line["ours"] / line["baseline_value"], rel=1e-2)
        assert 1.0 <= line["avg_exit_layer"] <= 4.0 and 0.0 <= line["token_agreement"] <= 1.0
        assert line["layer_speedup"] == pytest.approx(4.0 / line["avg_exit_layer"], rel=1e-3)
