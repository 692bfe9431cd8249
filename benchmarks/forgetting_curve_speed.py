"""Forgetting-curve evaluation speed: our batched module against the official one-sample-at-a-time protocol.

Both sides score exactly the same samples (one :class:`datamodules.long_text.LongTextDataModule` draw: ``--corpus``,
``--lengths``, ``--repeats``, ``--seed``) with the same model object (``--model``, ``--dtype``, eval mode, inference
mode):

- ``official_loop``: what the official ``draw.py`` does per sample (Liu et al. 2024, ``1azybug/ForgettingCurve``
  ``e3b76dc``): the copy input, then the LM input, each as a batch of one through ``model(ids).logits``, the argmax
  over the whole ``[T, V]`` logits, then the accuracy of the last ``ceil(L/2)`` tokens. Written here from the spec's
  description; no official code is imported or downloaded.
- ``ours_b<B>``: ``python train.py test``'s path: :class:`lit_models.forgetting_curve.ForgettingCurve` under a
  ``lightning.Trainer`` with ``batch_size=B`` (copy and LM inputs of ``B`` samples in one forward of ``2B`` rows; the
  LM head only at the ``h`` scored positions), timed wall clock around ``trainer.test`` (data assembly, statistics,
  JSON and PNG writing included).

Printed: one JSON line per figure (``samples_per_s`` of each runner, ratio against the loop; one sample is one copy +
LM pair) and a parity line: per-sample accuracies of every runner against the loop, ``identical`` and the number of
samples whose accuracy differs (a last-bit difference of a batched matmul can flip an argmax; the spec allows one flip
per length with batching). Speed is reported, never asserted; the goal is ``ours`` at least 2x the loop.

    python benchmarks/forgetting_curve_speed.py                       # SmolLM2-135M on Austen, L 64..1024
    python benchmarks/forgetting_curve_speed.py --model llama-tiny --lengths 8,16 --repeats 2 --batch-sizes 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datamodules.long_text import LongTextDataModule
from lit_models.forgetting_curve import ForgettingCurve

GOAL = 2.0


def official_loop(model: torch.nn.Module, dm: LongTextDataModule) -> tuple[dict[tuple[int, int], tuple[float, float]],
                                                                            float]:
    """Per-sample (copy_acc, lm_acc) keyed by (L, repeat), and the seconds taken, one input at a time."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, sample in enumerate(dm.samples):
            batch = dm.make_batch([i])
            L = batch["length"]
            accs = []
            for key in ("copy_ids", "lm_ids"):
                ids = batch[key].to(model.device)
                pred = model(input_ids=ids, use_cache=False).logits.argmax(-1)[0]
                src = ids[0, L + 2 : 2 * L + 2]  # the second X
                hyp = pred[L + 1 : 2 * L + 1]  # predictions of its tokens
                h = -(-L // 2)  # official src[-length//2:]: the last ceil(L/2) tokens
                accs.append(float((hyp[-h:] == src[-h:]).double().mean()))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            out[(L, sample["sample_idx"])] = (accs[0], accs[1])
    return out, time.perf_counter() - t0


def ours(module: ForgettingCurve, dm: LongTextDataModule, out_dir: Path) -> tuple[dict[tuple[int, int], tuple[float,
                                                                                                             float]],
                                                                                  float]:
    import lightning as L

    module.hparams.output_dir = str(out_dir)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out_dir))
    t0 = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    accs = {}
    for r in module.results:
        for i, (c, lm) in enumerate(zip(r["copy_accs"], r["lm_accs"])):
            accs[(r["length"], i)] = (c, lm)
    return accs, seconds


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--model-config-overrides", default=None, help="JSON dict (tiny models)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--corpus", default="austen")
    parser.add_argument("--data-type", default="order", choices=["order", "random"])
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    overrides = json.loads(args.model_config_overrides) if args.model_config_overrides else None
    module = ForgettingCurve(model=args.model, dtype=args.dtype, model_config_overrides=overrides)
    vocab = module._vocab_size()
    data_kwargs: dict[str, Any] = {"corpus": args.corpus, "tokenizer": args.model, "data_type": args.data_type,
                                   "lengths": lengths, "repeats": args.repeats, "seed": args.seed}
    if args.data_type == "random":
        data_kwargs["random_id_range"] = [0, min(vocab, 32000) - 1]
    module.model.to("cuda" if torch.cuda.is_available() else "cpu")

    def data(batch_size: int) -> LongTextDataModule:
        dm = LongTextDataModule(**data_kwargs, batch_size=batch_size)
        dm.setup("test")
        return dm

    dm = data(1)
    n = len(dm.samples)
    # one warm-up forward of the longest input (allocator, kernels), unmeasured
    with torch.inference_mode():
        module.model(input_ids=dm.make_batch([n - 1])["copy_ids"].to(module.model.device), use_cache=False)
    base_accs, base_s = official_loop(module.model, dm)
    lines: list[dict[str, Any]] = []
    base_rate = n / base_s
    common = {"benchmark": "forgetting_curve_speed", "model": args.model, "lengths": lengths, "repeats": args.repeats,
              "samples": n, "threads": args.threads, "device": str(module.model.device)}
    with tempfile.TemporaryDirectory() as tmp:
        for b in (int(x) for x in args.batch_sizes.split(",")):
            accs, seconds = ours(module, data(b), Path(tmp) / f"b{b}")
            rate = n / seconds
            ratio = rate / base_rate
            diff = sum(1 for k in base_accs if base_accs[k] != accs[k])
            max_abs = max(max(abs(a - b_) for a, b_ in zip(base_accs[k], accs[k])) for k in base_accs)
            lines.append({**common, "figure": "samples_per_s", "ours": round(rate, 3), "runner": f"ours_b{b}",
                          "baseline": "official_loop", "baseline_value": round(base_rate, 3),
                          "ratio": round(ratio, 3), "goal": f">= {GOAL}x", "meets_goal": ratio >= GOAL})
            lines.append({**common, "figure": "parity", "runner": f"ours_b{b}", "baseline": "official_loop",
                          "identical": diff == 0, "samples_differing": diff, "max_abs_diff": max_abs})
    for line in lines:
        print(json.dumps(line), flush=True)
    print("\n".join(
        ["", f"{'runner':<16}{'samples/s':>12}{'x loop':>9}{'identical':>11}",
         f"{'official_loop':<16}{base_rate:>12.3f}{1.0:>9.2f}{'-':>11}"]
        + [f"{s['runner']:<16}{s['ours']:>12.3f}{s['ratio']:>9.2f}{p['identical']!s:>11}"
           for s, p in zip(lines[::2], lines[1::2])]), file=sys.stderr)
    return lines


if __name__ == "__main__":
    main()
