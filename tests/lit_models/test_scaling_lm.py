"""ScalingLM and its accounting (spec moe_scaling.md section 10, tests 1-4, and section 11's model errors): exact
parameter counts against the built models, MoE with one expert equals dense, the auxiliary loss in the objective,
the FLOP counter, bad configurations."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lit_models.nn.scaling_utils import build_config, count_params, default_intermediate_size, flops_per_token
from lit_models.scaling_lm import ScalingLM

WORKED = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "intermediate_size": 176, "num_experts": 8, "top_k": 2,
          "vocab_size": 100}


def _nonemb_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def test_worked_example_counts_match_the_spec_and_the_built_models() -> None:
    from transformers import AutoModelForCausalLM

    dense, moe = build_config(ffn="dense", **WORKED), build_config(ffn="moe", **WORKED)
    assert moe.intermediate_size == 88  # active-matched f_e = f // k
    c_dense, c_moe = count_params(dense), count_params(moe)
    assert c_dense["n_total_nonemb"] == c_dense["n_active_nonemb"] == 100_672
    assert (c_moe["n_total_nonemb"], c_moe["n_active_nonemb"]) == (304_448, 101_696)
    assert c_moe["n_embedding"] == 100 * 64  # tied
    for config, counts in ((dense, c_dense), (moe, c_moe)):
        model = AutoModelForCausalLM.from_config(config)
        assert _nonemb_numel(model) == counts["n_total_nonemb"]
        assert sum(p.numel() for p in model.parameters()) == counts["n_total"]


@pytest.mark.parametrize("impl", ["qwen2_moe", "olmoe"])
def test_other_moe_implementations_count_their_extras(impl: str) -> None:
    from transformers import AutoModelForCausalLM

    config = build_config(ffn="moe", moe_impl=impl, tie_word_embeddings=False, **WORKED)
    counts = count_params(config)
    model = AutoModelForCausalLM.from_config(config)
    assert _nonemb_numel(model) == counts["n_total_nonemb"]
    assert counts["n_embedding"] == 2 * 100 * 64  # untied: embed_tokens and lm_head
    # a token passes the router, k of the 8 experts and (Qwen2-MoE) the shared expert and its gate
    experts = 2 * (8 - 2) * 3 * 64 * 88
    assert counts["n_total_nonemb"] - counts["n_active_nonemb"] == experts


def test_flops_per_token() -> None:
    f = flops_per_token(dict(ffn="moe", **WORKED), seq_len=128)
    assert f == {"flops_6n": 6 * 101_696, "flops_kaplan": 6 * 101_696 + 6 * 2 * 128 * 64}
    assert default_intermediate_size(64) == 176 and default_intermediate_size(96) == 256


def test_moe_with_one_expert_equals_dense() -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    shape = dict(WORKED, num_experts=1, top_k=1, expert_intermediate_size=176)
    dense = AutoModelForCausalLM.from_config(build_config(ffn="dense", **shape)).eval()
    moe = AutoModelForCausalLM.from_config(build_config(ffn="moe", **shape)).eval()
    state = dense.state_dict()
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        gate, up, down = state.pop(p + "gate_proj.weight"), state.pop(p + "up_proj.weight"), state.pop(p + "down_proj.weight")
        state[p + "experts.gate_up_proj"] = torch.cat([gate, up])[None]
        state[p + "experts.down_proj"] = down[None]
        state[p + "gate.weight"] = torch.randn(1, 64)  # one expert: its renormalised weight is 1 whatever the logit
    missing, unexpected = moe.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


class _Blocks(Dataset):
    def __init__(self, n: int, T: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (n, T), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i], "attention_mask": torch.ones_like(self.rows[i])}


def _fit(tmp_path: Path, steps: int, B: int = 4, T: int = 16, **kwargs) -> tuple[ScalingLM, list[dict[str, str]]]:
    torch.manual_seed(0)
    module = ScalingLM(**{**WORKED, **kwargs}, summary_file=str(tmp_path / "run_summary.json"))
    trainer = Trainer(max_steps=steps, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, accelerator="cpu", limit_val_batches=2)
    loader = DataLoader(_Blocks(4 * B, T, 100), batch_size=B)
    trainer.fit(module, loader, DataLoader(_Blocks(2 * B, T, 100), batch_size=B))
    with open(next((tmp_path / "logs").glob("version_*/metrics.csv"))) as fh:
        return module, list(csv.DictReader(fh))


def _at(rows: list[dict[str, str]], key: str, step: int) -> float:
    return next(float(r[key]) for r in rows if r.get(key) and int(r["step"]) == step)


@pytest.mark.parametrize("coef", [0.01, 0.0])
def test_aux_loss_is_k_for_uniform_routing_and_in_the_objective_when_configured(tmp_path: Path, coef: float) -> None:
    torch.manual_seed(0)
    module = ScalingLM(ffn="moe", router_aux_loss_coef=coef, **WORKED)
    for layer in module.model.model.layers:
        torch.nn.init.zeros_(layer.mlp.gate.weight)  # uniform router probabilities
    out = module.model(torch.randint(0, 100, (2, 16)), output_router_logits=True)
    assert out.aux_loss.item() == 2.0  # load_balancing_loss_func: E * sum(f_e * 1/E) = sum f_e = k

    _, rows = _fit(tmp_path, steps=1, ffn="moe", router_aux_loss_coef=coef)
    loss, lm, aux = (_at(rows, k, 0) for k in ("train/loss", "train/lm_loss", "train/aux_loss"))
    assert aux > 0
    assert loss == pytest.approx(lm + coef * aux, abs=1e-6)
    if coef == 0:
        assert loss == lm


def test_flop_counter_and_summary_after_three_steps(tmp_path: Path) -> None:
    B, T = 4, 16
    _module, rows = _fit(tmp_path, steps=3, B=B, T=T, ffn="moe")
    n_active = 101_696
    assert _at(rows, "flops/cumulative", 2) == 6 * n_active * 3 * B * T
    assert _at(rows, "tokens_seen", 2) == 3 * B * T
    assert _at(rows, "params/n_active_nonemb", 0) == n_active
    assert 0 <= _at(rows, "moe/load_cv", 2) and 1 / 8 <= _at(rows, "moe/max_load_frac", 2) <= 1
    import json

    summary = json.loads((tmp_path / "run_summary.json").read_text())
    # validation ran at the final step although max_steps ended mid-epoch (4 batches per epoch)
    assert summary["status"] == "ok" and summary["steps"] == 3 and summary["tokens_seen"] == 3 * B * T
    assert summary["final_val_loss"] == pytest.approx(_at(rows, "val/loss", 2))
    # an untrained 100-token model is near chance: ln 100 nats
    assert abs(summary["final_val_loss"] - math.log(100)) < 0.5
    assert summary["n_active_nonemb"] == n_active and summary["n_total_nonemb"] == 304_448


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ffn": "sparse"}, r"ffn must be one of dense, moe"),
        ({"ffn": "moe", "moe_impl": "switch"}, r"moe_impl must be one of mixtral, qwen2_moe, olmoe"),
        ({"ffn": "moe", "top_k": 9}, r"top_k=9 must be in \[1, num_experts=8\]"),
        ({"ffn": "moe", "top_k": 0}, r"top_k=0 must be in"),
        ({"ffn": "moe", "num_experts": 0}, r"num_experts must be >= 1"),
        ({"d_model": 60, "n_heads": 8}, r"d_model=60 is not divisible by n_heads=8"),
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_heads=4 is not divisible by n_kv_heads=3"),
        ({"vocab_size": 99, "tokenizer": "x" * 100}, r"vocab_size=99 differs from the tokenizer's vocabulary \(100"),
    ],
)
def test_bad_configurations_name_the_values(kwargs: dict, match: str) -> None:
    args = {**WORKED, **kwargs}
    if "tokenizer" in args:
        args["tokenizer"] = _FakeTokenizer(len(args.pop("tokenizer")))
    with pytest.raises(ValueError, match=match):
        ScalingLM(**args)


class _FakeTokenizer:
    """len() and decode() are all ScalingLM reads from a tokenizer."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "é" * (ids[0] % 3)


def test_bits_per_byte_uses_the_decoded_bytes_of_the_scored_tokens(tmp_path: Path) -> None:
    tok = _FakeTokenizer(100)
    module = ScalingLM(**{**WORKED, "vocab_size": None}, tokenizer=tok)
    assert module.bytes_per_id[:4].tolist() == [0.0, 2.0, 4.0, 0.0]  # "é" is 2 UTF-8 bytes
    batch = _Blocks(2, 8, 100)[0]
    batch = {k: v[None] for k, v in batch.items()}
    with torch.no_grad():
        module._eval_step(batch)
    _nats, tokens, n_bytes = (float(m.compute()) for m in (module.val_nats, module.val_tokens, module.val_bytes))
    assert tokens == 7 and n_bytes == float(module.bytes_per_id[batch["labels"][0, 1:]].sum())
