"""Batched beam search and greedy search with fairseq semantics (PCformer spec section 3 "Beam search").

Decoding protocol: any encoder-decoder model in the project can be decoded here if it provides

- ``encode(src_tokens [B, S]) -> enc``: an opaque encoder state;
- ``reorder_encoder_out(enc, new_order [N] long) -> enc``: select batch rows;
- ``init_cache() -> cache``: an empty incremental state (opaque; ``decode`` may update it in place);
- ``decode(prev_tokens [N, 1], enc, cache) -> logits [N, T, V]``: scores of the next token after feeding one new
  token per row; only the last position is used. Logits are unnormalised: ``log_softmax`` is applied here in
  float32 (a model that already returns log-probabilities works unchanged, log_softmax being idempotent);
- ``reorder_cache(cache, new_order [N'] long) -> cache``: select rows of every cached tensor (``N'`` may be
  smaller than ``N``: finished sentences are dropped);
- optionally an ``int`` attribute ``max_positions``: the output length is capped at ``max_positions - 1``
  tokens before EOS (fairseq).

Calls: ``encode`` once; ``reorder_encoder_out`` to expand each sentence to ``beam_size`` rows
(sentence-major: row ``b * beam_size + k``) and again whenever finished sentences leave the batch (beams of a
sentence share one encoder state, so reordering beams inside a sentence never needs it); ``decode`` once per
step with the token chosen at the previous step (BOS first); ``reorder_cache`` after every step.
:class:`lit_models.nn.seq2seq.EncoderDecoderTransformer` implements the protocol.

Semantics (fairseq ``SequenceGenerator``): pad is never generated; a hypothesis finishes when EOS is among the
``beam_size`` best candidates (ranked by summed log-probability) and its score is ``sum(log p) / |y|**lp`` with
|y| counting EOS (not GNMT's ``((5+|y|)/6)**lp``). Each sentence may emit at most
``max_len = int(max_len_a * |x| + max_len_b)`` tokens before EOS, |x| its non-pad source length; EOS is forced at
step ``max_len``. The search over all ``batch * beam`` rows is vectorised; finished sentences leave the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """A finished hypothesis.

    Attributes:
        tokens: output ids without BOS and EOS.
        score: ``sum(positional_scores) / len(positional_scores) ** length_penalty``.
        positional_scores: log p of each output token, EOS included (length ``len(tokens) + 1``).
    """

    tokens: list[int]
    score: float
    positional_scores: list[float]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _max_lens(model: nn.Module, src_tokens: Tensor, pad_id: int, max_len_a: float, max_len_b: float) -> Tensor:
    """Per-sentence output budget (tokens before EOS) [B] on the CPU."""
    src_lens = src_tokens.ne(pad_id).sum(1).cpu().double()
    max_lens = (src_lens * max_len_a + max_len_b).floor().long().clamp(min=0)
    cap = getattr(model, "max_positions", None)
    if isinstance(cap, int):
        max_lens = max_lens.clamp(max=cap - 1)
    return max_lens


def _check(beam_size: int, max_len_a: float) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_len_a < 0:
        raise ValueError(f"max_len_a must be >= 0, got {max_len_a}")


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    src_tokens: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    stop_early: bool = True,
) -> list[list[Hypothesis]]:
    """Beam search over a right-padded source batch (spec section 3 "Beam search"; fairseq semantics).

    Args:
        model: implements the module-level decoding protocol; run in eval mode (restored afterwards).
        src_tokens: [B, S] long, right-padded with ``pad_id``; ragged lengths allowed.
        bos_id, eos_id, pad_id: special ids (BOS starts decoding, pad is never generated).
        beam_size: K, live hypotheses per sentence.
        length_penalty: lp in ``score = sum(log p) / |y|**lp``, |y| counting EOS.
        max_len_a, max_len_b: at most ``int(a * |x| + b)`` tokens before EOS per sentence.
        stop_early: fairseq's rule (default, the spec's): a sentence stops once K hypotheses have finished.
            False is fairseq 0.6's ``--no-early-stop``: keep the K best finished hypotheses and stop only when no
            live one can beat the worst of them, using the exact bound for lp >= 0 ``best live sum(log p) /
            (max_len + 1)**lp`` (log p <= 0, so extending a live hypothesis never lowers |sum| and the
            denominator is largest at the length limit; for lp < 0 the bound uses the next length instead).

    Returns:
        Per sentence, up to K :class:`Hypothesis`, best score first (empty only if every continuation had
        probability 0 or NaN, e.g. an all-pad source).

    Raises:
        ValueError: ``beam_size < 1`` or ``max_len_a < 0``.
    """
    _check(beam_size, max_len_a)
    with _eval_mode(model):
        return _beam_search(
            model, src_tokens, bos_id, eos_id, pad_id, beam_size, length_penalty, max_len_a, max_len_b, stop_early
        )


def _beam_search(
    model: nn.Module,
    src_tokens: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    k: int,
    lp: float,
    max_len_a: float,
    max_len_b: float,
    stop_early: bool,
) -> list[list[Hypothesis]]:
    device, n_sent = src_tokens.device, src_tokens.size(0)
    finalized: list[list[Hypothesis]] = [[] for _ in range(n_sent)]
    if n_sent == 0:
        return finalized
    max_lens = _max_lens(model, src_tokens, pad_id, max_len_a, max_len_b)  # [B] CPU
    max_len = int(max_lens.max())
    n_fin = torch.zeros(n_sent, dtype=torch.long)  # CPU, per original sentence
    worst_fin = torch.full((n_sent,), float("inf"), dtype=torch.float64)  # worst finished score once K have finished
    sent_ids = torch.arange(n_sent)  # CPU: original sentence id of each batch row

    enc = model.encode(src_tokens)
    enc = model.reorder_encoder_out(enc, torch.arange(n_sent, device=device).repeat_interleave(k))
    cache = model.init_cache()
    rows = n_sent * k
    tokens = torch.full((rows, max_len + 2), pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = bos_id
    tok_lp = torch.zeros(rows, max_len + 1, device=device)  # log p of each chosen token
    cum = torch.zeros(n_sent, k, device=device)
    cum[:, 1:] = NEG_INF  # all beams start identical: expand only beam 0 at step 0
    cum = cum.view(-1)
    row_max = max_lens.to(device).repeat_interleave(k)  # [rows] budget of each row
    cand_off = torch.arange(2 * k, device=device)

    for step in range(max_len + 1):
        bsz = sent_ids.numel()
        logits = model.decode(tokens[:, step : step + 1], enc, cache)[:, -1]
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        vocab = lprobs.size(-1)
        lprobs.nan_to_num_(nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)  # fairseq: NaN -> -inf
        lprobs[:, pad_id] = NEG_INF
        if step >= int(max_lens[sent_ids].min()):  # force EOS on rows at their budget (keep log p(EOS))
            not_eos = torch.ones(vocab, dtype=torch.bool, device=device)
            not_eos[eos_id] = False
            lprobs.masked_fill_(row_max.le(step)[:, None] & not_eos[None, :], NEG_INF)

        flat_lp = lprobs.view(bsz, k * vocab)
        cand_scores, cand_idx = (lprobs + cum[:, None]).view(bsz, k * vocab).topk(2 * k, dim=1)
        cand_tok = cand_idx % vocab
        cand_row = cand_idx // vocab + torch.arange(bsz, device=device)[:, None] * k  # [bsz, 2K] rows
        cand_lp = flat_lp.gather(1, cand_idx)
        is_eos = cand_tok.eq(eos_id)

        # Finalise EOS among the K best candidates (fairseq), in candidate order.
        fin = is_eos[:, :k] & cand_scores[:, :k].gt(NEG_INF)
        touched: set[int] = set()
        if bool(fin.any()):
            b_idx, c_idx = fin.nonzero(as_tuple=True)
            fin_rows = cand_row[b_idx, c_idx]
            seqs = tokens[fin_rows, 1 : step + 1].tolist()
            pos = torch.cat([tok_lp[fin_rows, :step], cand_lp[b_idx, c_idx, None]], dim=1).tolist()
            scores = (cand_scores[b_idx, c_idx] / (step + 1) ** lp).tolist()
            for b, seq, p, s in zip(sent_ids[b_idx.cpu()].tolist(), seqs, pos, scores):
                hyps = finalized[b]
                if len(hyps) < k:
                    hyps.append(Hypothesis(seq, s, p))
                elif not stop_early and s > float(worst_fin[b]):
                    hyps[min(range(k), key=lambda i: hyps[i].score)] = Hypothesis(seq, s, p)
                else:
                    continue
                touched.add(b)
            for b in touched:
                n_fin[b] = len(finalized[b])
                if n_fin[b] == k:
                    worst_fin[b] = min(h.score for h in finalized[b])

        # Next live beams: the K best non-EOS candidates (at least K of the 2K are non-EOS).
        live = (is_eos.long() * 2 * k + cand_off).topk(k, dim=1, largest=False).indices
        sel_row, sel_tok = cand_row.gather(1, live), cand_tok.gather(1, live)
        sel_score, sel_lp = cand_scores.gather(1, live), cand_lp.gather(1, live)

        full = n_fin[sent_ids].eq(k)
        done = max_lens[sent_ids].le(step)
        if stop_early:
            done |= full
        elif bool(full.any()):
            # longest (lp >= 0) or shortest (lp < 0) length, EOS included, a live hypothesis can still reach
            best_len = max_lens[sent_ids] + 1 if lp >= 0 else torch.full((bsz,), step + 2)
            bound = sel_score.max(1).values.cpu().double() / best_len.double() ** lp
            done |= full & worst_fin[sent_ids].ge(bound)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            sent_ids = sent_ids[keep]
            keep = keep.to(device)
            sel_row, sel_tok, sel_score, sel_lp = (
                t.index_select(0, keep) for t in (sel_row, sel_tok, sel_score, sel_lp)
            )
            enc_order = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)
            enc = model.reorder_encoder_out(enc, enc_order)
            row_max = row_max.index_select(0, enc_order)

        order = sel_row.view(-1)
        cache = model.reorder_cache(cache, order)
        tokens = tokens.index_select(0, order)
        tokens[:, step + 1] = sel_tok.view(-1)
        tok_lp = tok_lp.index_select(0, order)
        tok_lp[:, step] = sel_lp.view(-1)
        cum = sel_score.view(-1)

    return [sorted(hyps, key=lambda h: h.score, reverse=True) for hyps in finalized]


@torch.inference_mode()
def greedy_search(
    model: nn.Module,
    src_tokens: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
) -> list[list[int]]:
    """Greedy (argmax) decoding with the same protocol, pad ban and length budget as :func:`beam_search`.

    Args:
        model, src_tokens, bos_id, eos_id, pad_id, max_len_a, max_len_b: as in :func:`beam_search`.

    Returns:
        Per sentence the output ids without BOS and EOS; equals ``beam_search(..., beam_size=1)`` up to ties.

    Raises:
        ValueError: ``max_len_a < 0``.
    """
    _check(1, max_len_a)
    with _eval_mode(model):
        device, n_sent = src_tokens.device, src_tokens.size(0)
        out: list[list[int]] = [[] for _ in range(n_sent)]
        if n_sent == 0:
            return out
        max_lens = _max_lens(model, src_tokens, pad_id, max_len_a, max_len_b)
        max_len = int(max_lens.max())
        sent_ids = torch.arange(n_sent)
        row_max = max_lens.to(device)
        enc, cache = model.encode(src_tokens), model.init_cache()
        tokens = torch.full((n_sent, max_len + 2), pad_id, dtype=torch.long, device=device)
        tokens[:, 0] = bos_id
        for step in range(max_len + 1):
            logits = model.decode(tokens[:, step : step + 1], enc, cache)[:, -1].float().clone()
            logits[:, pad_id] = NEG_INF
            nxt = logits.argmax(-1).masked_fill(row_max.le(step), eos_id)
            tokens[:, step + 1] = nxt
            done = nxt.eq(eos_id)
            if not bool(done.any()):
                continue
            done_cpu = done.cpu()
            for b, seq in zip(sent_ids[done_cpu].tolist(), tokens[done, 1 : step + 1].tolist()):
                out[b] = seq
            if bool(done_cpu.all()):
                break
            keep = (~done).nonzero().squeeze(1)
            sent_ids = sent_ids[~done_cpu]
            enc, cache = model.reorder_encoder_out(enc, keep), model.reorder_cache(cache, keep)
            tokens, row_max = tokens.index_select(0, keep), row_max.index_select(0, keep)
        return out
