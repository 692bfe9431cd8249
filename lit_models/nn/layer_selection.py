"""SLAM layer identification (pure, no Lightning): FFN gate activation statistics per language, layer scores, plot.

Method: Fan et al., *SLAM: Towards Efficient Multilingual Reasoning via Selective Language Alignment*, COLING 2025,
arXiv 2501.03681. Project spec: ``shared/methods/slam.md`` section 3.1 (the exact rule is the project's default; the
paper's analysis script is not released). Steps:

1. N parallel questions per language (English ``en`` is the reference), forwarded as raw text with the tokenizer's own
   special tokens (a BOS if it adds one), batched with right padding and an attention mask.
2. A forward hook on every layer's FFN gate (:func:`ffn_gate_module`: ``mlp.gate_proj``; GPT-2 ``mlp.c_fc``) reads the
   pre-activation ``z = W_gate x`` ``[batch, tokens, d_ff]``; neuron ``j`` is *activated* on a token iff ``z_j > 0``
   (the same as ``SiLU(z_j) > 0`` and ``GELU(z_j) > 0``).
3. Only question tokens count: padding and the special tokens the tokenizer adds (BOS/EOS) are excluded.
4. ``p^l_{j,k}`` = share of language-k tokens on which neuron j of layer l is activated
   (:func:`activation_probabilities`).
5.-8. :func:`layer_scores`: activated sets ``A^l_k = {j : p >= tau}``, counts ``n^l_k = |A^l_k| / d_ff``, their
   mean squared deviation across languages ``MSD^l``, overlap with English ``O^l_k = |A_k ∩ A_en| / max(|A_en|, 1)``
   and its mean ``Obar^l``; layers are ranked by MSD descending and by Obar ascending (average ranks for ties), the
   score is the mean of the two ranks and the ``top_k`` smallest scores are selected (ties to the lower index).

Plots use matplotlib (Agg canvas, no pyplot state) and are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_models.fileio import atomic_write

__all__ = [
    "STRATEGIES",
    "activation_counts",
    "activation_probabilities",
    "ffn_gate_module",
    "find_decoder_layers",
    "layer_scores",
    "model_fingerprint",
    "plot_layer_scores",
]

#: ``rank``: the scored selection of spec 3.1 step 8; ``bottom``: layers ``0..top_k-1`` (the paper's outcome).
STRATEGIES = ("rank", "bottom")

# Attribute paths (from the causal LM) of the decoder-layer list, tried in order.
_LAYER_PATHS = (
    ("model", "layers"),  # LLaMA, Mistral, Qwen2, Gemma, ...
    ("model", "language_model", "layers"),  # multimodal wrappers (transformers >= 4.52)
    ("transformer", "h"),  # GPT-2
    ("layers",),  # a bare decoder (LlamaModel)
    ("h",),  # a bare GPT2Model
)
# Attribute paths (from one decoder layer) of the FFN gate / first projection, tried in order.
_GATE_PATHS = (("mlp", "gate_proj"), ("mlp", "c_fc"))


# --------------------------------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``PeftModel.get_base_model()``), else ``model``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


def _get_path(obj: Any, path: Sequence[str]) -> Any:
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers: ``model.model.layers`` (LLaMA, Mistral, Qwen2), ``model.transformer.h``
    (GPT-2); a peft wrapper is unwrapped first.

    Raises:
        ValueError: no such list, naming the model class and the attribute paths tried.
    """
    base = _unwrap(model)
    for path in _LAYER_PATHS:
        layers = _get_path(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    tried = ", ".join(".".join(p) for p in _LAYER_PATHS)
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__} (tried {tried}); supported: LLaMA/Mistral/Qwen2-style "
        "model.model.layers and GPT-2-style transformer.h"
    )


