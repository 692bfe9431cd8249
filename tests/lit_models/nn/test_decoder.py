"""Pre-norm decoder, sinusoidal positions and the encoder-decoder wrapper (PCformer spec section 10, check 8)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lit_models.nn.attention import MultiheadAttention
from lit_models.nn.seq2seq import EncoderDecoderTransformer, EncoderOut
from lit_models.nn.transformer import PreNormDecoder, SinusoidalPositionalEmbedding

PAD, BOS, EOS, VOCAB, D = 1, 0, 2, 23, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyEncoder(nn.Module):
    """Stand-in with the ``PCTransformerEncoder`` signature: one pre-norm self-attention block + final LN."""

    def __init__(self, d_model: int = D, n_heads: int = 4) -> None:
        super().__init__()
        self.ln, self.out_ln = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiheadAttention(d_model, n_heads)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        return self.out_ln(x + self.attn(self.ln(x), key_padding_mask=pad_mask))


def make_model(history: str = "none", share: bool = True, seed: int = 0, rel_pos: int = 0) -> EncoderDecoderTransformer:
    torch.manual_seed(seed)
    dec = PreNormDecoder(2, D, 4, 64, history=history, rel_pos_max_distance=rel_pos)
    return EncoderDecoderTransformer(TinyEncoder(), dec, VOCAB, PAD, D, share_all_embeddings=share, max_positions=64)


def ragged_src(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (3, 7), generator=g)
    for b, n in enumerate((7, 4, 2)):
        src[b, n:] = PAD
    return src


@pytest.mark.parametrize(("history", "rel_pos"), [("none", 0), ("learnable_dense", 0), ("none", 3)])
def test_incremental_equals_teacher_forced(history: str, rel_pos: int) -> None:
    model = make_model(history, rel_pos=rel_pos).eval()
    if history == "learnable_dense":  # move W_d off its initial mean so the test sees the mixing
        with torch.no_grad():
            model.decoder.history_weights.add_(0.1 * torch.randn_like(model.decoder.history_weights))
    src = ragged_src()
    prev = torch.cat([torch.full((3, 1), BOS), torch.randint(3, VOCAB, (3, 6))], dim=1)
    with torch.no_grad():
        full = model(src, prev)
        enc, cache = model.encode(src), model.init_cache()
        steps = [model.decode(prev[:, t : t + 1], enc, cache) for t in range(prev.size(1))]
    assert model.decoder.cached_len(cache) == prev.size(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_dlcl_init_and_masked_upper_triangle() -> None:
    dec = PreNormDecoder(3, D, 4, 64, history="learnable_dense")
    w = dec.history_weights
    for t in range(4):
        torch.testing.assert_close(w[t, : t + 1], torch.full((t + 1,), 1 / (t + 1)))
    x, enc = torch.randn(2, 3, D), torch.randn(2, 4, D)
    dec(x, enc, None).sum().backward()
    assert torch.all(torch.triu(w.grad, diagonal=1) == 0) and w.grad.abs().sum() > 0


def test_bad_history_and_cache_length() -> None:
    with pytest.raises(ValueError, match="none.*learnable_dense"):
        PreNormDecoder(2, D, 4, 64, history="dense")
    dec = PreNormDecoder(2, D, 4, 64)
    with pytest.raises(ValueError, match="2 layer entries"):
        dec(torch.randn(1, 1, D), torch.randn(1, 2, D), None, cache=[{}])


def test_sinusoidal_offsets_pads_and_growth() -> None:
    emb = SinusoidalPositionalEmbedding(D, PAD, init_size=4)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, PAD, PAD, PAD, PAD, PAD]])
    full = emb(tokens)  # 8 positions > init_size: the table grows
    assert full.shape == (2, 8, D)
    assert torch.all(full[1, 3:] == 0)
    for t in range(tokens.size(1)):
        torch.testing.assert_close(emb(tokens[:, t : t + 1], offset=t)[:, 0], full[:, t])
    big = SinusoidalPositionalEmbedding(D, PAD, init_size=64)
    torch.testing.assert_close(big(tokens), full)
    # fairseq values: token t has position p = pad + 1 + t; first half sin(p w_i), second half cos(p w_i)
    p, half = PAD + 1 + 2, D // 2
    w = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    torch.testing.assert_close(full[0, 2], torch.cat([torch.sin(p * w), torch.cos(p * w)]))
    assert "weights" not in emb.state_dict()


def test_reorder_cache_and_encoder_out() -> None:
    model = make_model("learnable_dense").eval()
    src = ragged_src(2)
    prev = torch.cat([torch.full((3, 1), BOS), torch.randint(3, VOCAB, (3, 3))], dim=1)
    order = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        enc, cache = model.encode(src), model.init_cache()
        for t in range(3):
            model.decode(prev[:, t : t + 1], enc, cache)
        cache = model.reorder_cache(cache, order)
        enc2 = model.reorder_encoder_out(enc, order)
        step = model.decode(prev[order, 3:4], enc2, cache)
        ref = model(src[order], prev[order])[:, 3:4]
    assert all(v.size(0) == 4 for layer in cache for sub in layer.values() for v in sub.values())
    assert set(cache[0]) == {"self", "cross"} and set(cache[0]["cross"]) == {"k", "v"}
    torch.testing.assert_close(enc2.pad_mask, src[order].eq(PAD))
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=0)


def test_shared_vs_unshared_embeddings() -> None:
    shared, unshared = make_model(share=True), make_model(share=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(unshared) - n(shared) == VOCAB * D
    assert shared.encoder_embed is shared.decoder_embed
    assert unshared.encoder_embed is not unshared.decoder_embed
    for m in (shared, unshared):
        assert torch.all(m.decoder_embed.weight[PAD] == 0)
        assert abs(m.decoder_embed.weight.std().item() - D**-0.5) < 0.03
    # output projection tied to the decoder embedding: its gradient flows into that weight
    src, prev = ragged_src(), torch.full((3, 2), BOS)
    unshared(src, prev)[..., 5].sum().backward()
    assert unshared.decoder_embed.weight.grad[5].abs().sum() > 0


def test_max_positions_guard() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="source length 65 exceeds max_positions=64"):
        model.encode(torch.full((1, 65), 5))


def test_any_encoder_module_and_output_shapes() -> None:
    model = make_model().eval()
    enc = model.encode(ragged_src())
    assert isinstance(enc, EncoderOut) and enc.out.shape == (3, 7, D) and enc.pad_mask.dtype == torch.bool
    assert model(ragged_src(), torch.full((3, 5), BOS)).shape == (3, 5, VOCAB)
