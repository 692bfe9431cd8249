"""LayerSelectiveFreezing: SLAM's trainable fractions on paper-sized shapes (meta device), anchored matching, GPT-2
naming, frozen weights untouched by training, and the errors the spec names."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from callbacks.layer_freezing import LayerSelectiveFreezing
from datamodules.instruction import InstructionDataModule
from lit_models.causal_lm import CausalLMFineTune
from lit_models.hf import resolve_model_dir


def _meta_llama(**kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**kwargs))


LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "vocab_size": 32000}
LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
              "vocab_size": 32000}


@pytest.mark.parametrize(
    ("shape", "layers", "trainable", "total", "fraction"),
    [
        (LLAMA2_7B, 6, 541_065_216, 6_738_415_616, 0.080296),  # spec 3.2: 8.0296 %
        (LLAMA2_7B, 5, 450_887_680, 6_738_415_616, 0.066913),  # the released 7B script: layers 0-4
        (LLAMA2_13B, 6, 849_346_560, 13_015_864_320, 0.065255),  # 6.5255 %
    ],
)
def test_paper_fractions_on_llama2_shapes(shape: dict, layers: int, trainable: int, total: int, fraction: float) -> None:
    model = _meta_llama(**shape)
    stats = LayerSelectiveFreezing(layers=list(range(layers))).apply(model)
    assert stats["trainable_params"] == trainable and stats["total_params"] == total
    assert stats["trainable_fraction"] == pytest.approx(fraction, abs=1e-6)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable_names) == 2 * layers
    assert all(n.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")) for n in trainable_names)


def test_smollm2_fraction_counts_tied_embeddings_once() -> None:
    config = AutoConfig.from_pretrained(resolve_model_dir("smollm2-135m"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    stats = LayerSelectiveFreezing(layers=[0, 1, 2, 3, 4, 5], expected_fraction=0.078927).apply(model)
    assert (stats["trainable_params"], stats["total_params"]) == (10_616_832, 134_515_008)


def test_layer_one_never_matches_layer_eleven_and_extra_trainable() -> None:
    model = _meta_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                        vocab_size=100)
    freezing = LayerSelectiveFreezing(layers=[1], extra_trainable=["embed_tokens"])
    freezing.apply(model)
    assert freezing.trainable_names == ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                                        "model.layers.1.mlp.up_proj.weight"]
    custom = LayerSelectiveFreezing(layers=[11], patterns=["self_attn.q_proj", "self_attn.v_proj"])
    custom.apply(model)
    assert custom.trainable_names == ["model.layers.11.self_attn.q_proj.weight", "model.layers.11.self_attn.v_proj.weight"]


def test_gpt2_naming_trains_the_mlp_not_the_attention_projection() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    freezing = LayerSelectiveFreezing(layers=[2])
    freezing.apply(model)
    assert freezing.trainable_names == ["transformer.h.2.mlp.c_fc.bias", "transformer.h.2.mlp.c_fc.weight",
                                        "transformer.h.2.mlp.c_proj.bias", "transformer.h.2.mlp.c_proj.weight"]


def test_random_layers_are_seeded() -> None:
    model = _meta_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                        vocab_size=100)
    a = LayerSelectiveFreezing(random_layers=4, seed=3).apply(model)["layers"]
    b = LayerSelectiveFreezing(random_layers=4, seed=3).apply(model)["layers"]
    assert a == b and len(set(a)) == 4 and all(0 <= i < 12 for i in a)


def test_bad_selections_name_the_problem(tmp_path: Path) -> None:
    model = _meta_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=100)
    with pytest.raises(ValueError, match=r"layers \[4, 7\] out of range: the model has 4 decoder layers \(indices 0-3\)"):
        LayerSelectiveFreezing(layers=[0, 4, 7]).apply(model)
    with pytest.raises(ValueError, match=r"pattern 'mlp.w1' matches no parameter of layer 0 \(its sub-modules: .*"
                                         r"mlp.up_proj"):
        LayerSelectiveFreezing(layers=[0], patterns=["mlp.w1"]).apply(model)
    with pytest.raises(ValueError, match="exactly one of layers, layers_file, random_layers"):
        LayerSelectiveFreezing(layers=[0], random_layers=2)
    with pytest.raises(ValueError, match="exactly one of"):
        LayerSelectiveFreezing()
    with pytest.raises(ValueError, match="expected_fraction"):
        LayerSelectiveFreezing(layers=[0], expected_fraction=0.5).apply(model)
    other = tmp_path / "selection.json"
    other.write_text(json.dumps({"fingerprint": {"model_type": "llama", "num_layers": 32, "hidden_size": 4096,
                                                 "intermediate_size": 11008}, "selected": [0, 1]}))
    with pytest.raises(ValueError, match="was computed for a model with"):
        LayerSelectiveFreezing(layers_file=str(other)).apply(model)


def _data(tmp_path: Path) -> InstructionDataModule:
    rows = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a, b in ((2, 3), (7, 5), (4, 9), (1, 8), (6, 6), (3, 2), (9, 1), (5, 4))]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return InstructionDataModule(train_files=[str(path)], batch_size=4, max_length=64)


def test_training_changes_only_the_selected_weights(tmp_path: Path) -> None:
    module = CausalLMFineTune(model="llama-tiny", mode="full", lr=1e-2, warmup_steps=0, lr_schedule="constant",
                              model_config_overrides={"num_hidden_layers": 3})
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    freezing = LayerSelectiveFreezing(layers=[1])
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[freezing],
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=_data(tmp_path))
    selected = {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, param in module.model.named_parameters():
        if name in selected:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # bit-identical
    assert sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"]) == \
        freezing.stats["trainable_params"] == 2 * 64 * 128


class _EagerOptimizer(CausalLMFineTune):
    """Builds its optimizer over every parameter, as if before freezing."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


def test_an_optimizer_holding_frozen_weights_is_an_error(tmp_path: Path) -> None:
    module = _EagerOptimizer(model="llama-tiny", mode="full", model_config_overrides={"num_hidden_layers": 2})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LayerSelectiveFreezing(layers=[0])], default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="built before LayerSelectiveFreezing froze the model"):
        trainer.fit(module, datamodule=_data(tmp_path))
