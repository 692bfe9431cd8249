"""ReMamba building blocks: span arithmetic, the selector (scoring MLPs, top-k, ReLU(cos) weights) and the Δ hook.

ReMamba (Yuan et al., arXiv 2408.15496; official code ``lblankl/ReMamba`` commit ``cb127bc``; spec
``shared/methods/remamba.md``) runs a Mamba LM twice over a prompt ``x_0..x_{L-1}``:

1. **selection**: the final-layer normed hidden states ``H`` [L, d] of a first pass are scored inside the span
   ``[s0, s0 + L')`` (``L' = max(ceil(p L), 1)``, ``s0 = floor(s L)``) by ``c_i = cos(K(H_i), Q(H_{L-1}))``; the top
   ``k = ceil(rho L')`` positions are kept **in their original order**, with weights ``w = ReLU(c)`` and compressed
   states ``Z = V(H_idx)`` (:class:`ReMambaSelector`). ``Z`` replaces the span's input embeddings.
2. **selective adaptation**: in the second pass, every layer's pre-softplus time step ``delta`` at the ``k``
   compressed positions becomes ``w * delta + b_ret`` (:func:`delta_adaptation`), then ``softplus(delta + b_dt)``
   as usual.

**How the Δ hook works.** transformers 5.x's :class:`~transformers.models.mamba.modeling_mamba.MambaMixer` computes
``delta = dt_proj.weight @ x`` itself (``dt_proj`` is never *called*, so a module forward hook on it never fires:
the official code's CPU fallback silently skips the adaptation for the same reason) and hands the pre-bias ``delta``
[B, d_in, T] with ``delta_bias = dt_proj.bias`` to the module-level function ``mamba_selective_scan``, which is the
torch reference scan on CPU and mamba-ssm's CUDA ``selective_scan_fn`` when mamba-ssm is installed. Inside
:func:`delta_adaptation` that function is replaced by a wrapper that edits ``delta`` at ``[start, start + k)`` of
the layer whose mixer is running (known from a forward pre-hook on every mixer) and counts the call. The fused
training kernel ``mamba_inner_fn`` (GPU + mamba-ssm only; it takes ``dt_proj.weight`` and never exposes delta) is
switched off for the same block, so the mixer takes the unfused path, which still uses the CUDA scan kernel. When
the block ends, a layer whose scan did not run raises ``RuntimeError`` (the guard against a silent skip). Single-token
decode steps use ``mamba_selective_state_update``, not the scan, so the hook never touches decoding.

Supported: Mamba-1 (``MambaForCausalLM``; ``MambaMixer``) with the transformers 5.x mixer. Mamba-2 is not supported
(:func:`mamba_mixers` raises ``TypeError``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DeltaHookState",
    "ReMambaSelector",
    "Selection",
    "delta_adaptation",
    "init_from_layer0",
    "mamba_mixers",
    "sample_train_ratios",
    "span_sizes",
    "stage2_embeddings",
    "stage2_labels",
]

Kernel = Literal["auto", "torch", "cuda"]
_MODELING = "transformers.models.mamba.modeling_mamba"


# ================================================================================================ span arithmetic
def _ceil(x: float) -> int:
    """``ceil`` that ignores float noise (``0.18 * 5500 = 990.0000000000001`` is 990, as the paper counts)."""
    return math.ceil(round(x, 9))


def check_ratios(p: float, rho: float, s: float = 0.0, prefix: str = "model.init_args.") -> None:
    """Raise ``ValueError`` naming the key when ``p`` or ``rho`` is outside (0, 1] or ``s`` outside [0, 1)."""
    for key, value in (("compress_ratio", p), ("keep_ratio", rho)):
        if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
            raise ValueError(f"{prefix}{key} must be in (0, 1]; got {value!r}")
    if not (isinstance(s, int | float) and 0.0 <= s < 1.0):
        raise ValueError(f"{prefix}start_ratio must be in [0, 1); got {s!r}")


def span_sizes(L: int, p: float, rho: float, s: float = 0.0) -> tuple[int, int, int]:
    """``(s0, L', k)`` of a prompt of ``L`` tokens: ``L' = max(ceil(p L), 1)``, ``s0 = floor(s L)``,
    ``k = ceil(rho L')``. The second pass has ``L - L' + k`` prompt positions.

    Raises:
        ValueError: ``p``/``rho`` outside (0, 1], ``s`` outside [0, 1), ``L < 2``, or a span that reaches the last
            prompt token (``s0 + L' > L - 1``: the query token must stay uncompressed).
    """
    check_ratios(p, rho, s)
    if L < 2:
        raise ValueError(f"ReMamba needs a prompt of at least 2 tokens; got {L}")
    L_prime = max(_ceil(p * L), 1)
    s0 = math.floor(s * L)
    k = max(_ceil(rho * L_prime), 1)
    if s0 + L_prime > L - 1:
        raise ValueError(
            f"compressed span [{s0}, {s0 + L_prime}) covers the last prompt token at {L - 1}; "
            "lower compress_ratio/start_ratio"
        )
    return s0, L_prime, k


def sample_train_ratios(
    L: int,
    rng: random.Random,
    mode: Literal["official", "fixed", "uniform"] = "official",
    p_range: Sequence[float] = (0.1, 0.3),
    rho_range: Sequence[float] = (0.05, 0.2),
    long_threshold: int = 1600,
    keep_uncompressed: int = 1500,
    short_p: float = 0.1,
    fixed: tuple[float, float] = (0.18, 0.009),
) -> tuple[float, float]:
    """Training-time ``(p, rho)`` for a prompt of ``L`` tokens, with ``ceil(p L)`` equal to the span length.

    ``official`` (Remambahf ``Finetune.py``): ``L > long_threshold``: ``p ~ U(p_range)``, ``L' = min(ceil(p L),
    L - keep_uncompressed)``; otherwise ``L' = max(1, ceil(short_p L))``; ``rho ~ U(rho_range)`` in both cases.
    ``uniform``: ``p ~ U(p_range)``, ``rho ~ U(rho_range)`` at every length. ``fixed``: ``fixed``. The span is
    additionally capped at ``L - 1`` tokens (the query token is never compressed).
    """
    if mode == "fixed":
        p, rho = fixed
    elif mode == "uniform":
        p, rho = rng.uniform(*p_range), rng.uniform(*rho_range)
    elif mode == "official":
        if L > long_threshold:
            span = min(_ceil(rng.uniform(*p_range) * L), L - keep_uncompressed)
        else:
            span = max(1, _ceil(short_p * L))
        rho = rng.uniform(*rho_range)
        p = max(span, 1) / L
    else:
        raise ValueError(f"model.init_args.train_sampling must be official, fixed or uniform; got {mode!r}")
    span = min(max(_ceil(p * L), 1), L - 1)
    return span / L, float(rho)


# ================================================================================================= the selector
def _mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))


@dataclass
class Selection:
    """What :meth:`ReMambaSelector.select` returns (batch size 1).

    Attributes:
        s0, span, k: the span ``[s0, s0 + span)`` and the number kept.
        indices: [k] long, absolute prompt positions kept, strictly increasing.
        weights: [k] float, ``ReLU(cos)`` in [0, 1] (differentiable w.r.t. Q and K).
        states: [k, d], ``V(H[indices])`` (differentiable w.r.t. V and the first pass).
        scores: [span] float, the cosine of every span position.
    """

    s0: int
    span: int
    k: int
    indices: Tensor
    weights: Tensor
    states: Tensor
    scores: Tensor = field(repr=False)


class ReMambaSelector(nn.Module):
    """Q, K, V scoring MLPs (each ``Linear(d, d) -> SiLU -> Linear(d, d)``), shared across layers.

    Args:
        d: model width (``config.hidden_size``).
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = _mlp(d), _mlp(d), _mlp(d)

    def select(self, H: Tensor, s0: int, span: int, k: int) -> Selection:
        """Top-``k`` positions of ``H`` [L, d] (final-layer normed states of the first pass) inside ``[s0, s0+span)``
        scored against the last position; returned in original order.

        Raises:
            ValueError: ``H`` is not 2-D, or the span / ``k`` do not fit ``L``.
        """
        if H.dim() != 2:
            raise ValueError(f"select expects H of shape [L, d] (batch size 1); got {tuple(H.shape)}")
        L = H.size(0)
        if not (0 <= s0 and s0 + span <= L - 1 and 1 <= k <= span):
            raise ValueError(f"bad span: s0={s0}, span={span}, k={k} for L={L}")
        query = self.q_proj(H[L - 1])
        keys = self.k_proj(H[s0:s0 + span])
        scores = F.cosine_similarity(keys, query.unsqueeze(0), dim=-1, eps=1e-8)
        order = torch.topk(scores, k).indices.sort().values
        weights = F.relu(scores[order])
        indices = order + s0
        states = self.v_proj(H[indices])
        return Selection(s0=s0, span=span, k=k, indices=indices, weights=weights, states=states, scores=scores)


@torch.no_grad()
def init_from_layer0(selector: ReMambaSelector, mixer0: nn.Module) -> None:
    """Official initialisation (``Finetune.py``): from layer 0's ``in_proj.weight`` [2 d_in, d], K's two linears take
    rows [0, d) and [d, 2d), Q's take rows [2d, 3d) and [3d, 4d); from ``out_proj.weight`` [d, d_in], V's take columns
    [0, d) and [d, 2d). Biases become zero.

    Raises:
        ValueError: the mixer's inner width is not ``2 d`` (``expand != 2``).
    """
    w_in = _base_weight(mixer0.in_proj)
    w_out = _base_weight(mixer0.out_proj)
    d = selector.q_proj[0].in_features
    if tuple(w_in.shape) != (4 * d, d) or tuple(w_out.shape) != (d, 2 * d):
        raise ValueError(
            f"init_qkv_from_layer0 needs expand=2 (in_proj [4d, d], out_proj [d, 2d] with d={d}); got "
            f"in_proj {tuple(w_in.shape)}, out_proj {tuple(w_out.shape)}: set model.init_args.init_qkv_from_layer0 false"
        )
    pieces = {
        selector.k_proj[0]: w_in[0:d], selector.k_proj[2]: w_in[d:2 * d],
        selector.q_proj[0]: w_in[2 * d:3 * d], selector.q_proj[2]: w_in[3 * d:4 * d],
        selector.v_proj[0]: w_out[:, 0:d], selector.v_proj[2]: w_out[:, d:2 * d],
    }
    for linear, weight in pieces.items():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.zero_()


def _base_weight(module: nn.Module) -> Tensor:
    """Weight of a linear layer, under a peft LoRA wrapper (``base_layer``) if there is one."""
    base = getattr(module, "base_layer", module)
    return base.weight


# ============================================================================================ stage-2 alignment
def stage2_embeddings(embeds: Tensor, sel: Selection) -> Tensor:
    """``[E_<s0 ; Z ; E_>=s0+L']``: embeds [1, T, d] with the span replaced by the ``k`` compressed states
    -> [1, T - L' + k, d]."""
    z = sel.states.to(embeds.dtype).unsqueeze(0)
    return torch.cat([embeds[:, :sel.s0], z, embeds[:, sel.s0 + sel.span:]], dim=1)


def stage2_labels(labels: Tensor, sel: Selection) -> Tensor:
    """Labels [1, T] aligned with the second pass [1, T - L' + k]: the span's labels are dropped and the ``k``
    compressed positions get -100.

    Raises:
        AssertionError: a dropped label is not -100 (the span overlaps supervised tokens), naming the positions.
    """
    dropped = labels[0, sel.s0:sel.s0 + sel.span]
    bad = (dropped != -100).nonzero().flatten()
    if bad.numel():
        raise AssertionError(f"labels at compressed positions {(bad + sel.s0).tolist()[:10]} are not -100")
    fill = labels.new_full((labels.size(0), sel.k), -100)
    return torch.cat([labels[:, :sel.s0], fill, labels[:, sel.s0 + sel.span:]], dim=1)


# ================================================================================================== the Δ hook
def mamba_mixers(model: nn.Module) -> list[nn.Module]:
    """The ``MambaMixer`` modules of ``model`` (a peft wrapper is fine), in layer order.

    Raises:
        TypeError: the model has no Mamba-1 mixer (Mamba-2 and other architectures are not supported), naming its
            class.
    """
    from transformers.models.mamba.modeling_mamba import MambaMixer

    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    if not mixers:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Mixer" in type(m).__name__})
        extra = f" (it has {', '.join(kinds)}; only Mamba-1 MambaMixer is supported)" if kinds else ""
        raise TypeError(f"ReMamba needs a Mamba-1 model (MambaForCausalLM); got {type(model).__name__}{extra}")
    return sorted(mixers, key=lambda m: m.layer_idx)


@dataclass
class DeltaHookState:
    """Counters of one :func:`delta_adaptation` block: ``fired[layer_idx]`` scan calls seen per layer."""

    n_layers: int
    fired: dict[int, int] = field(default_factory=dict)
    current: int | None = None


def _scan_impl(kernel: Kernel, transformers_scan: Any) -> Any:
    """The scan function a hooked call ends in: ``torch`` the reference scan, ``cuda`` mamba-ssm's
    ``selective_scan_fn``, ``auto`` whatever transformers resolved (mamba-ssm when installed, else torch)."""
    if kernel == "torch":
        return inspect.unwrap(transformers_scan)
    if kernel == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("kernel='cuda' needs CUDA, which is not available")
        try:
            interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        except Exception as err:  # ImportError, or a broken CUDA extension
            raise RuntimeError(f"kernel='cuda' needs mamba-ssm (pip install mamba-ssm), which failed to import: "
                               f"{err}") from err
        fn = interface.selective_scan_fn
        allowed = set(inspect.signature(fn).parameters)

        def cuda_scan(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **{k: v for k, v in kwargs.items() if k in allowed})

        return cuda_scan
    if kernel == "auto":
        return transformers_scan
    raise ValueError(f"kernel must be auto, torch or cuda; got {kernel!r}")


@contextlib.contextmanager
def delta_adaptation(
    model: nn.Module,
    start: int,
    weights: Tensor,
    ret_bias: Sequence[Tensor],
    kernel: Kernel = "auto",
) -> Iterator[DeltaHookState]:
    """Within the block, every Mamba layer's pre-softplus delta at positions ``[start, start + k)`` of a full-sequence
    forward becomes ``weights * delta + ret_bias[layer]`` (``weights`` [k] or [B, k]; ``ret_bias[l]`` [d_in]).

    Exactly one full-sequence forward of ``model`` must run inside the block; the yielded state counts scan calls
    per layer. Gradients flow to ``weights`` and ``ret_bias``.

    Raises:
        TypeError: not a Mamba-1 model (see :func:`mamba_mixers`).
        ValueError: ``len(ret_bias)`` differs from the number of layers, or ``start < 0``.
        RuntimeError: on leaving the block, a layer whose scan did not run once ("Δ hook did not run in layers
            [...]; the mixer took a path that bypasses dt_proj"); ``kernel='cuda'`` without CUDA or mamba-ssm.
    """
    modeling = importlib.import_module(_MODELING)
    if not hasattr(modeling, "mamba_selective_scan"):
        raise RuntimeError(f"{_MODELING} has no mamba_selective_scan: this transformers version is not supported "
                           "by the ReMamba delta hook (needs transformers 5.x)")
    mixers = mamba_mixers(model)
    if len(ret_bias) != len(mixers):
        raise ValueError(f"ret_bias has {len(ret_bias)} entries for {len(mixers)} Mamba layers")
    if start < 0:
        raise ValueError(f"start must be >= 0; got {start}")
    state = DeltaHookState(n_layers=len(mixers), fired={m.layer_idx: 0 for m in mixers})
    bias_of = {m.layer_idx: b for m, b in zip(mixers, ret_bias, strict=True)}
    original_scan = modeling.mamba_selective_scan
    original_inner = getattr(modeling, "mamba_inner_fn", None)
    scan = _scan_impl(kernel, original_scan)
    k = weights.shape[-1]

    def hooked_scan(hidden_states: Tensor, dt: Tensor, *args: Any, **kwargs: Any) -> Any:
        layer = state.current
        if layer is None or layer not in bias_of:
            raise RuntimeError("Δ hook: a selective scan ran outside a known Mamba mixer")
        T = dt.shape[-1]
        if start + k > T:
            raise ValueError(f"Δ hook: positions [{start}, {start + k}) exceed the sequence length {T}")
        w = weights.to(dt.dtype)
        w = w.view(1, 1, k) if w.dim() == 1 else w.unsqueeze(1)  # [B|1, 1, k]
        b = bias_of[layer].to(dt.dtype).view(1, -1, 1)  # [1, d_in, 1]
        middle = dt[:, :, start:start + k] * w + b
        dt = torch.cat([dt[:, :, :start], middle, dt[:, :, start + k:]], dim=-1)
        state.fired[layer] += 1
        return scan(hidden_states, dt, *args, **kwargs)

    def pre_hook(module: nn.Module, args: Any) -> None:
        state.current = module.layer_idx

    handles = [m.register_forward_pre_hook(pre_hook) for m in mixers]
    modeling.mamba_selective_scan = hooked_scan
    if original_inner is not None:
        modeling.mamba_inner_fn = _no_fused
    failed = False
    try:
        yield state
    except BaseException:
        failed = True
        raise
    finally:
        modeling.mamba_selective_scan = original_scan
        if original_inner is not None:
            modeling.mamba_inner_fn = original_inner
        for h in handles:
            h.remove()
        if not failed:
            missing = sorted(layer for layer, n in state.fired.items() if n != 1)
            if missing:
                raise RuntimeError(
                    f"Δ hook did not run in layers {missing} (scan calls per layer: {state.fired}); the mixer took a "
                    "path that bypasses dt_proj"
                )


def _no_fused(*args: Any, **kwargs: Any) -> None:
    """Stand-in for the fused ``mamba_inner_fn`` inside :func:`delta_adaptation`: ``None`` makes the mixer take the
    unfused path, whose scan the hook sees."""
    return
