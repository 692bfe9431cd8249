"""Sinusoidal positions and the pre-norm Transformer decoder with an incremental cache.

Source: PCformer spec (``shared/methods/pcformer.md``) section 3 "Decoder": a standard pre-norm decoder
(self-attention, cross-attention, FFN, final LayerNorm), optionally with the DLCL layer history
``decoder_history="learnable_dense"``. Positions follow fairseq's ``SinusoidalPositionalEmbedding``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_models.nn.attention import MultiheadAttention

HISTORIES = ("none", "learnable_dense")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}

LayerCache = dict[str, dict[str, Tensor]]


class SinusoidalPositionalEmbedding(nn.Module):
    """fairseq's sinusoidal positions: position p maps to [sin(p w_0..w_{h-1}), cos(p w_0..w_{h-1})].

    Positions start at ``padding_idx + 1``; pad tokens get the zero vector. The table is a non-persistent
    buffer (not in the ``state_dict``) that grows on demand past ``init_size``.

    Args:
        d_model: embedding width d (an odd d gets a zero last column, as in fairseq).
        padding_idx: the pad token id; row ``padding_idx`` of the table is zero.
        init_size: number of positions to precompute.
    """

    def __init__(self, d_model: int, padding_idx: int, init_size: int = 1024) -> None:
        super().__init__()
        self.d_model, self.padding_idx = d_model, padding_idx
        self.register_buffer("weights", self._table(init_size + padding_idx + 1), persistent=False)

    def _table(self, num: int, device: torch.device | None = None) -> Tensor:
        half = self.d_model // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float, device=device) * -(math.log(10000) / (half - 1)))
        ang = torch.arange(num, dtype=torch.float, device=device)[:, None] * freq[None, :]
        table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
        if self.d_model % 2 == 1:
            table = torch.cat([table, torch.zeros(num, 1, device=device)], dim=1)
        table[self.padding_idx] = 0
        return table

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """Positional vectors for ``tokens`` [B, T] -> [B, T, d] (float32 unless the module was cast).

        Token t gets position ``padding_idx + 1 + offset + t`` (``offset`` = number of tokens already decoded,
        for incremental decoding); pad tokens get zeros. Unlike fairseq's ``cumsum`` positions this counts pads
        too, which is identical for right-padded batches and keeps full and incremental decoding consistent.
        """
        t = tokens.size(1)
        needed = self.padding_idx + 1 + offset + t
        if needed > self.weights.size(0):
            with torch.inference_mode(False):  # a normal tensor even when first grown under inference_mode
                self.weights = self._table(max(needed, 2 * self.weights.size(0)), self.weights.device).to(
                    self.weights.dtype
                )
        pos = torch.arange(offset, offset + t, device=tokens.device) + self.padding_idx + 1
        out = self.weights.index_select(0, pos)[None].expand(tokens.size(0), -1, -1)
        return out.masked_fill(tokens.eq(self.padding_idx)[..., None], 0.0)


class PreNormDecoderLayer(nn.Module):
    """Pre-norm decoder layer (spec section 3 "Decoder"; Vaswani et al. 2017 with Wang et al. 2019's pre-norm).

    ``x = x + Drop(SelfAttn(LN1 x, causal)); x = x + Drop(CrossAttn(LN2 x, enc)); x = x + Drop(FFN(LN3 x))``.

    Args:
        d_model, n_heads, ffn_dim: widths; ``d_model % n_heads == 0``.
        dropout: residual dropout; ``attention_dropout`` on attention probabilities; ``activation_dropout``
            after the FFN activation.
        activation: ``"relu"`` or ``"gelu"``.
        rel_pos_max_distance: Shaw key-only relative positions in self-attention (0 = off).

    Raises:
        ValueError: unknown ``activation`` or ``d_model % n_heads != 0``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        activation: str = "relu",
        rel_pos_max_distance: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.activation = ACTIVATIONS[activation]
        self.self_attn = MultiheadAttention(d_model, n_heads, attention_dropout, rel_pos_max_distance)
        self.cross_attn = MultiheadAttention(d_model, n_heads, attention_dropout)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model)
        for fc in (self.fc1, self.fc2):  # fairseq Linear init
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(
        self, x: Tensor, enc_out: Tensor, enc_pad_mask: Tensor | None, cache: LayerCache | None = None
    ) -> Tensor:
        """x [B, T, d], enc_out [B, S, d], enc_pad_mask [B, S] (True = pad) -> [B, T, d].

        ``cache`` (updated in place) holds ``"self"`` (growing k/v) and ``"cross"`` (encoder k/v, computed once).
        """
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = x + self.dropout(self.self_attn(self.ln1(x), causal=True, cache=self_cache))
        h = self.cross_attn(self.ln2(x), enc_out, key_padding_mask=enc_pad_mask, cache=cross_cache, static_kv=True)
        x = x + self.dropout(h)
        h = self.fc2(self.activation_dropout(self.activation(self.fc1(self.ln3(x)))))
        return x + self.dropout(h)


