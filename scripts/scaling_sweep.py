#!/usr/bin/env python
"""Dense vs MoE scaling sweep launcher (spec ``shared/methods/moe_scaling.md`` sections 4, 5 and 9.5).

Expands a grid YAML into one ``train.py fit`` run per (family, size, tokens D, batch B, lr, seed), launches the runs
as subprocesses (or submits them with a cluster launcher), and writes one CSV row per run for
``scripts/fit_scaling_laws.py``. **Every D gets its own run with its own cosine schedule** (``max_steps =
ceil(D / (B * seq_len))``); shorter runs are never read off a longer run's curve (pitfall 5).

Grid YAML (``configs/scaling/sweep_demo.yaml``)::

    name: sweep_demo                      # default --out runs/<name>
    families: {dense: configs/scaling/dense_tiny.yaml, moe: configs/scaling/moe_tiny.yaml}
    sizes: [{d_model: 64, n_layers: 2, n_heads: 4}, ...]   # optional n_kv_heads
    mode: grid                            # grid: tokens D per run; isoflop: flops C, D = C / (6 N_active) per size
    tokens: [262144, 524288]              # mode grid
    flops: [1.0e13, 1.0e14]               # mode isoflop (D rounded down to a multiple of seq_len)
    batch_size: [16]                      # sequences per step (default: the family config's)
    lr: [3.0e-3]                          # (default: the family config's)
    seeds: [0]                            # (default: the family config's seed_everything, else 0)
    seq_len: 128                          # optional; default data.init_args.seq_len of the family config
    overrides: {trainer.val_check_interval: 64}   # optional, applied to every run

Family paths are relative to the repository root (the runs' working directory) or to the grid file. Numbers may be
written ``3e-3`` (YAML 1.1 reads that as a string; it is converted). Isoflop mode counts N_active with
``lit_models.nn.scaling_utils.count_params`` on the family's ``model.init_args`` merged with the size.

Each run ``<out>/<run_id>/`` (run_id e.g. ``moe-d64-l2-h4-D524288-B16-lr3e-3-s0``) is::

    <python> train.py fit --config FAMILY --model.init_args.d_model=.. --model.init_args.n_layers=..
        --model.init_args.n_heads=.. --data.init_args.max_train_tokens=D --data.init_args.batch_size=B
        --model.init_args.lr=LR --trainer.max_steps=ceil(D/(B*T)) --seed_everything=S
        --trainer.default_root_dir=RUN_DIR --model.init_args.summary_file=RUN_DIR/run_summary.json
        --checkpoint.dirpath=RUN_DIR/checkpoints [--trainer.logger=JSON] [--data.init_args.seq_len=T]
        [grid overrides] [--extra args]

``--trainer.logger`` repeats the family's loggers with every ``save_dir`` set to RUN_DIR and the W&B run named
after the run id (so runs never share a log directory); it is left out when the family configures no logger. Each
run is started from the repository root with stdout and stderr in ``RUN_DIR/train.log``; ``RUN_DIR/sweep_run.json``
records the command and the git commit. A run is ``ok`` when it exits 0 and its ``run_summary.json`` has ``status:
ok``; otherwise it is kept as ``failed`` (exit code, timeout or missing summary, plus the last 20 lines of
``train.log`` in the ``error`` column) and the sweep continues. The CSV is rewritten atomically after every finished
run. An unfinished run directory (no summary) is moved to ``<out>/_failed_attempts/`` before the run is started again;
with ``--launcher``, only ``--resume`` once the cluster jobs have ended (``--collect`` shows which are incomplete).

Examples::

    python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml --dry-run
    python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml --resume
    # smoke run: 2 runs of 3 steps (extra args go last and win; after a bare -- or as --extra=ARG)
    python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml --out /tmp/smoke --max-runs 2 \\
        -- --trainer.max_steps=3 --data.init_args.max_train_tokens=2048
    # cluster: submit and exit, then rebuild the CSV once the jobs are done
    python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml \\
        --launcher 'sbatch -J {run_id} -o {run_dir}/slurm.out --wrap "{cmd}"'
    python scripts/scaling_sweep.py --grid configs/scaling/sweep_demo.yaml --collect

Launcher templates are run with ``/bin/sh -c``; ``{cmd}`` becomes the shell command line (``cd ROOT && WANDB_MODE=..
[timeout N] <python> train.py .. > RUN_DIR/train.log 2>&1``, arguments quoted with ``shlex``; written ``"{cmd}"``,
inside double quotes, its ``" $ ` \\`` are backslash-escaped so the shell gives back the exact command),
``{cmd_quoted}`` the same as one single-quoted shell word (``sh -c {cmd_quoted}``), ``{run_id}`` and ``{run_dir}`` the
run's id and directory.

Exit status: 0 when every run is ok (skipped runs count as ok), 1 when any failed (or, with ``--collect``, is not
ok), 2 on bad input (the message names the grid file and key), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("lit_models") is None:  # a checkout that is not installed: put the repo root on the path
    sys.path.insert(0, str(ROOT))

from lit_models.fileio import atomic_write

__all__ = [
    "ARCH_KEYS", "CSV_COLUMNS", "GRID_KEYS", "SIZE_KEYS", "Family", "Grid", "Run", "build_command", "collect_row", "format_number",
    "load_grid", "main", "plan_runs", "shell_command",
]

GRID_KEYS = ("name", "families", "sizes", "mode", "tokens", "flops", "batch_size", "lr", "seeds", "seq_len",
             "overrides")
SIZE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads")
CSV_COLUMNS = (
    "run_id", "family", "ffn", "num_experts", "top_k", "moe_impl", "d_model", "n_layers", "n_heads", "seed", "status",
    "git_sha", "n_active_nonemb", "n_total_nonemb", "n_embedding", "tokens", "batch_size", "batch_tokens", "seq_len",
    "lr", "steps", "flops_6nd", "flops_kaplan", "final_train_lm_loss", "final_val_loss", "best_val_loss", "wall_s",
    "error", "flops_budget",
)
# Summary keys copied into the CSV (CSV column -> run_summary.json key).
_SUMMARY_COLUMNS = {
    "ffn": "ffn", "num_experts": "num_experts", "top_k": "top_k", "moe_impl": "moe_impl", "d_model": "d_model",
    "n_layers": "n_layers", "n_heads": "n_heads", "n_active_nonemb": "n_active_nonemb",
    "n_total_nonemb": "n_total_nonemb", "n_embedding": "n_embedding", "tokens": "tokens_seen", "seq_len": "seq_len",
    "batch_size": "batch_size", "batch_tokens": "batch_tokens", "steps": "steps", "lr": "lr", "flops_6nd": "flops_6nd",
    "flops_kaplan": "flops_kaplan", "final_train_lm_loss": "final_train_lm_loss", "final_val_loss": "final_val_loss",
    "best_val_loss": "best_val_loss", "wall_s": "wall_s",
}
# Keys the sweep sets on every command; grid `overrides` must not touch them (extras may, and win).
_CONTROLLED = {
    "model.init_args.d_model", "model.init_args.n_layers", "model.init_args.n_heads", "model.init_args.n_kv_heads",
    "model.init_args.lr", "model.init_args.summary_file", "data.init_args.max_train_tokens",
    "data.init_args.batch_size", "trainer.max_steps", "seed_everything", "trainer.default_root_dir",
    "checkpoint.dirpath",
}
SUMMARY_NAME = "run_summary.json"
LOG_NAME = "train.log"
META_NAME = "sweep_run.json"
TAIL_LINES = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")

# ScalingLM architecture arguments (spec section 4), the config handed to the parameter counter in isoflop mode.
ARCH_KEYS = ("ffn", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
             "max_position_embeddings", "rope_theta", "tie_word_embeddings", "num_experts", "top_k",
             "expert_intermediate_size", "router_aux_loss_coef", "router_jitter_noise", "moe_impl")
ParamCounter = Callable[[dict[str, Any]], dict[str, Any]]


# ------------------------------------------------------------------------------------------------------ grid
@dataclass
class Family:
    """One model family: its name in run ids, the ``--config`` argument and the parsed LightningCLI YAML."""

    name: str
    config_arg: str  # as passed to train.py (relative to the repository root when possible)
    path: Path
    config: dict[str, Any]

    def get(self, dotted: str, default: Any = None) -> Any:
        """Value at ``a.b.c`` of the family YAML, or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def model_args(self) -> dict[str, Any]:
        args = self.get("model.init_args", {})
        return dict(args) if isinstance(args, dict) else {}


