"""Beam and greedy search (PCformer spec section 3 "Beam search", section 10 check 9, section 11 errors)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from lit_models.nn.beam_search import Hypothesis, beam_search, greedy_search
from lit_models.nn.seq2seq import EncoderOut
from tests.lit_models.nn.test_decoder import make_model, ragged_src

BOS, PAD, EOS = 0, 1, 2
A, B, C, D, E, X = 3, 4, 5, 6, 7, 8
V = 9
KW = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table(rows: dict[int, dict[int, float]]) -> Tensor:
    """Transition probabilities [V, V] from {last token: {next token: p}}; unlisted rows go to EOS."""
    probs = torch.zeros(V, V)
    probs[:, EOS] = 1.0
    for prev, nxt in rows.items():
        probs[prev] = 0.0
        for tok, p in nxt.items():
            probs[prev, tok] = p
    assert torch.allclose(probs.sum(1), torch.ones(V))
    return probs


class TableModel(nn.Module):
    """Stub implementing the decoding protocol: next-token log-probs from a table indexed by the last token.

    The cache records the fed tokens so that the protocol's row bookkeeping is checked on every step.
    """

    def __init__(self, probs: Tensor, max_positions: int | None = None) -> None:
        super().__init__()
        self.register_buffer("logp", probs.log())
        if max_positions is not None:
            self.max_positions = max_positions

    def encode(self, src: Tensor) -> EncoderOut:
        return EncoderOut(src[..., None].float(), src.eq(PAD))

    @staticmethod
    def reorder_encoder_out(enc: EncoderOut, order: Tensor) -> EncoderOut:
        return EncoderOut(enc.out[order], enc.pad_mask[order])

    def init_cache(self) -> dict[str, Tensor]:
        return {}

    @staticmethod
    def reorder_cache(cache: dict[str, Tensor], order: Tensor) -> dict[str, Tensor]:
        return {k: v[order] for k, v in cache.items()}

    def decode(self, prev: Tensor, enc: EncoderOut, cache: dict[str, Tensor]) -> Tensor:
        assert prev.shape == (enc.out.size(0), 1)
        cache["fed"] = torch.cat([cache["fed"], prev], 1) if "fed" in cache else prev
        assert cache["fed"].size(0) == prev.size(0)
        return self.logp[prev[:, -1]][:, None]


def seq_logp(probs: Tensor, tokens: list[int]) -> list[float]:
    prev = [BOS, *tokens]
    return [math.log(p) if (p := probs[a, y].item()) > 0 else -math.inf for a, y in zip(prev, [*tokens, EOS])]


# greedy takes A (0.6) then EOS: 0.24; B then EOS has 0.36.
GREEDY_TRAP = table({BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.4, A: 0.3, B: 0.3}, B: {EOS: 0.9, A: 0.1}})
# [X] has the larger total log p, [C, D, E] the larger per-token average.
LENGTH = table({BOS: {X: 0.55, C: 0.45}, X: {EOS: 1.0}, C: {D: 0.95, EOS: 0.05}, D: {E: 0.95, EOS: 0.05}})
SRC = torch.tensor([[5, 6, PAD], [5, 6, 7]])


def test_beam1_equals_greedy_on_table() -> None:
    model = TableModel(GREEDY_TRAP)
    greedy = greedy_search(model, SRC, **KW)
    assert greedy == [[A], [A]]
    beam = beam_search(model, SRC, beam_size=1, **KW)
    assert [hyps[0].tokens for hyps in beam] == [[A], [A]] and all(len(hyps) == 1 for hyps in beam)


def test_beam4_beats_greedy_and_scores_are_exact() -> None:
    model = TableModel(GREEDY_TRAP)
    hyps = beam_search(model, SRC, beam_size=4, max_len_a=0.0, max_len_b=6, **KW)
    for sent in hyps:
        assert len(sent) == 4 and sent[0].tokens == [B]
        assert [h.score for h in sent] == sorted((h.score for h in sent), reverse=True)
        for h in sent:  # score = sum log p / |y|^0.6, |y| counting EOS
            expected = seq_logp(GREEDY_TRAP, h.tokens)
            assert h.positional_scores == pytest.approx(expected, rel=1e-6)
            assert h.score == pytest.approx(sum(expected) / (len(h.tokens) + 1) ** 0.6, rel=1e-6)
    greedy_score = sum(seq_logp(GREEDY_TRAP, [A])) / 2**0.6
    assert hyps[0][0].score > greedy_score
    # the beam's best is the global optimum over all sequences within the length budget
    best = max(
        (sum(seq_logp(GREEDY_TRAP, list(s))) / (n + 1) ** 0.6, s)
        for n in range(0, 7)
        for s in itertools.product((A, B), repeat=n)
    )
    assert hyps[0][0].score == pytest.approx(best[0], rel=1e-6) and tuple(hyps[0][0].tokens) == best[1]


def test_length_penalty_changes_the_winner() -> None:
    model = TableModel(LENGTH)
    short = beam_search(model, SRC[:1], beam_size=4, length_penalty=0.0, **KW)[0]
    long = beam_search(model, SRC[:1], beam_size=4, length_penalty=1.0, **KW)[0]
    assert short[0].tokens == [X] and long[0].tokens == [C, D, E]
    assert sorted(map(tuple, (h.tokens for h in short))) == sorted(map(tuple, (h.tokens for h in long)))
    assert short[0].score == pytest.approx(math.log(0.55), rel=1e-6)  # lp = 0: plain sum
    assert long[0].score == pytest.approx(math.log(0.45 * 0.95 * 0.95) / 4, rel=1e-6)  # lp = 1: mean


def test_stop_early_false_uses_the_bound() -> None:
    model = TableModel(LENGTH)
    kw = dict(beam_size=2, length_penalty=1.0, max_len_a=0.0, max_len_b=6, **KW)
    # fairseq's rule stops once two hypotheses have finished ([X] at step 1, [C, D] at step 2) ...
    assert [h.tokens for h in beam_search(model, SRC[:1], **kw)[0]] == [[X], [C, D]]
    # ... the bound sees that live [C, D, E] (sum -0.90, up to 7 tokens) may still beat [C, D], and finds it
    assert beam_search(model, SRC[:1], stop_early=False, **kw)[0][0].tokens == [C, D, E]


def test_max_length_respected_and_eos_forced() -> None:
    model = TableModel(table({BOS: {A: 1.0}, A: {A: 0.9, EOS: 0.1}}))
    src = torch.tensor([[5, 6, 7], [5, PAD, PAD]])
    kw = dict(max_len_a=1.0, max_len_b=0, **KW)  # budgets 3 and 1 tokens before EOS
    assert [len(s) for s in greedy_search(model, src, **kw)] == [3, 1]
    for hyps, budget in zip(beam_search(model, src, beam_size=4, **kw), (3, 1)):
        assert all(len(h.tokens) <= budget for h in hyps)
        assert any(len(h.tokens) == budget for h in hyps)
        forced = next(h for h in hyps if len(h.tokens) == budget)
        assert forced.positional_scores[-1] == pytest.approx(math.log(0.1), rel=1e-6)  # EOS keeps its log p
    capped = TableModel(model.logp.exp(), max_positions=3)  # fairseq: at most max_positions - 1 tokens
    assert [len(s) for s in greedy_search(capped, src, **kw)] == [2, 1]


def test_errors() -> None:
    model = TableModel(GREEDY_TRAP)
    with pytest.raises(ValueError, match="beam_size must be >= 1, got 0"):
        beam_search(model, SRC, beam_size=0, **KW)
    with pytest.raises(ValueError, match="max_len_a must be >= 0, got -1"):
        beam_search(model, SRC, max_len_a=-1, **KW)
    with pytest.raises(ValueError, match="max_len_a must be >= 0, got -0.5"):
        greedy_search(model, SRC, max_len_a=-0.5, **KW)


def _real_model():
    model = make_model("learnable_dense", seed=3)
    with torch.no_grad():  # make EOS a plausible choice so that hypotheses end at different lengths
        model.decoder_embed.weight[EOS] *= 4
    return model


def test_beam1_equals_greedy_on_transformer_ragged_batch() -> None:
    model, src = _real_model(), ragged_src()
    kw = dict(max_len_a=1.0, max_len_b=3, **KW)
    greedy = greedy_search(model, src, **kw)
    beam = beam_search(model, src, beam_size=1, **kw)
    assert [hyps[0].tokens for hyps in beam] == greedy
    assert len({len(g) for g in greedy}) > 1  # ragged outputs: rows leave the batch at different steps


def test_beam4_transformer_batch_matches_single_and_rescoring() -> None:
    model, src = _real_model(), ragged_src()
    model.train()  # beam search must switch to eval and restore the flags
    kw = dict(beam_size=4, max_len_a=1.0, max_len_b=3, **KW)
    batch = beam_search(model, src, **kw)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    for i, hyps in enumerate(batch):
        n = int(src[i].ne(PAD).sum())
        single = beam_search(model, src[i : i + 1, :n], **kw)[0]
        assert [h.tokens for h in single] == [h.tokens for h in hyps]
        assert [h.score for h in single] == pytest.approx([h.score for h in hyps], abs=1e-5)
        for h in hyps:  # incremental + reordered caches give the teacher-forced log-probs
            assert isinstance(h, Hypothesis) and len(h.positional_scores) == len(h.tokens) + 1
            assert len(h.tokens) <= n + 3
            prev = torch.tensor([[BOS, *h.tokens]])
            with torch.no_grad():
                logp = torch.log_softmax(model(src[i : i + 1], prev)[0], -1)
            ref = logp.gather(1, torch.tensor([*h.tokens, EOS])[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(h.positional_scores), ref, atol=1e-5, rtol=0)
            assert h.score == pytest.approx(ref.sum().item() / len(ref) ** 0.6, abs=1e-5)
