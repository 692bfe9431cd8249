"""PCformer vs the vanilla pre-norm Transformer on the offline Bible En->De demo, at equal training steps.

What is measured (spec ``shared/methods/pcformer.md`` section 10 "Benchmark", pitfall 10 "compute fairness"):

- variants (``--variants``, default the first three):

  ``vanilla``                  ``configs/pcformer/demo_vanilla_en_de.yaml`` (3-layer pre-norm encoder);
  ``pcformer``                 ``configs/pcformer/demo_bible_en_de.yaml`` (RK2, EMA coefficients, multistep corrector);
  ``vanilla_compute_matched``  vanilla with ``encoder_layers = L x (K+1)`` = 3 x 3 = 9, i.e. as many encoder block
                               evaluations per sentence as PCformer (K+1 per layer with the corrector);
  ``vanilla_deep_narrow`` / ``pcformer_deep_narrow``  the secondary row of the spec: 6 encoder layers, d_model 64
                               (FFN, heads and the 3-layer decoder unchanged); not run by default;

- each for every seed of ``--seeds`` (``seed_everything`` and the data shuffle seed both set to it) for exactly
  ``--max_steps`` updates (default 2000, the demo budget), with validation every ``max_steps/4`` steps,
  checkpoints every ``max_steps/8`` steps and ``CheckpointAveraging(last_n=--avg_last)`` (default 3), then the test
  after fit on the averaged checkpoint (``test_after_fit: true``). Sanity validation is off. The CSV logger is the
  only logger (W&B removed);
- every run goes through the project's own CLI: ``python train.py fit --config <demo yaml> <overrides>`` in a
  subprocess (``--launcher subprocess``, the default: isolation and clean timing) or ``lit_models.cli.main`` in this
  process (``--launcher inprocess``, used by the smoke test), in its own directory ``<out>/<variant>/seed<seed>``
  (checkpoints, ``logs/version_0/metrics.csv``, ``train.log``);
- after fit, ``python train.py validate --ckpt_path <run>/checkpoints/averaged.ckpt`` scores the validation split with
  the averaged weights too (``--no_val_averaged`` skips it);
- timing: ``wall_s`` is the whole subprocess (imports, data loading, fit, test); the callback
  ``benchmarks/_fit_timer.py`` splits fit into ``train_step_s`` (forward + backward + optimizer over all steps; no data
  loading, validation or checkpoint writing), ``val_s`` (validation inside fit, beam search included),
  ``fit_other_s`` (the rest of fit: data loading, checkpoints, averaging) and ``test_s``.
  ``s_per_step`` = train_step_s / steps (training only); ``s_per_step_excl_val`` = (fit_s - val_s) / steps (fit
  without validation: adds data loading and checkpoints); ``s_per_step_incl_val`` = fit_s / steps (all of fit).

Output: one JSON line per run (``"figure": "run"``), then per variant and figure a summary line with mean and
sample std over seeds, the baseline's mean beside it, ``ratio`` = ours/baseline, ``diff`` = ours - baseline and the
paired per-seed difference (``diff_mean``, ``diff_std`` over the seeds both have); lines with ``"baseline": null``
give a variant's own mean and std. Baselines: ``vanilla`` for every other variant, ``vanilla_compute_matched`` for
``pcformer`` (and ``vanilla_deep_narrow`` for ``pcformer_deep_narrow``). Figures: ``val_nll`` and ``val_sacrebleu``
(last validation of fit, final weights), ``val_nll_avg`` / ``val_sacrebleu_avg`` (averaged checkpoint),
``test_sacrebleu`` and ``test_nll`` (averaged checkpoint), ``params``, ``s_per_step``, ``s_per_step_excl_val``,
``s_per_step_incl_val``, ``wall_s``. In run lines, ``val_curve`` and ``alpha_trajectory`` are ``[update, value]``
pairs (updates counted from 1; the alpha trajectory is ``pc/alpha`` subsampled to ``--alpha_points``).
A table goes to stderr at the end and ``<out>/summary.json`` keeps every line. Nothing is asserted: the spec's
expectations (PC mean val nll <= vanilla mean; every run above 1.0 SacreBLEU; PC vs compute-matched reported only)
are for the reader; ``sanity_floor_ok`` in each run line says whether test SacreBLEU > 1.0.

``--resume`` skips runs whose ``result.json`` exists and was made with the same ``train.py`` arguments (a run without
it, or with other arguments, is deleted and started again from scratch), so a long sweep can be interrupted and
continued. Runs go seed by seed (all variants of seed 1 first), so a partial sweep is already a paired comparison.

Run (the real benchmark, about 2.5-3 h on 2 CPU cores for 3 variants x 3 seeds x 2000 steps):

    python benchmarks/pcformer_vs_vanilla.py --out runs/bench_pcformer --resume

Smoke run (seconds; a tiny slice as in tests/test_train_pcformer.py):

    python benchmarks/pcformer_vs_vanilla.py --seeds 1 --max_steps 2 --max_train_pairs 200 --max_eval_pairs 12 \
        --vocab_size 500 --data_dir /tmp/bible --tokenizer_path /tmp/bible/spm500.model --max_tokens 512 \
        --out /tmp/bench_pc --extra "--model.init_args.max_len_b 5 --model.init_args.max_len_a 0.5"
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pcformer"
VANILLA_CFG = CONFIGS / "demo_vanilla_en_de.yaml"
PCFORMER_CFG = CONFIGS / "demo_bible_en_de.yaml"
BENCH = "pcformer_vs_vanilla"


def _model_args(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())["model"]["init_args"]


def _block_evals_per_layer(model_args: dict[str, Any]) -> int:
    order = int(model_args.get("order", 1))
    return order + (1 if model_args.get("corrector", "none") == "multistep" else 0)


def variants() -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (config file, model.init_args overrides)."""
    pc = _model_args(PCFORMER_CFG)
    matched = int(pc["encoder_layers"]) * _block_evals_per_layer(pc)  # 3 x (2 + 1) = 9
    narrow = {"encoder_layers": 6, "d_model": 64}
    return {
        "vanilla": (VANILLA_CFG, {}),
        "pcformer": (PCFORMER_CFG, {}),
        "vanilla_compute_matched": (VANILLA_CFG, {"encoder_layers": matched}),
        "vanilla_deep_narrow": (VANILLA_CFG, dict(narrow)),
        "pcformer_deep_narrow": (PCFORMER_CFG, dict(narrow)),
    }


