"""ReMamba blocks on a tiny random Mamba-1 (d 32, 2 layers, d_state 8, vocab 64): span arithmetic, top-k selection,
the delta hook (exact identity, effect, gradients, firing counter), label alignment and cached decoding."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from torch import nn

from lit_models.nn.remamba import (
    ReMambaSelector,
    delta_adaptation,
    sample_train_ratios,
    span_sizes,
    stage2_embeddings,
    stage2_labels,
)
from lit_models.remamba import ReMamba

TINY = {"model_type": "mamba", "vocab_size": 64, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2,
        "expand": 2, "conv_kernel": 4, "tie_word_embeddings": True}


class _Tok:
    """Stand-in tokenizer of the 64-token tiny model."""

    eos_token_id = 2

    def __len__(self) -> int:
        return 64

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def tiny_remamba(**kwargs: object) -> ReMamba:
    torch.manual_seed(0)
    args = {"backbone": dict(TINY), "tokenizer": _Tok(), "lora_r": 4, "compress_ratio": 0.3, "keep_ratio": 0.1,
            "kernel": "torch"}
    args.update(kwargs)
    return ReMamba(**args)


def _ref_bias(model: ReMamba, value: float) -> list[torch.Tensor]:
    return [torch.full_like(b, value) for b in model.ret_bias]


# ============================================================================================ span arithmetic
def test_span_sizes_match_the_spec() -> None:
    assert span_sizes(200, 0.18, 0.05, 0) == (0, 36, 2)
    assert 200 - 36 + 2 == 166
    assert span_sizes(5500, 0.18, 0.009, 0)[1:] == (990, 9)
    assert span_sizes(5500, 0.005, 0.5, 0)[1:] == (28, 14)
    assert span_sizes(100, 0.3, 0.1, 0.5) == (50, 30, 3)


def test_training_sampler_caps_and_short_prompts() -> None:
    rng = random.Random(0)
    for _ in range(200):
        p, rho = sample_train_ratios(2000, rng)
        assert span_sizes(2000, p, rho)[1] <= 500 and 0.05 <= rho <= 0.2
        p, rho = sample_train_ratios(1000, rng)
        assert span_sizes(1000, p, rho)[1] == 100


@pytest.mark.parametrize(("key", "kwargs"), [
    ("compress_ratio", {"p": 0.0, "rho": 0.5}), ("compress_ratio", {"p": 1.5, "rho": 0.5}),
    ("keep_ratio", {"p": 0.5, "rho": 0.0}), ("keep_ratio", {"p": 0.5, "rho": 1.01}),
])
def test_ratios_outside_0_1_are_rejected(key: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=key):
        span_sizes(100, kwargs["p"], kwargs["rho"])
    with pytest.raises(ValueError, match=f"model.init_args.{key}"):
        tiny_remamba(**{key: kwargs["p"] if key == "compress_ratio" else kwargs["rho"]})


def test_span_may_not_swallow_the_query_token() -> None:
    with pytest.raises(ValueError, match="covers the last prompt token"):
        span_sizes(10, 1.0, 0.5)
    # ... and settings that always would are refused at construction, naming the keys
    with pytest.raises(ValueError, match="start_ratio \\+ compress_ratio must be < 1"):
        tiny_remamba(compress_ratio=0.3, start_ratio=0.8)
    with pytest.raises(ValueError, match="train_p_range: hi must be < 1"):
        tiny_remamba(train_p_range=(0.5, 1.0))


# ============================================================================================ selection
@pytest.mark.parametrize(("L", "p", "rho", "s"), [(50, 0.3, 0.1, 0.0), (200, 0.18, 0.05, 0.0), (97, 0.5, 0.33, 0.2),
                                                  (40, 0.9, 1.0, 0.0), (301, 0.05, 0.5, 0.6)])
def test_selection_keeps_exactly_k_positions_in_order(L: int, p: float, rho: float, s: float) -> None:
    torch.manual_seed(L)
    sel_mod = ReMambaSelector(16)
    s0, span, k = span_sizes(L, p, rho, s)
    sel = sel_mod.select(torch.randn(L, 16), s0, span, k)
    idx = sel.indices.tolist()
    assert len(idx) == k == sel.weights.numel() == sel.states.shape[0]
    assert idx == sorted(set(idx)) and s0 <= idx[0] and idx[-1] < s0 + span
    top = set((torch.topk(sel.scores, k).indices + s0).tolist())
    assert set(idx) == top
    assert bool(((sel.weights >= 0) & (sel.weights <= 1)).all())


def test_planted_query_copy_gets_weight_one_and_opposed_vectors_zero() -> None:
    sel_mod = ReMambaSelector(4)
    sel_mod.q_proj, sel_mod.k_proj = nn.Identity(), nn.Identity()
    H = torch.tensor([[1.0, 0, 0, 0], [-0.5, 0.8660254, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    sel = sel_mod.select(H, 0, 4, 2)  # scores: 1, -0.5, 0, 0
    assert sel.indices.tolist()[0] == 0 and sel.weights[0].item() == pytest.approx(1.0)
    assert sel.scores[1].item() == pytest.approx(-0.5, abs=1e-6)
    sel_all = sel_mod.select(H, 0, 4, 4)
    assert sel_all.weights[1].item() == 0.0


# ============================================================================================ the delta hook
def test_hook_with_unit_weights_and_zero_bias_is_exactly_plain_mamba() -> None:
    model = tiny_remamba()
    base = model.base.eval()
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (1, 30)))
    plain = base(inputs_embeds=embeds).logits
    with delta_adaptation(base, 5, torch.ones(6), list(model.ret_bias), "torch") as state:
        hooked = base(inputs_embeds=embeds).logits
    assert torch.equal(hooked, plain)
    assert state.fired == {0: 1, 1: 1}


def test_hook_changes_the_cpu_output_after_the_span_only() -> None:
    model = tiny_remamba()
    base = model.base.eval()
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (1, 30)))
    plain = base(inputs_embeds=embeds).logits
    with delta_adaptation(base, 5, torch.full((6,), 0.5), _ref_bias(model, 0.3), "torch"):
        hooked = base(inputs_embeds=embeds).logits
    assert torch.equal(hooked[:, :5], plain[:, :5])  # before the span: bit-identical
    assert (hooked[:, 5:] - plain[:, 5:]).abs().amax().item() > 1e-4


def test_hook_matches_a_reference_with_the_modified_dt_bias() -> None:
    """With w = 1 and b_ret = c at every position (start 0, k = T), the hooked run equals the plain model whose
    dt_proj bias is shifted by c: delta + c + b_dt."""
    model = tiny_remamba(lora_r=0)
    base = model.base.eval()
    ids = torch.randint(3, 64, (1, 12))
    embeds = base.get_input_embeddings()(ids)
    with delta_adaptation(base, 0, torch.ones(12), _ref_bias(model, 0.3), "torch"):
        hooked = base(inputs_embeds=embeds).logits
    with torch.no_grad():
        for layer in base.backbone.layers:
            layer.mixer.dt_proj.bias += 0.3
    shifted = base(inputs_embeds=embeds).logits
    torch.testing.assert_close(hooked, shifted, atol=1e-5, rtol=1e-5)


def test_hook_counter_raises_when_a_mixer_bypasses_the_scan() -> None:
    model = tiny_remamba()
    base = model.base.eval()
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (1, 10)))
    mixer = base.backbone.layers[1].mixer
    mixer.forward = lambda hidden_states, *a, **k: torch.zeros_like(hidden_states)  # a path without the scan
    with (pytest.raises(RuntimeError, match=r"Δ hook did not run in layers \[1\]"),
          delta_adaptation(base, 2, torch.ones(3), list(model.ret_bias), "torch")):
        base(inputs_embeds=embeds)


def test_gradients_reach_selector_ret_bias_dt_proj_and_lora_not_frozen_weights() -> None:
    model = tiny_remamba()
    model.train()
    ids = torch.randint(3, 64, (1, 40))
    labels = torch.full_like(ids, -100)
    labels[:, 30:] = ids[:, 30:]
    loss, sel = model.sequence_loss({"input_ids": ids, "labels": labels, "prompt_len": 30}, 0.3, 0.5)
    loss.backward()
    assert sel is not None and sel.k == 5
    named = dict(model.named_parameters())
    for prefix in ("selector.q_proj", "selector.k_proj", "selector.v_proj", "ret_bias", "dt_proj.modules_to_save",
                   "lora_B"):
        grads = [p.grad for n, p in named.items() if prefix in n and p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # LoRA B starts at zero, so A's first gradient is exactly zero; it exists (A is in the graph)
    assert all(p.grad is not None for n, p in named.items() if "lora_A" in n or "lora_embedding_A" in n)
    frozen = [p for n, p in named.items() if n.endswith("in_proj.base_layer.weight")]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_full_pass_through_equals_the_plain_model_loss() -> None:
    """rho = 1 keeps every span position; with V returning the original embeddings and w = 1 the stage-2 input is
    the original sequence, so ReMamba's loss equals plain Mamba's exactly (index and label alignment)."""
    model = tiny_remamba()
    model.eval()
    ids = torch.randint(3, 64, (1, 24))
    labels = torch.full_like(ids, -100)
    labels[:, 18:] = ids[:, 18:]
    embeds = model.base.get_input_embeddings()(ids)
    select = model.selector.select

    def passthrough(H: torch.Tensor, s0: int, span: int, k: int):
        sel = select(H, s0, span, k)
        sel.states = embeds[0, sel.indices]
        sel.weights = torch.ones_like(sel.weights)
        return sel

    model.selector.select = passthrough
    batch = {"input_ids": ids, "labels": labels, "prompt_len": 18}
    remamba_loss, sel = model.sequence_loss(batch, 0.5, 1.0)
    plain_loss, _ = model.sequence_loss(batch, None, None)
    assert sel is not None and sel.k == sel.span == 9
    assert torch.equal(remamba_loss, plain_loss)


def test_stage2_alignment_drops_the_span_and_rejects_supervised_drops() -> None:
    sel_mod = ReMambaSelector(4)
    H = torch.randn(10, 4)
    sel = sel_mod.select(H, 2, 5, 2)
    embeds = torch.arange(12.0).view(1, 12, 1).expand(1, 12, 4)
    out = stage2_embeddings(embeds, sel)
    assert out.shape == (1, 12 - 5 + 2, 4)
    assert out[0, :2, 0].tolist() == [0.0, 1.0] and out[0, 4:, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    labels = torch.tensor([[-100] * 10 + [5, 6]])
    assert stage2_labels(labels, sel).tolist() == [[-100] * 7 + [5, 6]]
    with pytest.raises(AssertionError, match=r"compressed positions \[3\]"):
        stage2_labels(torch.tensor([[-100, -100, -100, 7] + [-100] * 8]), sel)


def test_batch_size_above_one_is_rejected() -> None:
    model = tiny_remamba()
    ids = torch.randint(3, 64, (2, 20))
    with pytest.raises(ValueError, match="batch_size=1"):
        model.sequence_loss({"input_ids": ids, "labels": ids, "prompt_len": 10}, 0.3, 0.1)


# ============================================================================================ decoding
def test_cached_greedy_decoding_equals_full_recomputation() -> None:
    model = tiny_remamba()
    model.eval()
    prompt = torch.randint(3, 64, (1, 40))
    new, _, _ = model.generate(prompt, 8)
    with torch.no_grad():
        sel = model.select(prompt, 0.3, 0.1, 0.0)
        embeds = stage2_embeddings(model.base.get_input_embeddings()(prompt), sel)
        ref = []
        for _ in range(8):
            hidden = model.stage2(embeds, sel).last_hidden_state
            token = model.base.lm_head(hidden[:, -1]).argmax(-1)
            ref.append(int(token))
            embeds = torch.cat([embeds, model.base.get_input_embeddings()(token[:, None])], dim=1)
    assert new == ref


def test_not_a_mamba_backbone_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="LlamaForCausalLM, not a MambaForCausalLM"):
        ReMamba(backbone="llama-tiny", lora_r=0)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")
def test_cuda_kernel_hook_matches_the_torch_scan() -> None:
    model = tiny_remamba().cuda().eval()
    base = model.base
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (1, 64), device="cuda"))
    w = torch.full((6,), 0.5, device="cuda")
    outs = {}
    for kernel in ("torch", "cuda"):
        with delta_adaptation(base, 5, w, _ref_bias(model, 0.3), kernel) as state:
            outs[kernel] = base(inputs_embeds=embeds).logits
        assert state.fired == {0: 1, 1: 1}
    torch.testing.assert_close(outs["cuda"], outs["torch"], atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_kernel_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="kernel='cuda' needs CUDA"):
        tiny_remamba(kernel="cuda")


def test_zero_weight_and_very_negative_bias_freeze_the_ssm_state() -> None:
    """w = 0, b_ret = -30: delta ~ softplus(-30 + b_dt) ~ 0 at the hooked positions, so every layer's SSM state after
    them equals the state before them."""
    model = tiny_remamba(lora_r=0)
    base = model.base.eval()
    embeds = base.get_input_embeddings()(torch.randint(3, 64, (1, 16)))
    with torch.no_grad():
        before = base.backbone(inputs_embeds=embeds[:, :10], use_cache=True).cache
        with delta_adaptation(base, 10, torch.zeros(6), _ref_bias(model, -30.0), "torch"):
            after = base.backbone(inputs_embeds=embeds, use_cache=True).cache
    for layer in range(2):
        s_before = before.get_recurrent_state(layer, state_idx=0)
        s_after = after.get_recurrent_state(layer, state_idx=0)
        assert s_before.abs().amax() > 1e-3
        torch.testing.assert_close(s_after, s_before, atol=1e-6, rtol=0)


def test_lora_target_matching_no_module_lists_the_names() -> None:
    with pytest.raises(ValueError, match=r"lora_targets: \['q_proj'\] match no module of MambaForCausalLM; module "
                                         r"names: \[.*'dt_proj'"):
        tiny_remamba(lora_targets=["q_proj"])
    with pytest.raises(ValueError, match=r"full_train: \['dt_bias'\]"):
        tiny_remamba(full_train=["dt_bias"])
