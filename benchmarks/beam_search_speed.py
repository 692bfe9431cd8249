"""Beam-search decoding speed: our ``lit_models.nn.beam_search.beam_search`` vs ``MarianMTModel.generate``.

What is measured: sentences per second (and output tokens per second) of batched beam search on the CPU, for our
``PCformerTranslation`` network (``--arch vanilla`` and/or ``pcformer``, demo sizes: d 128, FFN 256, 4 heads, 3-3
layers, 4000-piece vocabulary; random weights) and for a ``MarianMTModel`` built offline from a ``MarianConfig``
with the same dimensions (shared and tied embeddings, ReLU, 1024 positions, SDPA attention), on the same source
batches: ``--num_sentences`` sentences of the Bible demo test split (``--source bible``, encoded with the demo
tokenizer, EOS appended as in training) or random ids with lengths 10-50 (``--source synthetic``), sorted by length
(longest first, as fairseq does) and cut into batches of ``--batch_size``. Both sides: ``--beam_size`` beams (4),
length penalty ``--length_penalty`` (0.6, fairseq's ``sum log p / |y|**lp`` with |y| counting EOS, which is also
what ``generate`` divides by for encoder-decoder models), early stopping (a sentence stops once ``beam_size``
hypotheses have finished: fairseq's rule, ``early_stopping=True`` in ``generate``), pad never generated
(``suppress_tokens=[pad]`` in ``generate``), KV caches on, eval mode, ``torch.inference_mode``. One batch is
decoded by each side first as a warm-up; then ``--repeats`` interleaved rounds, the median is reported.

Fair lengths (``--length_mode``): random models stop at random lengths, so by default (``fixed``) both sides
produce exactly ``--output_len`` tokens plus EOS for every sentence (default 32, the mean reference length of the
Bible test split in demo pieces): EOS is suppressed before that length and forced at it. Ours: ``max_len_a=0,
max_len_b=output_len`` (EOS forced at the budget, fairseq) plus a thin wrapper around the model that sets the EOS
logit to -inf while fewer than ``output_len`` tokens have been produced; generate: ``min_new_tokens=output_len,
max_new_tokens=output_len + 1, forced_eos_token_id=eos``. Both then run exactly ``output_len + 1`` decoder steps
per batch and the JSON lines show the measured average lengths side by side. ``natural`` lets each model stop on
its own: ours with ``max_len_a * |x| + max_len_b`` per sentence (1.2, 10), generate with
``max_new_tokens = int(max_len_a * max|x| + max_len_b) + 1`` per batch (it has no per-sentence budget) and forced
EOS at it; the lengths then differ and ``output_tokens_per_s`` is the fairer figure.

``--checkpoint PATH``: decode with a trained PCformerTranslation checkpoint (e.g. ``runs/.../averaged.ckpt``)
instead of random weights (``--arch`` is then ignored; ``--tokenizer_path`` must be the tokenizer it was trained
with) and ``--length_mode natural`` by default; the Marian baseline gets the checkpoint's dimensions but stays random,
so compare the lengths reported beside the speeds.

Output (stdout): per arch two JSON lines, ``figure`` ``sentences_per_s`` and ``output_tokens_per_s``:
``{"benchmark": "beam_search_speed", "figure": ..., "arch": ..., "ours": ..., "baseline": "hf_marian_generate",
"baseline_value": ..., "ratio": ours/baseline, "avg_output_len_ours": ..., "avg_output_len_baseline": ...,
"length_mode": ..., "beam_size": ..., "batch_size": ..., "num_sentences": ..., ...}`` (lengths count EOS).
A table goes to stderr. Nothing is asserted.

Run (the real one, about a minute or two on 2 CPU cores):

    python benchmarks/beam_search_speed.py
    python benchmarks/beam_search_speed.py --checkpoint runs/bench_pcformer/pcformer/seed1/checkpoints/averaged.ckpt

Smoke run: ``python benchmarks/beam_search_speed.py --source synthetic --num_sentences 4 --batch_size 2
--output_len 4 --repeats 1 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
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
from torch import Tensor, nn

BENCH = "beam_search_speed"
DEMO = demo_sizes()
SPECIALS = {"pad_id": 0, "bos_id": 2, "eos_id": 3}  # the demo SentencePiece model's ids (synthetic source)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--checkpoint", default=None, help="a trained PCformerTranslation checkpoint (.ckpt)")
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--length_penalty", type=float, default=0.6)
    p.add_argument("--batch_size", type=int, default=32, help="sentences per batch (default 32)")
    p.add_argument("--num_sentences", type=int, default=128, help="sentences per round (default 128)")
    p.add_argument(
        "--length_mode",
        choices=["fixed", "natural"],
        default=None,
        help="fixed (default without --checkpoint) or natural (default with it)",
    )
    p.add_argument("--output_len", type=int, default=32, help="fixed mode: tokens before EOS (default 32)")
    p.add_argument("--max_len_a", type=float, default=1.2, help="natural mode (default 1.2)")
    p.add_argument("--max_len_b", type=int, default=10, help="natural mode (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds, median reported (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--source", choices=["bible", "synthetic"], default="bible")
    p.add_argument("--data_dir", default=str(ROOT / "data" / "bible_en_de"))
    p.add_argument("--tokenizer_path", default=None, help="default <data_dir>/spm_bpe4000.en-de.model")
    p.add_argument("--vocab_size", type=int, default=4000, help="synthetic source, random models (default 4000)")
    p.add_argument("--no_marian", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.length_mode is None:
        args.length_mode = "natural" if args.checkpoint else "fixed"
    if min(args.beam_size, args.batch_size, args.num_sentences, args.repeats, args.output_len) < 1:
        p.error("--beam_size, --batch_size, --num_sentences, --repeats and --output_len must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------- sources
def load_sources(args: argparse.Namespace, max_positions: int) -> tuple[list[list[int]], dict[str, Any]]:
    """Token id lists (EOS appended) of the source sentences, and vocab/special ids."""
    if args.source == "synthetic":
        g = torch.Generator().manual_seed(args.seed)
        lens = torch.randint(10, 51, (args.num_sentences,), generator=g).tolist()
        ids = [torch.randint(4, args.vocab_size, (n - 1,), generator=g).tolist() + [SPECIALS["eos_id"]] for n in lens]
        return ids, dict(vocab_size=args.vocab_size, **SPECIALS, source="synthetic")
    from datamodules.tokenization import SubwordTokenizer

    tok_path = Path(args.tokenizer_path) if args.tokenizer_path else Path(args.data_dir) / "spm_bpe4000.en-de.model"
    src_file = Path(args.data_dir) / "test.en"
    if not tok_path.is_file() or not src_file.is_file():
        raise FileNotFoundError(
            f"--source bible needs {src_file} and {tok_path}: build the demo data first (python train.py fit --config "
            "configs/pcformer/demo_bible_en_de.yaml --trainer.max_steps 1, or the datamodule with demo: bible), or "
            "use --source synthetic"
        )
    tok = SubwordTokenizer.load(tok_path)
    lines = [ln.strip() for ln in src_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = [lines[i % len(lines)] for i in range(args.num_sentences)]  # cycle when more are asked for
    ids = [x[: max_positions - 1] + [tok.eos_id] for x in tok.encode_batch(lines)]
    info = {
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "source": f"bible test split ({src_file})",
    }
    return ids, info


def make_batches(ids: list[list[int]], batch_size: int, pad_id: int) -> list[Tensor]:
    ids = sorted(ids, key=len, reverse=True)
    batches = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        t = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
        for j, row in enumerate(chunk):
            t[j, : len(row)] = torch.tensor(row)
        batches.append(t)
    return batches


# ---------------------------------------------------------------------------------------------------- models
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


def load_checkpoint(path: str):
    """Rebuild PCformerTranslation from a Lightning checkpoint's hyper-parameters and load its state_dict."""
    from lit_models.pcformer import PCformerTranslation

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters", {})).items() if not k.startswith("_")}
    hp.pop("tokenizer", None)
    module = PCformerTranslation(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module


def marian_dims(module: Any) -> dict[str, Any]:
    hp = module.hparams
    return {
        "d_model": hp.d_model,
        "ffn_dim": hp.ffn_dim,
        "n_heads": hp.n_heads,
        "encoder_layers": hp.encoder_layers,
        "decoder_layers": hp.decoder_layers,
        "dropout": hp.dropout,
        "attention_dropout": hp.attention_dropout,
        "activation_dropout": hp.activation_dropout,
        "max_positions": hp.max_positions,
    }


def build_marian(dims: dict[str, Any], info: dict[str, Any], seed: int) -> nn.Module:
    from transformers import GenerationConfig, MarianMTModel

    torch.manual_seed(seed)
    cfg = marian_config(dims, info)
    model = MarianMTModel(cfg).eval()
    model.generation_config = GenerationConfig(
        pad_token_id=info["pad_id"],
        eos_token_id=info["eos_id"],
        decoder_start_token_id=info["bos_id"],
        bos_token_id=info["bos_id"],
        forced_eos_token_id=info["eos_id"],
    )
    return model


class MinLengthModel(nn.Module):
    """Our decoding protocol around a model, with the EOS logit at -inf until ``min_len`` tokens were produced.

    ``decode`` is called once per step after feeding one token; after the call the cache holds ``n`` positions
    (BOS + n - 1 outputs), so the token being chosen is output number ``n``: EOS is allowed only from ``n > min_len``.
    """

    def __init__(self, model: nn.Module, eos_id: int, min_len: int) -> None:
        super().__init__()
        self.model, self.eos_id, self.min_len = model, eos_id, min_len
        self.max_positions = getattr(model, "max_positions", None)

    def encode(self, src_tokens: Tensor) -> Any:
        return self.model.encode(src_tokens)

    def reorder_encoder_out(self, enc: Any, new_order: Tensor) -> Any:
        return self.model.reorder_encoder_out(enc, new_order)

    def init_cache(self) -> Any:
        return self.model.init_cache()

    def reorder_cache(self, cache: Any, new_order: Tensor) -> Any:
        return self.model.reorder_cache(cache, new_order)

    def decode(self, prev_tokens: Tensor, enc: Any, cache: Any) -> Tensor:
        logits = self.model.decode(prev_tokens, enc, cache)
        if self.model.decoder.cached_len(cache) <= self.min_len:
            logits[..., self.eos_id] = float("-inf")
        return logits


# ---------------------------------------------------------------------------------------------------- decoding
def run_ours(
    model: nn.Module, batches: list[Tensor], info: dict[str, Any], args: argparse.Namespace
) -> tuple[float, list[int]]:
    """Seconds and output lengths (EOS counted) of our beam search over ``batches``."""
    from lit_models.nn.beam_search import beam_search

    if args.length_mode == "fixed":
        model = MinLengthModel(model, info["eos_id"], args.output_len)
        a, b = 0.0, args.output_len
    else:
        a, b = args.max_len_a, args.max_len_b
    lengths: list[int] = []
    t0 = time.perf_counter()
    for src in batches:
        hyps = beam_search(
            model,
            src,
            bos_id=info["bos_id"],
            eos_id=info["eos_id"],
            pad_id=info["pad_id"],
            beam_size=args.beam_size,
            length_penalty=args.length_penalty,
            max_len_a=a,
            max_len_b=b,
        )
        lengths += [len(h[0].tokens) + 1 if h else 0 for h in hyps]
    return time.perf_counter() - t0, lengths


def run_marian(
    model: nn.Module, batches: list[Tensor], info: dict[str, Any], args: argparse.Namespace
) -> tuple[float, list[int]]:
    """Seconds and output lengths (EOS counted, decoder start not) of ``generate`` over ``batches``."""
    pad, eos = info["pad_id"], info["eos_id"]
    lengths: list[int] = []
    t0 = time.perf_counter()
    for src in batches:
        mask = src.ne(pad)
        if args.length_mode == "fixed":
            lim = {"min_new_tokens": args.output_len, "max_new_tokens": args.output_len + 1}
        else:
            lim = {"max_new_tokens": int(args.max_len_a * int(mask.sum(1).max()) + args.max_len_b) + 1}
        with torch.inference_mode():
            out = model.generate(
                input_ids=src,
                attention_mask=mask,
                num_beams=args.beam_size,
                num_return_sequences=1,
                length_penalty=args.length_penalty,
                early_stopping=True,
                do_sample=False,
                use_cache=True,
                suppress_tokens=[pad],
                forced_eos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=pad,
                decoder_start_token_id=info["bos_id"],
                **lim,
            )
        for row in out[:, 1:].tolist():
            n = row.index(eos) + 1 if eos in row else sum(t != pad for t in row)
            lengths.append(n)
    return time.perf_counter() - t0, lengths


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints JSON lines (stdout) and a table (stderr). Returns the lines as dicts."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*generation flags are not valid.*")
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        module = load_checkpoint(args.checkpoint)
        archs = {f"checkpoint:{module.hparams.arch}": module}
        max_pos = int(module.hparams.max_positions)
    else:
        archs, max_pos = {}, DEMO["max_positions"]
    ids, info = load_sources(args, max_pos)
    if args.checkpoint:
        if int(module.hparams.vocab_size) != info["vocab_size"]:
            raise ValueError(
                f"the checkpoint's vocab_size {module.hparams.vocab_size} differs from the tokenizer's "
                f"{info['vocab_size']}: pass --tokenizer_path of the tokenizer the checkpoint was trained with"
            )
        info.update(
            pad_id=int(module.hparams.pad_id), bos_id=int(module.hparams.bos_id), eos_id=int(module.hparams.eos_id)
        )
        dims = marian_dims(module)
    else:
        archs = {arch: build_ours(arch, info, args.seed) for arch in args.arch}
        dims = dict(DEMO)
    models = {name: m.model.eval() for name, m in archs.items()}
    marian = None if args.no_marian else build_marian(dims, info, args.seed)
    batches = make_batches(ids, args.batch_size, info["pad_id"])
    n_sent = sum(b.size(0) for b in batches)
    print(
        f"[{BENCH}] {n_sent} sentences ({info['source']}), {len(batches)} batches of <= {args.batch_size}, beam "
        f"{args.beam_size}, lenpen {args.length_penalty}, length mode {args.length_mode}"
        + (f" (output_len {args.output_len})" if args.length_mode == "fixed" else "")
        + f", {args.threads} threads",
        file=sys.stderr,
        flush=True,
    )

    # warm-up: one batch per side
    for model in models.values():
        run_ours(model, batches[:1], info, args)
    if marian is not None:
        run_marian(marian, batches[:1], info, args)

    secs: dict[str, list[float]] = {}
    lens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for name, model in models.items():
            dt, ln = run_ours(model, batches, info, args)
            secs.setdefault(name, []).append(dt)
            lens[name] = ln
        if marian is not None:
            dt, ln = run_marian(marian, batches, info, args)
            secs.setdefault("marian", []).append(dt)
            lens["marian"] = ln
        print(
            f"[{BENCH}] round {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {n_sent / v[-1]:.2f} sent/s" for k, v in secs.items()),
            file=sys.stderr,
            flush=True,
        )

    common = {
        "length_mode": args.length_mode,
        "output_len": args.output_len if args.length_mode == "fixed" else None,
        "beam_size": args.beam_size,
        "length_penalty": args.length_penalty,
        "batch_size": args.batch_size,
        "num_sentences": n_sent,
        "threads": args.threads,
        "repeats": args.repeats,
        "source": info["source"],
        "checkpoint": args.checkpoint,
    }
    lines: list[dict[str, Any]] = []
    for name in models:
        t_ours = statistics.median(secs[name])
        avg_ours = statistics.fmean(lens[name])
        base = {
            "baseline": "hf_marian_generate",
            "baseline_value": None,
            "ratio": None,
            "avg_output_len_baseline": None,
        }
        for figure, num in (("sentences_per_s", n_sent), ("output_tokens_per_s", None)):
            ours = (num if num is not None else sum(lens[name])) / t_ours
            line = {
                "benchmark": BENCH,
                "figure": figure,
                "arch": name,
                "ours": ours,
                **base,
                "avg_output_len_ours": avg_ours,
                "seconds_ours": secs[name],
            }
            if marian is not None:
                t_m = statistics.median(secs["marian"])
                value = (num if num is not None else sum(lens["marian"])) / t_m
                line.update(
                    baseline_value=value,
                    ratio=ours / value,
                    avg_output_len_baseline=statistics.fmean(lens["marian"]),
                    seconds_baseline=secs["marian"],
                )
            if args.length_mode == "fixed":
                want = args.output_len + 1
                line["lengths_match"] = all(n == want for n in lens[name]) and (
                    marian is None or all(n == want for n in lens["marian"])
                )
            line.update(common)
            lines.append(line)
    for line in lines:
        print(json.dumps(line), flush=True)
    rows = [f"{'arch':22} {'figure':20} {'ours':>10} {'marian':>10} {'ratio':>7} {'len ours':>9} {'len marian':>11}"]
    for ln in lines:

        def f(v: Any, w: int, spec: str = ".2f") -> str:
            return ("-" if v is None else format(v, spec)).rjust(w)

        rows.append(
            f"{ln['arch']:22} {ln['figure']:20} {f(ln['ours'], 10)} {f(ln['baseline_value'], 10)} "
            f"{f(ln['ratio'], 7, '.3f')} {f(ln['avg_output_len_ours'], 9, '.1f')} "
            f"{f(ln['avg_output_len_baseline'], 11, '.1f')}"
        )
    print(
        f"\n== {BENCH} (beam {args.beam_size}, batch {args.batch_size}, {n_sent} sentences, {args.length_mode} "
        f"lengths) ==\n" + "\n".join(rows),
        file=sys.stderr,
        flush=True,
    )
    return lines


if __name__ == "__main__":
    main()