@dataclass
class Grid:
    """A validated grid YAML (see the module docstring)."""

    path: Path
    name: str
    families: dict[str, Family]
    sizes: list[dict[str, int]]
    mode: str
    tokens: list[int]
    flops: list[float]
    batch_size: list[int] | None
    lr: list[float] | None
    seeds: list[int] | None
    seq_len: int | None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """One planned training run."""

    run_id: str
    family: str
    size: dict[str, int]
    tokens: int
    batch_size: int
    lr: float
    seed: int
    seq_len: int
    steps: int
    run_dir: Path
    argv: list[str]
    flops_budget: float | None = None
    planned: dict[str, Any] = field(default_factory=dict)  # CSV fallbacks when there is no summary

    @property
    def summary_path(self) -> Path:
        return self.run_dir / SUMMARY_NAME

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME


def format_number(value: float) -> str:
    """Short exact-enough number for run ids: ``0.003 -> 3e-3``, ``0.0015 -> 1.5e-3``, ``1e15 -> 1e15``, ``5 -> 5e0``."""
    mantissa, exponent = f"{float(value):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _cli_value(value: Any) -> str:
    """A YAML value as a jsonargparse command-line value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = True) -> float | int:
    """``value`` (int, float or a numeric string such as ``'3e-3'``) as a number; ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected a number, got {value!r}")  # noqa: TRY004 (bad config, not argument)
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if integer:
        if float(number) != int(number):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        number = int(number)
    if positive and number <= 0:
        raise ValueError(f"{where}: expected a positive number, got {value!r}")
    return number


