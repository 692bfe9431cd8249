"""train.py end to end for constrained translation: every shipped config runs test / predict (the SmolLM2 ones on the
tiny random Llama with the SmolLM2 chat template), the scripted demo reaches the spec's exact per-round numbers, the
predictions file holds every round, and fit / bad input are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_models.cli import main
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "constrained_mt"
TINY = ["--model.init_args.model_path", "llama-tiny", "--model.init_args.max_new_tokens", "8"]


def args(config: str, run_dir: Path, *extra: str) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir),
                                                                               "name": "logs"}}]
    return ["--config", str(CONFIGS / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", json.dumps(logger), "--trainer.enable_progress_bar", "false", *extra]


def predictions(run_dir: Path, stage: str) -> list[dict]:
    [path] = list(run_dir.glob(f"logs/version_*/constrained_mt_{stage}.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_config_gives_the_spec_numbers(tmp_path: Path) -> None:
    main(["test", *args("demo.yaml", tmp_path, "--data.init_args.max_items", "100")])
    rows = read_metrics(tmp_path)
    assert [round(metric(rows, f"test/csr_r{r}"), 4) for r in range(4)] == [0.7, 0.9, 1.0, 1.0]
    assert [round(metric(rows, f"test/exact_r{r}"), 4) for r in range(4)] == [0.6, 0.8, 1.0, 1.0]
    assert [metric(rows, f"test/llm_calls_r{r}") for r in range(4)] == [100, 40, 20, 0]
    assert metric(rows, "test/sacrebleu_r2") == pytest.approx(100.0) and metric(rows, "test/chrf") == 100.0
    recs = predictions(tmp_path, "test")
    assert len(recs) == 100 and [r["selected_round"] for r in recs[:5]] == [2, 1, 0, 0, 0]
    [summary] = list(tmp_path.glob("logs/version_*/constrained_mt_test.summary.json"))
    assert json.loads(summary.read_text())["metrics"]["csr_r1"] == pytest.approx(0.9)


def test_terminology_config_on_the_tiny_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    main(["test", *args("terminology_smollm2.yaml", tmp_path, *TINY, "--data.init_args.data_dir", str(data),
                        "--data.init_args.max_items", "10", "--data.init_args.batch_size", "5",
                        "--model.init_args.max_revisions", "1")])
    rows = read_metrics(tmp_path)
    assert metric(rows, "test/reference_csr") == 1.0 and metric(rows, "test/llm_calls_r0") == 10
    assert 0 <= metric(rows, "test/csr_r0") <= metric(rows, "test/csr_r1") <= 1
    assert metric(rows, "test/llm_calls_r1") == 10 - round(metric(rows, "test/exact_r0") * 10)
    recs = predictions(tmp_path, "test")
    assert len(recs) == 10
    first = recs[0]["rounds"][0]["prompt"]
    assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>assistant\n")
    assert "Use these term translations exactly as written:\n- \"" in first and "German: " in first


def test_predict_config_on_a_user_jsonl(tmp_path: Path) -> None:
    user = tmp_path / "mine.jsonl"
    user.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "source": "Das <b>Haus</b> ist alt.", "constraints": [{"src": "Haus", "tgt": "house"}],
         "reference": "The <b>house</b> is old.", "note": "kept"},
        {"id": "b", "source": "Der Baum {0}", "constraints": [{"src": "Baum", "tgt": ["tree", "trunk"]}]},
    ]) + "\n")
    main(["predict", *args("predict_jsonl.yaml", tmp_path, *TINY, "--data.init_args.predict_file", str(user),
                           "--model.init_args.max_revisions", "1")])
    recs = predictions(tmp_path, "predict")
    assert [r["id"] for r in recs] == ["a", "b"] and recs[0]["meta_note"] == "kept"
    assert all(isinstance(r["output"], str) and r["rounds"][0]["n_units"] == r["n_units"] for r in recs)
    assert recs[0]["n_units"] == 2 and recs[1]["n_units"] == 2  # term + <b> (one tag: no order unit) / term + {0}
    rows = read_metrics(tmp_path)  # a reference exists: predict metrics go to the loggers
    assert metric(rows, "predict/llm_calls_r0") == 2 and 0 <= metric(rows, "predict/csr") <= 1


def test_fit_is_refused_and_bad_input_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="inference-only; use test or predict"):
        main(["fit", *args("demo.yaml", tmp_path, "--trainer.max_steps", "1")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "constraints": []}\n{"source": "b", "constraints": [{"src": "b", "tgt": ""}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: constraint 0 has an empty 'tgt'"):
        main(["predict", *args("demo.yaml", tmp_path, "--data.init_args.predict_file", str(bad))])
    with pytest.raises(ValueError, match=r"revise_template lacks the required placeholder\(s\) \['\{previous\}'\]"):
        main(["test", *args("demo.yaml", tmp_path, "--model.init_args.revise_template",
                            "Fix {source}{unmet_lines}")])
