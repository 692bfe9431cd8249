"""The shared JSONL reader: records with their line numbers, blank lines skipped, errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.jsonl import iter_jsonl


def test_records_lines_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes('\ufeff{"a": 1}\n\n  \n{"a": "ü"}\n'.encode())
    before = path.read_bytes()
    assert list(iter_jsonl(path)) == [(1, f"{path}:1", {"a": 1}), (4, f"{path}:4", {"a": "ü"})]
    assert [loc for _, loc, _ in iter_jsonl(path, lambda p, n: f"line {n} of {p.name}")] == [
        "line 1 of x.jsonl", "line 4 of x.jsonl"]
    assert path.read_bytes() == before  # never modified
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"{path.name}:2: not valid JSON \(Expecting value at column 7\)"):
        list(iter_jsonl(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path.name}:2: expected a JSON object, got list"):
        list(iter_jsonl(path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