def _number_list(raw: dict[str, Any], key: str, grid_path: Path, *, integer: bool, positive: bool = True) -> list:
    if key not in raw or raw[key] is None:
        return []
    values = raw[key]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{grid_path}: '{key}' must be a non-empty list, got {values!r}")
    return [_number(v, f"{grid_path}: {key}[{i}]", integer=integer, positive=positive) for i, v in enumerate(values)]


def _resolve_family(name: str, value: Any, grid_path: Path) -> Family:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{grid_path}: families: name {name!r} must match {_NAME_RE.pattern} (it starts run ids)")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{grid_path}: families.{name}: expected a config path, got {value!r}")
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [ROOT / given, grid_path.parent / given]
    for candidate in candidates:
        if candidate.is_file():
            path = candidate.resolve()
            try:
                config_arg = str(path.relative_to(ROOT))
            except ValueError:
                config_arg = str(path)
            break
    else:
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"{grid_path}: families.{name}: config file {value!r} not found (tried {tried})")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: cannot parse the family config of families.{name}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the family config of families.{name} must be a mapping")  # noqa: TRY004
    return Family(name=name, config_arg=config_arg, path=path, config=config)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid YAML.

    Raises:
        FileNotFoundError: the grid file or a family config does not exist.
        ValueError: unknown key, bad value or size (n_heads not dividing d_model, ...), naming the file and key.
    """
    grid_path = Path(path).expanduser().resolve()
    if not grid_path.is_file():
        raise FileNotFoundError(f"grid file not found: {grid_path}")
    try:
        raw = yaml.safe_load(grid_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{grid_path}: cannot parse YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{grid_path}: the grid must be a mapping of {', '.join(GRID_KEYS)}")  # noqa: TRY004
    unknown = sorted(str(k) for k in raw if k not in GRID_KEYS)
    if unknown:
        raise ValueError(f"{grid_path}: unknown grid key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(GRID_KEYS)}")

    name = raw.get("name", grid_path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{grid_path}: 'name' must match {_NAME_RE.pattern}, got {name!r}")

    families_raw = raw.get("families")
    if not isinstance(families_raw, dict) or not families_raw:
        raise ValueError(f"{grid_path}: 'families' must be a non-empty mapping name -> config path, "
                         f"got {families_raw!r}")
    families = {fam: _resolve_family(fam, value, grid_path) for fam, value in families_raw.items()}

    sizes_raw = raw.get("sizes")
    if not isinstance(sizes_raw, list) or not sizes_raw:
        raise ValueError(f"{grid_path}: 'sizes' must be a non-empty list of {{d_model, n_layers, n_heads}}")
    sizes: list[dict[str, int]] = []
    for i, size in enumerate(sizes_raw):
        where = f"{grid_path}: sizes[{i}]"
        if not isinstance(size, dict):
            raise ValueError(f"{where}: expected a mapping of d_model, n_layers, n_heads: {size!r}")  # noqa: TRY004
        bad = sorted(str(k) for k in size if k not in SIZE_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(SIZE_KEYS)}")
        missing = [k for k in SIZE_KEYS[:3] if k not in size]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        parsed = {k: _number(v, f"{where}.{k}", integer=True) for k, v in size.items()}
        if parsed["d_model"] % parsed["n_heads"]:
            raise ValueError(f"{where}: n_heads={parsed['n_heads']} does not divide d_model={parsed['d_model']}")
        if "n_kv_heads" in parsed and parsed["n_heads"] % parsed["n_kv_heads"]:
            raise ValueError(f"{where}: n_kv_heads={parsed['n_kv_heads']} does not divide "
                             f"n_heads={parsed['n_heads']}")
        sizes.append(parsed)

    tokens = _number_list(raw, "tokens", grid_path, integer=True)
    flops = [float(c) for c in _number_list(raw, "flops", grid_path, integer=False)]
    mode = raw.get("mode", "isoflop" if flops and not tokens else "grid")
    if mode not in ("grid", "isoflop"):
        raise ValueError(f"{grid_path}: 'mode' must be 'grid' or 'isoflop', got {mode!r}")
    if mode == "grid" and (not tokens or flops):
        raise ValueError(f"{grid_path}: mode 'grid' needs a 'tokens' list and no 'flops'")
    if mode == "isoflop" and (not flops or tokens):
        raise ValueError(f"{grid_path}: mode 'isoflop' needs a 'flops' list and no 'tokens'")

    overrides_raw = raw.get("overrides") or {}
    if not isinstance(overrides_raw, dict):
        raise ValueError(  # noqa: TRY004 (bad config, not a bad argument)
            f"{grid_path}: 'overrides' must be a mapping dotted.key -> value, got {overrides_raw!r}")
    overrides: dict[str, Any] = {}
    for key, value in overrides_raw.items():
        dotted = str(key).lstrip("-")
        if dotted in _CONTROLLED:
            raise ValueError(f"{grid_path}: overrides.{dotted} is set by the sweep itself (use the grid lists, or "
                             f"pass it with --extra to override every run)")
        overrides[dotted] = value

    seq_len = None
    if raw.get("seq_len") is not None:
        seq_len = _number(raw["seq_len"], f"{grid_path}: seq_len", integer=True)
        if "data.init_args.seq_len" in overrides:
            raise ValueError(f"{grid_path}: seq_len is given both as 'seq_len' and overrides.data.init_args.seq_len")
    batch = _number_list(raw, "batch_size", grid_path, integer=True) or None
    lr = [float(v) for v in _number_list(raw, "lr", grid_path, integer=False)] or None
    seeds = _number_list(raw, "seeds", grid_path, integer=True, positive=False) or None
    if seeds is not None and any(s < 0 for s in seeds):
        raise ValueError(f"{grid_path}: seeds must be >= 0, got {seeds}")
    return Grid(path=grid_path, name=name, families=families, sizes=sizes, mode=mode, tokens=tokens, flops=flops,
                batch_size=batch, lr=lr, seeds=seeds, seq_len=seq_len, overrides=overrides)


# ---------------------------------------------------------------------------------------------------- planning
def _extra_value(extras: Sequence[str], key: str) -> str | None:
    """The last ``--key=value`` (or ``--key value``) in ``extras``, else None."""
    found = None
    for i, arg in enumerate(extras):
        if arg.startswith(f"--{key}="):
            found = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(extras):
            found = extras[i + 1]
    return found


def _family_value(grid: Grid, family: Family, extras: Sequence[str], key: str, list_value: Any) -> Any:
    """Precedence for the values that set the schedule: extras > grid overrides > grid value > family config."""
    dotted = f"data.init_args.{key}"
    for value in (_extra_value(extras, dotted), _extra_value(extras, f"data.{key}"), grid.overrides.get(dotted),
                  list_value):
        if value is not None:
            return value
    return family.get(dotted, family.get(f"data.{key}"))


def _default_param_counter(config: dict[str, Any]) -> dict[str, Any]:
    # Lazy: planning stays torch-free unless isoflop mode needs the parameter count.
    from lit_models.nn.scaling_utils import count_params

    return count_params(config)


def _run_loggers(family: Family, run: Run) -> Any:
    """The family's ``trainer.logger`` entries with ``save_dir`` moved into the run directory and the W&B run named
    after the run id; None when the family sets no such logger (Lightning's default logger follows
    ``default_root_dir``)."""
    loggers = family.get("trainer.logger")
    items = [loggers] if isinstance(loggers, dict) else loggers
    if not isinstance(items, list) or not all(isinstance(x, dict) and "class_path" in x for x in items):
        return None
    changed = False
    out = []
    for item in items:
        init = dict(item.get("init_args") or {})
        if "save_dir" in init:
            init["save_dir"] = str(run.run_dir)
            changed = True
        if str(item["class_path"]).rsplit(".", 1)[-1] == "WandbLogger":
            init["name"] = run.run_id
            changed = True
        out.append({**item, "init_args": init})
    if not changed:
        return None
    return out[0] if isinstance(loggers, dict) else out


def _n_active(counter: ParamCounter, grid: Grid, family: Family, size: dict[str, int]) -> int:
    """Active non-embedding parameters of ``size`` in ``family`` (isoflop mode)."""
    merged = {**family.model_args, **{k.split(".")[-1]: v for k, v in grid.overrides.items()
                                      if k.startswith("model.init_args.")}, **size}
    config = {k: v for k, v in merged.items() if k in ARCH_KEYS and v is not None}
    vocab = family.get("data.init_args.vocab_size")
    if "vocab_size" not in config and isinstance(vocab, int):
        config["vocab_size"] = vocab
    counts = counter(config)
    key = "n_active_nonemb" if "n_active_nonemb" in counts else "n_active"
    if key not in counts:
        raise ValueError(f"{grid.path}: the parameter counter returned {sorted(counts)}, without n_active_nonemb")
    return int(counts[key])


def build_command(python: Sequence[str], family: Family, run: Run, overrides: dict[str, Any], seq_len_arg: int | None,
                  extras: Sequence[str]) -> list[str]:
    """The ``train.py fit`` argument vector of one run (see the module docstring for the order)."""
    argv = [*python, "train.py", "fit", "--config", family.config_arg]
    for key in SIZE_KEYS:
        if key in run.size:
            argv.append(f"--model.init_args.{key}={run.size[key]}")
    argv += [
        f"--data.init_args.max_train_tokens={run.tokens}",
        f"--data.init_args.batch_size={run.batch_size}",
        f"--model.init_args.lr={_cli_value(run.lr)}",
        f"--trainer.max_steps={run.steps}",
        f"--seed_everything={run.seed}",
        f"--trainer.default_root_dir={run.run_dir}",
        f"--model.init_args.summary_file={run.summary_path}",
        f"--checkpoint.dirpath={run.run_dir / 'checkpoints'}",
    ]
    loggers = None if "trainer.logger" in overrides else _run_loggers(family, run)
    if loggers is not None:
        argv.append(f"--trainer.logger={json.dumps(loggers)}")
    if seq_len_arg is not None:
        argv.append(f"--data.init_args.seq_len={seq_len_arg}")
    argv += [f"--{key}={_cli_value(value)}" for key, value in overrides.items()]
    argv += list(extras)
    return argv


def plan_runs(grid: Grid, out_dir: Path, *, python: Sequence[str] = (sys.executable,), extras: Sequence[str] = (),
              param_counter: ParamCounter | None = None) -> list[Run]:
    """Every run of ``grid`` in launch order: family, (flops,) size, tokens, batch, lr, seed.

    Args:
        grid: from :func:`load_grid`.
        out_dir: the sweep directory; run ``r`` lives in ``out_dir / r.run_id``.
        python: the interpreter command (one or more words).
        extras: arguments appended to every command (they win over everything before them).
        param_counter: ``config -> {"n_active_nonemb": ..., ...}`` for isoflop mode; the config is the family's
            ``model.init_args`` merged with model overrides and the size, restricted to :data:`ARCH_KEYS` (ScalingLM
            names, None values dropped), plus ``vocab_size`` from ``data.init_args`` when given there. Default:
            ``lit_models.nn.scaling_utils.count_params``.

    Raises:
        ValueError: no seq_len / batch_size / lr known for a family, an isoflop D below one sequence, or duplicate
            run ids, naming the grid file.
    """
    out_dir = Path(out_dir).resolve()
    runs: list[Run] = []
    seen: dict[str, str] = {}
    for family in grid.families.values():
        where = f"{grid.path}: families.{family.name} ({family.path})"
        seq_len_raw = _family_value(grid, family, extras, "seq_len", grid.seq_len)
        if seq_len_raw is None:
            raise ValueError(f"{where}: no data.init_args.seq_len in the family config; set 'seq_len' in the grid")
        seq_len = _number(seq_len_raw, f"{where}: seq_len", integer=True)
        batches = grid.batch_size or [family.get("data.init_args.batch_size", family.get("data.batch_size"))]
        lrs = grid.lr or [family.get("model.init_args.lr", family.get("model.lr"))]
        seeds = grid.seeds or [family.get("seed_everything") if isinstance(family.get("seed_everything"), int) else 0]
        if batches[0] is None:
            raise ValueError(f"{where}: no batch_size in the grid or data.init_args.batch_size in the family config")
        if lrs[0] is None:
            raise ValueError(f"{where}: no lr in the grid or model.init_args.lr in the family config")
        batches = [_number(b, f"{where}: batch_size", integer=True) for b in batches]
        lrs = [float(_number(v, f"{where}: lr")) for v in lrs]
        model_args = family.model_args
        planned = {"ffn": model_args.get("ffn", ""), "num_experts": "", "top_k": "",
                   "moe_impl": model_args.get("moe_impl", "")}
        if model_args.get("ffn") == "moe":
            planned.update(num_experts=model_args.get("num_experts", ""), top_k=model_args.get("top_k", ""))
        for key in planned:
            if f"model.init_args.{key}" in grid.overrides:
                planned[key] = grid.overrides[f"model.init_args.{key}"]

        budgets: list[float | None] = list(grid.flops) if grid.mode == "isoflop" else [None]
        for budget in budgets:
            for size in grid.sizes:
                if budget is None:
                    token_list = list(grid.tokens)
                else:
                    n_active = _n_active(param_counter or _default_param_counter, grid, family, size)
                    d = int(budget // (6 * n_active * seq_len)) * seq_len
                    if d < seq_len:
                        raise ValueError(f"{grid.path}: flops {budget:g} with size {size} (N_active={n_active}) gives "
                                         f"D = {budget / (6 * n_active):.0f} tokens, below one sequence of {seq_len}")
                    token_list = [d]
                for tokens in token_list:
                    for batch in batches:
                        for lr in lrs:
                            for seed in seeds:
                                parts = [family.name]
                                if budget is not None:
                                    parts.append(f"C{format_number(budget)}")
                                parts += [f"d{size['d_model']}", f"l{size['n_layers']}", f"h{size['n_heads']}"]
                                if "n_kv_heads" in size:
                                    parts.append(f"kv{size['n_kv_heads']}")
                                parts += [f"D{tokens}", f"B{batch}", f"lr{format_number(lr)}", f"s{seed}"]
                                run_id = "-".join(parts)
                                if run_id in seen:
                                    raise ValueError(f"{grid.path}: duplicate run_id {run_id!r} (repeated size, "
                                                     f"tokens, batch_size, lr or seed, or two flops budgets giving "
                                                     f"the same D)")
                                seen[run_id] = family.name
                                run = Run(run_id=run_id, family=family.name, size=dict(size), tokens=tokens,
                                          batch_size=batch, lr=lr, seed=seed, seq_len=seq_len,
                                          steps=math.ceil(tokens / (batch * seq_len)), run_dir=out_dir / run_id,
                                          argv=[], flops_budget=budget, planned=dict(planned))
                                run.argv = build_command(python, family, run, grid.overrides, grid.seq_len, extras)
                                runs.append(run)
    return runs


def shell_command(run: Run, wandb_mode: str, timeout: float | None) -> str:
    """The run as one shell command line for a cluster launcher (cd, env, optional timeout, log redirection)."""
    words = ["cd", str(ROOT)]
    cmd = shlex.join(words) + " && " + f"WANDB_MODE={shlex.quote(wandb_mode)} "
    if timeout:
        cmd += f"timeout {math.ceil(timeout)} "
    return cmd + shlex.join(run.argv) + f" > {shlex.quote(str(run.log_path))} 2>&1"


def launcher_command(template: str, run: Run, wandb_mode: str, timeout: float | None) -> str:
    """``template`` with ``{cmd}``, ``{cmd_quoted}``, ``{run_id}`` and ``{run_dir}`` substituted (one pass).

    ``"{cmd}"`` (inside double quotes) gets ``" $ ` \\`` backslash-escaped, so the shell's double-quote processing
    gives back the exact command (the logger JSON holds double quotes); a bare ``{cmd}`` is inserted as it is.
    """
    cmd = shell_command(run, wandb_mode, timeout)
    values = {
        '"{cmd}"': '"' + re.sub(r'(["$`\\])', r"\\\1", cmd) + '"',
        "{cmd}": cmd,
        "{cmd_quoted}": shlex.quote(cmd),
        "{run_id}": run.run_id,
        "{run_dir}": str(run.run_dir),
    }
    return re.sub(r'"\{cmd\}"|\{cmd\}|\{cmd_quoted\}|\{run_id\}|\{run_dir\}', lambda m: values[m.group(0)], template)


# ------------------------------------------------------------------------------------------------------ results
def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(summary, "")`` or ``(None, reason)``."""
    if not path.is_file():
        return None, f"no {SUMMARY_NAME}"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return None, f"unreadable {path}: {err}"
    if not isinstance(summary, dict):
        return None, f"{path} is not a JSON object"
    if summary.get("status") != "ok":
        return None, f"{path}: status {summary.get('status')!r}"
    return summary, ""


