"""Seconds to learn one new user's preference: Latent DPO against LoRA-DPO, same pairs, same epochs (issue 12).

What is measured (spec ``shared/methods/latent_preference.md`` 4, 10):

1. CLaP, the one-time stage, is trained for ``--clap-steps`` steps (or read from ``--clap-ckpt``); its time is
   reported separately (``clap_seconds``, one-time, not per user). A short CLaP gives a poor latent space: the
   timing figure does not depend on it, the preference figures do.
2. For ``--user`` (default ``lang:de``: German over English solutions of the offline math demo), Latent DPO
   (:class:`lit_models.latent_preference.LatentPreferenceAlignment` ``stage=latent_dpo``: only the prompt-only prior
   encoder trains, the LLM is never called) and LoRA-DPO (``stage=lora_dpo``: peft LoRA r 8 on q/v, TRL's sigmoid
   loss) each train for ``--epochs`` epochs on the same training pairs, with the settings of
   ``configs/latent_preference/{latent_dpo,lora_dpo}_demo.yaml`` (batch 16 / lr 1e-4 and batch 4 / lr 1e-5, the
   spec's demo scale) unless overridden. Time = the model's ``time/seconds_per_user``: wall clock from Lightning's
   ``on_train_start`` to ``on_train_end`` with validation and checkpointing switched off during fit (so: every
   training step, data loading and Lightning's loop; not model loading).
3. After fit each model is validated on the held-out pairs of the same user: ``val/seq/rewards/accuracies`` (share
   of held-out pairs whose sequence-level implicit reward, beta (log pi - log pi_ref) summed over response tokens,
   is higher for the chosen response; for Latent DPO pi is the frozen LM with the prefix of the user's prior mean
   latent and pi_ref the LM with the z = 0 prefix) is the comparable preference metric; each method's own
   ``val/rewards/accuracies`` (latent-level for Latent DPO) and Latent DPO's ``val/ldpo/expected_latent_reward`` are
   reported too, plus the last training-step ``train/rewards/accuracies``.

Output (stdout): one JSON line per figure, e.g.::

    {"benchmark": "per_user_time", "figure": "seconds_per_user", "metric": "seconds", "ours": 3.1,
     "baseline": "lora_dpo", "baseline_value": 95.0, "ratio": 0.033, "goal": "<= 0.2", "meets_goal": true, ...}

``ratio`` is ours / baseline. A table goes to stderr. Nothing is asserted.

Runs:

    # the lead's run: SmolLM2-135M on the CPU, 2 threads, about 5-8 minutes (CLaP 5 steps, 1 epoch per method)
    python benchmarks/per_user_time.py --threads 2
    # smoke run, seconds: tiny random Llama, 20 problems
    python benchmarks/per_user_time.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml

BENCH = "per_user_time"
CONFIGS = ROOT / "configs" / "latent_preference"
GOAL = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="LM of every stage (default smollm2-135m)")
    p.add_argument("--user", default="lang:de", help="demo user (lang:de, lang:en, correct)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each per-user method (same for both)")
    p.add_argument("--clap-ckpt", default=None, help="use this CLaP checkpoint instead of training one")
    p.add_argument("--clap-steps", type=int, default=5, help="CLaP steps when no --clap-ckpt (0: untrained encoder)")
    p.add_argument("--clap-group-size", type=int, default=4, help="K responses per CLaP step")
    p.add_argument("--clap-rolls", type=int, default=1, help="contrastive rolls per CLaP step")
    p.add_argument("--latent-batch-size", type=int, default=None, help="default: latent_dpo_demo.yaml (16)")
    p.add_argument("--lora-batch-size", type=int, default=None, help="default: lora_dpo_demo.yaml (4)")
    p.add_argument("--latent-lr", type=float, default=None, help="default: latent_dpo_demo.yaml (1e-4)")
    p.add_argument("--lora-lr", type=float, default=None, help="default: lora_dpo_demo.yaml (1e-5)")
    p.add_argument("--max-problems", type=int, default=None, help="use the first N math problems (None: all 100)")
    p.add_argument("--max-prompt-len", type=int, default=None, help="default: the configs' (128)")
    p.add_argument("--max-response-len", type=int, default=None, help="default: the configs' (48)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-dir", default=None, help="demo data root (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke settings: llama-tiny, 20 problems, CLaP 2 steps, short sequences")
    args = p.parse_args(argv)
    if args.quick:
        args.model = "llama-tiny"
        args.max_problems = args.max_problems or 20
        args.clap_steps = min(args.clap_steps, 2)
        args.max_prompt_len = args.max_prompt_len or 48
        args.max_response_len = args.max_response_len or 24
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def init_args(name: str, section: str) -> dict[str, Any]:
    """``<section>.init_args`` of ``configs/latent_preference/<name>.yaml``."""
    return dict(_config(name)[section]["init_args"])


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def make_trainer(args: argparse.Namespace, **kw: Any) -> Any:
    import lightning as L

    accelerator = "gpu" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    return L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def datamodule(args: argparse.Namespace, config: str, data_dir: Path, **over: Any) -> Any:
    from datamodules.preference import PreferenceDataModule

    kw = init_args(config, "data")
    kw.update(tokenizer=args.model, data_dir=str(data_dir), seed=args.seed)
    if args.max_problems:
        kw["demo_kwargs"] = {"max_problems": args.max_problems}
    if args.max_prompt_len:
        kw["max_prompt_len"] = args.max_prompt_len
    if args.max_response_len:
        kw["max_response_len"] = args.max_response_len
    kw.update(over)
    dm = PreferenceDataModule(**kw)
    dm.prepare_data()
    return dm


def model_kwargs(config: str, args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    kw = init_args(config, "model")
    kw["model"] = args.model
    kw.update({k: v for k, v in over.items() if v is not None})
    return kw


def train_clap(args: argparse.Namespace, data_dir: Path, out: Path) -> tuple[str, float]:
    """Train (or build untrained) the CLaP stage; returns (checkpoint path, seconds)."""
    from lit_models.latent_preference import LatentPreferenceAlignment

    dm = datamodule(args, "clap_demo", data_dir, group_size=args.clap_group_size)
    model = LatentPreferenceAlignment(tokenizer=dm.tokenizer, **model_kwargs("clap_demo", args,
                                                                             contrastive_rolls=args.clap_rolls))
    trainer = make_trainer(args, max_steps=max(args.clap_steps, 1), limit_val_batches=0)
    t0 = time.perf_counter()
    if args.clap_steps > 0:
        trainer.fit(model, datamodule=dm)
    else:
        trainer.strategy.connect(model)
    seconds = time.perf_counter() - t0
    path = out / "clap.ckpt"
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    ckpt["hyper_parameters"].pop("tokenizer", None)
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path), seconds if args.clap_steps > 0 else 0.0


def run_user(args: argparse.Namespace, stage: str, data_dir: Path, clap_ckpt: str) -> dict[str, Any]:
    """Fit one per-user stage for ``--epochs`` epochs, then validate on the user's held-out pairs."""
    from lit_models.latent_preference import LatentPreferenceAlignment

    config = f"{stage}_demo"
    batch = args.latent_batch_size if stage == "latent_dpo" else args.lora_batch_size
    lr = args.latent_lr if stage == "latent_dpo" else args.lora_lr
    over = {"user": args.user} | ({"batch_size": batch} if batch else {})
    dm = datamodule(args, config, data_dir, **over)
    extra = {"clap_ckpt": clap_ckpt} if stage == "latent_dpo" else {}
    torch.manual_seed(args.seed)
    model = LatentPreferenceAlignment(tokenizer=dm.tokenizer, **model_kwargs(config, args, lr=lr, **extra))
    trainer = make_trainer(args, max_epochs=args.epochs, limit_val_batches=0,
                           gradient_clip_val=_config(config)["trainer"].get("gradient_clip_val"))
    trainer.fit(model, datamodule=dm)
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val = make_trainer(args).validate(model, datamodule=dm, verbose=False)[0]
    return {"stage": stage, "pairs": len(dm.dataset("train")), "val_pairs": len(dm.dataset("validation")),
            "batch_size": dm.batch_size, "lr": model.hparams.lr, **model.user_time,
            "train/rewards/accuracies": train_metrics.get("train/rewards/accuracies"),
            **{k: float(v) for k, v in val.items()}}


