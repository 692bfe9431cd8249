#!/usr/bin/env python
"""Re-plot forgetting-curve results and print their memory lengths (spec ``forgetting_curve.md`` section 4).

Reads one or more per-length JSON files, either ours (``<output_dir>/<title>.json`` written by
``lit_models.forgetting_curve.ForgettingCurve``) or the official ``draw.py`` JSON (entries without ``status`` count
as successful), prints one table row per run (label, fine-grained length F, coarse-grained length C, their
lower-bound flags, amnesia length, failed lengths) and writes one comparison figure.

A run's default label is the ``model`` name in a sibling ``<title>.summary.json`` when that file exists (else the
file stem); its ``training_len``, if recorded there, is drawn as a vertical line.

Examples::

    python scripts/plot_forgetting_curves.py outputs/forgetting_curve/smollm2.json --out smollm2.png --single
    python scripts/plot_forgetting_curves.py a.json b.json --labels llama mamba --log-x --out comparison.png

Exit status: 0 on success, 2 on a missing or malformed input (the message names the file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from lit_models.nn import forgetting_curve as fc
except ModuleNotFoundError:  # run from a checkout that is not installed: put the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lit_models.nn import forgetting_curve as fc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="per-length result JSON files (ours or official)")
    parser.add_argument("--out", required=True, type=Path, help="figure to write (format from the suffix, e.g. .png)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: summary model name)")
    parser.add_argument("--log-x", action="store_true", help="logarithmic length axis")
    parser.add_argument("--fine-threshold", type=float, default=0.99, help="copy accuracy for fine-grained memory")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level for coarse-grained memory")
    parser.add_argument("--single", action="store_true",
                        help="with exactly one run: draw the single-run figure (std bands, F/C markers) instead")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} values but {len(args.runs)} runs were given")
    if args.single and len(args.runs) != 1:
        parser.error(f"--single needs exactly one run, got {len(args.runs)}")
    return args


def summary_path(run: Path) -> Path:
    """``<dir>/<title>.summary.json`` next to ``<dir>/<title>.json``."""
    return run.with_name(f"{run.stem}.summary.json")


def read_summary(run: Path) -> dict:
    """The sibling summary dict, or ``{}`` when absent. Raises ValueError naming the file when it is not a JSON dict."""
    path = summary_path(run)
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")  # noqa: TRY004
    return summary


def default_label(run: Path, summary: dict) -> str:
    """The summary's model name (``model``, ``model_name`` or ``model_id``, when a string), else the file stem."""
    for key in ("model", "model_name", "model_id"):
        if isinstance(summary.get(key), str) and summary[key]:
            return summary[key]
    return run.stem


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Fixed-width table: label, F, C, lower-bound flags, amnesia length, failed lengths."""
    header = ("label", "fine_F", "fine_lb", "coarse_C", "coarse_lb", "amnesia", "failed")
    lines = [header]
    for label, m in rows:
        failed = ",".join(str(v) for v in m["failed_lengths"]) or "-"
        amnesia = "-" if m["amnesia_length"] is None else str(m["amnesia_length"])
        lines.append((label, str(m["fine_grained_length"]), str(m["fine_is_lower_bound"]),
                      str(m["coarse_grained_length"]), str(m["coarse_is_lower_bound"]), amnesia, failed))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    curves: dict[str, list[dict]] = {}
    memories: dict[str, dict] = {}
    training_lens: dict[str, int] = {}
    try:
        for i, run in enumerate(args.runs):
            results = fc.load_results(run)
            summary = read_summary(run)
            label = args.labels[i] if args.labels else default_label(run, summary)
            if label in curves:
                label = f"{label} ({run})"
            curves[label] = results
            memories[label] = fc.memory_lengths(results, fine_threshold=args.fine_threshold, alpha=args.alpha)
            training_len = summary.get("training_len")
            if isinstance(training_len, int) and not isinstance(training_len, bool) and training_len > 0:
                training_lens[label] = training_len
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(format_table(list(memories.items())))
    if args.single:
        label = next(iter(curves))
        out = fc.plot_curve(curves[label], args.out, training_len=training_lens.get(label), log_x=args.log_x,
                            title=label, memory=memories[label])
    else:
        out = fc.plot_comparison(curves, args.out, log_x=args.log_x, training_lens=training_lens)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
