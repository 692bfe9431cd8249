"""MoE vs dense training throughput at equal active parameters, and the peak memory of each.

The issue's benchmark (spec ``shared/methods/moe_scaling.md``): "tokens/s of the MoE model vs the dense model with
equal active parameters (goal at least 0.8x), and peak memory of each". For every size ``d x L`` of ``--sizes``:

- ``dense``: :class:`lit_models.scaling_lm.ScalingLM` ``ffn=dense`` (Llama, SwiGLU f = ceil(8/3 d) to 16, max(4, d/64)
  heads);
- ``moe``: ``ffn=moe``, 8 Mixtral experts, top-2, each of width f // 2 (active-matched: N_active = N_dense + L·d·E,
  the router), once per transformers expert kernel in ``--experts-impls`` (``grouped_mm``, transformers' default;
  ``eager``, a loop over the experts that receive tokens; ``batched_mm``, which gathers one weight matrix per token
  and is left out by default: on the CPU it ran at 0.01x dense and took 18 GB at 256x4).

Each model trains ``--warmup + --steps`` AdamW updates under ``lightning.Trainer`` exactly as ``train.py`` would
(:class:`~lit_models.scaling_lm.ScalingLM`, clipping 1.0, no logger, checkpoints or validation) on real batches:
``--batch-size`` x ``--seq-len`` blocks of the offline mixed corpus (Austen, Bible, essays) under the ``bpe:2048``
tokenizer of ``configs/scaling/*_tiny.yaml`` (:class:`~datamodules.text.TextDataModule`, so routing sees real text).
Every (size, model) runs in a fresh subprocess (``benchmarks.sft_throughput.spawn_worker``), so the memory figure is
not polluted by an earlier model. Reported per run: ``tokens_per_s`` (input tokens over the measured updates, wall
clock between update ends), ``peak_train_mem_mb`` (memory added by training: CUDA ``max_memory_allocated``, or CPU
peak RSS after resetting ``VmHWM``; ``benchmarks.sft_throughput.MemProbe``), N_active / N_total non-embedding
parameters, and ``ratio`` = MoE tokens/s / dense tokens/s at the same size (goal >= 0.8).

Run (2 CPU cores: about 2 minutes with the defaults):

    python benchmarks/moe_throughput.py
    python benchmarks/moe_throughput.py --sizes 64x2,256x4,512x8 --experts-impls grouped_mm --device cuda

Smoke run (seconds): ``python benchmarks/moe_throughput.py --sizes 32x1 --steps 2 --warmup 1 --batch-size 2
--seq-len 16 --experts-impls grouped_mm --threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from benchmarks.sft_throughput import MemProbe, Stamps, quiet, spawn_worker

BENCH = "moe_throughput"
GOAL = 0.8
IMPLS = ("grouped_mm", "batched_mm", "eager")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64x2,256x4", help="comma-separated d_model x n_layers (default 64x2,256x4)")
    p.add_argument("--experts-impls", default="grouped_mm,eager",
                   help=f"MoE expert kernels, of {', '.join(IMPLS)} (default grouped_mm,eager; batched_mm gathers a "
                        "weight matrix per token: on CPU 0.01x dense and 18 GB at 256x4)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="B blocks per update (default 16, the configs')")
    p.add_argument("--seq-len", type=int, default=128, help="T tokens per block (default 128, the configs')")
    p.add_argument("--steps", type=int, default=10, help="measured updates (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured updates first (default 3, at least 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            d, n_layers = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {part!r} is not <d_model>x<n_layers> (e.g. 256x4)") from None
        out.append((d, n_layers))
    return out


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def run_model(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model for ``--warmup + --steps`` updates on real blocks; its throughput, memory and counts."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from datamodules.text import TextDataModule
    from lit_models.scaling_lm import ScalingLM

    device = _device(args)
    n = args.warmup + args.steps
    B, T = args.batch_size, args.seq_len
    dm = TextDataModule(tokenizer="bpe:2048", source="mixed", seq_len=T, batch_size=B, max_train_tokens=n * B * T,
                        max_val_tokens=T, seed=args.seed)
    torch.manual_seed(args.seed)
    moe = spec["ffn"] == "moe"
    module = ScalingLM(ffn=spec["ffn"], d_model=spec["d_model"], n_layers=spec["n_layers"],
                       n_heads=max(4, spec["d_model"] // 64),  # 4 heads, or head size 64 from d 256 up
                       num_experts=args.num_experts, top_k=args.top_k,
                       experts_implementation=spec.get("experts_impl") if moe else None, tokenizer=dm.tokenizer,
                       warmup_ratio=0.0, summary_file=None)
    stamps = Stamps(device)

    class _Stamp(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            stamps.end(float(outputs["loss"]))

    module._write_summary = lambda: None  # type: ignore[method-assign]  # no run_summary.json from a benchmark
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_") as tmp:
        trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=n, max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
                            callbacks=[_Stamp()], use_distributed_sampler=False, default_root_dir=tmp)
        probe = MemProbe(device)
        probe.start()
        trainer.fit(module, datamodule=dm)
        mem = probe.stop()
    counts = module.counts
    return {**stamps.result(args.warmup, args.steps, B * T), **mem, "n_active_nonemb": counts["n_active_nonemb"],
            "n_total_nonemb": counts["n_total_nonemb"], "n_embedding": counts["n_embedding"],
            "device": str(device), "experts_impl": module.model.config._experts_implementation if moe else None}


def worker_main(args: argparse.Namespace) -> None:
    quiet()
    torch.set_num_threads(args.threads)
    spec_path = Path(args.worker)
    spec = json.loads(spec_path.read_text())
    with contextlib.redirect_stdout(sys.stderr):
        result = run_model(args, spec)
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return []
    argv = list(sys.argv[1:] if argv is None else argv)
    impls = [x for x in args.experts_impls.split(",") if x]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"--experts-impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    # Build the BPE tokenizer and token cache once, before the workers need them.
    from datamodules.text import TextDataModule

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        TextDataModule(tokenizer="bpe:2048", source="mixed", seq_len=args.seq_len).prepare_data()
    lines: list[dict[str, Any]] = []
    common = {"benchmark": BENCH, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "threads": args.threads, "num_experts": args.num_experts, "top_k": args.top_k}
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_") as tmp:
        for d, n_layers in _sizes(args.sizes):
            runs = [{"ffn": "dense", "d_model": d, "n_layers": n_layers}]
            runs += [{"ffn": "moe", "d_model": d, "n_layers": n_layers, "experts_impl": i} for i in impls]
            dense: dict[str, Any] | None = None
            for spec in runs:
                name = "dense" if spec["ffn"] == "dense" else f"moe_{spec['experts_impl']}"
                print(f"[{BENCH}] d={d} L={n_layers} {name} ...", file=sys.stderr, flush=True)
                res = spawn_worker(Path(__file__).resolve(), argv, spec, Path(tmp) / f"d{d}-l{n_layers}-{name}.json")
                line = {**common, "d_model": d, "n_layers": n_layers, "model": name,
                        "tokens_per_s": round(res["tokens_per_s"], 1),
                        "s_per_step_median": round(res["s_per_step_median"], 4),
                        "peak_train_mem_mb": round(res["peak_train_mem_mb"], 1), "mem_kind": res["mem_kind"],
                        "n_active_nonemb": res["n_active_nonemb"], "n_total_nonemb": res["n_total_nonemb"],
                        "n_embedding": res["n_embedding"], "device": res["device"]}
                if dense is None:
                    dense = line
                else:
                    ratio = line["tokens_per_s"] / dense["tokens_per_s"]
                    line.update({"baseline": "dense", "baseline_tokens_per_s": dense["tokens_per_s"],
                                 "ratio": round(ratio, 3), "goal": f">= {GOAL}x", "meets_goal": ratio >= GOAL,
                                 "mem_ratio": round(line["peak_train_mem_mb"] / max(dense["peak_train_mem_mb"], 1e-9),
                                                    2)})
                lines.append(line)
                print(json.dumps(line), flush=True)
    head = f"{'size':<9}{'model':<17}{'N_active':>10}{'N_total':>10}{'tokens/s':>10}{'x dense':>9}{'peak MB':>9}"
    rows = [head]
    for ln in lines:
        rows.append(f"{ln['d_model']}x{ln['n_layers']:<6}{ln['model']:<17}{ln['n_active_nonemb']:>10,}"
                    f"{ln['n_total_nonemb']:>10,}{ln['tokens_per_s']:>10.0f}{ln.get('ratio', 1.0):>9.2f}"
                    f"{ln['peak_train_mem_mb']:>9.1f}")
    print("\n".join(["", *rows]), file=sys.stderr)
    return lines


if __name__ == "__main__":
    main()
