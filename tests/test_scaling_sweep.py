"""``scripts/scaling_sweep.py``: the dense vs MoE scaling sweep launcher (spec ``moe_scaling.md`` sections 4, 5, 10.10).

No real training: runs are launched with ``--python`` pointing at a small fake interpreter script (written into
``tmp_path``) that parses the ``train.py fit`` arguments, records them, and writes a ``run_summary.json`` (or fails,
or sleeps, for chosen runs). Exact command lists of the demo grids, ``max_steps = ceil(D / (B * T))``, resume, failed
and timed-out runs kept in the CSV, grid errors before launch, isoflop D with an injected parameter counter, a
cluster launcher that submits without waiting, and ``--collect``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "scaling_sweep.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("scaling_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


SWEEP = _script()

# A fake interpreter: `FAKE train.py fit --config F --a.b=c ...`. It records its argv, cwd and WANDB_MODE in
# RUN_DIR/fake.json, appends the run directory name to LAUNCHED, and writes the summary with a loss that is an exact
# function of (d_model, D). Runs whose directory name contains FAIL exit 1; those containing SLEEP sleep 30 s first;
# every run sleeps DELAY s.
FAKE = """#!{python}
import json, os, sys, time
argv = sys.argv[1:]
args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
run_dir = args["trainer.default_root_dir"]
name = os.path.basename(run_dir)
with open({launched!r}, "a") as fh:
    fh.write(name + "\\n")
with open(os.path.join(run_dir, "fake.json"), "w") as fh:
    json.dump({{"argv": argv, "cwd": os.getcwd(), "wandb_mode": os.environ.get("WANDB_MODE")}}, fh)
time.sleep({delay})
print("fake training", name)
if {sleep!r} and {sleep!r} in name:
    time.sleep(30)
if {fail!r} and {fail!r} in name:
    print("Traceback (most recent call last):")
    print("RuntimeError: boom in " + name)
    sys.exit(1)
d = int(args["model.init_args.d_model"])
tokens = int(args["data.init_args.max_train_tokens"])
batch = int(args["data.init_args.batch_size"])
steps = int(args["trainer.max_steps"])
seq_len = int(args.get("data.init_args.seq_len", 128))
cfg = argv[argv.index("--config") + 1]
moe = "moe" in os.path.basename(cfg)
n_active = 1000 * d
summary = {{
    "status": "ok", "ffn": "moe" if moe else "dense", "moe_impl": "mixtral", "num_experts": 8 if moe else 1,
    "top_k": 2 if moe else 1, "d_model": d, "n_layers": int(args["model.init_args.n_layers"]),
    "n_heads": int(args["model.init_args.n_heads"]), "n_active_nonemb": n_active, "n_total_nonemb": 3 * n_active,
    "n_embedding": 2048 * d, "tokens_seen": steps * batch * seq_len, "seq_len": seq_len, "batch_size": batch,
    "batch_tokens": batch * seq_len, "steps": steps, "lr": float(args["model.init_args.lr"]),
    "flops_6nd": 6 * n_active * steps * batch * seq_len, "flops_kaplan": 7 * n_active * steps * batch * seq_len,
    "final_train_lm_loss": 10.0 / d + 1e4 / tokens + 0.01, "final_val_loss": 10.0 / d + 1e4 / tokens,
    "best_val_loss": 10.0 / d + 1e4 / tokens - 0.001, "wall_s": 1.5, "config": {{}},
}}
path = args["model.init_args.summary_file"]
with open(path + ".tmp", "w") as fh:
    json.dump(summary, fh)