class PreNormDecoder(nn.Module):
    """Stack of :class:`PreNormDecoderLayer` with a final LayerNorm (spec section 3 "Decoder").

    ``history="learnable_dense"`` is DLCL (Wang et al. 2019, official PCformer ``decoder_history``):
    H_0 = embedded input; before layer t, x = sum_j W_d[t, j] H_j (j <= t); after it, append LN_t(B_t(x)); the
    stack output is sum_j W_d[L, j] H_j (j <= L), then the final LayerNorm. W_d is (L+1) x (L+1),
    lower-triangular (entries above the diagonal are masked, so their gradient is zero), row t initialised to
    1/(t+1). DLCL is position-wise, so incremental decoding works step by step unchanged.

    Args:
        num_layers: L; other arguments as in :class:`PreNormDecoderLayer`.
        history: ``"none"`` or ``"learnable_dense"``.

    Raises:
        ValueError: unknown ``history`` (listing the allowed values) or ``num_layers < 1``.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        activation: str = "relu",
        history: str = "none",
        rel_pos_max_distance: int = 0,
    ) -> None:
        super().__init__()
        if history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers, self.d_model, self.history = num_layers, d_model, history
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(
                d_model, n_heads, ffn_dim, dropout, attention_dropout, activation_dropout, activation,
                rel_pos_max_distance,
            )
            for _ in range(num_layers)
        )
        self.layer_norm = nn.LayerNorm(d_model)
        if history == "learnable_dense":
            tril = torch.tril(torch.ones(num_layers + 1, num_layers + 1))
            self.register_buffer("history_mask", tril, persistent=False)
            self.history_weights = nn.Parameter(tril / tril.sum(1, keepdim=True))
            self.history_norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))

    def init_cache(self) -> list[LayerCache]:
        """An empty incremental cache: one ``{"self": {}, "cross": {}}`` per layer."""
        return [{"self": {}, "cross": {}} for _ in range(self.num_layers)]

    @staticmethod
    def cached_len(cache: list[LayerCache] | None) -> int:
        """Number of target positions already in ``cache`` (0 for None or an empty cache)."""
        if not cache or "k" not in cache[0].get("self", {}):
            return 0
        return cache[0]["self"]["k"].size(2)

    def forward(
        self, x: Tensor, enc_out: Tensor, enc_pad_mask: Tensor | None, cache: list[LayerCache] | None = None
    ) -> Tensor:
        """x [B, T, d] (embedded targets), enc_out [B, S, d], enc_pad_mask [B, S] (True = pad) -> [B, T, d].

        With ``cache`` (from :meth:`init_cache`, updated in place) x holds only the new positions.

        Raises:
            ValueError: ``cache`` does not have one entry per layer.
        """
        if cache is not None and len(cache) != self.num_layers:
            raise ValueError(f"cache must have {self.num_layers} layer entries (see init_cache), got {len(cache)}")
        caches = cache if cache is not None else [None] * self.num_layers
        if self.history == "none":
            for layer, c in zip(self.layers, caches):
                x = layer(x, enc_out, enc_pad_mask, c)
            return self.layer_norm(x)
        w = self.history_weights * self.history_mask
        hist = [x]
        for t, (layer, c) in enumerate(zip(self.layers, caches)):
            x = torch.einsum("j,jbtd->btd", w[t, : t + 1], torch.stack(hist))
            hist.append(self.history_norms[t](layer(x, enc_out, enc_pad_mask, c)))
        x = torch.einsum("j,jbtd->btd", w[self.num_layers], torch.stack(hist))
        return self.layer_norm(x)