def _is_finished(run: Run) -> bool:
    return _read_summary(run.summary_path)[0] is not None


def _log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def collect_row(run: Run, status: str | None = None, error: str = "", git_sha: str = "",
                wall_s: float | None = None) -> dict[str, Any]:
    """One CSV row: planned values, overwritten by ``run_summary.json`` when the run has one.

    Args:
        status: None to derive it from the summary (``ok`` when there is one with status ok, else ``failed``).
        error: the failure reason (the log tail is appended for failed runs).
        git_sha: the commit of the sweep; ``sweep_run.json``'s commit wins when present.
        wall_s: the measured wall time, used when the summary has none.
    """
    summary, reason = _read_summary(run.summary_path)
    if status is None:
        status = "ok" if summary is not None else "failed"
        error = error or reason
    if status == "ok" and summary is None:
        status, error = "failed", reason
    meta_path = run.run_dir / META_NAME
    if meta_path.is_file():
        try:
            git_sha = json.loads(meta_path.read_text(encoding="utf-8")).get("git_sha", git_sha)
        except (OSError, json.JSONDecodeError):
            pass
    row: dict[str, Any] = {col: "" for col in CSV_COLUMNS}
    row.update(
        run_id=run.run_id, family=run.family, seed=run.seed, status=status, git_sha=git_sha,
        d_model=run.size["d_model"], n_layers=run.size["n_layers"], n_heads=run.size["n_heads"], tokens=run.tokens,
        batch_size=run.batch_size, batch_tokens=run.batch_size * run.seq_len, seq_len=run.seq_len, lr=run.lr,
        steps=run.steps, wall_s="" if wall_s is None else round(wall_s, 3),
        flops_budget="" if run.flops_budget is None else run.flops_budget, **run.planned,
    )
    if summary is not None and status == "ok":
        for column, key in _SUMMARY_COLUMNS.items():
            if summary.get(key) is not None:
                row[column] = summary[key]
    if status != "ok":
        tail = _log_tail(run.log_path)
        row["error"] = f"{error}\n{tail}".strip() if tail else error
    return row


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows, atomically (a reader or an interrupted sweep never sees half a file)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def git_sha() -> str:
    """Current commit of the repository (``+dirty`` with uncommitted tracked changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------------------ running
def _prepare_run_dir(run: Run, out_dir: Path, sha: str, wandb_mode: str) -> None:
    """Create the run directory; an unfinished earlier attempt is moved to ``<out>/_failed_attempts/``."""
    if run.run_dir.exists():
        attempts = out_dir / "_failed_attempts"
        attempts.mkdir(parents=True, exist_ok=True)
        k = 1
        while (attempts / f"{run.run_id}.{k}").exists():
            k += 1
        run.run_dir.rename(attempts / f"{run.run_id}.{k}")
    run.run_dir.mkdir(parents=True)
    meta = {"run_id": run.run_id, "argv": run.argv, "command": shlex.join(run.argv), "cwd": str(ROOT),
            "wandb_mode": wandb_mode, "git_sha": sha, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(run.run_dir / META_NAME, json.dumps(meta, indent=2) + "\n")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a run started by this sweep (its own process group): SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _run_local(runs: list[Run], rows: dict[str, dict], args: argparse.Namespace, out_dir: Path, csv_path: Path,
               order: list[str], sha: str, n_skipped: int) -> tuple[list[Run], bool]:
    """Run ``runs`` with at most ``args.jobs`` subprocesses; returns (failed runs, interrupted)."""
    env = dict(os.environ, WANDB_MODE=args.wandb)
    failed: list[Run] = []
    counts = {"done": 0, "failed": 0, "skipped": n_skipped}
    queue = deque(runs)
    running: dict[str, tuple[Run, subprocess.Popen, float, Any]] = {}
    bar = tqdm(total=len(runs) + n_skipped, initial=n_skipped, unit="run", desc=f"sweep {out_dir.name}",
               file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix(counts)

    def flush() -> None:
        write_csv(csv_path, [rows[r] for r in order if r in rows])

    def finish(run: Run, status: str | None, error: str, wall: float) -> None:
        row = collect_row(run, status=status, error=error, git_sha=sha, wall_s=wall)
        rows[run.run_id] = row
        ok = row["status"] == "ok"
        counts["done" if ok else "failed"] += 1
        if not ok:
            failed.append(run)
        bar.update(1)
        bar.set_postfix(counts)
        bar.write(f"[{row['status']}] {run.run_id} ({wall:.1f} s)" + ("" if ok else f"  log: {run.log_path}"))
        flush()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)  # a killed sweep stops its runs and keeps its CSV too
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                run = queue.popleft()
                _prepare_run_dir(run, out_dir, sha, args.wandb)
                log = open(run.log_path, "wb")  # noqa: SIM115 - closed when the run ends
                try:
                    proc = subprocess.Popen(run.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as err:
                    log.close()
                    finish(run, "failed", f"cannot start {run.argv[0]}: {err}", 0.0)
                    continue
                running[run.run_id] = (run, proc, time.monotonic(), log)
            progressed = False
            for run_id, (run, proc, start, log) in list(running.items()):
                wall = time.monotonic() - start
                code = proc.poll()
                timed_out = code is None and args.timeout_per_run and wall > args.timeout_per_run
                if code is None and not timed_out:
                    continue
                if timed_out:
                    _kill_group(proc)
                log.close()
                del running[run_id]
                progressed = True
                if timed_out:
                    finish(run, "failed", f"timeout after {args.timeout_per_run:g} s", wall)
                elif code != 0:
                    finish(run, "failed", f"exit code {code}", wall)
                else:
                    finish(run, None, "", wall)
            if not progressed:
                time.sleep(0.05)
    except KeyboardInterrupt:
        for run, proc, start, log in running.values():
            _kill_group(proc)
            log.close()
            rows[run.run_id] = collect_row(run, status="failed", error="interrupted", git_sha=sha,
                                           wall_s=time.monotonic() - start)
            failed.append(run)
        flush()
        bar.close()
        return failed, True
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return failed, False


def _print_summary(n_ok: int, failed: list[Run], n_skipped: int, csv_path: Path | None, rows: dict) -> None:
    total = n_ok + len(failed) + n_skipped
    print(f"runs: {total}  ok: {n_ok}  failed: {len(failed)}  skipped (finished earlier): {n_skipped}")
    if failed:
        width = max(len(r.run_id) for r in failed)
        print("failed runs:")
        for run in failed:
            reason = str(rows.get(run.run_id, {}).get("error", "")).split("\n", 1)[0]
            print(f"  {run.run_id:<{width}}  {reason}  log: {run.log_path}")
    if csv_path is not None:
        print(f"csv: {csv_path}")


# ---------------------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after a bare -- are passed to every run (like --extra).")
    parser.add_argument("--grid", "--config", dest="grid", required=True, type=Path, help="grid YAML")
    parser.add_argument("--out", type=Path, default=None, help="sweep directory (default runs/<grid name>)")
    parser.add_argument("--csv", type=Path, default=None, help="results CSV (default <out>/results.csv)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, one per line; launch nothing")
    parser.add_argument("--resume", action="store_true", help="skip runs whose directory has a run_summary.json")
    parser.add_argument("--max-runs", type=int, default=None, help="launch at most this many runs (after skipping)")
    parser.add_argument("--jobs", type=int, default=1, help="concurrent training subprocesses")
    parser.add_argument("--timeout-per-run", type=float, default=None, help="seconds before a run is killed")
    parser.add_argument("--wandb", choices=("offline", "disabled"), default="offline", help="WANDB_MODE of the runs")
    parser.add_argument("--launcher", default=None,
                        help="cluster submit template run with sh -c, e.g. 'sbatch -J {run_id} --wrap \"{cmd}\"'; "
                             "submits every run and exits without waiting (then use --collect)")
    parser.add_argument("--collect", action="store_true",
                        help="rebuild the CSV from the run directories' summaries; launch nothing")
    parser.add_argument("--extra", action="append", default=[], metavar="ARG",
                        help="argument appended to every run, e.g. --extra=--trainer.max_steps=3 (repeatable)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter command, split like a shell (default: this Python); runs start in the "
                             "repository root, so a relative path is made absolute, and --extra paths are relative "
                             "to the root")
    args = parser.parse_args(argv)
    args.extra = list(args.extra) + tail
    if args.max_runs is not None and args.max_runs < 1:
        parser.error(f"--max-runs must be >= 1, got {args.max_runs}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.timeout_per_run is not None and args.timeout_per_run <= 0:
        parser.error(f"--timeout-per-run must be > 0, got {args.timeout_per_run}")
    if args.collect and (args.dry_run or args.launcher):
        parser.error("--collect launches nothing: do not combine it with --dry-run or --launcher")
    if args.launcher is not None and not any(p in args.launcher for p in ("{cmd}", "{cmd_quoted}")):
        parser.error("--launcher must contain {cmd} or {cmd_quoted}")
    return args


def main(argv: list[str] | None = None, param_counter: ParamCounter | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    try:
        grid = load_grid(args.grid)
        out_dir = (args.out if args.out is not None else ROOT / "runs" / grid.name).expanduser().resolve()
        csv_path = (args.csv if args.csv is not None else out_dir / "results.csv").expanduser().resolve()
        python = shlex.split(args.python)
        if not python:
            raise ValueError("--python is empty")
        if "/" in python[0] and not Path(python[0]).is_absolute():  # runs start in the repository root
            python[0] = str(Path(python[0]).resolve())
        runs = plan_runs(grid, out_dir, python=python, extras=args.extra, param_counter=param_counter)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    order = [r.run_id for r in runs]
    sha = "" if args.dry_run else git_sha()

    if args.collect:
        rows = {}
        for run in runs:
            if not run.run_dir.exists():
                rows[run.run_id] = collect_row(run, status="missing", error="never launched", git_sha=sha)
            elif run.summary_path.is_file():
                rows[run.run_id] = collect_row(run, git_sha=sha)  # ok, or failed with the summary's problem
            else:  # failed, or a cluster job still queued or running
                rows[run.run_id] = collect_row(run, status="incomplete", error=f"no {SUMMARY_NAME} yet", git_sha=sha)
        write_csv(csv_path, [rows[r] for r in order])
        statuses = [row["status"] for row in rows.values()]
        print(f"collected {len(runs)} runs from {out_dir}: " +
              ", ".join(f"{s} {statuses.count(s)}" for s in dict.fromkeys(statuses)))
        print(f"csv: {csv_path}")
        return 0 if all(s == "ok" for s in statuses) else 1

    finished = [r for r in runs if _is_finished(r)]
    if finished and not args.resume:
        names = ", ".join(r.run_id for r in finished[:3]) + (" ..." if len(finished) > 3 else "")
        print(f"error: {len(finished)} run(s) already finished in {out_dir} ({names}); pass --resume to skip them "
              f"or choose another --out", file=sys.stderr)
        return 2
    skipped = finished if args.resume else []
    skipped_ids = {r.run_id for r in skipped}
    to_run = [r for r in runs if r.run_id not in skipped_ids]
    if args.max_runs is not None:
        to_run = to_run[:args.max_runs]

    if args.launcher is not None:
        commands = [launcher_command(args.launcher, r, args.wandb, args.timeout_per_run) for r in to_run]
    else:
        commands = [shlex.join(r.argv) for r in to_run]
    if args.dry_run:
        for command in commands:
            print(command)
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "grid.yaml", grid.path.read_bytes())
    if args.launcher is not None:
        n_failed = 0
        for run, command in zip(to_run, commands, strict=True):
            _prepare_run_dir(run, out_dir, sha, args.wandb)
            done = subprocess.run(["/bin/sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                                  check=False)
            (run.run_dir / "submit.log").write_text(f"$ {command}\n{done.stdout}{done.stderr}", encoding="utf-8")
            if done.returncode != 0:
                n_failed += 1
                print(f"[submit failed] {run.run_id}: exit code {done.returncode}: {done.stderr.strip()[-500:]}",
                      file=sys.stderr)
        print(f"submitted {len(to_run) - n_failed} run(s), {n_failed} submission(s) failed, {len(skipped)} skipped; "
              f"when the jobs are done: python scripts/scaling_sweep.py --grid {args.grid} --out {out_dir} --collect")
        return 1 if n_failed else 0

    rows = {r.run_id: collect_row(r, status="ok", git_sha=sha) for r in skipped}
    if rows:
        write_csv(csv_path, [rows[r] for r in order if r in rows])
    failed, interrupted = _run_local(to_run, rows, args, out_dir, csv_path, order, sha, len(skipped))
    n_ok = sum(1 for r in to_run if rows.get(r.run_id, {}).get("status") == "ok")
    _print_summary(n_ok, failed, len(skipped), csv_path, rows)
    if interrupted:
        print(f"interrupted: {sum(1 for r in to_run if r.run_id not in rows)} run(s) not started; "
              "continue with --resume")
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