def strict(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def figures(args: argparse.Namespace, ours: dict[str, Any], base: dict[str, Any], clap_s: float) -> list[dict]:
    common = {"benchmark": BENCH, "model": args.model, "user": args.user, "epochs": args.epochs,
              "pairs": ours["pairs"], "val_pairs": ours["val_pairs"], "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
              "clap_steps": args.clap_steps if args.clap_ckpt is None else "from --clap-ckpt"}

    def line(figure: str, metric: str, a: float | None, b: float | None, goal: str | None = None,
             meets: bool | None = None, **extra: Any) -> dict[str, Any]:
        ratio = a / b if a is not None and b not in (None, 0) else None
        return {**common, "figure": figure, "metric": metric, "ours": strict(a), "baseline": "lora_dpo",
                "baseline_value": strict(b), "ratio": strict(ratio), "goal": goal, "meets_goal": meets, **extra}

    s_ours, s_base = ours["time/seconds_per_user"], base["time/seconds_per_user"]
    return [
        line("seconds_per_user", "seconds", s_ours, s_base, f"<= {GOAL}", s_ours / s_base <= GOAL,
             steps_ours=ours["time/steps"], steps_baseline=base["time/steps"], batch_ours=ours["batch_size"],
             batch_baseline=base["batch_size"], llm_block_calls_per_step_ours=ours["time/llm_block_calls_per_step"]),
        line("seconds_per_step", "seconds (median)", ours["time/seconds_per_step"], base["time/seconds_per_step"]),
        line("heldout_seq_pref_accuracy", "val/seq/rewards/accuracies", ours.get("val/seq/rewards/accuracies"),
             base.get("val/seq/rewards/accuracies"), note="sequence-level implicit reward on held-out pairs"),
        line("heldout_seq_margin", "val/seq/rewards/margins", ours.get("val/seq/rewards/margins"),
             base.get("val/seq/rewards/margins")),
        line("own_pref_accuracy", "val/rewards/accuracies", ours.get("val/rewards/accuracies"),
             base.get("val/rewards/accuracies"), note="ours: latent-level pairs; baseline: sequence level"),
        line("train_pref_accuracy", "train/rewards/accuracies (last step)", ours.get("train/rewards/accuracies"),
             base.get("train/rewards/accuracies")),
        {**common, "figure": "expected_latent_reward", "metric": "val/ldpo/expected_latent_reward",
         "ours": strict(ours.get("val/ldpo/expected_latent_reward")), "baseline": None, "baseline_value": None,
         "ratio": None, "goal": "> 0.5 (prior N(0, I) gives about 0.5)", "meets_goal": None},
        {**common, "figure": "clap_seconds", "metric": "seconds (one-time, not per user)", "ours": clap_s,
         "baseline": None, "baseline_value": None, "ratio": None, "goal": None, "meets_goal": None},
    ]


def _fmt(v: Any) -> str:
    return f"{v:12.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'-':>12s}"


def table(lines: list[dict[str, Any]]) -> str:
    rows = [f"{'figure':28s} {'latent_dpo':>12s} {'lora_dpo':>12s} {'ratio':>8s}  goal"]
    for ln in lines:
        ratio = f"{ln['ratio']:8.3f}" if ln["ratio"] is not None else f"{'-':>8s}"
        rows.append(f"{ln['figure']:28s} {_fmt(ln['ours'])} {_fmt(ln['baseline_value'])} {ratio}  {ln['goal'] or ''}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory(prefix="per_user_time_") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        if args.clap_ckpt is None:
            clap_ckpt, clap_s = train_clap(args, data_dir, Path(tmp))
        else:
            clap_ckpt, clap_s = args.clap_ckpt, 0.0
        ours = run_user(args, "latent_dpo", data_dir, clap_ckpt)
        base = run_user(args, "lora_dpo", data_dir, clap_ckpt)
    lines = figures(args, ours, base, clap_s)
    for ln in lines:
        print(json.dumps(ln), flush=True)
    print(table(lines), file=sys.stderr)
    return lines


if __name__ == "__main__":
    main()
