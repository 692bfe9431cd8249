"""A thin layer loop over a transformers LLaMA-family decoder: per-exit hidden states and early-exit greedy decoding.

Pure PyTorch, no Lightning (spec ``shared/methods/early_exit.md`` sections 3.1 and 3.5). Nothing here copies model
code: the loop calls the model's own modules (``model.model.embed_tokens``, ``rotary_emb``, each decoder layer of
``model.model.layers``, ``model.model.norm``, ``model.lm_head``) with the mask that transformers'
``create_causal_mask`` builds for the model, and a transformers ``DynamicCache``. Sub-layer exits and KV filling use
the LLaMA pre-norm layer structure (``input_layernorm``, ``self_attn`` with ``k_proj``/``v_proj``,
``post_attention_layernorm``, ``mlp``), shared by Llama, Mistral, Qwen2 and SmolLM2.

**Early-exit decoding** (:func:`early_exit_generate`, batch 1, greedy, fixed length): the prompt is prefilled at full
depth; every new token runs layers until its :class:`ExitPolicy` says stop, emits the argmax of the model's own norm
and head at that point, then fills the caches of the layers it skipped (``kv_mode``):

- ``propagate`` (default, CALM-style): for each skipped layer ``m``, ``K_m = RoPE(k_proj_m(Norm_in,m(h_e)), t)`` and
  ``V_m = v_proj_m(Norm_in,m(h_e))`` from the exit hidden state ``h_e``. Cost: two small projections per skipped
  layer (SmolLM2: 576 -> 192 each). Later tokens attend to an approximation of what the skipped layers would have
  computed, so quality drifts slowly with output length.
- ``kv_copy`` (the paper's variant): the exit layer's own K/V of this position is appended to every skipped layer
  (already rotated at ``t``: no second RoPE). Cheapest; the paper reports it degrades on long generations.
- ``lazy`` (exact caches): the exit state is stored and the missing layers run later, when a token needs layer ``m``,
  as one causal chunk over the pending positions. Every cache entry then equals what the full model writes for the
  same tokens; it saves compute only when later tokens also exit early.

Invariant (checked after every step; ``lazy``: after the final flush): every layer's cache holds one entry per
processed position. With the policy disabled the loop is the full-depth baseline: same cache, same Python overhead,
and the same tokens as ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lit_models.nn.exit_gates import (
    GATE_RULES,
    ExitGates,
    check_threshold,
    exit_layer_units,
    logit_gate_features,
    logit_scores,
)

__all__ = ["KV_MODES", "DecodeResult", "ExitPolicy", "LayerwiseRunner", "early_exit_generate"]

KV_MODES = ("propagate", "kv_copy", "lazy")
_SUBLAYER_ATTRS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _need(obj: Any, path: str, root: str = "model") -> Any:
    """``obj.<path>`` or ``TypeError`` naming the attribute looked for."""
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise TypeError(f"EarlyExitLM supports LLaMA-family causal LMs; missing {root}.{path} "
                            f"(on {type(obj).__name__})")
        cur = getattr(cur, part)
    return cur


class LayerwiseRunner:
    """Manual layer loop over an HF LLaMA-family causal LM (no copy: the model's own modules are called).

    Args:
        model: a ``...ForCausalLM`` with ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``
            (a peft wrapper is unwrapped).
        sublayer: exit points after the attention and after the FFN of each layer (``2L``), else after each layer.

    Raises:
        TypeError: a missing attribute (``missing model.model.layers``, ...), or logits that are not the head of the
            final norm (logit soft-capping).
    """

    def __init__(self, model: Any, sublayer: bool = False) -> None:
        self.model = _unwrap(model)
        self.backbone = _need(self.model, "model")
        self.layers = _need(self.model, "model.layers")
        self.embed = _need(self.model, "model.embed_tokens")
        self.norm = _need(self.model, "model.norm")
        self.rotary = _need(self.model, "model.rotary_emb")
        self.head = _need(self.model, "lm_head")
        self.config = self.model.config
        if getattr(self.config, "final_logit_softcapping", None):
            raise TypeError("EarlyExitLM supports LLaMA-family causal LMs; logit soft-capping is not supported")
        self.sublayer = bool(sublayer)
        self.n_layers = len(self.layers)
        if self.n_layers < 1:
            raise TypeError("EarlyExitLM supports LLaMA-family causal LMs; model.model.layers is empty")
        if self.sublayer:
            self.check_layer_structure()
        self.n_exits = 2 * self.n_layers if self.sublayer else self.n_layers
        self.hidden_size = int(self.config.hidden_size)
        self._rope = getattr(sys.modules[type(self.layers[0]).__module__], "apply_rotary_pos_emb", None)

    def check_layer_structure(self) -> None:
        """Raise ``TypeError`` unless every layer has the pre-norm attributes the sub-layer split and KV filling use."""
        for i, layer in enumerate(self.layers):
            for attr in _SUBLAYER_ATTRS:
                _need(layer, attr, root=f"model.model.layers[{i}]")
            for attr in ("k_proj", "v_proj"):
                _need(layer.self_attn, attr, root=f"model.model.layers[{i}].self_attn")

    @property
    def exit_units(self) -> Tensor:
        """Exit points in layer units ``[n_exits]``."""
        return exit_layer_units(self.n_exits, self.sublayer)

    # -------------------------------------------------------------------------------------------- pieces
    def logits(self, h: Tensor) -> Tensor:
        """``lm_head(norm(h))``: the model's own exit at any hidden state ``[..., d]`` -> ``[..., V]``."""
        return self.head(self.norm(h))

    def mask(self, h: Tensor, attention_mask: Tensor | None, cache: Any, position_ids: Tensor) -> Any:
        """The causal mask the model itself builds (transformers' ``create_causal_mask``) for ``h`` ``[B, T, d]``."""
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)

    def layer(self, i: int, h: Tensor, mask: Any, pe: Any, pos: Tensor, cache: Any = None) -> Tensor:
        """Decoder layer ``i`` (0-based) as the model calls it."""
        return self.layers[i](h, attention_mask=mask, position_embeddings=pe, position_ids=pos, cache=cache,
                              use_cache=cache is not None)

    def attn_half(self, i: int, h: Tensor, mask: Any, pe: Any, pos: Tensor, cache: Any = None) -> Tensor:
        """Post-attention residual of layer ``i``: ``h + Attn(Norm_in(h))`` (writes layer ``i``'s K/V to ``cache``)."""
        layer = self.layers[i]
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, position_ids=pos,
                                 cache=cache, use_cache=cache is not None, position_embeddings=pe)
        return h + out

    def ffn_half(self, i: int, h_half: Tensor) -> Tensor:
        """Post-FFN residual of layer ``i``: ``h + FFN(Norm_post(h))`` (position-wise, no cache)."""
        layer = self.layers[i]
        return h_half + layer.mlp(layer.post_attention_layernorm(h_half))

    # -------------------------------------------------------------------------------------------- teacher forcing
    def exit_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Residual stream at every exit point, teacher-forced (no cache; keeps autograd when enabled).

        Args:
            input_ids: ``[B, T]``; attention_mask: ``[B, T]`` (1 on tokens) or None.

        Returns:
            ``[n_exits + 1, B, T, d]``: index 0 is the embedding output ``h_0``, index ``k + 1`` exit point ``k``.
        """
        h = self.embed(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = self.mask(h, attention_mask, None, pos)
        pe = self.rotary(h, pos)
        states = [h]
        for i in range(self.n_layers):
            if self.sublayer:
                h = self.attn_half(i, h, mask, pe, pos)
                states.append(h)
                h = self.ffn_half(i, h)
            else:
                h = self.layer(i, h, mask, pe, pos)
            states.append(h)
        return torch.stack(states)

    @torch.no_grad()
    def exit_predictions(self, states: Tensor, with_scores: bool = False, chunk: int = 4096) -> dict[str, Tensor]:
        """Top-1 prediction (and, with ``with_scores``, ``p_max``, ``margin``, ``entropy``) at every row of
        ``states`` ``[S, N, d]``, computed exit by exit and in chunks of ``chunk`` tokens (the ``[N, V]`` logits of
        one chunk are the peak memory). Returns tensors ``[S, N]``."""
        keys = ("pred", "p_max", "margin", "entropy") if with_scores else ("pred",)
        out: dict[str, list[Tensor]] = {k: [] for k in keys}
        for s in range(states.shape[0]):
            parts: dict[str, list[Tensor]] = {k: [] for k in keys}
            for start in range(0, states.shape[1], chunk):
                z = self.logits(states[s, start:start + chunk])
                if with_scores:
                    for k, v in logit_scores(z).items():
                        parts[k].append(v)
                else:
                    parts["pred"].append(z.argmax(-1))
            for k in keys:
                out[k].append(torch.cat(parts[k]))
        return {k: torch.stack(v) for k, v in out.items()}

    @torch.no_grad()
    def stable_oracle(self, states: Tensor, chunk: int = 4096) -> tuple[Tensor, int]:
        """Stable oracle exit index of every token, scanning exit points from the top down.

        Equal to ``oracle_exit(exit_predictions(states)["pred"], "stable")``, but a token leaves the scan at the first
        exit point (from the top) whose prediction differs from the final one, so the LM head runs on
        ``sum_k |still stable at k|`` rows instead of ``n_exits x N`` (about ``(L - mean oracle + 1) / L`` of the cost).

        Args:
            states: ``[n_exits, N, d]`` exit-point states (without the embeddings row).

        Returns:
            (long ``[N]`` oracle indices, number of token rows that went through the head).
        """
        n, N = states.shape[0], states.shape[1]
        final = torch.cat([self.logits(states[-1, s:s + chunk]).argmax(-1) for s in range(0, N, chunk)])
        oracle = torch.zeros(N, dtype=torch.long, device=states.device)
        active = torch.arange(N, device=states.device)
        rows = N
        for k in range(n - 2, -1, -1):
            if active.numel() == 0:
                break
            h = states[k, active]
            pred = torch.cat([self.logits(h[s:s + chunk]).argmax(-1) for s in range(0, h.shape[0], chunk)])
            rows += h.shape[0]
            differs = pred != final[active]
            oracle[active[differs]] = k + 1
            active = active[~differs]
        return oracle, rows

    # -------------------------------------------------------------------------------------------- KV filling
    def propagated_kv(self, m: int, h_src: Tensor, pe: Any) -> tuple[Tensor, Tensor]:
        """K/V that layer ``m`` gets from the exit state ``h_src`` ``[1, q, d]`` in ``propagate`` mode:
        ``RoPE(k_proj(Norm_in,m(h_src)))`` and ``v_proj(Norm_in,m(h_src))``, each ``[1, kv_heads, q, head_dim]``."""
        layer = self.layers[m]
        attn = layer.self_attn
        x = layer.input_layernorm(h_src)
        head_dim = int(getattr(attn, "head_dim", self.hidden_size // self.config.num_attention_heads))
        shape = (*x.shape[:-1], -1, head_dim)
        k = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):  # Qwen3-style per-head key norm, applied before RoPE
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = pe
        if self._rope is None:
            raise TypeError(f"EarlyExitLM kv_mode=propagate needs apply_rotary_pos_emb in {type(self.layers[0]).__module__}")
        _, k = self._rope(k, k, cos, sin)
        return k, v


# ================================================================================================ exit policies
class ExitPolicy:
    """Decides at each exit point of one decoding step whether to stop (see :mod:`lit_models.nn.exit_gates`).

    Args:
        runner: the layer loop (its norm and head give the logit-based scores).
        rule: ``learned`` (``gates`` on ``gate_features``), ``confidence``, ``entropy`` or ``saturation``.
        threshold: exit when the score reaches it; ``None`` or 1.0: never exit early (the full-depth baseline).
        gates: the trained :class:`ExitGates` (``learned`` only).
        gate_features: ``hidden`` (cheap: no head) or ``logits`` (a head product per exit point).
        min_exit: first eligible exit index (0-based).
        saturation_k: consecutive equal top-1 predictions that make ``saturation`` exit.

    Raises:
        ValueError: unknown rule, a threshold outside [0, 1], ``learned`` without gates.
    """

    def __init__(
        self,
        runner: LayerwiseRunner,
        rule: Literal["learned", "confidence", "entropy", "saturation"] = "learned",
        threshold: float | None = None,
        gates: ExitGates | None = None,
        gate_features: Literal["hidden", "logits"] = "hidden",
        min_exit: int = 0,
        saturation_k: int = 2,
    ) -> None:
        if rule not in GATE_RULES:
            raise ValueError(f"gate must be one of {list(GATE_RULES)}; got {rule!r}")
        self.runner, self.rule, self.gates = runner, rule, gates
        self.threshold = check_threshold(threshold)
        self.gate_features, self.min_exit, self.saturation_k = gate_features, int(min_exit), int(saturation_k)
        if rule == "learned" and gates is None and not self.disabled:
            raise ValueError("gate=learned needs trained ExitGates")
        self._prev_pred: Tensor | None = None
        self._run = 0

    @property
    def disabled(self) -> bool:
        """True when the policy never exits early (threshold None or >= 1)."""
        return self.threshold is None or self.threshold >= 1.0

    def _needs_logits(self) -> bool:
        return self.rule != "learned" or self.gate_features == "logits"

    def start_token(self, h0: Tensor) -> None:
        """Reset the per-token state at the embedding output ``h0`` ``[1, 1, d]``."""
        self._run = 0
        self._prev_pred = None
        if not self.disabled and self._needs_logits() and self.rule != "saturation":
            self._prev_pred = self.runner.logits(h0).argmax(-1)

    def _hidden_gate_prob(self, k: int, h: Tensor, h_prev: Tensor) -> Tensor:
        """``sigmoid(g_k)`` for one position (``h``, ``h_prev``: ``[1, 1, d]``): the same function as
        ``ExitGates.forward_one(k, hidden_gate_features(...))`` with fewer small ops (about half the time per layer on a
        CPU, where this runs once per layer and token)."""
        g = self.gates
        hf, pf = h.reshape(-1).float(), h_prev.reshape(-1).float()
        u = self.runner.norm(h).reshape(-1).to(g.w1.dtype)
        nh = hf.norm()
        cos = (hf @ pf) / (nh * pf.norm()).clamp_min(1e-6)
        delta = (hf - pf).norm() / nh.clamp_min(1e-6)
        w1 = g.w1[k]
        z = torch.addmv(g.b1[k], w1[:-2].t(), u) + cos * w1[-2] + delta * w1[-1]
        return torch.sigmoid(torch.nn.functional.gelu(z) @ g.w2[k] + g.b2[k])

    def should_exit(self, k: int, h: Tensor, h_prev: Tensor) -> bool:
        """Whether to stop at exit point ``k`` (never at the last one, which always exits) given the hidden state
        ``h`` and the previous exit point's ``h_prev`` (``[1, 1, d]``)."""
        if self.disabled or k >= self.runner.n_exits - 1:
            return False
        if not self._needs_logits():
            if k < self.min_exit:
                return False
            return bool(self._hidden_gate_prob(k, h, h_prev) >= self.threshold)
        scores = logit_scores(self.runner.logits(h))
        pred = scores["pred"]
        if self.rule == "saturation":
            self._run = self._run + 1 if self._prev_pred is not None and bool((pred == self._prev_pred).all()) else 1
            self._prev_pred = pred
            return k >= self.min_exit and self._run >= max(self.saturation_k, 1)
        prev, self._prev_pred = self._prev_pred, pred
        if k < self.min_exit:
            return False
        if self.rule == "confidence":
            score = scores["p_max"]
        elif self.rule == "entropy":
            score = 1.0 - scores["entropy"]
        else:
            feats = logit_gate_features(scores, prev, h, h_prev)[:, -1]
            score = torch.sigmoid(self.gates.forward_one(k, feats))
        return bool(score.reshape(-1)[0] >= self.threshold)


