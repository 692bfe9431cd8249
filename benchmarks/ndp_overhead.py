"""NDP overhead: training-step time of NDP vs NTP, and the cost of building the NDP count tables.

The issue's benchmark (spec ``shared/methods/ndp.md`` sections 4, 9 and 10, "Benchmarks": ``ndp_step_overhead.py`` and
``ndp_build_tables.py`` in one script). Everything comes from ``configs/ndp/translation_demo.yaml``: the model (the
tiny random Llama of its ``model.init_args``: 2 layers, d 128, 4 query / 2 KV heads, SmolLM2's 49,152-token
vocabulary, float32), the data (:class:`datamodules.ndp.NDPInstructionDataModule` on the offline ``bible_multiref``
demo: German verses with two English answers, chat template, ``max_length`` 256, length-grouped batches,
``min_prefix`` 1, ``hash128`` tables) and the optimisation (AdamW, lr 1e-3, warm-up 0.05, cosine, clipping 1.0,
``precision 32-true``). ``--max-train`` is the demo's number of training verses (each gives two records, WEB and KJV).

**Part ``step``** (``--part step``). Three arms train the same model (same seeded initialisation) on the SAME batches
(same sampler seed and epoch, so the same examples in the same order; the JSON lines carry a checksum of every
measured batch's ``input_ids`` to show it), each under ``lightning.Trainer.fit(module, datamodule=dm)`` exactly like
a real run (no logger, checkpoints or validation; ``max_epochs -1``) for ``--warmup`` unmeasured and then ``--steps``
measured updates:

- ``ntp``: :class:`lit_models.ndp.NextDistributionLM` ``target: ntp`` on ``target: ntp`` batches (what the NTP
  baseline run pays: plain collation, one-hot cross-entropy);
- ``ndp_sparse``: ``target: ndp`` on ``target: ndp`` batches: :class:`datamodules.ndp.NDPCollator` looks up every
  example's count rows and concatenates them, the module turns counts into rows (softmax over raw counts, mixed
  0.8/0.2) and computes :func:`lit_models.nn.soft_ce.sparse_soft_cross_entropy` plus its logged statistics;
- ``ndp_dense``: as ``ndp_sparse``, but the collator also materialises the mixed target rows as a dense float32
  ``[P, V]`` tensor on the CPU (:func:`lit_models.nn.count_targets.to_dense`), as the official collator does, which
  travels with the batch, and the loss is :func:`lit_models.nn.soft_ce.dense_soft_cross_entropy` against it
  (spec pitfall 1; shown only to demonstrate it).

Time is wall clock between the ends of consecutive updates (CUDA synchronised), so it includes the DataLoader and the
collator (table lookup, count concatenation, dense materialisation), the host-to-device copy, forward, loss, backward,
clipping, AdamW, the scheduler and Lightning's loop. Reported per arm: ``s_per_step`` (measured time / ``--steps``:
the arms see the same batches, so this is the fair mean; the per-update median is also given), ``collate_ms`` (mean
time inside the collate function per measured batch), ``peak_train_mem_mb`` (memory added by training over the
moment it starts: CUDA ``max_memory_allocated`` or CPU peak RSS after resetting ``VmHWM``,
``benchmarks.sft_throughput.MemProbe``), the mean prediction positions P per batch and the dense target bytes
``P x V x 4`` per batch. The ratio of every arm to ``ntp`` is printed; the issue's goal is NDP-sparse <= 1.05 x NTP
and the spec's acceptance line is <= 1.10 x. Every arm runs in a fresh subprocess by default (``--inprocess``: in
this process, for smoke runs; CPU memory figures then less trustworthy); ``--repeats`` interleaves rounds and reports
medians (single runs on a shared machine vary by about 10%).

**Part ``build``** (``--part build``). :func:`datamodules.ndp_tables.build_tables` on the tokenised training split
(the exact ``input_ids``/spans a run trains on), with both backends (``hash128``, ``trie``), on two data sets:

- ``demo``: the training split itself;
- ``demo_x<R>`` (``--replicate`` R, default 10): R copies of it, copy ``c = 0..R-1`` with every token id ``t`` of
  every example (template, prompt and answer) replaced by ``(t + c * floor(V / R)) mod V``. The shift is a bijection,
  so each copy has the demo's lengths, spans and prefix structure; as every example starts with the same token
  (``<|im_start|>``) and the copies start with different ids, no full prefix is shared between copies: the
  supervised table has exactly R times the demo's keys and entries and the same ``frac_multi_sup``. Answer-only (CLM)
  prefixes may coincide across copies (mostly one-token prefixes), so the CLM table grows a little less than R x.
  ``n_positions`` and ``n_tokens`` are exactly R x.

Every (data set, backend) build runs in a fresh subprocess (``--inprocess``: here). Reported: ``build_s`` (wall clock
of ``build_tables``), ``tokens_per_s_count`` / ``tokens_per_s_lookup`` (its stats: pass 1 over training tokens, pass
2), ``build_mem_added_mb`` (peak RSS added by the build over its start, ``VmHWM`` reset) and ``peak_rss_mb`` (the
process's high-water mark, Python and imports included), keys and entries of both tables, ``frac_multi_sup`` /
``frac_multi_clm``, ``targets_npz_bytes`` (the saved ``targets.npz``), ``bytes_per_position`` (npz bytes /
``n_positions``, i.e. per stored prediction token) and ``dense_bytes`` = ``n_positions x V x 4`` (what the official
dense collator would hold for the same positions), and ``arrays_sha256`` (a hash of the seven CSR arrays: equal for
both backends unless a 128-bit hash collides). ``hash128`` lines compare with ``trie`` (the exact backend), the
``npz`` lines with the dense bytes, and the ``growth`` lines the replicated build with the demo build of the same
backend (ratio / R < 1: sub-linear). The ``build_s`` lines of the demo also carry the spec's target (under 60 s on one
core) as ``spec_target`` / ``meets_spec_target``.

Output (stdout, JSON lines only), one line per figure: ``figure`` (e.g. ``s_per_step_ndp_sparse``,
``build_s_demo_hash128``, ``build_growth_trie``), ``ours``, ``baseline``, ``baseline_value``, ``ratio`` (with
``ratio_definition``), ``goal`` / ``meets_goal`` (and for the step time ``acceptance`` / ``meets_acceptance``), and
the run's settings and full result. A table goes to stderr. Nothing is asserted.

Run (the real one). On 2 shared CPU cores with 2 threads an update of the demo model at batch 8 takes about
0.15-0.3 s, so the step part (3 arms x (5 + 30) updates, each arm a subprocess that tokenises the 6,000 records
first) takes about 2 minutes; the build part (4 builds, the largest 7.6 M tokens) about 1 minute:

    python benchmarks/ndp_overhead.py                                 # both parts, 3,000 verses, x10 replication
    python benchmarks/ndp_overhead.py --part step --steps 50 --repeats 3
    python benchmarks/ndp_overhead.py --part step --device cuda --batch-size 32

Smoke run (seconds): ``python benchmarks/ndp_overhead.py --steps 2 --warmup 1 --max-train 16 --replicate 2
--threads 1 --inprocess --data-dir /tmp/ndp_bench_data --tables-dir /tmp/ndp_bench_tables``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
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

import numpy as np
import torch
import yaml

from benchmarks.sft_throughput import MemProbe, Stamps, quiet, spawn_worker, strict_json

BENCH = "ndp_overhead"
CONFIG = ROOT / "configs" / "ndp" / "translation_demo.yaml"
ARMS = ("ntp", "ndp_sparse", "ndp_dense")
BACKENDS = ("hash128", "trie")
#: The issue's goal and the spec's acceptance line for NDP-sparse step time / NTP step time.
GOAL = 1.05
ACCEPTANCE = 1.10
#: The spec's target for building the Bible demo tables (seconds, one core).
BUILD_TARGET_S = 60.0
DEFAULT_MAX_TRAIN = 3000
DEFAULT_MAX_EVAL = 150


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["step", "build", "both"], default="both")
    p.add_argument("--config", default=str(CONFIG), help="the NDP demo config (default translation_demo.yaml)")
    p.add_argument("--max-train", type=int, default=DEFAULT_MAX_TRAIN,
                   help=f"training verses of the bible_multiref demo, 2 records each (default {DEFAULT_MAX_TRAIN})")
    p.add_argument("--data-dir", default=None,
                   help="root of the demo data (default: data/instruction, the config's, for the default size; "
                   "data/instruction/ndp_bench_train<N> otherwise)")
    p.add_argument("--tables-dir", default=None,
                   help="where the run's NDP tables live (default: the project cache, keyed by the data)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--inprocess", action="store_true", help="run every arm and build in this process (smoke runs)")
    s = p.add_argument_group("step part")
    s.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    s.add_argument("--steps", type=int, default=30, help="measured updates (default 30)")
    s.add_argument("--warmup", type=int, default=5, help="unmeasured updates before them (default 5, at least 1)")
    s.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the config's, 8)")
    s.add_argument("--repeats", type=int, default=1, help="interleaved rounds of all arms, medians reported")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--seed", type=int, default=0, help="torch seed of the model initialisation (default 0)")
    b = p.add_argument_group("build part")
    b.add_argument("--replicate", type=int, default=10, help="copies in the replicated data set (default 10)")
    b.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of hash128,trie")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [a for a in args.arm_list if a not in ARMS] + [b for b in args.backend_list if b not in BACKENDS]
    if bad or not args.arm_list or not args.backend_list or len(set(args.arm_list)) != len(args.arm_list):
        p.error(f"--arms must name distinct arms of {list(ARMS)} and --backends backends of {list(BACKENDS)}; "
                f"got {args.arms!r}, {args.backends!r}")
    if min(args.steps, args.warmup, args.repeats, args.max_train, args.threads) < 1:
        p.error("--steps, --warmup, --repeats, --max-train and --threads must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.replicate < 2:
        p.error(f"--replicate must be >= 2, got {args.replicate}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def resolve_device(args: argparse.Namespace) -> torch.device:
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def data_dir(args: argparse.Namespace) -> Path:
    """The demo root: ``--data-dir``, else the config's ``data/instruction`` for the default size (the demo built by a
    real run is reused), else ``data/instruction/ndp_bench_train<N>`` (the demo builder refuses a directory built
    with other arguments)."""
    if args.data_dir:
        return Path(args.data_dir)
    base = ROOT / "data" / "instruction"
    return base if args.max_train == DEFAULT_MAX_TRAIN else base / f"ndp_bench_train{args.max_train}"


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """``{"model": model init_args, "data": data init_args, "trainer": trainer section}`` of ``--config``."""
    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    return {"model": dict(config["model"]["init_args"]), "data": dict(config["data"]["init_args"]),
            "trainer": dict(config.get("trainer") or {})}


# ---------------------------------------------------------------------------------------------------- data
class TimedCollate:
    """``collate_fn`` wrapper: records, per batch, the seconds spent inside ``inner`` and what the batch holds
    (prediction positions, non-pad tokens, a checksum of ``input_ids``)."""

    def __init__(self, inner: Any, log: list[dict[str, Any]]) -> None:
        self.inner = inner
        self.log = log

    def __call__(self, samples: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.inner(samples)
        dt = time.perf_counter() - t0
        ids = batch["input_ids"]
        self.log.append({
            "s": dt,
            "positions": int(batch["labels"][:, 1:].ne(-100).sum()),
            "tokens": int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(ids.numel()),
            "checksum": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        })
        return batch


class DenseTargets:
    """``collate_fn`` wrapper that adds ``dense_target`` float32 ``[P, V]``: the mixed NDP target rows of the batch
    materialised on the CPU, as the official collator does (spec pitfall 1). Same transform and mixing as the model
    (:func:`~lit_models.nn.count_targets.counts_to_rows`, :func:`~lit_models.nn.count_targets.mix_rows`)."""

    def __init__(self, inner: Any, vocab_size: int, transform: str, temperature: float, zero_prob: float,
                 mix_ratio: float) -> None:
        self.inner = inner
        self.vocab_size = vocab_size
        self.kw = {"transform": transform, "temperature": temperature, "zero_prob": zero_prob}
        self.mix_ratio = mix_ratio

    def __call__(self, samples: Any) -> dict[str, Any]:
        from lit_models.nn.count_targets import counts_to_rows, mix_rows, to_dense

        batch = self.inner(samples)
        rows = [counts_to_rows(batch[f"{t}_ptr"], batch[f"{t}_tok"], batch[f"{t}_cnt"], vocab_size=self.vocab_size,
                               **self.kw)[0] for t in ("sup", "clm")]
        batch["dense_target"] = to_dense(mix_rows(rows[0], rows[1], self.mix_ratio), self.vocab_size)
        return batch


def make_datamodule(args: argparse.Namespace, target: str, dense: dict[str, Any] | None = None) -> Any:
    """The config's :class:`~datamodules.ndp.NDPInstructionDataModule` (``--max-train`` verses, ``--data-dir``,
    ``--tables-dir``, ``--batch-size``, ``target``) whose training collate function is timed (:class:`TimedCollate`)
    and, with ``dense``, also materialises dense targets (:class:`DenseTargets`)."""
    from datamodules.ndp import NDPInstructionDataModule

    class BenchDataModule(NDPInstructionDataModule):
        def _with_targets(self, split: str, dataset: Any, collate: Any) -> tuple[Any, Any]:
            dataset, collate = super()._with_targets(split, dataset, collate)
            if split != "train":
                return dataset, collate
            if dense is not None:
                collate = DenseTargets(collate, vocab_size=self.vocab_size, **dense)
            return dataset, TimedCollate(collate, self.collate_log)

    kwargs = load_config(args)["data"]
    kwargs.update(data_dir=str(data_dir(args)), demo_kwargs={"max_train": args.max_train, "max_eval": DEFAULT_MAX_EVAL},
                  target=target, tables_dir=args.tables_dir)
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    with contextlib.redirect_stdout(sys.stderr):
        dm = BenchDataModule(**kwargs)
    dm.collate_log = []
    return dm


# ---------------------------------------------------------------------------------------------------- step part
def _bench_module(model_kwargs: dict[str, Any], tokenizer: Any) -> Any:
    """A :class:`~lit_models.ndp.NextDistributionLM` that keeps the last update's summed losses (``bench_last``) and
    uses the dense target when the batch carries one (``ndp_dense``)."""
    import torch.nn.functional as F

    from lit_models.ndp import NextDistributionLM
    from lit_models.nn.soft_ce import dense_soft_cross_entropy

    class BenchLM(NextDistributionLM):
        def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            if "dense_target" in batch:
                logits, targets = self._supervised_logits(batch)
                logits = logits.float()
                out = {"loss": dense_soft_cross_entropy(logits, batch["dense_target"]).sum(),
                       "loss_ntp": F.cross_entropy(logits, targets, reduction="sum").detach(),
                       "n": torch.tensor(float(targets.numel()))}
            else:
                out = super()._losses(batch)
            self.bench_last = {k: out[k].detach() for k in ("loss", "loss_ntp", "n")}
            return out

    return BenchLM(tokenizer=tokenizer, **model_kwargs)


def run_step_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm for ``--warmup + --steps`` updates under ``lightning.Trainer.fit`` (see module docstring);
    returns its timing, memory and per-update losses and batch checksums."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    cfg = load_config(args)
    device = resolve_device(args)
    model_kwargs = dict(cfg["model"])
    model_kwargs["target"] = "ntp" if arm == "ntp" else "ndp"
    dense = None
    if arm == "ndp_dense":
        dense = {"transform": model_kwargs.get("count_transform", "softmax"),
                 "temperature": float(model_kwargs.get("count_temperature", 1.0)),
                 "zero_prob": float(model_kwargs.get("zero_prob", 0.0)),
                 "mix_ratio": float(model_kwargs.get("mix_ratio", 0.8))}
    dm = make_datamodule(args, "ntp" if arm == "ntp" else "ndp", dense)
    n = args.warmup + args.steps
    with contextlib.redirect_stdout(sys.stderr):
        dm.prepare_data()
        dm.setup("fit")
        torch.manual_seed(args.seed)
        module = _bench_module(model_kwargs, dm.tokenizer)
    vocab = module.model.get_output_embeddings().out_features
    if vocab != dm.vocab_size:
        raise ValueError(f"{BENCH}: the model has {vocab} output tokens but the tokenizer {dm.vocab_size}")
    stamps = Stamps(device)
    loss_ntp: list[float] = []

    class _Clock(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            last = pl_module.bench_last
            count = max(float(last["n"]), 1.0)
            stamps.end(float(last["loss"]) / count)
            loss_ntp.append(float(last["loss_ntp"]) / count)

    clip = cfg["trainer"].get("gradient_clip_val", 1.0)
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_{arm}_") as tmp, contextlib.redirect_stdout(sys.stderr):
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=n, max_epochs=-1, precision="32-true", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=clip, callbacks=[_Clock()],
            use_distributed_sampler=False, default_root_dir=tmp,
        )
        probe = MemProbe(device)
        probe.start()
        trainer.fit(module, datamodule=dm)
        mem = probe.stop()
    log = dm.collate_log[:n]
    if len(log) < n:
        raise RuntimeError(f"{BENCH}: {arm} collated {len(log)} batches for {n} updates")
    timed = log[args.warmup:]
    mean_tokens = statistics.fmean(b["tokens"] for b in timed)
    res = stamps.result(args.warmup, args.steps, mean_tokens)  # tokens/s over the measured (varying) batches
    result = {
        "arm": arm, "device": str(device),
        "s_per_step": res["elapsed_s"] / args.steps,
        "s_per_step_median": res["s_per_step_median"],
        "elapsed_s": res["elapsed_s"], "tokens_per_s": res["tokens_per_s"], "cpu_busy": res["cpu_busy"],
        "minor_faults_per_step": res["minor_faults_per_step"],
        "collate_ms": 1000.0 * statistics.fmean(b["s"] for b in timed),
        "positions_per_batch": statistics.fmean(b["positions"] for b in timed),
        "tokens_per_batch": mean_tokens,
        "dense_target_bytes_per_batch": statistics.fmean(b["positions"] for b in timed) * dm.vocab_size * 4,
        "vocab_size": dm.vocab_size,
        "losses": res["losses"], "losses_ntp": loss_ntp,
        "batch_checksums": [b["checksum"] for b in timed],
        **mem,
    }
    del module, trainer, dm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gc.collect()
    return result


def _figure(part: str, figure: str, ours: float, baseline: str | None, base: float | None, definition: str | None,
            extra: dict[str, Any], goal: float | None = None, acceptance: float | None = None) -> dict[str, Any]:
    """One JSON line; ``ratio = ours / baseline_value`` (null without a baseline or when it is 0); goals are upper
    bounds on the ratio."""
    ratio = ours / base if base not in (None, 0) else None
    line: dict[str, Any] = {
        "benchmark": BENCH, "part": part, "figure": figure, "ours": ours, "baseline": baseline,
        "baseline_value": base, "ratio": ratio, "ratio_definition": definition,
        "goal": f"<= {goal:.2f}" if goal is not None else None,
        "meets_goal": (ratio <= goal) if goal is not None and ratio is not None else None,
    }
    if acceptance is not None:
        line["acceptance"] = f"<= {acceptance:.2f}"
        line["meets_acceptance"] = ratio <= acceptance if ratio is not None else None
    line.update(extra)
    return line


STEP_FIGURES = (("s_per_step", "s_per_step"), ("collate_ms", "collate_ms"),
                ("peak_train_mem_mb", "peak_train_mem_mb"))


def run_step(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """The step part: every arm on the same batches; returns its JSON lines and prints a table."""
    device = resolve_device(args)
    # tokenise once and build the tables (if missing) here, so that the arm subprocesses only load them
    dm = make_datamodule(args, "ndp")
    with contextlib.redirect_stdout(sys.stderr):
        dm.prepare_data()
        dm.setup("fit")
    print(f"[{BENCH}] step: {args.config} model on {device}, {args.threads} threads, batch {dm.batch_size}, "
          f"{len(dm.dataset('train'))} training examples; {args.warmup} + {args.steps} updates x {args.repeats}; "
          f"arms {args.arm_list}; {'in-process' if args.inprocess else 'subprocesses'}", file=sys.stderr, flush=True)
    batch_size = dm.batch_size
    del dm
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in args.arm_list}
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_") as tmp:
        for r in range(args.repeats):
            for arm in args.arm_list:
                t0 = time.perf_counter()
                if args.inprocess:
                    res = run_step_arm(arm, args)
                else:
                    res = spawn_worker(Path(__file__).resolve(), argv, {"kind": "step", "arm": arm},
                                       Path(tmp) / f"step-{arm}-{r}.json")
                runs[arm].append(res)
                print(f"[{BENCH}] round {r + 1}/{args.repeats} {arm:10}: {res['s_per_step']:.4f} s/step, collate "
                      f"{res['collate_ms']:.2f} ms, +{res['peak_train_mem_mb']:.1f} MB "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for arm, rs in runs.items():
        summary[arm] = dict(rs[0])
        for key in ("s_per_step", "s_per_step_median", "tokens_per_s", "cpu_busy", "collate_ms", "peak_train_mem_mb",
                    "mem_peak_mb"):
            summary[arm][key] = statistics.median(r[key] for r in rs)
        summary[arm]["rounds_s_per_step"] = [r["s_per_step"] for r in rs]
    common = {"config": str(args.config), "device": str(device), "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "max_train": args.max_train,
              "batch_size": batch_size, "seed": args.seed,
              "isolation": "inprocess" if args.inprocess else "subprocess"}
    base = summary.get("ntp")
    lines = []
    for arm in args.arm_list:
        res = summary[arm]
        for metric, key in STEP_FIGURES:
            has_base = base is not None and arm != "ntp"
            goal = GOAL if metric == "s_per_step" and arm == "ndp_sparse" else None
            acceptance = ACCEPTANCE if metric == "s_per_step" and arm == "ndp_sparse" else None
            lines.append(_figure(
                "step", f"{metric}_{arm}", res[key], "ntp" if has_base else None, base[key] if has_base else None,
                f"{arm}/ntp" if has_base else None,
                {"metric": metric, "arm": arm, "result": res, **common}, goal if has_base else None,
                acceptance if has_base else None))
    print(_step_table(args, summary), file=sys.stderr, flush=True)
    return lines


def _step_table(args: argparse.Namespace, summary: dict[str, dict[str, Any]]) -> str:
    base = summary.get("ntp")
    rows = [(f"\n== {BENCH} step: {args.warmup} + {args.steps} updates, {args.max_train} verses, {args.threads} threads "
            f"(median of {args.repeats} round(s)); goal ndp_sparse <= {GOAL:.2f} x ntp (issue), acceptance <= "
            f"{ACCEPTANCE:.2f} x (spec) =="),
            (f"{'arm':10} {'s/step':>8} {'x ntp':>7} {'median':>8} {'collate ms':>10} {'train MB':>9} "
            f"{'P/batch':>8} {'dense MB/batch':>14} {'loss first->last':>18}")]
    for arm, res in summary.items():
        ratio = f"{res['s_per_step'] / base['s_per_step']:7.3f}" if base else f"{'-':>7}"
        rows.append(f"{arm:10} {res['s_per_step']:8.4f} {ratio} {res['s_per_step_median']:8.4f} "
                    f"{res['collate_ms']:10.2f} {res['peak_train_mem_mb']:9.1f} {res['positions_per_batch']:8.1f} "
                    f"{res['dense_target_bytes_per_batch'] / 2**20:14.1f} "
                    f"{res['losses'][0]:8.4f}->{res['losses'][-1]:<8.4f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- build part
def replicate(input_ids: list[Any], spans: list[Any], copies: int, vocab_size: int) -> tuple[list[np.ndarray], list]:
    """``copies`` copies of the examples, copy ``c`` with every token id ``t`` replaced by ``(t + c * (V // copies))
    mod V`` (copy 0 is the data itself); spans are unchanged (see module docstring)."""
    shift = vocab_size // copies
    base = [np.asarray(x, dtype=np.int64) for x in input_ids]
    out_ids: list[np.ndarray] = []
    out_spans: list[Any] = []
    for c in range(copies):
        out_ids += [(x + c * shift) % vocab_size for x in base]
        out_spans += list(spans)
    return out_ids, out_spans


def _save_examples(path: Path, input_ids: list[Any], spans: list[Any]) -> None:
    """The tokenised split as flat arrays (read by the build workers without tokenising again)."""
    lens = np.array([len(x) for x in input_ids], dtype=np.int64)
    n_spans = np.array([len(s) for s in spans], dtype=np.int64)
    flat_spans = np.array([list(sp) for s in spans for sp in s], dtype=np.int64).reshape(-1, 2)
    np.savez(path, ids=np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids]), lens=lens,
             n_spans=n_spans, spans=flat_spans)


def _load_examples(path: Path) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
    with np.load(path) as z:
        ids, lens, n_spans, flat = z["ids"], z["lens"], z["n_spans"], z["spans"]
    ends = np.cumsum(lens)
    input_ids = [ids[e - n:e] for e, n in zip(ends, lens)]
    s_ends = np.cumsum(n_spans)
    spans = [[(int(a), int(b)) for a, b in flat[e - n:e]] for e, n in zip(s_ends, n_spans)]
    return input_ids, spans


def arrays_digest(tables: Any) -> str:
    """sha256 over the names and bytes of the seven CSR arrays of an :class:`~datamodules.ndp_tables.NDPTables`."""
    digest = hashlib.sha256()
    for name, arr in tables.arrays().items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def run_build_one(backend: str, copies: int, examples_file: Path, vocab_size: int, min_prefix: int) -> dict[str, Any]:
    """Build the tables of the examples in ``examples_file`` (replicated ``copies`` times when > 1) with ``backend``;
    returns the build's statistics, memory, sizes and the hash of its arrays."""
    from datamodules.ndp_tables import TARGETS_FILE, build_tables

    input_ids, spans = _load_examples(examples_file)
    if copies > 1:
        input_ids, spans = replicate(input_ids, spans, copies, vocab_size)
    gc.collect()
    probe = MemProbe(torch.device("cpu"))
    probe.start()
    t0 = time.perf_counter()
    tables = build_tables(input_ids, spans, vocab_size=vocab_size, min_prefix=min_prefix, backend=backend)
    seconds = time.perf_counter() - t0
    mem = probe.stop()
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_tables_") as tmp:
        tables.save(tmp, {"benchmark": BENCH, "backend": backend, "copies": copies})
        npz_bytes = (Path(tmp) / TARGETS_FILE).stat().st_size
    s = tables.stats
    n_pos = int(s["n_positions"])
    return {
        **{k: s[k] for k in ("n_examples", "n_positions", "n_tokens", "sup_keys", "clm_keys", "sup_entries",
                             "clm_entries", "frac_multi_sup", "frac_multi_clm", "tokens_per_s_count",
                             "tokens_per_s_lookup", "seconds_count", "seconds_lookup", "peak_rss_mb")},
        "trie_nodes": s.get("trie_nodes"),
        "backend": backend, "copies": copies, "build_s": seconds,
        "build_mem_added_mb": mem["peak_train_mem_mb"], "mem_kind": mem["mem_kind"],
        "targets_npz_bytes": npz_bytes, "bytes_per_position": npz_bytes / max(n_pos, 1),
        "dense_bytes": n_pos * vocab_size * 4, "vocab_size": vocab_size, "min_prefix": min_prefix,
        "arrays_sha256": arrays_digest(tables),
    }


def run_build(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """The build part: both backends on the demo split and its ``--replicate`` x replication; JSON lines + table."""
    dm = make_datamodule(args, "ndp")
    with contextlib.redirect_stdout(sys.stderr):
        dm.prepare_data()
        train = dm.dataset("train")
    vocab, min_prefix = dm.vocab_size, dm.min_prefix
    first_tokens = {int(x[0]) for x in train.input_ids if len(x)}
    datasets = {"demo": 1, f"demo_x{args.replicate}": args.replicate}
    print(f"[{BENCH}] build: {len(train)} training examples ({int(train.lengths.sum()):,} tokens), V {vocab}, "
          f"min_prefix {min_prefix}; data sets {list(datasets)}; backends {args.backend_list}; "
          f"{'in-process' if args.inprocess else 'subprocesses'}", file=sys.stderr, flush=True)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f"{BENCH}_") as tmp:
        examples_file = Path(tmp) / "examples.npz"
        _save_examples(examples_file, train.input_ids, train.spans)
        del dm, train
        gc.collect()
        for name, copies in datasets.items():
            for backend in args.backend_list:
                t0 = time.perf_counter()
                if args.inprocess:
                    res = run_build_one(backend, copies, examples_file, vocab, min_prefix)
                else:
                    spec = {"kind": "build", "backend": backend, "copies": copies, "examples_file": str(examples_file),
                            "vocab_size": vocab, "min_prefix": min_prefix}
                    res = spawn_worker(Path(__file__).resolve(), argv, spec, Path(tmp) / f"build-{name}-{backend}.json")
                results[(name, backend)] = res
                print(f"[{BENCH}] {name:9} {backend:8}: {res['build_s']:.2f} s, +{res['build_mem_added_mb']:.1f} MB, "
                      f"{res['targets_npz_bytes'] / 2**20:.2f} MB npz ({time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr, flush=True)
    common = {"config": str(args.config), "max_train": args.max_train, "replicate": args.replicate,
              "replication": "copy c: token id t -> (t + c * (V // R)) mod V, every token of every example",
              "first_token_shared": len(first_tokens) == 1, "vocab_size": vocab, "min_prefix": min_prefix,
              "isolation": "inprocess" if args.inprocess else "subprocess"}
    lines: list[dict[str, Any]] = []
    for (name, backend), res in results.items():
        exact = results.get((name, "trie")) if backend == "hash128" else None
        extra = {"dataset": name, "backend": backend, "result": res, **common}
        for metric in ("build_s", "tokens_per_s_count", "tokens_per_s_lookup", "build_mem_added_mb"):
            target = ({"spec_target": f"build_s < {BUILD_TARGET_S:.0f} s on one core (spec, demo data)",
                       "meets_spec_target": res["build_s"] < BUILD_TARGET_S}
                      if metric == "build_s" and name == "demo" else {})
            lines.append(_figure("build", f"{metric}_{name}_{backend}", res[metric], "trie" if exact else None,
                                 exact[metric] if exact else None, "hash128/trie" if exact else None,
                                 {"metric": metric, **target, **extra}))
        lines.append(_figure("build", f"targets_npz_bytes_{name}_{backend}", res["targets_npz_bytes"], "dense",
                             res["dense_bytes"], "targets_npz_bytes/dense_bytes (n_positions x V x 4)",
                             {"metric": "targets_npz_bytes", **extra}))
    grown = f"demo_x{args.replicate}"
    for backend in args.backend_list:
        small, big = results[("demo", backend)], results[(grown, backend)]
        for metric in ("build_s", "build_mem_added_mb", "targets_npz_bytes"):
            lines.append(_figure("build", f"{metric}_growth_{backend}", big[metric], "demo", small[metric],
                                 f"{grown}/demo (data x {args.replicate})",
                                 {"metric": metric, "backend": backend, "dataset": grown, "result": big,
                                  "baseline_result": small, **common}))
    print(_build_table(args, results), file=sys.stderr, flush=True)
    return lines


def _build_table(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, Any]]) -> str:
    rows = [(f"\n== {BENCH} build: {args.max_train} verses and x{args.replicate} replication, min_prefix "
            f"{next(iter(results.values()))['min_prefix']} =="),
            (f"{'data':10} {'backend':8} {'positions':>10} {'build s':>8} {'Mtok/s cnt':>10} {'Mtok/s lkp':>10} "
            f"{'+MB':>7} {'peak MB':>8} {'sup keys':>9} {'sup ent':>9} {'clm keys':>9} {'clm ent':>9} "
            f"{'multi sup':>9} {'multi clm':>9} {'B/pos':>6} {'npz MB':>8} {'dense GB':>9}")]
    for (name, backend), r in results.items():
        rows.append(f"{name:10} {backend:8} {r['n_positions']:10,d} {r['build_s']:8.2f} "
                    f"{r['tokens_per_s_count'] / 1e6:10.2f} {r['tokens_per_s_lookup'] / 1e6:10.2f} "
                    f"{r['build_mem_added_mb']:7.1f} {r['peak_rss_mb']:8.1f} {r['sup_keys']:9,d} "
                    f"{r['sup_entries']:9,d} {r['clm_keys']:9,d} {r['clm_entries']:9,d} {r['frac_multi_sup']:9.4f} "
                    f"{r['frac_multi_clm']:9.4f} {r['bytes_per_position']:6.1f} "
                    f"{r['targets_npz_bytes'] / 2**20:8.2f} {r['dense_bytes'] / 2**30:9.2f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- main
def worker_main(args: argparse.Namespace) -> None:
    """Subprocess entry: run the step arm or the build named in the ``--worker`` spec; write the result beside it."""
    quiet()
    torch.set_num_threads(args.threads)
    spec_path = Path(args.worker)
    spec = json.loads(spec_path.read_text())
    if spec["kind"] == "step":
        result = run_step_arm(spec["arm"], args)
    else:
        result = run_build_one(spec["backend"], spec["copies"], Path(spec["examples_file"]), spec["vocab_size"],
                               spec["min_prefix"])
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))


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
        lines: list[dict[str, Any]] = []
        if args.part in ("step", "both"):
            lines += run_step(args, argv)
        if args.part in ("build", "both"):
            lines += run_build(args, argv)
    finally:
        torch.set_num_threads(old_threads)
    lines = [strict_json(line) for line in lines]
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
