"""``train.py``'s entry point: input and config errors are one ``error:`` line with exit status 2 (no traceback),
unless ``LITLAB_TRACEBACK=1`` asks for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
ARGV = ["train.py", "test", "--config", str(ROOT / "configs/constrained_mt/demo.yaml"),
        "--model.init_args.translate_template", "Translate.", "--trainer.logger", "false"]


def test_config_error_is_one_line_with_status_2(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ARGV)
    monkeypatch.delenv("LITLAB_TRACEBACK", raising=False)
    assert train.run() == 2
    err = capsys.readouterr().err
    assert "error: model.init_args.translate_template lacks the required placeholder(s)" in err
    assert "Traceback" not in err


def test_traceback_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ARGV)
    monkeypatch.setenv("LITLAB_TRACEBACK", "1")
    with pytest.raises(ValueError, match="translate_template"):
        train.run()


def test_fit_of_an_inference_only_method_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(ROOT / "configs/constrained_mt/demo.yaml"),
                                      "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    monkeypatch.delenv("LITLAB_TRACEBACK", raising=False)
    assert train.run() == 2
    err = capsys.readouterr().err
    assert "error: ConstrainedTranslation is inference-only" in err and "Traceback" not in err