# ================================================================================================ decoding
@dataclass
class DecodeResult:
    """Output of :func:`early_exit_generate` (batch 1).

    Attributes:
        tokens: the generated ids (``forced_tokens`` given: the model's own prediction at each step).
        exits: exit point of each generated token in layer units (the first token comes from the full-depth prefill).
        n_layers: ``L``.
        prefill_s, decode_s: wall-clock seconds of the prefill and of the remaining steps (flushes included).
        cache_lengths: every layer's cache length at the end (``lazy``: after the final flush).
    """

    tokens: list[int]
    exits: list[float]
    n_layers: int
    prefill_s: float
    decode_s: float
    cache_lengths: list[int] = field(default_factory=list)

    @property
    def avg_exit_layer(self) -> float:
        return sum(self.exits) / max(len(self.exits), 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second, prefill included."""
        return len(self.tokens) / max(self.prefill_s + self.decode_s, 1e-9)


def _chunk_mask(q: int, past: int, like: Tensor) -> Tensor:
    """Additive causal mask ``[1, 1, q, past + q]`` for a chunk of ``q`` new positions after ``past`` cached ones."""
    full = torch.full((q, past + q), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return full.triu(past + 1)[None, None]


@torch.no_grad()
def early_exit_generate(
    runner: LayerwiseRunner,
    prompt_ids: Tensor,
    max_new_tokens: int,
    policy: ExitPolicy | None = None,
    kv_mode: Literal["propagate", "kv_copy", "lazy"] = "propagate",
    forced_tokens: list[int] | Tensor | None = None,
    step_hook: Any = None,
) -> DecodeResult:
    """Greedy decoding of ``max_new_tokens`` tokens with per-token early exit (see the module docstring).

    Args:
        runner: the layer loop of the model.
        prompt_ids: ``[1, T]`` (or ``[T]``) prompt ids.
        max_new_tokens: tokens to generate (no EOS stop: fixed length, comparable timing).
        policy: the exit rule; None (or a disabled policy) decodes at full depth.
        kv_mode: ``propagate``, ``kv_copy`` or ``lazy``.
        forced_tokens: teacher forcing: feed ``forced_tokens[j]`` as the ``j+1``-th generated token instead of the
            model's own choice (token agreement on the full-decoding trajectory); needs ``max_new_tokens - 1`` ids.
        step_hook: called as ``step_hook(step, exit_index, cache)`` after each decoding step (tests).

    Raises:
        ValueError: batch size > 1 (``early-exit decoding runs with batch size 1``), unknown ``kv_mode``,
            ``max_new_tokens < 1``, too few ``forced_tokens``, or prompt plus new tokens beyond the model's
            ``max_position_embeddings``.
        RuntimeError: the cache invariant is broken (a bug, never expected).
    """
    from transformers import DynamicCache

    if kv_mode not in KV_MODES:
        raise ValueError(f"kv_mode must be one of {list(KV_MODES)}; got {kv_mode!r}")
    ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids.unsqueeze(0)
    if ids.shape[0] != 1:
        raise ValueError("early-exit decoding runs with batch size 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    n_prompt = ids.shape[1]
    limit = getattr(runner.config, "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={limit}")
    if forced_tokens is not None:
        forced = [int(x) for x in (forced_tokens.tolist() if isinstance(forced_tokens, Tensor) else forced_tokens)]
        if len(forced) < max_new_tokens - 1:
            raise ValueError(f"forced_tokens needs {max_new_tokens - 1} ids; got {len(forced)}")
    if policy is None:
        policy = ExitPolicy(runner, "learned", None)
    L, sub, device = runner.n_layers, runner.sublayer, ids.device
    units = exit_layer_units(runner.n_exits, sub).tolist()
    cache = DynamicCache(config=runner.config)

    t0 = time.perf_counter()
    h = runner.embed(ids)
    pos = torch.arange(n_prompt, device=device).unsqueeze(0)
    mask = runner.mask(h, torch.ones_like(ids), cache, pos)
    pe = runner.rotary(h, pos)
    for i in range(L):
        h = runner.layer(i, h, mask, pe, pos, cache)
    tokens = [int(runner.logits(h[:, -1:]).argmax(-1))]
    exits = [float(L)]
    prefill_s = time.perf_counter() - t0

    # lazy: position -> (completed sub-layers in half-layer units, hidden state [1, 1, d])
    pending: dict[int, tuple[int, Tensor]] = {}

    def cache_len(i: int) -> int:
        return cache.layers[i].get_seq_length()

    def flush(i: int, upto: int) -> None:
        """lazy: run layer ``i`` for the positions ``cache_len(i)..upto-1`` that skipped it (one causal chunk)."""
        start = cache_len(i)
        if start >= upto:
            return
        positions = list(range(start, upto))
        states = []
        for p in positions:
            done, hp = pending[p]
            if done == 2 * i - 1:  # exited after layer i-1's attention: finish its FFN first
                hp, done = runner.ffn_half(i - 1, hp), 2 * i
            if done != 2 * i:
                raise RuntimeError(f"lazy cache: position {p} is at sub-layer {done}, expected {2 * i} (bug)")
            states.append(hp)
        hc = torch.cat(states, dim=1)
        pc = torch.tensor([positions], device=device)
        out = runner.layer(i, hc, _chunk_mask(len(positions), start, hc), runner.rotary(hc, pc), pc, cache)
        for j, p in enumerate(positions):
            if 2 * (i + 1) >= 2 * L:
                del pending[p]
            else:
                pending[p] = (2 * (i + 1), out[:, j:j + 1])

    t1 = time.perf_counter()
    for step in range(1, max_new_tokens):
        t = n_prompt + step - 1
        tok = forced[step - 1] if forced_tokens is not None else tokens[-1]
        h = runner.embed(torch.tensor([[tok]], device=device))
        pos = torch.tensor([[t]], device=device)
        mask = runner.mask(h, torch.ones(1, t + 1, dtype=torch.long, device=device), cache, pos)
        pe = runner.rotary(h, pos)
        policy.start_token(h)
        exit_k, last_layer = runner.n_exits - 1, L - 1
        for i in range(L):
            if kv_mode == "lazy":
                flush(i, t)
            if sub:
                hh = runner.attn_half(i, h, mask, pe, pos, cache)
                if policy.should_exit(2 * i, hh, h):
                    h, exit_k, last_layer = hh, 2 * i, i
                    break
                h2 = runner.ffn_half(i, hh)
                if policy.should_exit(2 * i + 1, h2, hh):
                    h, exit_k, last_layer = h2, 2 * i + 1, i
                    break
                h = h2
            else:
                h2 = runner.layer(i, h, mask, pe, pos, cache)
                if policy.should_exit(i, h2, h):
                    h, exit_k, last_layer = h2, i, i
                    break
                h = h2
        if last_layer < L - 1:
            if kv_mode == "propagate":
                for m in range(last_layer + 1, L):
                    k, v = runner.propagated_kv(m, h, pe)
                    cache.update(k, v, m)
            elif kv_mode == "kv_copy":
                src = cache.layers[last_layer]
                k, v = src.keys[:, :, -1:], src.values[:, :, -1:]
                for m in range(last_layer + 1, L):
                    cache.update(k, v, m)
            else:
                pending[t] = ((exit_k + 1) if sub else 2 * (exit_k + 1), h)
        tokens.append(int(runner.logits(h).argmax(-1)))
        exits.append(units[exit_k])
        if kv_mode != "lazy":
            lengths = {cache_len(i) for i in range(L)}
            if lengths != {t + 1}:
                raise RuntimeError(f"cache invariant broken at position {t}: layer cache lengths {sorted(lengths)}")
        if step_hook is not None:
            step_hook(step, exit_k, cache)
    processed = n_prompt + max_new_tokens - 1
    if kv_mode == "lazy":
        for i in range(L):
            flush(i, processed)
    decode_s = time.perf_counter() - t1
    lengths = [cache_len(i) for i in range(L)]
    if set(lengths) != {processed}:
        raise RuntimeError(f"cache invariant broken at the end: layer cache lengths {lengths}, expected {processed}")
    return DecodeResult(tokens=tokens, exits=exits, n_layers=L, prefill_s=prefill_s, decode_s=decode_s,
                        cache_lengths=lengths)
