"""train.py test end to end for every forgetting-curve config (tiny grids): JSON, summary, PNG and logged metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "forgetting_curve").glob("*.yaml"))
KEYS = ("test/fine_grained_length", "test/coarse_grained_length", "test/amnesia_length", "test/n_failed_lengths",
        "test/samples_per_s")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_through_train_py(config: Path, tmp_path: Path) -> None:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs"}}]
    extra = []
    if config.stem == "smollm2":  # the real model on Austen, shrunk grid
        extra = ["--data.init_args.lengths", "[8, 24]", "--data.init_args.repeats", "3",
                 "--data.init_args.batch_size", "3"]
    main([
        "test", "--config", str(config),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", json.dumps(logger),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ])
    out = tmp_path / "logs" / "version_0" / "forgetting_curve"
    title = next(p.name for p in out.glob("*.summary.json")).removesuffix(".summary.json")
    results = json.loads((out / f"{title}.json").read_text())
    summary = json.loads((out / f"{title}.summary.json").read_text())
    assert (out / f"{title}.png").read_bytes()[:4] == b"\x89PNG"
    lengths = [8, 24] if config.stem == "smollm2" else list(range(4, 65, 4))
    assert [r["length"] for r in results] == lengths
    assert all(r["status"] == "ok" and r["n_scored"] == (r["length"] + 1) // 2 for r in results)
    assert all(len(r["copy_accs"]) == len(r["lm_accs"]) == 3 for r in results)
    assert summary["n_failed_lengths"] == 0
    assert summary["settings"]["data"]["N"] > 0 if config.stem == "smollm2" else True
    rows = read_metrics(tmp_path)
    for key in KEYS[:2] + KEYS[3:]:
        assert metric(rows, key) == pytest.approx(summary[key.split("/", 1)[1]] if key != "test/samples_per_s"
                                                  else summary["samples_per_s"], rel=1e-5)
    per_length = {int(r["step"]) for r in rows if r.get("test/copy_acc") not in (None, "")}
    assert per_length == set(lengths)
    if config.stem == "smollm2":
        by_length = {r["length"]: r for r in results}
        assert by_length[24]["copy_mean"] > by_length[24]["lm_mean"]


def test_a_bad_model_argument_ends_with_its_own_message(tmp_path: Path) -> None:
    """The constructor's message is the error raised, not a jsonargparse union report with the config dumped twice."""
    config = ROOT / "configs" / "forgetting_curve" / "llama_tiny_random.yaml"
    with pytest.raises(ValueError) as info:
        main(["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--model.init_args.alpha", "1.5"])
    assert str(info.value) == "model.init_args.alpha must be in (0, 1), got 1.5"
    with pytest.raises(ValueError) as info:
        main(["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--data.init_args.repeats", "1"])
    assert "paired t-test needs >= 2" in str(info.value) and "Union" not in str(info.value)


def test_ddp_on_two_cpu_processes_gives_the_single_process_curve(tmp_path: Path) -> None:
    """Each rank scores every other batch; rank 0 gathers and writes the same JSON as one process does. (DDP runs in
    a subprocess of train.py: Lightning re-launches the running command for rank 1.)"""
    config = ROOT / "configs" / "forgetting_curve" / "llama_tiny_random.yaml"
    results = {}
    for name, extra in (("single", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                                 "--trainer.accelerator", "cpu"])):
        run = tmp_path / name
        args = ["test", "--config", str(config), "--trainer.default_root_dir", str(run), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--model.init_args.output_dir", str(run / "out"),
                "--data.init_args.lengths", "[4, 8, 12, 16, 20]", "--data.init_args.batch_size", "1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((run / "out" / "llama_tiny_random.json").read_text())
    assert [r["length"] for r in results["ddp"]] == [4, 8, 12, 16, 20]
    for a, b in zip(results["ddp"], results["single"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
