"""Encoder-decoder Transformer wrapper: embeddings, positions, any encoder, the pre-norm decoder, tied output.

Source: PCformer spec (``shared/methods/pcformer.md``) sections 3 ("Notation", "Decoder") and 4: the input is
the token embedding scaled by sqrt(d) plus sinusoidal positions, then dropout (fairseq); the output projection is
tied to the (shared) embedding. Implements the decoding protocol of :mod:`lit_models.nn.beam_search`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lit_models.nn.transformer import LayerCache, PreNormDecoder, SinusoidalPositionalEmbedding


@dataclass
class EncoderOut:
    """Encoder result: ``out`` [B, S, d] and ``pad_mask`` [B, S] bool (True = pad)."""

    out: Tensor
    pad_mask: Tensor


class EncoderDecoderTransformer(nn.Module):
    """Token embeddings + sinusoidal positions around an encoder and a :class:`PreNormDecoder`.

    Args:
        encoder: any module with ``forward(x [B, S, d] embedded, pad_mask [B, S] True=pad) -> [B, S, d]``
            (e.g. ``PCTransformerEncoder``), already ending in its final LayerNorm.
        decoder: the decoder stack.
        vocab_size, pad_id: vocabulary size V and pad id (pad embedding row is zero and gets no gradient).
        d_model: width d (embeddings ~ N(0, d^-0.5), scaled by sqrt(d)).
        dropout: dropout on the embedded input of both stacks.
        max_positions: longest accepted source; also the initial size of the position table.
        share_all_embeddings: one embedding for source, target and output projection; if False the encoder gets
            its own embedding and the output projection stays tied to the decoder embedding.

    Raises:
        ValueError: ``decoder.d_model != d_model`` or ``pad_id`` outside the vocabulary.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: PreNormDecoder,
        vocab_size: int,
        pad_id: int,
        d_model: int,
        dropout: float = 0.1,
        max_positions: int = 1024,
        share_all_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if decoder.d_model != d_model:
            raise ValueError(f"decoder.d_model ({decoder.d_model}) must equal d_model ({d_model})")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, {vocab_size}), got {pad_id}")
        self.encoder, self.decoder = encoder, decoder
        self.vocab_size, self.pad_id, self.d_model, self.max_positions = vocab_size, pad_id, d_model, max_positions
        self.decoder_embed = self._embedding(vocab_size, d_model, pad_id)
        self.encoder_embed = (
            self.decoder_embed if share_all_embeddings else self._embedding(vocab_size, d_model, pad_id)
        )
        self.embed_scale = math.sqrt(d_model)
        self.embed_positions = SinusoidalPositionalEmbedding(d_model, pad_id, init_size=max_positions)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _embedding(vocab_size: int, d_model: int, pad_id: int) -> nn.Embedding:
        emb = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(emb.weight, mean=0.0, std=d_model**-0.5)
        nn.init.zeros_(emb.weight[pad_id])
        return emb

    def _embed(self, emb: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        x = self.embed_scale * emb(tokens)
        return self.dropout(x + self.embed_positions(tokens, offset).to(x.dtype))

    def encode(self, src_tokens: Tensor) -> EncoderOut:
        """src_tokens [B, S] (right-padded with ``pad_id``) -> :class:`EncoderOut` (out [B, S, d], pad_mask [B, S]).

        Raises:
            ValueError: S > ``max_positions`` (naming the length).
        """
        if src_tokens.size(1) > self.max_positions:
            raise ValueError(f"source length {src_tokens.size(1)} exceeds max_positions={self.max_positions}")
        pad_mask = src_tokens.eq(self.pad_id)
        return EncoderOut(self.encoder(self._embed(self.encoder_embed, src_tokens), pad_mask), pad_mask)

    def decode(self, prev_tokens: Tensor, enc: EncoderOut, cache: list[LayerCache] | None = None) -> Tensor:
        """prev_tokens [B, T] (BOS-shifted targets) -> logits [B, T, V].

        With ``cache`` (from :meth:`init_cache`, updated in place) ``prev_tokens`` holds only the new step(s); their
        positions continue after the cached length.
        """
        offset = self.decoder.cached_len(cache)
        x = self.decoder(self._embed(self.decoder_embed, prev_tokens, offset), enc.out, enc.pad_mask, cache)
        return F.linear(x, self.decoder_embed.weight)

    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor) -> Tensor:
        """Teacher-forced logits: src_tokens [B, S], prev_output_tokens [B, T] -> [B, T, V]."""
        return self.decode(prev_output_tokens, self.encode(src_tokens))

    def init_cache(self) -> list[LayerCache]:
        """An empty incremental decoder cache (one dict per decoder layer)."""
        return self.decoder.init_cache()

    @staticmethod
    def reorder_cache(cache: list[LayerCache], new_order: Tensor) -> list[LayerCache]:
        """Select rows ``new_order`` [N] (long) of every cached tensor (self and cross k/v), in place; returns it."""
        for layer in cache:
            for sub in layer.values():
                for key, val in sub.items():
                    sub[key] = val.index_select(0, new_order)
        return cache

    @staticmethod
    def reorder_encoder_out(enc: EncoderOut, new_order: Tensor) -> EncoderOut:
        """Select rows ``new_order`` [N] of the encoder output and its pad mask."""
        return EncoderOut(enc.out.index_select(0, new_order), enc.pad_mask.index_select(0, new_order))
