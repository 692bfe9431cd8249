"""Multi-head attention with an incremental key/value cache and optional Shaw relative positions.

Shared by every encoder-decoder model in the project. Uses :func:`torch.nn.functional.scaled_dot_product_attention`
so that fused kernels are picked on CUDA; relative positions, padding and causality are folded into one additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = dict[str, Tensor]


class MultiheadAttention(nn.Module):
    """Scaled dot-product multi-head attention (Vaswani et al., 2017, section 3.2).

    Args:
        d_model: model width d; must be divisible by ``n_heads``.
        n_heads: number of heads H.
        dropout: dropout on the attention probabilities (fairseq's ``attention_dropout``).
        rel_pos_max_distance: 0 disables relative positions; k > 0 adds Shaw et al. (2018) key-only relative
            position logits q_i . r_{clip(j - i, -k, k)} (the ODE-Transformer / PCformer ``relative_*`` architectures).
        bias: use biases in the four projections.

    Raises:
        ValueError: if ``d_model % n_heads != 0`` or ``rel_pos_max_distance < 0``.
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, rel_pos_max_distance: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if rel_pos_max_distance < 0:
            raise ValueError(f"rel_pos_max_distance must be >= 0, got {rel_pos_max_distance}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.rel_pos_max_distance = rel_pos_max_distance
        self.rel_k = (
            nn.Embedding(2 * rel_pos_max_distance + 1, self.head_dim) if rel_pos_max_distance > 0 else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq initialisation: xavier_uniform with gain 1/sqrt(2) for the fused-in projections.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        static_kv: bool = False,
    ) -> Tensor:
        """Attend from ``query`` to ``key`` (self-attention when ``key`` is None).

        Args:
            query: [B, T, d].
            key: [B, S, d] memory for cross-attention (keys and values), or None for self-attention.
            key_padding_mask: [B, S] bool, True at padded key positions (S counts cached keys too).
            causal: mask future keys; with a cache, query position i is ``cached_len + i``. Sequences are
                right-padded, so a real query never attends to a padded key and no padding mask is needed.
            cache: dict updated in place for incremental decoding. Self-attention appends this step's
                ``k``/``v`` ([B, H, S, d/H]); with ``static_kv`` the memory's k/v are computed once and reused.
            static_kv: the keys do not change between steps (cross-attention over the encoder output).

        Returns:
            [B, T, d].
        """
        q = self._heads(self.q_proj(query))
        if static_kv and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            src = query if key is None else key
            k, v = self._heads(self.k_proj(src)), self._heads(self.v_proj(src))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        t, s = q.size(2), k.size(2)
        offset = s - t if (cache is not None and not static_kv) else 0

        dropout_p = self.dropout if self.training else 0.0
        if self.rel_k is None and not (causal and t > 1 and t != s):
            # Fast path: no additive mask to build. Full-sequence causal self-attention uses is_causal (fused kernels);
            # padded keys are excluded with a boolean mask (True = attend).
            if causal and t > 1:
                if key_padding_mask is not None:
                    raise ValueError("causal self-attention assumes right padding: pass no key_padding_mask")
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            else:
                keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)
            return self.out_proj(out.transpose(1, 2).reshape(out.size(0), t, self.d_model))

        mask: Tensor | None = None
        if self.rel_k is not None:
            qpos = torch.arange(offset, offset + t, device=q.device)
            kpos = torch.arange(s, device=q.device)
            rel = (kpos[None, :] - qpos[:, None]).clamp(-self.rel_pos_max_distance, self.rel_pos_max_distance)
            r = self.rel_k(rel + self.rel_pos_max_distance)  # [T, S, dh]
            # SDPA scales q.k by 1/sqrt(dh); scale the relative logits the same way.
            mask = torch.einsum("bhtd,tsd->bhts", q, r) * self.head_dim**-0.5
        if causal and t > 1:
            qpos = torch.arange(offset, offset + t, device=q.device)
            future = torch.arange(s, device=q.device)[None, :] > qpos[:, None]  # [T, S]
            neg = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill(future, float("-inf"))
            mask = neg if mask is None else mask + neg
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        b = out.size(0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.d_model))