def ffn_gate_module(layer: nn.Module) -> nn.Module:
    """The module of one decoder layer whose output is the FFN gate pre-activation ``z = W_gate x``: ``mlp.gate_proj``
    (gated FFNs: LLaMA, Mistral, Qwen2), or the first projection ``mlp.c_fc`` of GPT-2's non-gated FFN.

    Raises:
        ValueError: the layer has neither, naming its class and its ``mlp``'s children (e.g. a fused ``gate_up_proj``
            or a mixture-of-experts block, which are not supported).
    """
    for path in _GATE_PATHS:
        module = _get_path(layer, path)
        if isinstance(module, nn.Module):
            return module
    mlp = getattr(layer, "mlp", None)
    children = [name for name, _ in mlp.named_children()] if isinstance(mlp, nn.Module) else None
    raise ValueError(
        f"decoder layer {type(layer).__name__} has no FFN gate module (looked for "
        f"{', '.join('.'.join(p) for p in _GATE_PATHS)}; its mlp children: {children})"
    )


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{model_type, num_layers, hidden_size, intermediate_size}`` of a model's config (a peft wrapper is unwrapped),
    recorded with a layer selection so that it is never applied to another model. GPT-2 configs: ``n_layer``,
    ``n_embd``, ``n_inner`` or ``4 * n_embd``.

    Raises:
        ValueError: the model has no ``config`` or the config lacks a layer count or hidden size.
    """
    base = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        raise ValueError(f"{type(base).__name__} has no config: cannot fingerprint it")
    model_type = getattr(config, "model_type", None) or type(base).__name__
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if num_layers is None or hidden is None:
        raise ValueError(f"config of {type(base).__name__} has no num_hidden_layers/n_layer or hidden_size/n_embd")
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is None and (model_type == "gpt2" or hasattr(config, "n_inner")):
        intermediate = getattr(config, "n_inner", None) or 4 * int(hidden)
    return {
        "model_type": str(model_type),
        "num_layers": int(num_layers),
        "hidden_size": int(hidden),
        "intermediate_size": None if intermediate is None else int(intermediate),
    }


# --------------------------------------------------------------------------------------------------------------------
# Steps 2-4: activation statistics
# --------------------------------------------------------------------------------------------------------------------


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _decoder_or_model(model: nn.Module) -> nn.Module:
    """The decoder without the LM head when the model exposes one (``get_decoder()``), else ``model`` itself."""
    try:
        decoder = _unwrap(model).get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


def _encode(tokenizer: Any, lang: str, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
    """Per text ``(input_ids, question-token flags)``: False on the special tokens the tokenizer adds (BOS/EOS).

    Raises:
        ValueError: a text with no question token (names the language, index and text).
    """
    encoded = []
    for index, text in enumerate(texts):
        e = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
        question = [flag == 0 for flag in e["special_tokens_mask"]]
        if not any(question):
            raise ValueError(f"texts_by_lang[{lang!r}][{index}] = {text!r:.60} has no question token (empty text?)")
        encoded.append((list(e["input_ids"]), question))
    return encoded


def _pad_batch(encoded: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and question-token mask ``[batch, tokens]`` (bool, False on
    padding). Built here rather than by the tokenizer, so its ``padding_side`` (left padding would shift positions)
    and its pad token do not matter."""
    longest = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), longest), dtype=torch.long)
    question = torch.zeros((len(encoded), longest), dtype=torch.bool)
    for row, (row_ids, row_question) in enumerate(encoded):
        n = len(row_ids)
        ids[row, :n] = torch.tensor(row_ids, dtype=torch.long)
        attention[row, :n] = 1
        question[row, :n] = torch.tensor(row_question, dtype=torch.bool)
    return ids, attention, question


