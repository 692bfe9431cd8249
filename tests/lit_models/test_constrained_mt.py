"""ConstrainedTranslation with the scripted fake LLM (spec section 10), prompts, output cleaning and the
OpenAI-compatible backend against a loopback server (retries, failures recorded, the run goes on)."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from datamodules.demo.terminology import synthetic_terminology
from lit_models.constrained_mt import (
    DEFAULT_REVISE,
    DEFAULT_TRANSLATE,
    ConstrainedTranslation,
    clean_output,
    render_template,
)
from lit_models.nn.llm_backends import LLMRequest, OpenAICompatBackend


def lexical_items() -> list[dict[str, Any]]:
    items = synthetic_terminology()[:100]
    for i, item in enumerate(items):
        item["index"] = i
    return items


def run(policy: str, k: int = 3, select: str = "best", batches: int = 1, **kw: Any
        ) -> tuple[ConstrainedTranslation, dict[str, float], list[dict[str, Any]]]:
    model = ConstrainedTranslation(backend="scripted", scripted_policy={"name": policy}, max_revisions=k,
                                   select=select, src_lang="English", tgt_lang="German", **kw)
    items = lexical_items()
    size = len(items) // batches
    records = [r for b in range(batches) for r in model.translate_batch(items[b * size:(b + 1) * size])]
    metrics, _ = model.compute_metrics(records)
    return model, metrics, records


def rounds(metrics: dict[str, float], name: str, k: int = 3) -> list[float]:
    return [round(metrics[f"{name}_r{r}"], 6) for r in range(k + 1)]


def test_fix_one_per_round_exact_expectations() -> None:
    model, m, records = run("fix_one_per_round", batches=4)  # 4 batches of 25: per-batch rounds add up
    assert rounds(m, "csr") == [0.7, 0.9, 1.0, 1.0]
    assert rounds(m, "exact") == [0.6, 0.8, 1.0, 1.0]
    assert rounds(m, "llm_calls") == [100, 40, 20, 0]
    assert m["sacrebleu_r2"] == pytest.approx(100.0) and m["chrf_r2"] == pytest.approx(100.0)
    assert m["sacrebleu_r0"] < 100 and m["csr"] == 1.0 and m["reference_csr"] == 1.0
    assert m["revised_frac"] == 0.4 and m["regressions"] == 0 and m["failed_calls"] == 0 and m["echo_r0"] == 0
    # satisfied items are never re-prompted: i % 5 >= 2 only in round 0, i % 5 == 1 in rounds 0-1
    calls: dict[str, list[int]] = {}
    for item_id, r in model.backend.calls:
        calls.setdefault(item_id, []).append(r)
    for i in range(100):
        assert calls[f"synthetic-{i:03d}"] == {0: [0, 1, 2], 1: [0, 1]}.get(i % 5, [0])
    rec = records[0]
    assert [e["round"] for e in rec["rounds"]] == [0, 1, 2] and rec["selected_by_round"] == [0, 1, 2, 2]
    assert rec["output"] == rec["reference"] and rec["rounds"][0]["unmet"] == [
        '"size" must be translated as "Größe"', '"bread" must be translated as "Brot"']


def test_ignore_revisions_and_no_revisions() -> None:
    _, m, _ = run("ignore_revisions")
    assert rounds(m, "csr") == [0.7] * 4 and rounds(m, "llm_calls") == [100, 40, 40, 40]
    _, m0, _ = run("fix_one_per_round", k=0)
    assert m0["csr_r0"] == m0["csr"] == pytest.approx(0.7) and m0["llm_calls_r0"] == 100 and "csr_r1" not in m0
    _, mn, _ = run("fix_one_per_round", detection="none")
    assert mn["csr"] == pytest.approx(0.7) and "llm_calls_r1" not in mn


def test_break_other_regresses_but_best_never_drops() -> None:
    _, best, recs = run("break_other", select="best")
    csr = rounds(best, "csr")
    assert all(a <= b for a, b in itertools.pairwise(csr)) and best["regressions"] > 0
    for r in recs:  # per item, the selected satisfied count never decreases
        assert all(a <= b for a, b in itertools.pairwise(r["n_met_by_round"]))
    _, last, recs_last = run("break_other", select="last")
    assert last["regressions"] > 0
    assert any(a > b for r in recs_last for a, b in itertools.pairwise(r["n_met_by_round"]))


def test_self_detection_revises_every_item_without_the_unmet_list() -> None:
    model = ConstrainedTranslation(backend="scripted", scripted_policy={"name": "echo_source"}, max_revisions=1,
                                   detection="self")
    recs = model.translate_batch(lexical_items()[:5])
    assert [len(r["rounds"]) for r in recs] == [2] * 5
    assert "check every requirement" in recs[0]["rounds"][1]["prompt"]
    assert "must be translated" not in recs[0]["rounds"][1]["prompt"]


def test_prompts_render_and_drop_empty_lines() -> None:
    model = ConstrainedTranslation(backend="scripted", scripted_policy={"name": "echo_source"})
    item = {"id": "a", "source": "Das <b>Haus</b> {0}", "constraints": [{"src": "Haus", "tgt": ["house", "home"]}]}
    units = model.checker.units(item["source"])
    prompt = model.translate_prompt(item, units)
    assert prompt == ('Translate the following German text into English.\n'
                      'Use these term translations exactly as written:\n- "Haus" \u2192 "house" or "home"\n'
                      'Keep every markup tag and placeholder (<b>, {0}) unchanged, correctly nested and in the same '
                      'order.\nAnswer with the English translation only.\n\nGerman: Das <b>Haus</b> {0}')
    plain = model.translate_prompt({**item, "source": "Das Haus", "constraints": []}, [])
    assert plain == "Translate the following German text into English.\nAnswer with the English translation " \
                    "only.\n\nGerman: Das Haus"
    check = model.checker.check(item["source"], "The <b>building</b>", item["constraints"], units=units)
    revise = model.revise_prompt(item, units, "The <b>building</b>", check)
    assert revise.splitlines()[:2] == ["Source (German): Das <b>Haus</b> {0}",
                                       "Current English translation: The <b>building</b>"]
    assert '- "Haus" must be translated as "house" or "home"' in revise
    assert "- placeholder {0} must be kept unchanged (missing)" in revise
    assert render_template("a {{x}} {source}\nb{unmet_lines}", {"source": "s", "unmet_lines": ""}) == "a {x} s"


@pytest.mark.parametrize(("key", "template", "match"), [
    ("translate_template", "Translate {source}", r"translate_template lacks .*\{constraint_lines\}"),
    ("translate_template", DEFAULT_TRANSLATE + " {foo}", r"unknown placeholder.*\{foo\}"),
    ("revise_template", "Fix {source} {previous}", r"revise_template lacks .*\{unmet_lines\}"),
    ("revise_template", DEFAULT_REVISE + " {", "not a valid format template"),
])
def test_template_errors_name_the_placeholder(key: str, template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConstrainedTranslation(backend="scripted", scripted_policy={"name": "echo_source"}, **{key: template})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_revisions": -1}, "max_revisions must be >= 0"),
    ({"select": "first"}, r"select must be one of \['best', 'last'\]"),
    ({"detection": "llm"}, "detection must be one of"),
    ({"overlap": "greedy"}, "overlap must be one of"),
    ({"tag_order": "loose"}, "tag_order must be one of"),
    ({"scripted_policy": None}, "scripted_policy"),
    ({"sacrebleu_tokenize": "nope"}, "use 'char'"),
])
def test_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    args = {"backend": "scripted", "scripted_policy": {"name": "echo_source"}, **kwargs}
    with pytest.raises(ValueError, match=match):
        ConstrainedTranslation(**args)


def test_unbalanced_source_markup_names_the_item() -> None:
    model = ConstrainedTranslation(backend="scripted", scripted_policy={"name": "echo_source"})
    with pytest.raises(ValueError, match=r"item 'x7'.*unclosed tag <b>"):
        model.translate_batch([{"id": "x7", "index": 0, "source": "<b>Hallo", "constraints": []}])


def test_echo_flag() -> None:
    from lit_models.constrained_mt import is_echo

    assert is_echo('- "wegen" \u2192 "because of"') and is_echo('"Haus" must be translated as "house"')
    assert not is_echo("The house is old.")


def test_clean_output() -> None:
    assert clean_output('  English: "The house."  ', "English") == "The house."
    assert clean_output("Translation: The house.\nNote: I kept the term.", "English") == "The house."
    assert clean_output("\u201eDas Haus\u201c", "German") == "Das Haus"
    assert clean_output("English translation: a\nb", "English", single_line=False) == "a\nb"


# ----------------------------------------------------------------------------------------- HTTP backend
class _Handler(BaseHTTPRequestHandler):
    script: ClassVar[list[int]] = []  # status codes to return in order, then 200
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        status = type(self).script.pop(0) if type(self).script else 200
        if status == 0:  # hang past the client's timeout
            threading.Event().wait(0.5)
            status = 200
        prompt = body["messages"][-1]["content"]
        content = prompt[5:] if prompt.startswith("echo:") else "Translation: The house."
        payload = {"choices": [{"message": {"content": content}}]} if status == 200 else {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Any:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Handler.script, _Handler.seen = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_backend_retries_then_succeeds(server: str) -> None:
    _Handler.script = [503, 0]  # a 503, then a timeout, then success
    backend = OpenAICompatBackend(server, "m", timeout_s=0.2, max_retries=2, backoff_s=0, concurrency=1)
    [resp] = backend.generate([LLMRequest("Translate: Haus")])
    assert (resp.text, resp.error, resp.attempts) == ("Translation: The house.", None, 3)
    body = _Handler.seen[-1]
    assert body["temperature"] == 0 and body["top_p"] == 1 and body["messages"][-1]["content"] == "Translate: Haus"


def test_openai_backend_keeps_the_order_under_concurrency(server: str) -> None:
    backend = OpenAICompatBackend(server, "m", timeout_s=5, max_retries=0, concurrency=4)
    responses = backend.generate([LLMRequest(f"echo:{i}") for i in range(8)])
    assert [r.text for r in responses] == [str(i) for i in range(8)]


def test_openai_failures_are_recorded_and_the_run_continues(server: str) -> None:
    _Handler.script = [500, 500, 500]  # item 0 fails every attempt (1 + 2 retries); item 1 then succeeds
    model = ConstrainedTranslation(backend="openai", api_base=server, api_model="m", request_timeout_s=1,
                                   max_retries=2, retry_backoff_s=0, concurrency=1, max_revisions=1)
    items = [{"id": f"s{i}", "index": i, "source": "Das Haus", "reference": "The house.",
              "constraints": [{"src": "Haus", "tgt": ["home"]}]} for i in range(2)]
    recs = model.translate_batch(items)
    metrics, _ = model.compute_metrics(recs)
    assert recs[0]["failed"] and "failed after 3 attempts: HTTP 500" in recs[0]["rounds"][0]["error"]
    assert recs[0]["output"] == "" and len(recs[0]["rounds"]) == 1  # not revised after failing
    assert recs[1]["output"] == "The house." and not recs[1]["failed"] and len(recs[1]["rounds"]) == 2
    assert metrics["failed_calls"] == 1 and metrics["failed_items"] == 1 and metrics["llm_calls_r1"] == 1


def test_openai_refuses_remote_hosts_and_needs_a_model() -> None:
    with pytest.raises(ValueError, match="allow_remote=true"):
        OpenAICompatBackend("https://api.example.com/v1", "m")
    assert OpenAICompatBackend("https://api.example.com/v1", "m", allow_remote=True).url.endswith("/chat/completions")
    with pytest.raises(ValueError, match="api_model"):
        ConstrainedTranslation(backend="openai", api_base="http://localhost:1/v1")


# ----------------------------------------------------------------------------------------- HF backend
def test_hf_backend_batches_left_padded_like_single_calls() -> None:
    from lit_models.nn.llm_backends import HFChatBackend

    backend = HFChatBackend.from_name("llama-tiny", max_new_tokens=6)
    assert backend.stop_ids == [0, 2]  # SmolLM2: <|endoftext|>, and <|im_end|> (EOS and end of turn)
    prompts = ["Translate: Haus", "Translate the following German text into English: Der alte Baum steht dort."]
    batched = backend.generate([LLMRequest(p) for p in prompts])
    single = [backend.generate([LLMRequest(p)])[0] for p in prompts]
    assert [r.text for r in batched] == [r.text for r in single]
    assert batched[0].rendered.endswith("<|im_start|>user\nTranslate: Haus<|im_end|>\n<|im_start|>assistant\n")


def test_hf_backend_errors() -> None:
    from types import SimpleNamespace

    from lit_models.nn.llm_backends import HFChatBackend

    with pytest.raises(ValueError, match="has no chat template"):
        HFChatBackend(model=None, tokenizer=SimpleNamespace(chat_template=None, name_or_path="base-lm"))
    with pytest.raises(FileNotFoundError, match="model_path: /nonexistent/model does not exist"):
        HFChatBackend.from_name("/nonexistent/model")
