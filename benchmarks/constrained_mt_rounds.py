"""TAR per revision round with SmolLM2-135M-Instruct on the offline Bible + FreeDict terminology set (de -> en).

Spec ``shared/methods/constrained_mt.md`` section 10 (benchmark). The data and settings are those of
``configs/constrained_mt/terminology_smollm2.yaml`` (its YAML is read), except two defaults that keep the run under
10 minutes on 2 CPU cores: ``--items 30`` (the config: 50) and ``--max-new-tokens 64`` (the config: 96). The model
and data are driven in this process (:class:`lit_models.constrained_mt.ConstrainedTranslation`,
:class:`datamodules.terminology.TerminologyDataModule`), not through ``train.py``. Arms:

- ``plain``: ``constraints_in_prompt: false``, no revision (a plain translation prompt);
- ``prompt``: constraints in the prompt, no revision: identical to round 0 of ``tar`` (same greedy prompts, same
  batches), so it is read from there instead of being decoded twice;
- ``tar``: constraints in the prompt and ``max_revisions`` rounds of check-and-revise (``select: best``).

Figures per arm and round ``r`` (on the output selected after ``r`` revisions): ``csr`` (constraint satisfaction
rate), ``exact`` (sentences meeting all their constraints), ``sacrebleu``, ``chrf``, ``llm_calls``, ``len_ratio``,
``echo`` (outputs copying the prompt's constraint lines) and ``wall_s`` (seconds spent generating in that round);
per arm ``reference_csr`` (must be 1.0), ``regressions``, ``revised_frac``. Expectation lines (``part:
expectation``, with ``holds``; printed, never asserted): CSR_plain < CSR_r0 <= ... <= CSR_rK (the "<=" steps are
guaranteed by ``select: best``) and chrF dropping by at most 2 points from r0 to rK. The paper's +15 points concern
far larger LLMs; a 135M model mostly shows the mechanics.

Output (stdout): JSON lines only, ``{"figure": "<metric>_r<r>_<arm>", "value": ..., "arm", "round", "metric"}``,
a table on stderr, every item's rounds in ``<out>/<arm>.jsonl`` when ``--out`` is given.

Run (real figures; about 4-8 minutes on 2 CPU cores, mostly the TAR arm's generation; ``--items 50
--max-new-tokens 96`` reproduces the config exactly, about twice as long):

    python benchmarks/constrained_mt_rounds.py --out runs/constrained_mt/bench
    python benchmarks/constrained_mt_rounds.py --quick      # 10 items, 1 revision, 24 new tokens: ~1 minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "constrained_mt" / "terminology_smollm2.yaml"
METRICS = ("csr", "exact", "sacrebleu", "chrf", "llm_calls", "len_ratio", "echo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=30, help="test items (the config has 50; 30 keeps the run < 10 min)")
    p.add_argument("--max-revisions", type=int, default=None, help="K (default: the config's, 3)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="the config has 96; 64 covers almost every verse and keeps the run < 10 min")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (8)")
    p.add_argument("--model", default=None, help="model_path (default: the config's, smollm2-135m)")
    p.add_argument("--data-dir", default=None, help="demo cache (default: the config's data/terminology)")
    p.add_argument("--arms", default="plain,tar", help="comma-separated subset of plain,tar")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write every item's rounds to <out>/<arm>.jsonl")
    p.add_argument("--quick", action="store_true", help="10 items, 1 revision, 24 new tokens (proves it runs)")
    return p.parse_args(argv)


def _emit(lines: list[dict[str, Any]], **fields: Any) -> None:
    lines.append(fields)
    print(json.dumps(fields), flush=True)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import torch

    from datamodules.terminology import TerminologyDataModule
    from lit_models.constrained_mt import ConstrainedTranslation

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(CONFIG.read_text())
    model_args = dict(cfg["model"]["init_args"])
    data_args = dict(cfg["data"]["init_args"])
    if args.quick:
        args.items, args.max_new_tokens = 10, 24
        args.max_revisions = 1 if args.max_revisions is None else args.max_revisions
    for key, value in (("max_revisions", args.max_revisions), ("max_new_tokens", args.max_new_tokens),
                       ("model_path", args.model)):
        if value is not None:
            model_args[key] = value
    for key, value in (("max_items", args.items), ("batch_size", args.batch_size), ("data_dir", args.data_dir)):
        if value is not None:
            data_args[key] = value
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - {"plain", "tar"})
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from plain,tar")

    dm = TerminologyDataModule(**data_args)
    dm.prepare_data()
    dm.setup("test")
    batches = list(dm.test_dataloader())
    n_items = sum(len(b) for b in batches)
    lines: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        kwargs = dict(model_args)
        if arm == "plain":
            kwargs.update(constraints_in_prompt=False, max_revisions=0)
        t0 = time.perf_counter()
        model = ConstrainedTranslation(**kwargs)
        load_s = time.perf_counter() - t0
        model.eval()
        records = [r for b in batches for r in model.translate_batch(b)]
        metrics, sigs = model.compute_metrics(records)
        k_max = kwargs["max_revisions"]
        results[arm] = {"metrics": metrics, "wall": list(model._round_times), "K": k_max}
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{arm}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        names = {"tar": ["tar"], "plain": ["plain"]}[arm] + (["prompt"] if arm == "tar" else [])
        for name in names:
            rounds = range(k_max + 1) if name != "prompt" else range(1)
            for r in rounds:
                for m in METRICS:
                    if f"{m}_r{r}" in metrics:
                        _emit(lines, figure=f"{m}_r{r}_{name}", value=metrics[f"{m}_r{r}"], arm=name, round=r,
                              metric=m, n_items=n_items)
                _emit(lines, figure=f"wall_s_r{r}_{name}", value=round(results[arm]["wall"][r], 3), arm=name,
                      round=r, metric="wall_s", n_items=n_items)
        for m in ("reference_csr", "regressions", "revised_frac", "failed_items"):
            if m in metrics:
                _emit(lines, figure=f"{m}_{arm}", value=metrics[m], arm=arm, metric=m, n_items=n_items)
        _emit(lines, figure=f"load_s_{arm}", value=round(load_s, 3), arm=arm, metric="load_s",
              model=kwargs["model_path"], max_new_tokens=kwargs["max_new_tokens"], signatures=sigs)

    if "tar" in results:
        tm, k_max = results["tar"]["metrics"], results["tar"]["K"]
        csr = [tm[f"csr_r{r}"] for r in range(k_max + 1)]
        chain = all(a <= b + 1e-12 for a, b in itertools.pairwise(csr))
        if "plain" in results:
            chain = chain and results["plain"]["metrics"]["csr_r0"] < csr[0]
        _emit(lines, figure="expect_csr_chain", holds=bool(chain), part="expectation",
              value=[results["plain"]["metrics"]["csr_r0"]] + csr if "plain" in results else csr,
              claim="CSR_plain < CSR_r0 <= ... <= CSR_rK")
        drop = tm["chrf_r0"] - tm[f"chrf_r{k_max}"]
        _emit(lines, figure="expect_chrf_drop", holds=bool(drop <= 2.0), part="expectation", value=drop,
              claim="chrF(r0) - chrF(rK) <= 2")

    print(f"{'arm':7s} {'r':>2s} " + " ".join(f"{m:>9s}" for m in (*METRICS, "wall_s")), file=sys.stderr)
    for arm, res in results.items():
        for r in range(res["K"] + 1):
            vals = [res["metrics"].get(f"{m}_r{r}", float("nan")) for m in METRICS] + [res["wall"][r]]
            print(f"{arm:7s} {r:2d} " + " ".join(f"{v:9.3f}" for v in vals), file=sys.stderr)
    return lines


if __name__ == "__main__":
    main()