DEFAULT_VARIANTS = ["vanilla", "pcformer", "vanilla_compute_matched"]
#: (variant, baseline) pairs of the summary; pairs whose members were not run are skipped.
COMPARISONS = [
    ("pcformer", "vanilla"),
    ("vanilla_compute_matched", "vanilla"),
    ("pcformer", "vanilla_compute_matched"),
    ("pcformer_deep_narrow", "vanilla_deep_narrow"),
    ("vanilla_deep_narrow", "vanilla"),
    ("pcformer_deep_narrow", "vanilla"),
]
SUMMARY_FIGURES = [
    "val_nll",
    "val_nll_avg",
    "val_sacrebleu",
    "val_sacrebleu_avg",
    "test_sacrebleu",
    "test_nll",
    "params",
    "s_per_step",
    "s_per_step_excl_val",
    "s_per_step_incl_val",
    "wall_s",
]


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(variants()))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max_steps", type=int, default=2000, help="updates per run (default 2000, the demo budget)")
    p.add_argument("--val_every", type=int, default=None, help="validation interval (default max_steps/4)")
    p.add_argument("--ckpt_every", type=int, default=None, help="checkpoint interval (default max_steps/8)")
    p.add_argument("--avg_last", type=int, default=3, help="CheckpointAveraging last_n (default 3)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_pcformer"), help="root of the run directories")
    p.add_argument("--resume", action="store_true", help="skip runs whose result.json exists")
    p.add_argument("--threads", type=int, default=2, help="OMP/torch threads per run (default 2)")
    p.add_argument("--launcher", choices=["subprocess", "inprocess"], default="subprocess")
    p.add_argument("--no_val_averaged", action="store_true", help="skip validating the averaged checkpoint")
    p.add_argument("--alpha_points", type=int, default=20, help="points of the subsampled alpha trajectory")
    # data pass-through (--data.init_args.*), to shrink smoke runs
    p.add_argument("--data_dir", default=None)
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--vocab_size", type=int, default=None)
    p.add_argument("--max_train_pairs", type=int, default=None)
    p.add_argument("--max_eval_pairs", type=int, default=None)
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--extra", default="", help="more train.py overrides for every run, one shell-quoted string")
    args = p.parse_args(argv)
    if args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    args.val_every = args.val_every or max(1, args.max_steps // 4)
    args.ckpt_every = args.ckpt_every or max(1, args.max_steps // 8)
    return args


# ---------------------------------------------------------------------------------------------------- one run
def _data_overrides(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for key in ("data_dir", "tokenizer_path", "vocab_size", "max_train_pairs", "max_eval_pairs", "max_tokens"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--data.init_args.{key}", str(value)]
    return out


def _model_overrides(overrides: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in overrides.items():
        out += [f"--model.init_args.{key}", str(value)]
    return out


def _csv_logger(save_dir: Path) -> str:
    return json.dumps(
        [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(save_dir), "name": "logs", "version": 0},
            }
        ]
    )


def fit_args(args: argparse.Namespace, variant: str, seed: int, run_dir: Path) -> list[str]:
    config, overrides = variants()[variant]
    callbacks = [
        {"class_path": "callbacks.checkpoint_averaging.CheckpointAveraging", "init_args": {"last_n": args.avg_last}},
        {"class_path": "benchmarks._fit_timer.FitTimer", "init_args": {"output": str(run_dir / "timing.json")}},
    ]
    log_every = max(1, min(25, args.max_steps // 40))
    return [
        "fit",
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        "--data.init_args.seed",
        str(seed),
        *_data_overrides(args),
        *_model_overrides(overrides),
        "--trainer.max_steps",
        str(args.max_steps),
        "--trainer.max_epochs",
        "-1",
        "--trainer.val_check_interval",
        str(args.val_every),
        "--trainer.check_val_every_n_epoch",
        "null",
        "--trainer.log_every_n_steps",
        str(log_every),
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger",
        _csv_logger(run_dir),
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--checkpoint.dirpath",
        str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps",
        str(args.ckpt_every),
        "--checkpoint.save_top_k",
        "-1",
        "--test_after_fit",
        "true",
        *shlex.split(args.extra),
    ]


def validate_args(args: argparse.Namespace, variant: str, run_dir: Path) -> list[str]:
    config, overrides = variants()[variant]
    out_dir = run_dir / "validate_averaged"
    return [
        "validate",
        "--config",
        str(config),
        *_data_overrides(args),
        *_model_overrides(overrides),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(out_dir),
        "--trainer.logger",
        _csv_logger(out_dir),
        "--trainer.callbacks",
        "[]",
        "--checkpoint.dirpath",
        str(out_dir / "checkpoints"),
        "--ckpt_path",
        str(run_dir / "checkpoints" / "averaged.ckpt"),
        *shlex.split(args.extra),
    ]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def launch(cli_args: list[str], log_path: Path, args: argparse.Namespace) -> tuple[int, float]:
    """Run ``train.py <cli_args>``; returns (exit code, wall seconds). Output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.launcher == "subprocess":
        with open(log_path, "a", encoding="utf-8") as log:
            log.write("$ python train.py " + shlex.join(cli_args) + "\n")
            log.flush()
            proc = subprocess.run(
                [sys.executable, str(ROOT / "train.py"), *cli_args],
                check=False,
                cwd=ROOT,
                env=_env(args.threads),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return proc.returncode, time.perf_counter() - t0
    # in-process: same CLI, no isolation (used by the smoke test)
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lit_models.cli import main

    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            main(cli_args)  # stdout (Lightning's tables) to the log; the JSON lines stay alone on stdout
        code = 0
    except SystemExit as exc:  # argument errors
        code = int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - report and go on with the other runs
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{type(exc).__name__}: {exc}\n")
        code = 1
    finally:
        os.chdir(cwd)
        torch.set_num_threads(old_threads)
    return code, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- reading results
def read_metrics(log_root: Path) -> list[dict[str, str]]:
    files = sorted(log_root.glob("logs/version_*/metrics.csv"))
    if not files:
        return []
    with open(files[-1], encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(update, value) pairs of ``key``; Lightning logs the metrics of update n (1-based) at ``step`` n - 1."""
    out = []
    for r in rows:
        value = r.get(key)
        if value not in (None, ""):
            out.append((int(float(r.get("step") or 0)) + 1, float(value)))
    return out


def _last(rows: list[dict[str, str]], key: str) -> float | None:
    series = _series(rows, key)
    return series[-1][1] if series else None


def subsample(series: list[tuple[int, float]], points: int) -> list[list[float]]:
    """At most ``points`` evenly spaced entries of ``series``, always including the first and the last."""
    if len(series) <= points:
        return [[s, v] for s, v in series]
    idx = sorted({round(i * (len(series) - 1) / (points - 1)) for i in range(points)})
    return [[series[i][0], series[i][1]] for i in idx]


def _saved_model_args(run_dir: Path) -> dict[str, Any]:
    files = sorted(run_dir.glob("logs/version_*/config.yaml"))
    if not files:
        return {}
    cfg = yaml.safe_load(files[-1].read_text())
    return ((cfg or {}).get("model") or {}).get("init_args") or {}


def collect(
    args: argparse.Namespace, variant: str, seed: int, run_dir: Path, wall_s: float, val_wall_s: float | None
) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").is_file() else {}
    model_args = _saved_model_args(run_dir) or {**_model_args(variants()[variant][0]), **variants()[variant][1]}
    steps = timing.get("steps") or args.max_steps
    alpha = _series(rows, "pc/alpha")
    test_bleu = _last(rows, "test/sacrebleu")
    res: dict[str, Any] = {
        "benchmark": BENCH,
        "figure": "run",
        "variant": variant,
        "seed": seed,
        "max_steps": args.max_steps,
        "steps": timing.get("steps"),
        "params": timing.get("params"),
        "encoder_layers": model_args.get("encoder_layers"),
        "d_model": model_args.get("d_model"),
        "encoder_block_evals": (int(model_args["encoder_layers"]) * _block_evals_per_layer(model_args))
        if "encoder_layers" in model_args
        else None,
        "val_nll": _last(rows, "val/nll"),
        "val_sacrebleu": _last(rows, "val/sacrebleu"),
        "val_nll_avg": None,
        "val_sacrebleu_avg": None,
        "test_sacrebleu": test_bleu,
        "test_nll": _last(rows, "test/nll"),
        "sanity_floor_ok": None if test_bleu is None else test_bleu > 1.0,
        "wall_s": wall_s,
        "fit_s": timing.get("fit_s"),
        "train_step_s": timing.get("train_step_s"),
        "val_s": timing.get("val_s"),
        "fit_other_s": timing.get("fit_other_s"),
        "test_s": timing.get("test_s"),
        "s_per_step": timing["train_step_s"] / steps if timing.get("train_step_s") else None,
        "s_per_step_median": timing.get("train_step_s_median"),
        "s_per_step_incl_val": timing["fit_s"] / steps if timing.get("fit_s") else None,
        "s_per_step_excl_val": (timing["fit_s"] - timing["val_s"]) / steps if timing.get("fit_s") else None,
        "val_curve": [[s, v] for s, v in _series(rows, "val/nll")],
        "alpha_final": alpha[-1][1] if alpha else None,
        "alpha_trajectory": subsample(alpha, args.alpha_points),
        "run_dir": str(run_dir),
    }
    if val_wall_s is not None:
        vrows = read_metrics(run_dir / "validate_averaged")
        res["val_nll_avg"] = _last(vrows, "val/nll")
        res["val_sacrebleu_avg"] = _last(vrows, "val/sacrebleu")
        res["validate_averaged_wall_s"] = val_wall_s
    return res


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    run_dir = (args.out / variant / f"seed{seed}").resolve()
    result_path = run_dir / "result.json"
    cli = fit_args(args, variant, seed, run_dir)
    if args.resume and result_path.is_file():
        res = json.loads(result_path.read_text())
        if res.get("cli_args") == cli and res.get("threads") == args.threads:
            res["resumed"] = True
            return res
        print(
            f"[{BENCH}] {variant} seed {seed}: {result_path} was made with other settings "
            "(train.py arguments or --threads); running again",
            file=sys.stderr,
            flush=True,
        )
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial run: start it again (stale checkpoints would enter the average)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    print(f"[{BENCH}] {variant} seed {seed}: training in {run_dir} (log: {log})", file=sys.stderr, flush=True)
    code, wall = launch(cli, log, args)
    if code != 0:
        return {
            "benchmark": BENCH,
            "figure": "run",
            "variant": variant,
            "seed": seed,
            "status": "failed",
            "exit_code": code,
            "wall_s": wall,
            "log": str(log),
            "log_tail": _tail(log),
        }
    val_wall = None
    if not args.no_val_averaged and (run_dir / "checkpoints" / "averaged.ckpt").is_file():
        vcode, val_wall = launch(validate_args(args, variant, run_dir), run_dir / "validate_averaged.log", args)
        if vcode != 0:
            print(
                f"[{BENCH}] validating the averaged checkpoint failed (see {run_dir / 'validate_averaged.log'})",
                file=sys.stderr,
            )
            val_wall = None
    res = collect(args, variant, seed, run_dir, wall, val_wall)
    res["status"] = "ok"
    res["cli_args"] = cli
    res["threads"] = args.threads
    result_path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return res


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _num(res: dict[str, Any], fig: str) -> float | None:
    v = res.get(fig)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = [r for r in results if r.get("status") == "ok"]
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in ok:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    lines: list[dict[str, Any]] = []
    for variant, runs in by_variant.items():
        for fig in SUMMARY_FIGURES:
            vals = [v for v in (_num(r, fig) for r in runs.values()) if v is not None]
            if not vals:
                continue
            mean, std = _mean_std(vals)
            lines.append(
                {
                    "benchmark": BENCH,
                    "figure": fig,
                    "variant": variant,
                    "ours": mean,
                    "ours_std": std,
                    "n": len(vals),
                    "baseline": None,
                    "baseline_value": None,
                    "ratio": None,
                    "diff": None,
                }
            )
    for variant, base in COMPARISONS:
        if variant not in by_variant or base not in by_variant:
            continue
        ours_runs, base_runs = by_variant[variant], by_variant[base]
        for fig in SUMMARY_FIGURES:
            ov = [v for v in (_num(r, fig) for r in ours_runs.values()) if v is not None]
            bv = [v for v in (_num(r, fig) for r in base_runs.values()) if v is not None]
            if not ov or not bv:
                continue
            om, os_ = _mean_std(ov)
            bm, bs = _mean_std(bv)
            paired = [
                _num(ours_runs[s], fig) - _num(base_runs[s], fig)  # type: ignore[operator]
                for s in sorted(set(ours_runs) & set(base_runs))
                if _num(ours_runs[s], fig) is not None and _num(base_runs[s], fig) is not None
            ]
            dm, ds = _mean_std(paired)
            lines.append(
                {
                    "benchmark": BENCH,
                    "figure": fig,
                    "variant": variant,
                    "ours": om,
                    "ours_std": os_,
                    "n": len(ov),
                    "baseline": base,
                    "baseline_value": bm,
                    "baseline_std": bs,
                    "baseline_n": len(bv),
                    "ratio": (om / bm) if bm else None,
                    "diff": om - bm,
                    "diff_mean": dm,
                    "diff_std": ds,
                    "paired_seeds": len(paired),
                }
            )
    return lines


def _fmt(v: Any, width: int = 10) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}").rjust(width)
    return str(v).rjust(width)


def table(results: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    out = ["", f"== {BENCH}: per run =="]
    cols = [
        "variant",
        "seed",
        "params",
        "val_nll",
        "val_nll_avg",
        "val_sacrebleu",
        "test_sacrebleu",
        "s_per_step",
        "wall_s",
        "alpha_final",
        "status",
    ]
    out.append(" ".join(c.rjust(12 if c == "variant" else 10) if c != "variant" else c.ljust(24) for c in cols))
    for r in results:
        cells = [str(r.get("variant")).ljust(24)] + [_fmt(r.get(c)) for c in cols[1:]]
        out.append(" ".join(cells))
    out.append("")
    out.append(f"== {BENCH}: mean +- std over seeds, vs baseline ==")
    out.append(
        f"{'variant':24} {'figure':20} {'ours':>10} {'+-':>8} {'baseline':>24} {'base':>10} {'ratio':>8} "
        f"{'paired diff':>12} {'+-':>8}"
    )
    for s in summary:
        if s["baseline"] is None:
            continue
        out.append(
            f"{s['variant']:24} {s['figure']:20} {_fmt(s['ours'])} {_fmt(s['ours_std'], 8)} {s['baseline']:>24} "
            f"{_fmt(s['baseline_value'])} {_fmt(s['ratio'], 8)} {_fmt(s.get('diff_mean'), 12)} "
            f"{_fmt(s.get('diff_std'), 8)}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep; prints JSON lines (stdout) and a table (stderr). Returns every printed line as a dict."""
    args = parse_args(argv)
    args.out = args.out if args.out.is_absolute() else (Path.cwd() / args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for seed in args.seeds:  # seed-major: a partial sweep already holds every variant for the first seeds
        for variant in args.variants:
            res = run_one(args, variant, seed)
            line = {k: v for k, v in res.items() if k not in ("log_tail", "cli_args")}
            print(json.dumps(line), flush=True)
            if res.get("status") != "ok":
                print(
                    f"[{BENCH}] {variant} seed {seed} FAILED (exit {res.get('exit_code')}); log tail:\n"
                    f"{res.get('log_tail', '')}",
                    file=sys.stderr,
                    flush=True,
                )
            results.append(res)
    summary = summarise(results)
    for s in summary:
        print(json.dumps(s), flush=True)
    print(table(results, summary), file=sys.stderr, flush=True)
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "runs": [{k: v for k, v in r.items() if k not in ("log_tail", "cli_args")} for r in results],
                "summary": summary,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return results + summary


if __name__ == "__main__":
    lines = main()
    sys.exit(1 if any(r.get("status") == "failed" for r in lines) else 0)
