"""Reading the CSV metrics of runs started through train.py in tests (shared by the train.py integration tests)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the newest ``<run_dir>/logs/version_*/metrics.csv``."""
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def metric(rows: list[dict[str, str]], key: str, step: int | None = None) -> float:
    """Last logged value of ``key`` (at ``step`` if given); fails when it was never logged."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "") and (step is None or int(r["step"]) == step)]
    assert values, f"{key} not logged (step={step})"
    return values[-1]