def activation_counts(
    model: nn.Module, tokenizer: Any, texts_by_lang: dict[str, list[str]], batch_size: int = 8
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Per language, how many question tokens activate each FFN neuron (``z > 0``), and the number of those tokens.

    Args:
        model: a transformers causal LM (or peft wrapper) with :func:`find_decoder_layers` / :func:`ffn_gate_module`.
        tokenizer: its tokenizer; each text is encoded with ``add_special_tokens=True``.
        texts_by_lang: ``{lang: [question, ...]}`` (raw text, no template).
        batch_size: texts per forward pass, formed from the texts sorted by token count (right padding with an
            attention mask; the result does not depend on it).

    Returns:
        ``(counts, tokens)``: ``counts[lang]`` int64 ``[num_layers, d_ff]`` (on CPU), ``tokens[lang]`` the number of
        question tokens of that language (padding and tokenizer-added special tokens such as BOS excluded).

    Raises:
        ValueError: ``batch_size < 1``, no language, a language without texts, a text that is not a string or that
            has no question token (empty), layers whose gate outputs have different widths; as :func:`find_decoder_layers` and
            :func:`ffn_gate_module`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not texts_by_lang:
        raise ValueError("texts_by_lang is empty: give {lang: [texts]} for at least one language")
    for lang, texts in texts_by_lang.items():
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"texts_by_lang[{lang!r}] must be a non-empty list of strings, got {texts!r:.80}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts_by_lang[{lang!r}][{i}] is {type(text).__name__}, not a string")  # noqa: TRY004
    gates = [ffn_gate_module(layer) for layer in find_decoder_layers(model)]
    state: dict[str, Any] = {"mask": None, "counts": [None] * len(gates)}

    def make_hook(index: int):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            z = output[0] if isinstance(output, tuple) else output  # [batch, tokens, d_ff]
            keep = state["mask"].to(z.device)
            if z.dim() == 2:  # an implementation that flattens the tokens: [batch * tokens, d_ff]
                keep = keep.reshape(-1)
            active = (z[keep] > 0).sum(dim=0, dtype=torch.long)  # [d_ff]
            if state["counts"][index] is None:
                state["counts"][index] = active
            else:
                state["counts"][index] += active

        return hook

    runner = _decoder_or_model(model)
    device = _input_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    handles = [gate.register_forward_hook(make_hook(i)) for i, gate in enumerate(gates)]
    counts: dict[str, Tensor] = {}
    tokens: dict[str, int] = {}
    try:
        model.eval()
        with torch.inference_mode():
            for lang, texts in texts_by_lang.items():
                state["counts"] = [None] * len(gates)
                n_tokens = 0
                encoded = _encode(tokenizer, lang, texts)
                order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths: less padding
                for start in range(0, len(order), batch_size):
                    ids, attention, question = _pad_batch([encoded[i] for i in order[start : start + batch_size]],
                                                          pad_id)
                    state["mask"] = question
                    n_tokens += int(question.sum())
                    runner(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
                widths = {int(c.shape[0]) for c in state["counts"]}
                if len(widths) != 1:
                    raise ValueError(f"the FFN gates of {type(_unwrap(model)).__name__} have different widths {widths}")
                counts[lang] = torch.stack([c.cpu() for c in state["counts"]])
                tokens[lang] = n_tokens
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts, tokens


def activation_probabilities(
    model: nn.Module, tokenizer: Any, texts_by_lang: dict[str, list[str]], batch_size: int = 8
) -> dict[str, Tensor]:
    """Spec 3.1 steps 2-4: per language a float64 tensor ``[num_layers, d_ff]``, the share of that language's question
    tokens (no padding, no tokenizer-added BOS/EOS) on which neuron ``j`` of layer ``l`` has gate pre-activation > 0.

    Forward hooks on :func:`ffn_gate_module` of every layer; batched with an attention mask under
    ``torch.inference_mode`` with the model in eval mode (its training flag is restored afterwards). Arguments and
    errors as :func:`activation_counts`.
    """
    counts, tokens = activation_counts(model, tokenizer, texts_by_lang, batch_size=batch_size)
    return {lang: counts[lang].to(torch.float64) / tokens[lang] for lang in counts}


# --------------------------------------------------------------------------------------------------------------------
# Steps 5-8: layer scores
# --------------------------------------------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray, descending: bool) -> np.ndarray:
    """1-based ranks (rank 1 = largest when ``descending``, else smallest); tied values share their average rank."""
    from scipy.stats import rankdata

    return rankdata(-values if descending else values, method="average")


def layer_scores(
    probs: dict[str, Tensor], tau: float = 0.5, top_k: int = 6, strategy: str = "rank", reference: str = "en"
) -> dict[str, Any]:
    """Spec 3.1 steps 5-8: per-layer statistics of the activated neuron sets and the selected layers.

    Args:
        probs: ``{lang: [num_layers, d_ff]}`` activation probabilities (:func:`activation_probabilities`), same shape
            for every language; at least two languages, one of them ``reference``.
        tau: a neuron is in the activated set ``A^l_k`` iff ``p^l_{j,k} >= tau``; in ``(0, 1]``.
        top_k: number of layers to select, ``1 <= top_k <= num_layers``.
        strategy: ``rank`` (smallest mean of the MSD rank, descending, and the mean-overlap rank, ascending; ties
            to the lower layer index) or ``bottom`` (``[0, ..., top_k - 1]``; statistics are still reported).
        reference: the language the overlaps are measured against (English).

    Returns:
        ``{"per_layer": [{"layer", "n": {lang: n^l_k}, "msd", "overlap": {lang: O^l_k for lang != reference},
        "mean_overlap", "score"}], "selected": [sorted layer indices]}`` (plain Python floats and ints).
        ``n^l_k = |A^l_k| / d_ff``; ``msd = mean_k (n^l_k - mean_k n^l_k)^2`` over all languages;
        ``O^l_k = |A^l_k ∩ A^l_ref| / max(|A^l_ref|, 1)``; ``score`` = mean of the two (average-tie) ranks.

    Raises:
        ValueError: ``reference`` missing (lists the languages present), fewer than two languages, ``tau`` not in
            ``(0, 1]``, ``top_k`` out of range (names the layer count), unknown ``strategy``, tensors that are not 2-D
            or differ in shape (names the languages).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    langs = list(probs)
    if reference not in probs:
        raise ValueError(f"reference language {reference!r} is missing from the probabilities; present: {langs}")
    if len(langs) < 2:
        raise ValueError(f"need at least 2 languages (the reference {reference!r} and one other), got {langs}")
    shape = tuple(probs[reference].shape)
    for lang in langs:
        if probs[lang].dim() != 2 or tuple(probs[lang].shape) != shape:
            raise ValueError(
                f"probs[{lang!r}] has shape {tuple(probs[lang].shape)}, expected 2-D [num_layers, d_ff] equal to "
                f"probs[{reference!r}] {shape}"
            )
    num_layers, d_ff = shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_layers:
        raise ValueError(f"top_k must be an integer in [1, {num_layers}] (the model has {num_layers} layers), got {top_k!r}")

    active = {lang: probs[lang].detach().cpu() >= tau for lang in langs}  # [L, d_ff] bool
    sizes = {lang: active[lang].sum(dim=1).to(torch.float64) for lang in langs}  # [L]
    n = torch.stack([sizes[lang] / d_ff for lang in langs])  # [K, L]
    msd = ((n - n.mean(dim=0, keepdim=True)) ** 2).mean(dim=0)  # [L]
    others = [lang for lang in langs if lang != reference]
    ref_size = sizes[reference].clamp(min=1.0)
    overlap = {
        lang: (active[lang] & active[reference]).sum(dim=1).to(torch.float64) / ref_size for lang in others
    }  # each [L]
    mean_overlap = torch.stack([overlap[lang] for lang in others]).mean(dim=0)  # [L]
    msd_np, overlap_np = msd.numpy(), mean_overlap.numpy()
    score = (_average_ranks(msd_np, descending=True) + _average_ranks(overlap_np, descending=False)) / 2.0

    if strategy == "bottom":
        selected = list(range(top_k))
    else:
        order = sorted(range(num_layers), key=lambda layer: (score[layer], layer))
        selected = sorted(order[:top_k])
    per_layer = [
        {
            "layer": layer,
            "n": {lang: float(n[i, layer]) for i, lang in enumerate(langs)},
            "msd": float(msd_np[layer]),
            "overlap": {lang: float(overlap[lang][layer]) for lang in others},
            "mean_overlap": float(overlap_np[layer]),
            "score": float(score[layer]),
        }
        for layer in range(num_layers)
    ]
    return {"per_layer": per_layer, "selected": selected}


# --------------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------------


def plot_layer_scores(result: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Two stacked panels sharing the layer axis, written atomically to ``path`` (format from the suffix, PNG by
    default; parent directories created): top, bars of ``MSD^l`` of the activated-neuron counts; bottom, the overlap
    with the reference per language and its mean (thick black). Selected layers are shaded in both panels and their
    bars coloured.

    Args:
        result: a :func:`layer_scores` dict (or the ``select_layers.py`` JSON, which holds the same keys).
        path: output file.
        title: figure title.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: ``result`` has no ``per_layer`` entries.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.get("per_layer") or []
    if not rows:
        raise ValueError("result has no per_layer entries: nothing to plot")
    selected = set(result.get("selected", []))
    layers = [row["layer"] for row in rows]
    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_msd, ax_overlap = fig.subplots(2, 1, sharex=True)
    colors = ["tab:red" if layer in selected else "tab:grey" for layer in layers]
    ax_msd.bar(layers, [row["msd"] for row in rows], color=colors)
    ax_msd.set_ylabel("MSD of n (activated share)")
    ax_msd.grid(True, axis="y", alpha=0.3)
    langs = list(rows[0]["overlap"])
    for i, lang in enumerate(langs):
        ax_overlap.plot(layers, [row["overlap"][lang] for row in rows], marker=".", color=f"C{i % 10}", label=lang)
    ax_overlap.plot(layers, [row["mean_overlap"] for row in rows], color="black", linewidth=2.5, label="mean")
    ax_overlap.set_ylabel("overlap with English")
    ax_overlap.set_xlabel("layer")
    ax_overlap.grid(True, alpha=0.3)
    for ax in (ax_msd, ax_overlap):
        for layer in selected:
            ax.axvspan(layer - 0.5, layer + 0.5, color="tab:red", alpha=0.12, linewidth=0)
    ax_overlap.plot([], [], color="tab:red", alpha=0.3, linewidth=8, label="selected")
    ax_overlap.legend(loc="best", fontsize="small", ncol=max(1, (len(langs) + 2) // 6))
    if len(layers) <= 48:
        ax_overlap.set_xticks(layers)
    fig.suptitle(title or f"layer selection: {sorted(selected)}")
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=fig.dpi))
    finally:
        fig.clear()