os.replace(path + ".tmp", path)
"""


def _fake_python(tmp_path: Path, fail: str = "", sleep: str = "", delay: float = 0.0) -> tuple[Path, Path]:
    """(fake interpreter path, file listing the launched run directories)."""
    launched = tmp_path / "launched.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE.format(python=sys.executable, launched=str(launched), fail=fail, sleep=sleep, delay=delay))
    fake.chmod(0o755)
    return fake, launched


def _families(tmp_path: Path, seq_len: int = 128, loggers: bool = False) -> dict[str, str]:
    """Minimal LightningCLI family configs (subclass mode) in ``tmp_path``, optionally with a CSV and a W&B logger."""
    paths = {}
    for fam, extra in (("dense", {"ffn": "dense"}), ("moe", {"ffn": "moe", "num_experts": 8, "top_k": 2,
                                                           "moe_impl": "mixtral"})):
        config = {
            "seed_everything": 0,
            "model": {"class_path": "lit_models.scaling_lm.ScalingLM",
                      "init_args": {"d_model": 64, "n_layers": 2, "n_heads": 4, "lr": 0.003, **extra}},
            "data": {"class_path": "datamodules.text.TextDataModule",
                     "init_args": {"source": "mixed", "vocab_size": 2048, "seq_len": seq_len, "batch_size": 16,
                                   "max_train_tokens": 524288}},
        }
        if loggers:
            config["trainer"] = {"logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/x", "name": "l"}},
                {"class_path": "lightning.pytorch.loggers.WandbLogger",
                 "init_args": {"save_dir": "runs/x", "project": "litlab", "name": "x"}}]}
        path = tmp_path / f"{fam}_{'logged' if loggers else 'family'}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths[fam] = str(path)
    return paths


def _grid(tmp_path: Path, name: str = "grid.yaml", **fields: Any) -> Path:
    """A small grid (2 families x 2 sizes x 2 D = 8 runs) with ``fields`` replacing its keys (None deletes)."""
    grid: dict[str, Any] = {
        "name": "small", "families": _families(tmp_path),
        "sizes": [{"d_model": 32, "n_layers": 2, "n_heads": 4}, {"d_model": 48, "n_layers": 2, "n_heads": 4}],
        "mode": "grid", "tokens": [4096, 8192], "batch_size": [2], "lr": [3e-3], "seeds": [0],
    }
    grid.update(fields)
    grid = {k: v for k, v in grid.items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _demo_grid_with_tmp_families(tmp_path: Path, grid_file: str) -> Path:
    """A repo demo grid, unchanged but for the family paths (fake family configs with seq_len 128)."""
    grid = yaml.safe_load((ROOT / "configs" / "scaling" / grid_file).read_text())
    assert set(grid["families"]) == {"dense", "moe"}
    grid["families"] = _families(tmp_path)
    path = tmp_path / grid_file
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------------ dry run
def test_dry_run_sweep_demo_exact_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = _demo_grid_with_tmp_families(tmp_path, "sweep_demo.yaml")
    out = (tmp_path / "out").resolve()
    assert SWEEP.main(["--grid", str(grid), "--out", str(out), "--dry-run", "--python", "python"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    fams = _families(tmp_path)
    expected = []
    for fam in ("dense", "moe"):
        for d, n_layers in ((32, 2), (48, 2), (64, 2), (96, 3)):
            for tokens in (262144, 524288, 1048576):
                run_id = f"{fam}-d{d}-l{n_layers}-h4-D{tokens}-B16-lr3e-3-s0"
                run_dir = out / run_id
                expected.append(
                    f"python train.py fit --config {fams[fam]} --model.init_args.d_model={d} "
                    f"--model.init_args.n_layers={n_layers} --model.init_args.n_heads=4 "
                    f"--data.init_args.max_train_tokens={tokens} --data.init_args.batch_size=16 "
                    f"--model.init_args.lr=0.003 --trainer.max_steps={tokens // 2048} --seed_everything=0 "
                    f"--trainer.default_root_dir={run_dir} --model.init_args.summary_file={run_dir}/run_summary.json "
                    f"--checkpoint.dirpath={run_dir}/checkpoints")
    assert len(lines) == 24
    assert lines == expected
    # max_steps = D / (16 * 128): every D has its own run and schedule
    steps = [int(line.split("--trainer.max_steps=")[1].split()[0]) for line in lines]
    assert steps == [128, 256, 512] * 8
    assert lines[0].split()[:5] == ["python", "train.py", "fit", "--config", fams["dense"]]
    assert not out.exists()  # a dry run creates nothing


def test_dry_run_real_family_configs(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The repo's sweep_demo.yaml with the repo's family configs (seq_len 128 per spec section 4)."""
    for fam in ("dense_tiny.yaml", "moe_tiny.yaml"):
        if not (ROOT / "configs" / "scaling" / fam).is_file():
            pytest.skip(f"configs/scaling/{fam} not written yet")
    out = (tmp_path / "o").resolve()
    assert SWEEP.main(["--grid", "configs/scaling/sweep_demo.yaml", "--out", str(out), "--dry-run",
                       "--python", "python"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 24
    assert [line.split("--trainer.max_steps=")[1].split()[0] for line in lines] == ["128", "256", "512"] * 8
    assert lines[0].startswith("python train.py fit --config configs/scaling/dense_tiny.yaml "
                               "--model.init_args.d_model=32 --model.init_args.n_layers=2 --model.init_args.n_heads=4 "
                               "--data.init_args.max_train_tokens=262144 --data.init_args.batch_size=16 "
                               "--model.init_args.lr=0.003 --trainer.max_steps=128 --seed_everything=0 ")
    assert lines[-1].startswith("python train.py fit --config configs/scaling/moe_tiny.yaml "
                                "--model.init_args.d_model=96 --model.init_args.n_layers=3")
    # the family's loggers write into each run's own directory
    for line in (lines[0], lines[-1]):
        argv = shlex.split(line)
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--trainer.default_root_dir="))
        assert run_dir.startswith(str(out))
        loggers = [a.split("=", 1)[1] for a in argv if a.startswith("--trainer.logger=")]
        assert {entry["init_args"].get("save_dir") for entry in json.loads(loggers[0])} == {run_dir}


def test_dry_run_hparams_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = _demo_grid_with_tmp_families(tmp_path, "hparams_demo.yaml")
    out = (tmp_path / "out").resolve()
    assert SWEEP.main(["--grid", str(grid), "--out", str(out), "--dry-run", "--python", "py"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 18
    ids = [Path(line.split("--trainer.default_root_dir=")[1].split()[0]).name for line in lines]
    assert ids[:4] == ["dense-d48-l2-h4-D524288-B8-lr1e-3-s0", "dense-d48-l2-h4-D524288-B8-lr3e-3-s0",
                       "dense-d48-l2-h4-D524288-B8-lr1e-2-s0", "dense-d48-l2-h4-D524288-B16-lr1e-3-s0"]
    assert ids[-1] == "moe-d48-l2-h4-D524288-B32-lr1e-2-s0"
    steps = {(i.split("-")[5], line.split("--trainer.max_steps=")[1].split()[0]) for i, line in zip(ids, lines)}
    assert steps == {("B8", "512"), ("B16", "256"), ("B32", "128")}  # 2^19 / (B * 128)
    lrs = [line.split("--model.init_args.lr=")[1].split()[0] for line in lines[:3]]
    assert lrs == ["0.001", "0.003", "0.01"]


def test_max_steps_rounds_up_and_overrides_extras(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ceil(D / (B * T)) with a grid seq_len; grid overrides and extras (--extra= and after --) are appended."""
    grid = _grid(tmp_path, tokens=[1000], batch_size=[3], seq_len=64,
                 sizes=[{"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}],
                 overrides={"trainer.val_check_interval": 5, "model.init_args.tie_word_embeddings": False})
    out = (tmp_path / "out").resolve()
    assert SWEEP.main(["--grid", str(grid), "--out", str(out), "--dry-run", "--python", "py -X dev",
                       "--extra=--trainer.log_every_n_steps=1", "--", "--trainer.limit_val_batches=2"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    run_dir = out / "dense-d32-l1-h2-kv1-D1000-B3-lr3e-3-s0"
    assert lines[0] == (
        f"py -X dev train.py fit --config {_families(tmp_path)['dense']} --model.init_args.d_model=32 "
        "--model.init_args.n_layers=1 --model.init_args.n_heads=2 --model.init_args.n_kv_heads=1 "
        "--data.init_args.max_train_tokens=1000 --data.init_args.batch_size=3 --model.init_args.lr=0.003 "
        f"--trainer.max_steps={math.ceil(1000 / (3 * 64))} --seed_everything=0 --trainer.default_root_dir={run_dir} "
        f"--model.init_args.summary_file={run_dir}/run_summary.json --checkpoint.dirpath={run_dir}/checkpoints "
        "--data.init_args.seq_len=64 --trainer.val_check_interval=5 --model.init_args.tie_word_embeddings=false "
        "--trainer.log_every_n_steps=1 --trainer.limit_val_batches=2")
    assert "--trainer.max_steps=6 " in lines[0]
    # seq_len given as an extra changes the schedule too
    assert SWEEP.main(["--grid", str(grid), "--out", str(out), "--dry-run", "--", "--data.init_args.seq_len=100"]) == 0
    assert "--trainer.max_steps=4 " in capsys.readouterr().out.split("\n")[0]


def test_family_loggers_move_into_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The family's loggers are repeated per run with save_dir = RUN_DIR and the W&B run named after the run id."""
    family = tmp_path / "logged.yaml"
    config = yaml.safe_load(Path(_families(tmp_path)["dense"]).read_text())
    config["trainer"] = {"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs/x", "name": "logs"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": "runs/x", "project": "litlab", "name": "x"}}]}
    family.write_text(yaml.safe_dump(config))
    grid = _grid(tmp_path, families={"dense": str(family)}, tokens=[4096], sizes=[
        {"d_model": 32, "n_layers": 2, "n_heads": 4}])
    out = (tmp_path / "out").resolve()
    assert SWEEP.main(["--grid", str(grid), "--out", str(out), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    run_dir = out / "dense-d32-l2-h4-D4096-B2-lr3e-3-s0"
    loggers = [a for a in argv if a.startswith("--trainer.logger=")]
    assert len(loggers) == 1
    assert json.loads(loggers[0].split("=", 1)[1]) == [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": str(run_dir), "project": "litlab", "name": run_dir.name}}]
    assert argv.index(loggers[0]) == argv.index(f"--checkpoint.dirpath={run_dir}/checkpoints") + 1
    assert yaml.safe_load(family.read_text()) == config  # the family file is not modified


def test_format_number() -> None:
    assert [SWEEP.format_number(v) for v in (3e-3, 0.0015, 1e15, 0.01, 5, 2.5e17)] == [
        "3e-3", "1.5e-3", "1e15", "1e-2", "5e0", "2.5e17"]


# ------------------------------------------------------------------------------------------------------ running
def test_run_records_failure_and_continues(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake, launched = _fake_python(tmp_path, fail="moe-d48-l2-h4-D8192")
    out = (tmp_path / "out").resolve()
    rc = SWEEP.main(["--grid", str(_grid(tmp_path)), "--out", str(out), "--python", str(fake), "--wandb", "disabled",
                     "--extra=--trainer.limit_val_batches=2"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "ok: 7  failed: 1  skipped (finished earlier): 0" in printed
    failed_id = "moe-d48-l2-h4-D8192-B2-lr3e-3-s0"
    assert f"{failed_id}  exit code 1  log: {out / failed_id / 'train.log'}" in printed
    # every run was launched, in plan order, the failure did not stop the sweep
    order = [f"{fam}-d{d}-l2-h4-D{t}-B2-lr3e-3-s0" for fam in ("dense", "moe") for d in (32, 48) for t in (4096, 8192)]
    assert launched.read_text().split() == order
    rows = _read_csv(out / "results.csv")
    assert list(rows[0]) == list(SWEEP.CSV_COLUMNS)
    assert [r["run_id"] for r in rows] == order
    assert [r["status"] for r in rows] == ["ok"] * 7 + ["failed"]
    bad = rows[-1]
    assert bad["error"].split("\n") == ["exit code 1", f"fake training {failed_id}",
                                        "Traceback (most recent call last):", f"RuntimeError: boom in {failed_id}"]
    assert (bad["family"], bad["ffn"], bad["num_experts"], bad["top_k"], bad["moe_impl"]) == (
        "moe", "moe", "8", "2", "mixtral")
    assert (bad["tokens"], bad["steps"], bad["batch_tokens"], bad["final_val_loss"]) == ("8192", "32", "256", "")
    ok = rows[1]  # dense d32, D 8192: values from the summary
    assert ok["run_id"] == "dense-d32-l2-h4-D8192-B2-lr3e-3-s0"
    assert (ok["ffn"], ok["num_experts"], ok["n_active_nonemb"], ok["tokens"], ok["steps"], ok["seed"]) == (
        "dense", "1", "32000", "8192", "32", "0")
    assert float(ok["final_val_loss"]) == 10.0 / 32 + 1e4 / 8192
    assert float(ok["flops_6nd"]) == 6 * 32000 * 8192
    assert ok["git_sha"] == json.loads((out / ok["run_id"] / "sweep_run.json").read_text())["git_sha"] != ""
    # the subprocess ran from the repository root with the chosen W&B mode and the extras last
    fake_rec = json.loads((out / ok["run_id"] / "fake.json").read_text())
    assert fake_rec["cwd"] == str(ROOT)
    assert fake_rec["wandb_mode"] == "disabled"
    assert fake_rec["argv"][:2] == ["train.py", "fit"]
    assert fake_rec["argv"][-1] == "--trainer.limit_val_batches=2"
    assert (out / ok["run_id"] / "train.log").read_text() == f"fake training {ok['run_id']}\n"


def test_resume_skips_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake, launched = _fake_python(tmp_path)
    grid = _grid(tmp_path, families={"dense": _families(tmp_path)["dense"]}, tokens=[4096])  # 2 runs
    out = (tmp_path / "out").resolve()
    base = ["--grid", str(grid), "--out", str(out), "--python", str(fake)]
    assert SWEEP.main(base) == 0
    ids = ["dense-d32-l2-h4-D4096-B2-lr3e-3-s0", "dense-d48-l2-h4-D4096-B2-lr3e-3-s0"]
    assert launched.read_text().split() == ids
    capsys.readouterr()
    # without --resume finished runs are an error, and nothing is launched
    assert SWEEP.main(base) == 2
    err = capsys.readouterr().err
    assert "2 run(s) already finished" in err and "--resume" in err and "--out" in err
    assert launched.read_text().split() == ids
    # one summary lost: --resume reruns only that run; the old attempt is kept aside
    (out / ids[1] / "run_summary.json").unlink()
    assert SWEEP.main([*base, "--resume", "--dry-run", "--python", "py"]) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    assert len(printed) == 1 and f"--trainer.default_root_dir={out / ids[1]} " in printed[0]
    assert SWEEP.main([*base, "--resume"]) == 0
    assert launched.read_text().split() == [*ids, ids[1]]
    assert (out / "_failed_attempts" / f"{ids[1]}.1" / "fake.json").is_file()
    assert "ok: 1  failed: 0  skipped (finished earlier): 1" in capsys.readouterr().out
    rows = _read_csv(out / "results.csv")
    assert [(r["run_id"], r["status"]) for r in rows] == [(ids[0], "ok"), (ids[1], "ok")]
    assert float(rows[0]["final_val_loss"]) == 10.0 / 32 + 1e4 / 4096  # the skipped run's row from its summary
    # everything finished: --resume launches nothing
    assert SWEEP.main([*base, "--resume"]) == 0
    assert len(launched.read_text().split()) == 3


def test_timeout_jobs_and_max_runs(tmp_path: Path) -> None:
    fake, launched = _fake_python(tmp_path, sleep="dense-d48")
    out = (tmp_path / "out").resolve()
    start = time.monotonic()
    rc = SWEEP.main(["--grid", str(_grid(tmp_path)), "--out", str(out), "--python", str(fake), "--jobs", "2",
                     "--timeout-per-run", "1", "--max-runs", "4"])
    assert time.monotonic() - start < 8
    assert rc == 1
    rows = _read_csv(out / "results.csv")
    assert [(r["run_id"].rsplit("-B", 1)[0], r["status"]) for r in rows] == [
        ("dense-d32-l2-h4-D4096", "ok"), ("dense-d32-l2-h4-D8192", "ok"),
        ("dense-d48-l2-h4-D4096", "failed"), ("dense-d48-l2-h4-D8192", "failed")]
    assert rows[2]["error"].split("\n")[0] == "timeout after 1 s"
    assert len(launched.read_text().split()) == 4  # --max-runs 4 of 8


def test_sigterm_stops_runs_and_keeps_csv(tmp_path: Path) -> None:
    """A killed sweep (SIGTERM) stops its running run, keeps the finished rows and exits 130."""
    fake, _ = _fake_python(tmp_path, sleep="d48")
    out = (tmp_path / "out").resolve()
    grid = _grid(tmp_path, families={"dense": _families(tmp_path)["dense"]}, tokens=[4096])  # d32 ok, then d48 sleeps
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--grid", str(grid), "--out", str(out), "--python",
                             str(fake)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 8
    while not (out / "dense-d48-l2-h4-D4096-B2-lr3e-3-s0" / "fake.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "ok: 1  failed: 1" in stdout
    rows = _read_csv(out / "results.csv")
    assert [(r["run_id"], r["status"]) for r in rows] == [("dense-d32-l2-h4-D4096-B2-lr3e-3-s0", "ok"),
                                                          ("dense-d48-l2-h4-D4096-B2-lr3e-3-s0", "failed")]
    assert rows[1]["error"].split("\n")[0] == "interrupted"


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("fields", "message"), [
    ({"epochs": 3}, "unknown grid key(s) 'epochs'"),
    ({"sizes": [{"d_model": 32, "n_layers": 2, "n_heads": 4}] * 2}, "duplicate run_id 'dense-d32-l2-h4-D4096"),
    ({"tokens": [4096, 4096.0]}, "duplicate run_id"),
    ({"sizes": [{"d_model": 32, "n_layers": 2, "n_heads": 4}, {"d_model": 50, "n_layers": 2, "n_heads": 4}]},
     "sizes[1]: n_heads=4 does not divide d_model=50"),
    ({"sizes": [{"d_model": 32, "n_layers": 2, "n_heads": 4, "width": 3}]}, "sizes[0]: unknown key(s) 'width'"),
    ({"sizes": [{"d_model": 32, "n_heads": 4}]}, "sizes[0]: missing key(s) n_layers"),
    ({"flops": [1e12]}, "mode 'grid' needs a 'tokens' list and no 'flops'"),
    ({"lr": ["fast"]}, "lr[0]: expected a number, got 'fast'"),
    ({"overrides": {"trainer.max_steps": 3}}, "overrides.trainer.max_steps is set by the sweep itself"),
])
def test_grid_errors(tmp_path: Path, capsys: pytest.CaptureFixture, fields: dict, message: str) -> None:
    grid = _grid(tmp_path, **fields)
    with pytest.raises(ValueError, match="grid.yaml") as info:
        SWEEP.plan_runs(SWEEP.load_grid(grid), tmp_path / "out")
    assert message in str(info.value)
    fake, launched = _fake_python(tmp_path)
    assert SWEEP.main(["--grid", str(grid), "--out", str(tmp_path / "out"), "--python", str(fake)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not launched.exists()  # nothing launched


def test_missing_family_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = _grid(tmp_path, families={"dense": "configs/scaling/no_such_family.yaml"})
    with pytest.raises(FileNotFoundError, match=r"families\.dense: config file 'configs/scaling/no_such_family"):
        SWEEP.load_grid(grid)
    assert SWEEP.main(["--grid", str(grid), "--dry-run"]) == 2
    assert "no_such_family.yaml" in capsys.readouterr().err


def test_numbers_written_as_yaml11_strings(tmp_path: Path) -> None:
    """PyYAML reads ``3e-3`` and ``1e15`` as strings; the grid converts them."""
    grid = tmp_path / "g.yaml"
    families = _families(tmp_path)
    grid.write_text(f"families: {{dense: {families['dense']}}}\nsizes: [{{d_model: 32, n_layers: 2, n_heads: 4}}]\n"
                    "tokens: [4096]\nbatch_size: [2]\nlr: [3e-3, 1e-2]\n")
    runs = SWEEP.plan_runs(SWEEP.load_grid(grid), tmp_path / "o")
    assert [r.lr for r in runs] == [0.003, 0.01]
    assert [r.run_id for r in runs] == ["dense-d32-l2-h4-D4096-B2-lr3e-3-s0", "dense-d32-l2-h4-D4096-B2-lr1e-2-s0"]


# ------------------------------------------------------------------------------------------------------ isoflop
def test_isoflop_tokens_from_injected_counter(tmp_path: Path) -> None:
    seen: list[dict] = []

    def counter(config: dict) -> dict:
        seen.append(dict(config))
        n = 12 * config["n_layers"] * config["d_model"] ** 2
        return {"n_total_nonemb": n, "n_active_nonemb": n, "n_embedding": 0, "n_total": n}

    grid = _grid(tmp_path, tokens=None, mode="isoflop", flops=["1e11", 3.0e11])
    runs = SWEEP.plan_runs(SWEEP.load_grid(grid), tmp_path / "out", param_counter=counter)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        n = 12 * run.size["n_layers"] * run.size["d_model"] ** 2
        d_exact = run.flops_budget / (6 * n)
        assert run.tokens == int(d_exact // 128) * 128  # rounded down to whole sequences
        assert run.steps == math.ceil(run.tokens / (2 * 128))
        assert f"--data.init_args.max_train_tokens={run.tokens}" in run.argv
    assert [(r.run_id, r.tokens) for r in runs[:4]] == [
        ("dense-C1e11-d32-l2-h4-D678144-B2-lr3e-3-s0", 678144), ("dense-C1e11-d48-l2-h4-D301312-B2-lr3e-3-s0", 301312),
        ("dense-C3e11-d32-l2-h4-D2034432-B2-lr3e-3-s0", 2034432),
        ("dense-C3e11-d48-l2-h4-D904192-B2-lr3e-3-s0", 904192)]
    # the counter gets the family's model args merged with the size (ScalingLM names) and the data vocabulary
    # (architecture keys only: no lr)
    moe_cfg = seen[-1]
    assert moe_cfg == {"d_model": 48, "n_layers": 2, "n_heads": 4, "ffn": "moe", "num_experts": 8, "top_k": 2,
                       "moe_impl": "mixtral", "vocab_size": 2048}
    # a budget below one sequence per run
    small = _grid(tmp_path, name="small.yaml", tokens=None, mode="isoflop", flops=[1e6])
    with pytest.raises(ValueError, match="below one sequence of 128"):
        SWEEP.plan_runs(SWEEP.load_grid(small), tmp_path / "out", param_counter=counter)


def test_isoflop_with_real_count_params(tmp_path: Path) -> None:
    """Default counter: spec section 3.1 worked example, N_active 100,672 (dense) and 101,696 (MoE) at d 64, L 2."""
    pytest.importorskip("lit_models.nn.scaling_utils")
    grid = _grid(tmp_path, tokens=None, mode="isoflop", flops=[1e12],
                 sizes=[{"d_model": 64, "n_layers": 2, "n_heads": 4}])
    runs = SWEEP.plan_runs(SWEEP.load_grid(grid), tmp_path / "out")
    assert [(r.run_id, r.tokens) for r in runs] == [
        (f"dense-C1e12-d64-l2-h4-D{int(1e12 // (6 * 100672 * 128)) * 128}-B2-lr3e-3-s0",
         int(1e12 // (6 * 100672 * 128)) * 128),
        (f"moe-C1e12-d64-l2-h4-D{int(1e12 // (6 * 101696 * 128)) * 128}-B2-lr3e-3-s0",
         int(1e12 // (6 * 101696 * 128)) * 128)]


# ------------------------------------------------------------------------------------------------------ cluster
def test_launcher_submits_without_waiting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake, launched = _fake_python(tmp_path)
    grid = _grid(tmp_path, families={"moe": _families(tmp_path)["moe"]}, tokens=[4096])
    out = (tmp_path / "out").resolve()
    listing = tmp_path / "submitted.txt"
    template = f"echo {{run_id}} {{run_dir}} >> {listing}; printf '%s\\n' {{cmd_quoted}} >> {tmp_path}/cmds.txt"
    rc = SWEEP.main(["--grid", str(grid), "--out", str(out), "--python", str(fake), "--launcher", template,
                     "--timeout-per-run", "600"])
    assert rc == 0
    ids = ["moe-d32-l2-h4-D4096-B2-lr3e-3-s0", "moe-d48-l2-h4-D4096-B2-lr3e-3-s0"]
    assert listing.read_text().split("\n")[:-1] == [f"{i} {out / i}" for i in ids]
    cmds = (tmp_path / "cmds.txt").read_text().split("\n")[:-1]
    run_dir = out / ids[0]
    argv = json.loads((run_dir / "sweep_run.json").read_text())["argv"]
    assert argv[0] == str(fake) and argv[1:3] == ["train.py", "fit"]
    assert cmds[0] == (f"cd {shlex.quote(str(ROOT))} && WANDB_MODE=offline timeout 600 {shlex.join(argv)} "
                       f"> {run_dir}/train.log 2>&1")
    assert not launched.exists() and not (run_dir / "run_summary.json").exists()  # submitted, nothing ran
    assert "submitted 2 run(s), 0 submission(s) failed" in capsys.readouterr().out
    assert not (out / "results.csv").exists()


def test_launcher_background_then_collect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``sh -c "{cmd}" &`` returns at once; --collect reports incomplete runs, then rebuilds the CSV."""
    fake, launched = _fake_python(tmp_path, delay=1.0)
    grid = _grid(tmp_path, families={"dense": _families(tmp_path, loggers=True)["dense"]})  # 4 runs
    out = (tmp_path / "out").resolve()
    base = ["--grid", str(grid), "--out", str(out)]
    start = time.monotonic()
    assert SWEEP.main([*base, "--python", str(fake), "--max-runs", "3",
                       "--launcher", 'sh -c "{cmd}" > /dev/null 2>&1 &']) == 0
    assert time.monotonic() - start < 0.9  # did not wait for the 1 s runs
    assert SWEEP.main([*base, "--collect"]) == 1
    assert "collected 4 runs" in capsys.readouterr().out
    rows = _read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["incomplete"] * 3 + ["missing"]
    ids = [r["run_id"] for r in rows]
    deadline = time.monotonic() + 8
    while not all((out / i / "run_summary.json").exists() for i in ids[:3]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert SWEEP.main([*base, "--collect"]) == 1  # the 4th run was never launched
    rows = _read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "missing"]
    assert rows[3]["error"] == "never launched"
    assert [float(r["final_val_loss"]) for r in rows[:3]] == [10 / 32 + 1e4 / 4096, 10 / 32 + 1e4 / 8192,
                                                              10 / 48 + 1e4 / 4096]
    assert sorted(launched.read_text().split()) == sorted(ids[:3])
    assert (out / ids[0] / "train.log").read_text() == f"fake training {ids[0]}\n"
    # through "{cmd}" the run got exactly the planned argv (the logger JSON's double quotes survive the shell)
    planned = json.loads((out / ids[0] / "sweep_run.json").read_text())["argv"]
    assert any(a.startswith('--trainer.logger=[{"class_path"') for a in planned)
    assert json.loads((out / ids[0] / "fake.json").read_text())["argv"] == planned[1:]
    # the last run submitted the same way, then everything collects as ok
    assert SWEEP.main([*base, "--python", str(fake), "--resume", "--launcher", 'sh -c "{cmd}"']) == 0
    assert SWEEP.main([*base, "--collect", "--csv", str(tmp_path / "all.csv")]) == 0
    assert [r["status"] for r in _read_csv(tmp_path / "all.csv")] == ["ok"] * 4


GRID_FILES = [c for c in sorted((ROOT / "configs").rglob("*.yaml")) if "families" in (yaml.safe_load(c.read_text()) or {})]


@pytest.mark.parametrize("grid_file", GRID_FILES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_grid_plans_runs_of_existing_train_configs(grid_file: Path, tmp_path: Path) -> None:
    grid = SWEEP.load_grid(grid_file)
    runs = SWEEP.plan_runs(grid, tmp_path)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    for family in grid.families.values():
        assert family.path.is_file() and family.get("model.class_path") == "lit_models.scaling_lm.ScalingLM"
