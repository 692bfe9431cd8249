"""Convergence of gated fusion (GSGN + multi-stage dropout) vs the FBank-only and SSL-only baselines on the speech demo.

What is measured (spec ``shared/methods/speech_fusion.md`` section 10 "Benchmarks"; the paper's claim: about 1.24x fewer
epochs than FBank-only at equal final BLEU):

- variants (``--variants``): ``gated`` = ``configs/speech_fusion/demo_en_de.yaml`` (GSGN, schedule, conflict monitor);
  ``gated_nodrop`` = the same without MultiStageDropout; ``fbank`` = ``demo_fbank_only.yaml``; ``ssl`` =
  ``demo_ssl_only.yaml``; all the same sizes, each for every seed of ``--seeds`` (``seed_everything`` = data seed);
- every run goes through ``train.py fit`` (subprocess, or in-process with ``--launcher inprocess``) in
  ``<out>/<variant>/seed<seed>``; validation every epoch, ``test_after_fit`` on the final weights (with the test BLEU
  of each view set: ``test/sacrebleu_fbank`` = SSL removed);
- target = the FBank-only mean final dev BLEU (and dev loss). ``epochs_to_target`` = first epoch (1-based) whose
  ``val/sacrebleu`` reaches it (``null`` if never), likewise ``epochs_to_loss_target`` on ``val/loss``;
  ``speedup`` = FBank-only mean epochs / variant mean epochs (the paper's "x1.24").

Output: one JSON line per run (``"figure": "run"``) then, per variant and figure, ``mean``/``std`` over seeds beside the
FBank-only baseline's mean and the ``ratio``; ``<out>/summary.json`` keeps every line. Figures: ``val_sacrebleu``,
``val_loss``, ``val_acc`` (last epoch), ``best_epoch``, ``test_sacrebleu``, ``test_sacrebleu_no_ssl``,
``test_sacrebleu_no_fbank``, ``epochs_to_target``, ``epochs_to_loss_target``, ``grad_cos_mean`` (gated), ``wall_s``.
Checks (b) of the spec are printed, not asserted: with SSL removed, does gated+schedule keep >= 90% of FBank-only
dev accuracy... (read ``test_sacrebleu_no_ssl`` against ``fbank``'s ``test_sacrebleu``).

Real figures (3 seeds x 4 variants x 20 epochs; the first run also builds the demo and caches the Whisper features,
~7 min; then ~10-15 min per run on 2 CPU cores, about 2.5-3.5 h in all):

    python benchmarks/speech_fusion_convergence.py --out runs/bench_speech_fusion --seeds 1 2 3 --resume

Quick check (about 1-2 minutes; tiny demo, 2 epochs, 1 seed, unpadded Whisper):

    python benchmarks/speech_fusion_convergence.py --quick --out /tmp/bench_sf
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "gated": "configs/speech_fusion/demo_en_de.yaml",
    "gated_nodrop": "configs/speech_fusion/demo_en_de.yaml",
    "fbank": "configs/speech_fusion/demo_fbank_only.yaml",
    "ssl": "configs/speech_fusion/demo_ssl_only.yaml",
}
MONITOR_ONLY = [{"class_path": "callbacks.gradient_conflict.GradientConflictMonitor",
                 "init_args": {"every_n_steps": 10, "max_frame_fraction": 0.5}}]


def run_args(variant: str, seed: int, run_dir: Path, a: argparse.Namespace) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    args = [
        "fit", "--config", str(ROOT / CONFIGS[variant]),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--data.init_args.root", a.data_root, "--data.init_args.demo_sizes", json.dumps(a.demo_sizes),
        "--data.init_args.ssl_pad_to_30s", str(a.ssl_pad_to_30s).lower(),
        "--trainer.max_epochs", str(a.max_epochs), "--trainer.logger", json.dumps(logger),
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--checkpoint.dirpath", str(run_dir / "checkpoints"), "--test_after_fit", "true",
    ]
    if variant == "gated_nodrop":
        args += ["--trainer.callbacks", json.dumps(MONITOR_ONLY)]
    return args + a.extra.split()


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}/logs")
    with open(files[-1]) as fh:
        return list(csv.DictReader(fh))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, int, float]]:
    """[(epoch, step, value)] of ``key`` in logging order."""
    return [(int(r["epoch"] or 0), int(r["step"] or 0), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def summarize_run(run_dir: Path) -> dict[str, Any]:
    rows = read_rows(run_dir)
    val = series(rows, "val/sacrebleu")
    loss = series(rows, "val/loss")

    def last(key: str) -> float | None:
        s = series(rows, key)
        return s[-1][2] if s else None

    cos = [v for _, _, v in series(rows, "train/grad_cos_fbank_ssl")]
    return {
        "val_curve": [[e + 1, s, v] for e, s, v in val], "loss_curve": [[e + 1, s, v] for e, s, v in loss],
        "val_sacrebleu": val[-1][2] if val else None, "val_loss": loss[-1][2] if loss else None,
        "val_acc": last("val/acc"), "best_epoch": last("val/best_epoch"), "test_sacrebleu": last("test/sacrebleu"),
        "test_sacrebleu_no_ssl": last("test/sacrebleu_fbank"), "test_sacrebleu_no_fbank": last("test/sacrebleu_ssl"),
        "grad_cos_mean": statistics.fmean(cos) if cos else None,
    }


def first_epoch(curve: list[list[float]], target: float, higher_is_better: bool) -> int | None:
    for epoch, _, v in curve:
        if (v >= target - 1e-9) if higher_is_better else (v <= target + 1e-9):
            return int(epoch)
    return None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_speech_fusion")
    p.add_argument("--variants", nargs="+", default=["gated", "gated_nodrop", "fbank", "ssl"], choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max_epochs", type=int, default=20)
    p.add_argument("--data_root", default="data/mustc_demo")
    p.add_argument("--demo_sizes", nargs=3, type=int, default=[600, 60, 60])
    p.add_argument("--ssl_pad_to_30s", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--extra", default="", help="more train.py overrides, space separated")
    p.add_argument("--launcher", choices=["subprocess", "inprocess"], default="subprocess")
    p.add_argument("--resume", action="store_true", help="skip runs whose result.json exists with the same arguments")
    p.add_argument("--quick", action="store_true", help="tiny demo (40/8/8), 2 epochs, seed 1, unpadded Whisper")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.max_epochs, a.demo_sizes, a.ssl_pad_to_30s = [1], 2, [40, 8, 8], False
        a.data_root = str(Path(a.out) / "data")
        a.extra = (a.extra + " --model.init_args.max_len_b 20 --data.init_args.max_tokens 4000").strip()
    out = Path(a.out)
    lines: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    for seed in a.seeds:
        for variant in a.variants:
            run_dir = out / variant / f"seed{seed}"
            args = run_args(variant, seed, run_dir, a)
            result_path = run_dir / "result.json"
            if a.resume and result_path.is_file() and json.loads(result_path.read_text()).get("args") == args:
                res = json.loads(result_path.read_text())
            else:
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                t0 = time.perf_counter()
                if a.launcher == "subprocess":
                    with open(run_dir / "train.log", "w") as log:
                        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=log,
                                              stderr=subprocess.STDOUT, check=False)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{variant} seed {seed} failed; see {run_dir / 'train.log'}")
                else:
                    from lit_models.cli import main as cli_main

                    cli_main(args)
                res = {"variant": variant, "seed": seed, "args": args, "wall_s": time.perf_counter() - t0,
                       **summarize_run(run_dir)}
                result_path.write_text(json.dumps(res) + "\n")
            runs[variant].append(res)
            line = {"figure": "run", **{k: v for k, v in res.items() if k != "args"}}
            print(json.dumps(line), flush=True)
            lines.append(line)

    def mean(variant: str, key: str) -> float | None:
        vals = [r[key] for r in runs.get(variant, []) if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    base = "fbank" if "fbank" in runs else None
    bleu_target, loss_target = (mean(base, "val_sacrebleu"), mean(base, "val_loss")) if base else (None, None)
    for rs in runs.values():
        for r in rs:
            r["epochs_to_target"] = first_epoch(r["val_curve"], bleu_target, True) if bleu_target is not None else None
            r["epochs_to_loss_target"] = (first_epoch(r["loss_curve"], loss_target, False)
                                          if loss_target is not None else None)
    figures = ("val_sacrebleu", "val_loss", "val_acc", "best_epoch", "test_sacrebleu", "test_sacrebleu_no_ssl",
               "test_sacrebleu_no_fbank", "epochs_to_target", "epochs_to_loss_target", "grad_cos_mean", "wall_s")
    for variant in a.variants:
        for fig in figures:
            vals = [r[fig] for r in runs[variant] if r.get(fig) is not None]
            m = statistics.fmean(vals) if vals else None
            b = mean(base, fig) if base and variant != base else None
            line = {"figure": fig, "variant": variant, "mean": m,
                    "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals),
                    "baseline": base if b is not None else None, "baseline_mean": b,
                    "ratio": (m / b) if (m is not None and b not in (None, 0)) else None}
            if fig in ("epochs_to_target", "epochs_to_loss_target") and m and b:
                line["speedup"] = b / m  # FBank-only epochs / variant epochs (paper: ~1.24 for GSGN+Drop)
            print(json.dumps(line), flush=True)
            lines.append(line)
    targets = {"figure": "targets", "fbank_final_val_sacrebleu": bleu_target, "fbank_final_val_loss": loss_target}
    print(json.dumps(targets), flush=True)
    lines.append(targets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(lines, indent=1) + "\n")
    return lines


if __name__ == "__main__":
    main()
