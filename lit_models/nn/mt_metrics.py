"""Thin sacreBLEU wrappers for generation-based MT evaluation (shared by NDP and constrained MT).

References are given per hypothesis: ``references[i]`` is the list of references of ``hypotheses[i]``, any count
(at least one) per hypothesis. sacreBLEU wants reference *streams* (``refs[k][i]`` = k-th reference of sentence ``i``),
so the lists are transposed and padded with ``None``, which sacreBLEU treats as "no reference" (variable reference
counts give ``nrefs:var`` in the signature).

Scores are on sacreBLEU's 0-100 scale. The returned signature is ``"<metric name>|<sacreBLEU signature>"``, e.g.
``"BLEU|nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"`` or
``"chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"`` (``chrF2++`` with ``word_order=2``): the name
is what sacreBLEU's own JSON output reports next to the signature.

Defaults follow the specs (``ndp.md`` / ``constrained_mt.md`` section 7): BLEU ``13a``, exp smoothing, case-sensitive;
chrF char order 6, word order 0, beta 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

__all__ = ["corpus_bleu", "corpus_chrf", "sentence_bleu", "sentence_chrf"]


def _streams(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists -> sacreBLEU reference streams padded with ``None``.

    Raises:
        ValueError: different lengths or a hypothesis without references (naming the index).
        TypeError: a non-string hypothesis.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypotheses[{i}] must be a string, got {type(hyp).__name__}")
        if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
    n_refs = max((len(r) for r in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(n_refs)]


def _bleu(tokenize: str, **kwargs) -> BLEU:
    try:
        return BLEU(tokenize=tokenize, **kwargs)
    except Exception as e:  # unknown name (KeyError), missing extra (RuntimeError), offline SPM download (URLError)
        raise ValueError(
            f"sacreBLEU tokenizer {tokenize!r} is unavailable ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"use 'char' (or '13a', 'intl', 'zh', 'none') instead"
        ) from e


def _signature(metric: BLEU | CHRF, name: str) -> str:
    return f"{name}|{metric.get_signature()}"


def _chrf_name(metric: CHRF) -> str:
    return f"chrF{metric.beta}" + "+" * metric.word_order  # as sacrebleu.metrics.chrf.CHRFScore names it


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a"
) -> tuple[float, str]:
    """Corpus BLEU (``sacrebleu.metrics.BLEU``, exp smoothing) -> ``(score, signature)``.

    Empty input gives ``(0.0, signature)`` with ``nrefs:0``. Empty hypothesis strings are scored (as no n-grams).

    Raises:
        ValueError: length mismatch, a hypothesis without references, or an unavailable tokenizer.
    """
    metric = _bleu(tokenize)
    streams = _streams(hypotheses, references)
    if not hypotheses:
        metric.num_refs = 0
        return 0.0, _signature(metric, "BLEU")
    score = metric.corpus_score(list(hypotheses), streams)
    return float(score.score), _signature(metric, score.name)


def corpus_chrf(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    char_order: int = 6,
    word_order: int = 0,
    beta: int = 2,
) -> tuple[float, str]:
    """Corpus chrF (``word_order=2``: chrF++) via ``sacrebleu.metrics.CHRF`` -> ``(score, signature)``.

    Empty input gives ``(0.0, signature)`` with ``nrefs:0``.

    Raises:
        ValueError: length mismatch or a hypothesis without references.
    """
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta)
    streams = _streams(hypotheses, references)
    if not hypotheses:
        metric.num_refs = 0
        return 0.0, _signature(metric, _chrf_name(metric))
    score = metric.corpus_score(list(hypotheses), streams)
    return float(score.score), _signature(metric, score.name)


def sentence_bleu(hypothesis: str, references: Sequence[str], tokenize: str = "13a") -> float:
    """Sentence BLEU with effective order (as ``sacrebleu.sentence_bleu``), 0-100.

    Raises:
        ValueError: no references or an unavailable tokenizer.
    """
    _streams([hypothesis], [references])
    return float(_bleu(tokenize, effective_order=True).sentence_score(hypothesis, list(references)).score)


def sentence_chrf(
    hypothesis: str, references: Sequence[str], char_order: int = 6, word_order: int = 0, beta: int = 2
) -> float:
    """Sentence chrF (``word_order=2``: chrF++), 0-100.

    Raises:
        ValueError: no references.
    """
    _streams([hypothesis], [references])
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta)
    return float(metric.sentence_score(hypothesis, list(references)).score)
