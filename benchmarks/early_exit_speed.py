"""Early-exit decoding speed on SmolLM2: tokens/s at several gate thresholds vs full greedy decoding, same cache.

The issue's benchmark (spec ``shared/methods/early_exit.md`` sections 3.5, 7 and 10). Steps:

1. **Gates.** :class:`lit_models.early_exit.EarlyExitLM` (``--model``, default ``smollm2-135m``, float32, LM frozen,
   hidden-state gates of width 32) either loads gates from a checkpoint (``--ckpt``, e.g. the ``last.ckpt`` of
   ``configs/early_exit/gate_demo.yaml``) or trains them here for ``--train-steps`` AdamW steps (lr ``--lr``) on
   ``--train-batch`` x ``--train-seq`` token blocks of five Austen novels (the offline ``austen`` source of
   :class:`datamodules.text.TextDataModule`), with stable-oracle labels recomputed at every step (``--finetune-lm``:
   the LM trains too, lr ``--lm-lr``, with the depth-weighted per-layer cross-entropy). A model with random
   gates never exits (their bias starts at -2), so without trained gates there is nothing to measure.
2. **Prompts.** The first ``--prompt-tokens`` tokens of the first ``--prompts`` validation blocks of *Persuasion*
   (held out from gate training).
3. **Decoding** (batch 1, greedy, ``--new-tokens`` tokens, no EOS stop), all with the same layer loop and
   transformers ``DynamicCache`` (:func:`lit_models.nn.exit_runner.early_exit_generate`):

   - ``full``: the gate disabled (every token at full depth). Also checked token for token against
     ``model.generate(do_sample=False)`` (``full_equals_generate``).
   - early exit at each ``--thresholds`` value and each ``--kv-modes`` entry (``propagate``: skipped layers' K/V
     projected from the exit state; ``kv_copy``; ``lazy``).

   Every configuration runs once untimed (warm-up) and then ``--repeats`` times; a prompt's time is the median of its
   repeats and tokens/s is all generated tokens / the sum of the prompts' median times (prefill included).
   ``token_agreement``: early exit teacher-forced on the full-decoding trajectory, the fraction of positions where
   its token equals the full one; ``prefix_match``: the free-running early-exit output's identical prefix / length;
   ``avg_exit_layer``: mean exit layer of the generated tokens (the first comes from the full-depth prefill);
   ``layer_speedup`` = L / avg_exit_layer (the compute bound, without the head and Python overhead).

Output: one JSON line per figure on stdout (``benchmark``, ``figure``, ``ours``, ``baseline``, ``baseline_value``,
``ratio``, ``goal``, ``meets_goal`` and the configuration), progress on stderr. The issue's goal: at least 1.3x the
full-decoding tokens/s at 99 % or better token agreement. Timings on a shared machine vary by about 10 %; run it alone.

    python benchmarks/early_exit_speed.py                      # ~7-10 min on 2 CPU cores (60 gate steps)
    python benchmarks/early_exit_speed.py --ckpt runs/early_exit/gate_demo/checkpoints/last.ckpt
    python benchmarks/early_exit_speed.py --quick              # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

import torch

BENCH = "early_exit_speed"
GOAL_SPEEDUP, GOAL_AGREEMENT = 1.3, 0.99


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model-config-overrides", default=None, help="JSON; tiny random models only (tests)")
    p.add_argument("--ckpt", default=None, help="gate checkpoint (gate_demo.yaml's last.ckpt); skips training")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-lm", action="store_true", help="joint optimisation: train the LM too (per-layer CE)")
    p.add_argument("--lm-lr", type=float, default=1e-5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--thresholds", default="0.5,0.8,0.9,0.95")
    p.add_argument("--kv-modes", default="propagate")
    p.add_argument("--min-exit-layer", type=int, default=1, help="no exit (and no gate evaluation) below this layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="token cache of the text data (default: the litlab cache)")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 prompt, 8 new tokens, threshold 0.5, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.prompts, args.new_tokens, args.thresholds, args.repeats = 3, 1, 8, "0.5", 1
    args.thresholds = [float(t) for t in str(args.thresholds).split(",") if t]
    args.kv_modes = [m for m in str(args.kv_modes).split(",") if m]
    return args


def _log(msg: str) -> None:
    print(f"[{BENCH}] {msg}", file=sys.stderr, flush=True)


def build_module(args: argparse.Namespace) -> Any:
    from lit_models.early_exit import EarlyExitLM

    overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else None
    torch.manual_seed(0)
    lm = EarlyExitLM(model=args.model, model_config_overrides=overrides, mode="gate", lr=args.lr,
                     min_exit_layer=args.min_exit_layer, finetune_lm=args.finetune_lm, lm_lr=args.lm_lr)
    if args.ckpt:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        lm.on_load_checkpoint(ckpt)  # refuses gates of another model; completes a gates-only state dict
        lm.load_state_dict(ckpt["state_dict"])
        _log(f"loaded gates from {args.ckpt}")
    return lm


def data_module(args: argparse.Namespace) -> Any:
    from datamodules.text import TextDataModule

    dm = TextDataModule(tokenizer=args.model, source="austen", val_documents=["persuasion"], seq_len=args.train_seq,
                        batch_size=args.train_batch, max_val_tokens=max(args.prompts, 1) * args.train_seq,
                        cache_dir=args.cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_gates(lm: Any, dm: Any, args: argparse.Namespace) -> dict[str, Any]:
    opt = lm.configure_optimizers()
    lm.train()
    start, losses, steps = time.perf_counter(), [], 0
    while steps < args.train_steps:
        for batch in dm.train_dataloader():
            loss = lm.training_step(batch, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
            if steps % 10 == 0:
                _log(f"gate step {steps}/{args.train_steps}: loss {losses[-1]:.4f}")
            if steps >= args.train_steps:
                break
    lm.eval()
    return {"train_steps": steps, "train_s": round(time.perf_counter() - start, 2),
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None}


def prompts_from(dm: Any, args: argparse.Namespace) -> list[torch.Tensor]:
    ds = dm.dataset("validation")
    out = [ds[i]["input_ids"][: args.prompt_tokens].view(1, -1) for i in range(min(args.prompts, len(ds)))]
    if len(out) < args.prompts:
        raise ValueError(f"only {len(out)} validation blocks for --prompts {args.prompts}")
    return out


def timed(run: Any, repeats: int) -> tuple[Any, float]:
    """``run()`` once untimed, then ``repeats`` times; (last result, median seconds)."""
    run()
    times, res = [], None
    for _ in range(repeats):
        res = run()
        times.append(res.prefill_s + res.decode_s)
    return res, statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from lit_models.early_exit import decode_summary
    from lit_models.nn.exit_runner import early_exit_generate

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        lm = build_module(args)
        dm = data_module(args)
        train = {"train_steps": 0} if args.ckpt else train_gates(lm, dm, args)
    lm.eval()
    prompts = prompts_from(dm, args)
    runner, n = lm.runner, args.new_tokens
    base = {"benchmark": BENCH, "model": args.model, "threads": args.threads, "prompts": len(prompts),
            "min_exit_layer": args.min_exit_layer, "finetune_lm": args.finetune_lm,
            "prompt_tokens": args.prompt_tokens, "new_tokens": n, "repeats": args.repeats, **train}
    lines: list[dict[str, Any]] = []

    def emit(line: dict[str, Any]) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    with torch.no_grad():
        full, full_s = [], 0.0
        equal_generate = True
        for p in prompts:
            res, sec = timed(lambda p=p: early_exit_generate(runner, p, n, None, "propagate"), args.repeats)
            full.append(res)
            full_s += sec
            hf = lm.model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                   pad_token_id=lm.tokenizer.pad_token_id)[0, p.shape[1]:].tolist()
            equal_generate &= hf == res.tokens
        full_tps = len(prompts) * n / full_s
        _log(f"full depth: {full_tps:.2f} tokens/s; equals generate: {equal_generate}")
        emit({**base, "figure": "full_tokens_per_s", "ours": round(full_tps, 3), "baseline": "hf_generate_tokens",
              "baseline_value": None, "ratio": None, "goal": "full loop = generate(do_sample=False) token for token",
              "meets_goal": equal_generate, "full_equals_generate": equal_generate})
        for kv in args.kv_modes:
            for tau in args.thresholds:
                policy = lm.policy(tau)
                ee, ee_s, forced = [], 0.0, []
                for p, f in zip(prompts, full, strict=True):
                    res, sec = timed(lambda p=p, pol=policy, kv=kv: early_exit_generate(runner, p, n, pol, kv),
                                     args.repeats)
                    ee.append(res)
                    ee_s += sec
                    forced.append(early_exit_generate(runner, p, n, policy, kv, forced_tokens=f.tokens[:-1]))
                s = decode_summary(full, ee, forced)
                tps = len(prompts) * n / ee_s
                speedup = tps / full_tps
                agree = s["ee/token_agreement"]
                line = {**base, "figure": "ee_tokens_per_s", "kv_mode": kv, "threshold": tau,
                        "ours": round(tps, 3), "baseline": "full_tokens_per_s", "baseline_value": round(full_tps, 3),
                        "ratio": round(speedup, 4), "goal": f">= {GOAL_SPEEDUP}x at token_agreement >= {GOAL_AGREEMENT}",
                        "meets_goal": bool(speedup >= GOAL_SPEEDUP and agree >= GOAL_AGREEMENT),
                        "avg_exit_layer": round(s["ee/avg_exit_layer"], 3), "n_layers": runner.n_layers,
                        "layer_speedup": round(s["ee/layer_speedup"], 4), "token_agreement": round(agree, 4),
                        "prefix_match": round(s["ee/prefix_match"], 4), "free_agreement": round(s["ee/free_agreement"], 4)}
                _log(f"{kv} tau={tau}: {tps:.2f} tokens/s ({speedup:.2f}x), {s['ee/avg_exit_layer']:.2f} layers, "
                     f"agreement {agree:.3f}")
                emit(line)
    return lines


if __name__ == "__main__":
    main()
