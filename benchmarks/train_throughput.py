"""Training throughput (target tokens per second) of our Lightning training step against two baselines.

What is measured, on the CPU, for each ``--arch`` (``vanilla`` = ``arch: transformer``, ``pcformer`` = RK2 EMA
multistep), with the demo sizes (d 128, FFN 256, 4 heads, 3-3 layers, dropout 0.1 everywhere, shared embeddings):

(a) ``ours``: :class:`lit_models.pcformer.PCformerTranslation` trained by ``lightning.Trainer.fit`` on a fixed list of
    identical batches (``--warmup + --steps`` of them); ``logger=False``, no checkpointing, no progress bar, no model
    summary, no validation. This is everything a real run pays per update: ``training_step`` (loss, the ``self.log``
    calls and ``pc_stats``), the token-count gradient normalisation in ``on_before_optimizer_step``, AdamW and the
    inverse-sqrt LambdaLR step, ``zero_grad``, and Lightning's loop.
(b) ``bare_pytorch``: a plain loop on the SAME network (``module.model``) and batch: forward,
    :func:`lit_models.seq2seq_eval.label_smoothed_nll_loss` (same epsilon), ``(loss / ntokens).backward()``, AdamW
    step (same lr, betas, weight decay), the same LambdaLR step, ``zero_grad(set_to_none=True)``.
(c) ``hf_marian``: ``transformers.MarianMTModel`` built offline from a ``MarianConfig`` with the same dimensions
    (d_model, FFN, heads, layers, vocabulary, 1024 positions, shared and tied embeddings, ReLU, scaled embeddings,
    the same three dropouts, SDPA attention) in the same bare loop, the loss computed from its logits with the same
    function. Marian is post-norm (no final LayerNorms) and has ``final_logits_bias``: a few hundred parameters'
    difference, reported.

Each figure is the median over ``--repeats`` rounds; a round runs (a), (b) and (c) in turn (interleaved, so that
background load hits all three alike) for ``--warmup`` unmeasured and ``--steps`` measured updates. Time is wall
clock from the end of the last warm-up update to the end of the last update (``time.perf_counter``), dropout on
(train mode). Tokens = non-pad target tokens of the batch (EOS included), as ``train/tokens_per_s`` counts them.

Batch (``--batch``): ``bible`` (default) is a real training batch of the demo: ``TranslationDataModule`` on
``--data_dir`` (default ``data/bible_en_de``) with the demo tokenizer (``spm_bpe4000.en-de.model`` there; a missing
corpus/tokenizer is built as ``demo: bible`` does), ``--max_tokens`` (default 2048, the demo's) token-budget batches,
and the one whose number of target tokens is the median of the epoch (``--batch_index`` picks another);
``synthetic`` is random ids of shape ``--synthetic_shape B S T`` (default 64 x 32 x 32, about the median Bible batch)
with the demo's vocabulary size 4000. The JSON lines say which, with the shape.

Output (stdout), one JSON line per figure and arch:
``{"benchmark": "train_throughput", "figure": "tokens_per_s", "arch": ..., "ours": ..., "baseline": "bare_pytorch"
| "hf_marian", "baseline_value": ..., "ratio": ours/baseline, "goal": 0.95 | 1.0 | null, "meets_goal": ...,
"batch": ..., "batch_shape": [B, S, T], "ntokens": ..., "params_ours": ..., "params_baseline": ..., "runs_ours":
[...], "runs_baseline": [...], ...}``; goals: ours/bare >= 0.95 (both archs: the same network), ours/marian >= 1.0
(vanilla only: the same architecture family; PCformer evaluates each encoder block 3 times). A table goes to stderr.
Nothing is asserted.

Run (the real one, a few minutes on 2 CPU cores):

    python benchmarks/train_throughput.py     # both archs, 2 threads, 20 steps after 5 warm-up, 3 rounds
    python benchmarks/train_throughput.py --arch vanilla --steps 50 --threads 2

Smoke run (seconds): ``python benchmarks/train_throughput.py --batch synthetic --synthetic_shape 8 12 12 --steps 2
--warmup 1 --repeats 1 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from benchmarks._common import ARCHS, demo_sizes, marian_config  # noqa: E402
from torch import nn

BENCH = "train_throughput"
DEMO = demo_sizes()
GOALS = {("bare_pytorch", "vanilla"): 0.95, ("bare_pytorch", "pcformer"): 0.95, ("hf_marian", "vanilla"): 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--steps", type=int, default=20, help="measured updates per round (default 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="unmeasured updates before them (default 5; 0 puts Trainer set-up into the measured time of ours)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", choices=["bible", "synthetic"], default="bible")
    p.add_argument("--data_dir", default=str(ROOT / "data" / "bible_en_de"))
    p.add_argument("--tokenizer_path", default=None, help="default <data_dir>/spm_bpe4000.en-de.model")
    p.add_argument("--max_tokens", type=int, default=2048, help="token budget of the Bible batches (default 2048)")
    p.add_argument("--max_train_pairs", type=int, default=None, help="load only the first N training pairs")
    p.add_argument("--batch_index", type=int, default=None, help="which epoch-0 batch (default: median tokens)")
    p.add_argument("--synthetic_shape", nargs=3, type=int, default=[64, 32, 32], metavar=("B", "S", "T"))
    p.add_argument(
        "--vocab_size",
        type=int,
        default=4000,
        help="synthetic batches; for bible, the size of a tokenizer that has to be trained (default 4000)",
    )
    p.add_argument("--no_marian", action="store_true", help="skip the transformers baseline")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps >= 1, --warmup >= 0, --repeats >= 1")
    return args


# ---------------------------------------------------------------------------------------------------- the batch
def bible_batch(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real demo training batch and the special ids (see module docstring)."""
    from datamodules.translation import TranslationCollator, TranslationDataModule

    data_dir = Path(args.data_dir)
    tok_path = Path(args.tokenizer_path) if args.tokenizer_path else data_dir / "spm_bpe4000.en-de.model"
    ready = (data_dir / "train.en").is_file() and (data_dir / "train.de").is_file() and tok_path.is_file()
    dm = TranslationDataModule(
        data_dir=str(data_dir),
        tokenizer_path=str(tok_path),
        vocab_size=args.vocab_size,
        max_tokens=args.max_tokens,
        max_train_pairs=args.max_train_pairs,
        demo=None if ready else "bible",
    )
    tok = dm.tokenizer
    ds = dm.dataset("train")
    batches = list(dm.train_dataloader().batch_sampler)  # epoch 0, shuffled with the data seed
    ntok = [int(sum(int(ds.tgt_lengths[i]) for i in b)) for b in batches]
    if args.batch_index is None:
        order = sorted(range(len(batches)), key=lambda i: ntok[i])
        index = order[len(order) // 2]
    else:
        index = args.batch_index % len(batches)
    batch = TranslationCollator(tok.pad_id, tok.bos_id, tok.eos_id)([ds[i] for i in batches[index]])
    info = {
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "batch": f"bible (epoch-0 batch {index} of {len(batches)}, max_tokens {args.max_tokens})",
    }
    return batch, info


def synthetic_batch(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random ids, no padding, special ids as the demo tokenizer's (pad 0, unk 1, bos 2, eos 3)."""
    b, s, t = args.synthetic_shape
    g = torch.Generator().manual_seed(args.seed)
    v = args.vocab_size
    src = torch.randint(4, v, (b, s), generator=g)
    src[:, -1] = 3
    tgt = torch.randint(4, v, (b, t - 1), generator=g)
    prev = torch.cat([torch.full((b, 1), 2), tgt], 1)
    target = torch.cat([tgt, torch.full((b, 1), 3)], 1)
    batch = {
        "src_tokens": src,
        "src_lengths": torch.full((b,), s),
        "prev_output_tokens": prev,
        "target": target,
        "ntokens": b * t,
        "id": torch.arange(b),
    }
    return batch, {"vocab_size": v, "pad_id": 0, "bos_id": 2, "eos_id": 3, "batch": f"synthetic {b}x{s}x{t}"}


# ---------------------------------------------------------------------------------------------------- the models
def build_ours(arch: str, info: dict[str, Any], seed: int):
    from lit_models.pcformer import PCformerTranslation

    torch.manual_seed(seed)
    return PCformerTranslation(
        vocab_size=info["vocab_size"],
        pad_id=info["pad_id"],
        bos_id=info["bos_id"],
        eos_id=info["eos_id"],
        **DEMO,
        **ARCHS[arch],
    )


def build_marian(info: dict[str, Any], seed: int) -> nn.Module:
    from transformers import MarianMTModel

    torch.manual_seed(seed)
    cfg = marian_config(DEMO, info)
    return MarianMTModel(cfg)


def n_params(m: nn.Module) -> int:
    """Trainable parameters (Marian keeps its sinusoidal position tables as frozen parameters: not counted)."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- the loops
def time_lightning(module: Any, batch: dict[str, Any], warmup: int, steps: int) -> float:
    """Seconds for ``steps`` updates of ``Trainer.fit`` after ``warmup`` ones (end of update to end of update)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class _Stamps(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, b: Any, batch_idx: int) -> None:
            self.ends.append(time.perf_counter())

    stamps = _Stamps()
    n = warmup + steps
    t_start = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=n,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stamps],
        use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader([batch] * n, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    if len(stamps.ends) != n:
        raise RuntimeError(f"expected {n} updates, Lightning ran {len(stamps.ends)}")
    start = stamps.ends[warmup - 1] if warmup > 0 else t_start
    return stamps.ends[-1] - start


def time_bare(model: nn.Module, batch: dict[str, Any], warmup: int, steps: int, pad_id: int, hf: bool) -> float:
    """Seconds for ``steps`` updates of the plain loop after ``warmup`` ones (see module docstring (b), (c))."""
    from lit_models.seq2seq_eval import inverse_sqrt_lambda, label_smoothed_nll_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=DEMO["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_lambda(DEMO["lr"], DEMO["warmup_steps"], 1e-7))
    src, prev, target = batch["src_tokens"], batch["prev_output_tokens"], batch["target"]
    attn = src.ne(pad_id)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        if hf:
            logits = model(input_ids=src, attention_mask=attn, decoder_input_ids=prev, use_cache=False).logits
        else:
            logits = model(src, prev)
        loss, _ = label_smoothed_nll_loss(logits, target, DEMO["label_smoothing"], ignore_index=pad_id)
        ntokens = int(target.ne(pad_id).sum())
        (loss / ntokens).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- main
def _quiet() -> None:
    import lightning  # noqa: F401  (creates its loggers, silenced below)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    warnings.filterwarnings("ignore", ".*validation_step.*but have no.*val_dataloader.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in list(logging.root.manager.loggerDict) + ["lightning.pytorch", "lightning.fabric"]:
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints JSON lines (stdout) and a table (stderr). Returns the lines as dicts."""
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    batch, info = bible_batch(args) if args.batch == "bible" else synthetic_batch(args)
    pad = info["pad_id"]
    ntokens = int(batch["target"].ne(pad).sum())
    shape = [int(batch["src_tokens"].size(0)), int(batch["src_tokens"].size(1)), int(batch["target"].size(1))]
    print(
        f"[{BENCH}] batch: {info['batch']}, shape B x S x T = {shape}, {ntokens} target tokens, "
        f"{args.threads} threads, {args.warmup} warm-up + {args.steps} measured updates x {args.repeats} rounds",
        file=sys.stderr,
        flush=True,
    )

    modules = {arch: build_ours(arch, info, args.seed) for arch in args.arch}
    marian = None if args.no_marian else build_marian(info, args.seed)
    tps: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for arch, module in modules.items():
            dt = time_lightning(module, batch, args.warmup, args.steps)
            tps.setdefault(f"ours/{arch}", []).append(ntokens * args.steps / dt)
            dt = time_bare(module.model, batch, args.warmup, args.steps, pad, hf=False)
            tps.setdefault(f"bare/{arch}", []).append(ntokens * args.steps / dt)
        if marian is not None:
            dt = time_bare(marian, batch, args.warmup, args.steps, pad, hf=True)
            tps.setdefault("marian", []).append(ntokens * args.steps / dt)
        print(
            f"[{BENCH}] round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
            file=sys.stderr,
            flush=True,
        )

    common = {
        "batch": info["batch"].split(" (")[0],
        "batch_detail": info["batch"],
        "batch_shape": shape,
        "ntokens": ntokens,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    lines: list[dict[str, Any]] = []
    for arch, module in modules.items():
        ours = statistics.median(tps[f"ours/{arch}"])
        baselines = [("bare_pytorch", tps[f"bare/{arch}"], n_params(module.model))]
        if marian is not None:
            baselines.append(("hf_marian", tps["marian"], n_params(marian)))
        for name, runs, params in baselines:
            value = statistics.median(runs)
            goal = GOALS.get((name, arch))
            ratio = ours / value
            lines.append(
                {
                    "benchmark": BENCH,
                    "figure": "tokens_per_s",
                    "arch": arch,
                    "ours": ours,
                    "baseline": name,
                    "baseline_value": value,
                    "ratio": ratio,
                    "goal": goal,
                    "meets_goal": None if goal is None else ratio >= goal,
                    "params_ours": n_params(module),
                    "params_baseline": params,
                    "runs_ours": tps[f"ours/{arch}"],
                    "runs_baseline": runs,
                    "ms_per_step_ours": 1000 * ntokens / ours,
                    "ms_per_step_baseline": 1000 * ntokens / value,
                    **common,
                }
            )
    for line in lines:
        print(json.dumps(line), flush=True)
    rows = [
        (
            f"{'arch':10} {'baseline':14} {'ours tok/s':>12} {'base tok/s':>12} {'ratio':>7} {'goal':>6} "
            f"{'ms/step ours':>13} {'ms/step base':>13}"
        )
    ]
    for ln in lines:
        rows.append(
            f"{ln['arch']:10} {ln['baseline']:14} {ln['ours']:12.0f} {ln['baseline_value']:12.0f} "
            f"{ln['ratio']:7.3f} {('-' if ln['goal'] is None else ln['goal']):>6} "
            f"{ln['ms_per_step_ours']:13.1f} {ln['ms_per_step_baseline']:13.1f}"
        )
    print(
        f"\n== {BENCH} ({info['batch']}, B x S x T = {shape}, {ntokens} target tokens) ==\n" + "\n".join(rows),
        file=sys.stderr,
        flush=True,
    )
    return lines


if __name__ == "__main__":
    main()
