"""Dense and MoE decoder configs for scaling-law runs, and their exact parameter and FLOP accounting.

Source: ``shared/methods/moe_scaling.md`` section 3.1 (our conventions, stated there). Symbols: d hidden size, L layers,
V vocabulary, T sequence length, H heads, H_kv key/value heads, h = d/H, f dense intermediate size, f_e expert
intermediate size, E experts, k top-k. Per layer: attention ``d·H·h + 2·d·H_kv·h + H·h·d``; dense SwiGLU ``3·d·f``;
MoE router ``d·E``, all experts ``E·3·d·f_e``, the active ones ``k·3·d·f_e``; two RMSNorms ``2d``; the final norm
``d``. **N counts non-embedding parameters**: ``embed_tokens`` and ``lm_head`` are excluded, tied or not (``V·d``, x2
untied, is reported separately as ``n_embedding``). Implementation extras are counted where the model has them:
Qwen2-MoE's shared expert (``3·d·f_e``) and its gate (``d``) in both totals, OLMoE's q/k RMSNorms (``H·h + H_kv·h``).

Worked example (the spec's test): d 64, L 2, H = H_kv = 4, f 176, E 8, k 2, f_e 88 gives N_dense 100,672, N_total
304,448 and N_active 101,696.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from transformers import PretrainedConfig

__all__ = ["FFN_TYPES", "MOE_IMPLS", "build_config", "count_params", "default_intermediate_size", "flops_per_token"]

FFN_TYPES = ("dense", "moe")
MOE_IMPLS = ("mixtral", "qwen2_moe", "olmoe")


def default_intermediate_size(d_model: int) -> int:
    """Dense SwiGLU width ``ceil(8/3 · d)`` rounded up to a multiple of 16 (LLaMA's rule; d 64 -> 176)."""
    return int(math.ceil(math.ceil(8 * d_model / 3) / 16) * 16)


def build_config(
    ffn: Literal["dense", "moe"] = "dense",
    vocab_size: int = 2048,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = True,
    num_experts: int = 8,
    top_k: int = 2,
    expert_intermediate_size: int | None = None,
    router_aux_loss_coef: float = 0.01,
    router_jitter_noise: float = 0.0,
    moe_impl: Literal["mixtral", "qwen2_moe", "olmoe"] = "mixtral",
    experts_implementation: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """A transformers config: ``LlamaConfig`` (``ffn="dense"``) or the MoE config of ``moe_impl``.

    MoE defaults are "active-matched" (spec section 3.1 and pitfall 9): ``expert_intermediate_size = f // top_k``, so
    the k active experts together are as wide as the dense FFN. Qwen2-MoE's shared expert gets the expert width. No
    biases anywhere (Qwen2-MoE's ``qkv_bias`` is turned off), RMSNorm, RoPE, SwiGLU; ``output_router_logits`` on.

    Raises:
        ValueError: unknown ``ffn``/``moe_impl`` (listing the allowed values), ``top_k`` outside ``[1, num_experts]``,
            ``num_experts < 1``, ``d_model % n_heads != 0``, ``n_heads % n_kv_heads != 0``, non-positive sizes, jitter
            with an implementation that has none.
    """
    if ffn not in FFN_TYPES:
        raise ValueError(f"model.init_args.ffn must be one of {', '.join(FFN_TYPES)}; got {ffn!r}")
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"model.init_args.moe_impl must be one of {', '.join(MOE_IMPLS)}; got {moe_impl!r}")
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("max_position_embeddings", max_position_embeddings)):
        if value < 1:
            raise ValueError(f"model.init_args.{name} must be >= 1, got {value}")
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if d_model % n_heads:
        raise ValueError(f"model.init_args.d_model={d_model} is not divisible by n_heads={n_heads}")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"model.init_args.n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    f = default_intermediate_size(d_model) if intermediate_size is None else int(intermediate_size)
    if f < 1:
        raise ValueError(f"model.init_args.intermediate_size must be >= 1, got {f}")
    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": d_model, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "max_position_embeddings": max_position_embeddings, "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
    }
    if ffn == "dense":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=f, attention_bias=False, mlp_bias=False, **common)

    if num_experts < 1:
        raise ValueError(f"model.init_args.num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"model.init_args.top_k={top_k} must be in [1, num_experts={num_experts}]")
    f_e = max(1, f // top_k) if expert_intermediate_size is None else int(expert_intermediate_size)
    if f_e < 1:
        raise ValueError(f"model.init_args.expert_intermediate_size must be >= 1, got {f_e}")
    if router_jitter_noise and moe_impl != "mixtral":
        raise ValueError(f"model.init_args.router_jitter_noise is only supported by moe_impl='mixtral' (got {moe_impl})")
    moe: dict[str, Any] = dict(num_experts_per_tok=top_k, router_aux_loss_coef=router_aux_loss_coef,
                               output_router_logits=True, **common)
    if experts_implementation is not None:
        moe["experts_implementation"] = experts_implementation
    if moe_impl == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(num_local_experts=num_experts, intermediate_size=f_e, sliding_window=None,
                             router_jitter_noise=router_jitter_noise, **moe)
    if moe_impl == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=f_e, shared_expert_intermediate_size=f_e,
                              intermediate_size=f, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False,
                              use_sliding_window=False, **moe)
    from transformers import OlmoeConfig

    return OlmoeConfig(num_experts=num_experts, intermediate_size=f_e, **moe)


def _moe_kind(config: PretrainedConfig) -> str | None:
    return {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "olmoe": "olmoe"}.get(config.model_type)


def count_params(config: PretrainedConfig | dict[str, Any]) -> dict[str, int]:
    """Exact parameter counts of a :func:`build_config` model, by the closed forms of spec section 3.1.

    Args:
        config: a transformers config (Llama, Mixtral, Qwen2-MoE, OLMoE) or a dict of :func:`build_config` arguments.

    Returns:
        ``{"n_total_nonemb", "n_active_nonemb", "n_embedding", "n_total"}``: non-embedding parameters of the whole
        model and those a token passes through (router and k experts; equal for dense), ``V·d`` (x2 untied), and
        every parameter. They equal the ``numel`` sums of the built model (``tests/lit_models/test_scaling_lm.py``).

    Raises:
        ValueError: a model type other than llama/mixtral/qwen2_moe/olmoe; an MoE layout with dense layers.
    """
    if isinstance(config, dict):
        config = build_config(**config)
    d, L = config.hidden_size, config.num_hidden_layers
    H = config.num_attention_heads
    H_kv = config.num_key_value_heads or H
    h = getattr(config, "head_dim", None) or d // H
    attn = d * H * h + 2 * d * H_kv * h + H * h * d
    if getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False):
        attn += H * h + 2 * H_kv * h
    norms = 2 * d
    kind = _moe_kind(config)
    if config.model_type == "llama":
        per_layer = attn + 3 * d * config.intermediate_size + norms
        total = active = L * per_layer + d
    elif kind is not None:
        k = config.num_experts_per_tok
        if kind == "mixtral":
            E, f_e = config.num_local_experts, config.intermediate_size
            extra = 0
        elif kind == "qwen2_moe":
            if config.decoder_sparse_step != 1 or config.mlp_only_layers:
                raise ValueError("count_params assumes every Qwen2-MoE layer is sparse (decoder_sparse_step=1, "
                                 "mlp_only_layers=[])")
            E, f_e = config.num_experts, config.moe_intermediate_size
            extra = 3 * d * config.shared_expert_intermediate_size + d  # shared expert and its sigmoid gate
        else:
            E, f_e = config.num_experts, config.intermediate_size
            extra = H * h + H_kv * h  # OLMoE's q_norm and k_norm
        base = attn + d * E + norms + extra
        total = L * (base + E * 3 * d * f_e) + d
        active = L * (base + k * 3 * d * f_e) + d
    else:
        raise ValueError(f"count_params supports llama, mixtral, qwen2_moe and olmoe configs, not {config.model_type!r}")
    n_emb = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return {"n_total_nonemb": total, "n_active_nonemb": active, "n_embedding": n_emb, "n_total": total + n_emb}


def flops_per_token(config: PretrainedConfig | dict[str, Any], seq_len: int) -> dict[str, int]:
    """Training FLOPs per token (spec section 3.1): ``6·N_active`` (the fitted convention, C = 6·N·D) and Kaplan's
    ``6·N_active + 6·L·T·d`` (adds attention scores and values at sequence length ``seq_len``). Embedding and LM-head
    FLOPs are in neither (pitfall 2: log ``n_embedding`` beside them)."""
    if isinstance(config, dict):
        config = build_config(**config)
    n_active = count_params(config)["n_active_nonemb"]
    return {"flops_6n": 6 * n_active,
            "flops_kaplan": 6 * n_active + 6 * config.num_hidden_layers * seq_len * config.hidden_size}
