"""Building blocks of latent preference alignment (CLaP + Latent DPO; spec ``shared/methods/latent_preference.md``).

Source: Zhang et al., *Disentangling Preference Representation and Text Generation for Efficient Individual Preference
Alignment*, COLING 2025 (arXiv 2412.20834); official code https://github.com/zhangjf-nlp/LatentDPO
(``modeling_gpt2_cvae.py``) and its LLaMA port (``LLM-based-CVAE``, ``modeling_llama_cvae.py``).

Pure PyTorch / transformers parts, reusable by other methods:

- closed-form diagonal Gaussians: :func:`gaussian_log_density`, :func:`gaussian_kl`, :func:`dg_kld` (the KL of the
  batch-aggregated posterior to N(0, I));
- DPO: :func:`dpo_sigmoid_loss` (TRL's ``loss_type="sigmoid"`` formula), :func:`latent_reward`, :func:`select_pairs`,
  :func:`latent_dpo_loss`;
- modules: :class:`LatentEncoder` (posterior q(z|x,y) and prompt-only prior pi(z|x) share it), :class:`LatentPrefixAdapter`
  (z -> a key/value prefix in every layer of a frozen causal LM, as a transformers ``DynamicCache``), :class:`GSkip`
  (a gradient-only skip from z to the LM's last hidden state), :class:`CallCounter` (forward-hook counter).

Notation: ``D`` = dim_z, ``s`` = log-variance, ``B`` batch, ``n`` candidate latents per example, ``d`` LM hidden size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CallCounter",
    "GSkip",
    "LatentEncoder",
    "LatentPrefixAdapter",
    "dg_kld",
    "dpo_sigmoid_loss",
    "gaussian_kl",
    "gaussian_log_density",
    "latent_dpo_loss",
    "latent_reward",
    "select_pairs",
]

LOGVAR_CLAMP = 20.0
_LOG_2PI = math.log(2 * math.pi)


# ============================================================================================ closed-form Gaussians
def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor, eps: float = 0.0, reduce: bool = True) -> Tensor:
    """log N(z; mu, diag e^logvar), summed over the last dimension (per dimension when ``reduce`` is False).

    ``sum_i [-1/2 log 2pi - 1/2 s_i - (z_i - mu_i)^2 / (2 (e^{s_i} + eps))]`` with ``s`` clamped to [-20, 20] (the
    official code adds ``eps = 1e-4`` to the variance; the default 0 is exact).

    Args:
        z, mu, logvar: broadcastable tensors [..., D].
        eps: added to the variance in the quadratic term only (code parity option).
        reduce: sum over D (True) or keep it.

    Returns:
        [...] (or [..., D] without ``reduce``).
    """
    s = logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    var = s.exp() + eps if eps else s.exp()
    out = -0.5 * _LOG_2PI - 0.5 * s - (z - mu).pow(2) / (2 * var)
    return out.sum(-1) if reduce else out


def gaussian_kl(mu: Tensor, logvar: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None) -> Tensor:
    """KL( N(mu, e^logvar) || N(mu_p, e^logvar_p) ) summed over the last dimension; the default p is N(0, I).

    ``1/2 sum_i [s_p - s + (e^s + (mu - mu_p)^2) / e^{s_p} - 1]``. Shapes: [..., D] -> [...].
    """
    s = logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    if mu_p is None:
        mu_p = torch.zeros_like(mu)
    sp = torch.zeros_like(s) if logvar_p is None else logvar_p.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    return 0.5 * (sp - s + (s.exp() + (mu - mu_p).pow(2)) / sp.exp() - 1.0).sum(-1)


def dg_kld(
    mu: Tensor,
    logvar: Tensor,
    samples: int = 16,
    mode: Literal["dg_marginal", "dg_joint", "standard"] = "dg_marginal",
    generator: torch.Generator | None = None,
) -> Tensor:
    """KL of the batch-aggregated posterior q(z) = 1/K sum_k q_k(z) to N(0, I), Monte-Carlo over ``samples`` draws.

    - ``dg_marginal`` (the code's ``marginal_kl=1``, default): per dimension i, log q_i(z) = logsumexp_k' log
      N(z_i; mu_k'i, s_k'i) - log K; the loss is sum_i mean_{k,j} [log q_i(z_kji) - log N(z_kji; 0, 1)].
    - ``dg_joint`` (``marginal_kl=0``): the same with the densities summed over dimensions before the logsumexp.
    - ``standard``: the per-sample closed-form KL(q_k || N(0, I)), averaged over k (collapses with a frozen LM).

    Args:
        mu, logvar: posterior parameters [K, D].
        samples: draws per posterior (reparameterised, so gradients reach mu and logvar).

    Returns:
        A scalar.
    """
    if mode == "standard":
        return gaussian_kl(mu, logvar).mean()
    if mode not in ("dg_marginal", "dg_joint"):
        raise ValueError(f"kl_mode must be one of ['dg_marginal', 'dg_joint', 'standard'], got {mode!r}")
    k = mu.size(0)
    s = logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)
    noise = torch.randn((k, samples, mu.size(1)), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu[:, None] + (0.5 * s[:, None]).exp() * noise  # [K, S, D]
    # density of every sample under every posterior k': [K, S, K', D]
    per_dim = gaussian_log_density(z[:, :, None, :], mu[None, None], s[None, None], reduce=False)
    prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z), reduce=False)  # [K, S, D]
    if mode == "dg_marginal":
        log_q = torch.logsumexp(per_dim, dim=2) - math.log(k)  # [K, S, D]
        return (log_q - prior).mean(dim=(0, 1)).sum()
    log_q = torch.logsumexp(per_dim.sum(-1), dim=2) - math.log(k)  # [K, S]
    return (log_q - prior.sum(-1)).mean()


# ============================================================================================ DPO
def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's DPO ``sigmoid`` loss (``DPOTrainer.dpo_loss``), per example.

    ``logits = (pi_c - ref_c) - (pi_r - ref_r)``; ``loss = -logsigmoid(beta logits) (1 - ls) - logsigmoid(-beta
    logits) ls``; ``rewards = beta (pi - ref)`` (detached).

    Args:
        *_logps: summed response log-probabilities [B].
        beta: the KL strength beta (> 0).
        label_smoothing: conservative DPO's epsilon (0: plain DPO).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    logits = chosen - rejected
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * chosen.detach(), beta * rejected.detach()


def latent_reward(z: Tensor, mu_w: Tensor, s_w: Tensor, mu_l: Tensor, s_l: Tensor, eps: float = 0.0) -> Tensor:
    """r(z) = sigmoid(log q_w(z) - log q_l(z)) in [0, 1]: how much more z looks like the chosen response's latent.

    Args:
        z: candidates [B, n, D]; mu_*, s_*: posteriors of chosen (w) and rejected (l) responses [B, D].

    Returns:
        [B, n].
    """
    lw = gaussian_log_density(z, mu_w[:, None], s_w[:, None], eps)
    ll = gaussian_log_density(z, mu_l[:, None], s_l[:, None], eps)
    return torch.sigmoid(lw - ll)


def select_pairs(
    reward: Tensor, evidence_ratio: float = 0.5, mode: Literal["quantile", "topk_pairs"] = "quantile",
    score: Tensor | None = None,
) -> Tensor:
    """Ordered candidate pairs (a preferred over b) that enter the Latent DPO loss.

    - ``quantile`` (GPT-2 code): G_ab = r_a - r_b over the full n x n matrix (diagonal and negative entries included),
      tau = its per-example ``1 - evidence_ratio / 2`` quantile (``torch.quantile``, linear interpolation), M_ab =
      [G_ab >= tau] [a != b].
    - ``topk_pairs`` (LLaMA port): sort by ``score`` (default ``reward``; the port uses log q_w - log q_l) and pair the
      top n/4 with the bottom n/4 element-wise.

    Args:
        reward: r [B, n].

    Returns:
        A float mask M [B, n, n] (1: the pair (a, b) is kept).
    """
    b, n = reward.shape
    if mode == "quantile":
        gap = reward[:, :, None] - reward[:, None, :]
        tau = torch.quantile(gap.reshape(b, -1), 1.0 - evidence_ratio / 2, dim=1)  # [B]
        eye = torch.eye(n, dtype=torch.bool, device=reward.device)
        return ((gap >= tau[:, None, None]) & ~eye).to(reward.dtype)
    if mode == "topk_pairs":
        key = reward if score is None else score
        order = key.argsort(dim=1, descending=True)
        q = max(n // 4, 1)
        mask = torch.zeros(b, n, n, dtype=reward.dtype, device=reward.device)
        rows = torch.arange(b, device=reward.device)[:, None].expand(b, q)
        mask[rows, order[:, :q], order.flip(1)[:, :q]] = 1.0
        return mask
    raise ValueError(f"pair_selection must be one of ['quantile', 'topk_pairs'], got {mode!r}")


def latent_dpo_loss(h: Tensor, mask: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor]:
    """L = sum_{x,a,b} M_ab [-log sigmoid(beta (h_a - h_b))] / sum M (a global count over the batch).

    Args:
        h: implicit latent reward h(z) = log pi(z|x) - log pi_ref(z|x) [B, n].
        mask: kept pairs [B, n, n] (:func:`select_pairs`).

    Returns:
        ``(loss, margins [B, n, n] = beta (h_a - h_b))``. At pi = pi_ref the loss is exactly log 2.
    """
    margins = beta * (h[:, :, None] - h[:, None, :])
    loss = (-F.logsigmoid(margins) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, margins


# ============================================================================================ modules
def _decoder(lm: nn.Module) -> nn.Module:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.get_decoder()


class LatentEncoder(nn.Module):
    """Diagonal Gaussian over z from token ids: q(z|x,y) (posterior, reads prompt + response) or pi(z|x) (prior).

    Architecture (spec 3.1): the LM's token embeddings (a frozen shared reference by default, or a trainable copy),
    ``num_queries`` learned query vectors appended after the text (initialised as the means of the first 10,000
    embedding rows split into ``num_queries`` groups), a ``transformers`` decoder of ``num_layers`` blocks copied from
    the LM's first layers plus its final norm (causal, padding masked, the text rolled to left padding so that the
    queries directly follow it, positions from 0), and ``h2z`` = Linear(d, d) -> SiLU -> Linear(d, 2 D / n_q) on each
    query state whose last layer is zero-initialised (a fresh encoder outputs exactly N(0, I)). Each query gives
    ``D / n_q`` means then ``D / n_q`` log-variances, concatenated over queries (the official layout).

    Args:
        lm: the causal LM (llama/mistral/qwen2-style: ``model.layers``, ``model.norm``, ``model.embed_tokens``).
        dim_z: D. num_queries: n_q (divides D). num_layers: copied decoder blocks.
        freeze_embeddings: share the LM's (frozen) embedding module instead of a trainable copy.

    Raises:
        ValueError: ``dim_z % num_queries != 0`` or more layers than the LM has.
    """

    def __init__(self, lm: nn.Module, dim_z: int = 32, num_queries: int = 4, num_layers: int = 2,
                 freeze_embeddings: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel

        if dim_z % num_queries != 0:
            raise ValueError(f"dim_z ({dim_z}) must be divisible by num_queries ({num_queries})")
        decoder = _decoder(lm)
        n_layers = len(decoder.layers)
        if num_layers > n_layers:
            raise ValueError(f"encoder_layers={num_layers} exceeds the LM's {n_layers} layers")
        config = copy.deepcopy(decoder.config)
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[:num_layers]
        config.use_cache = False
        backbone = AutoModel.from_config(config)
        emb = decoder.get_input_embeddings()
        backbone.set_input_embeddings(emb if freeze_embeddings else copy.deepcopy(emb))
        for i in range(num_layers):
            backbone.layers[i].load_state_dict(decoder.layers[i].state_dict())
        backbone.norm.load_state_dict(decoder.norm.state_dict())
        backbone.to(dtype=next(decoder.parameters()).dtype)
        self.backbone = backbone
        self.freeze_embeddings = freeze_embeddings
        d = config.hidden_size
        with torch.no_grad():
            rows = emb.weight[: min(10_000, emb.weight.size(0))].float()
            init = torch.stack([c.mean(0) for c in torch.tensor_split(rows, num_queries)])
        self.queries = nn.Parameter(init.to(emb.weight.dtype))
        per_query = 2 * dim_z // num_queries
        self.h2z = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, per_query))
        self.zero_head()
        self.dim_z, self.num_queries = dim_z, num_queries

    def zero_head(self) -> None:
        """Zero the last h2z layer: the encoder then outputs mu = 0, s = 0 (N(0, I)) for every input."""
        nn.init.zeros_(self.h2z[-1].weight)
        nn.init.zeros_(self.h2z[-1].bias)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        emb = self.backbone.get_input_embeddings().weight
        return (p for p in self.parameters() if not (self.freeze_embeddings and p is emb))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(mu [B, D], logvar [B, D]) of ids [B, T] with mask [B, T] (any padding side)."""
        b, t = input_ids.shape
        mask = attention_mask.long()
        # roll every row so that its padding comes first (left padding): queries directly follow the text
        lengths = mask.sum(1)
        first = mask.argmax(1)  # start of the text (0 for right padding)
        src = (torch.arange(t, device=input_ids.device)[None] + (lengths + first)[:, None]) % t
        ids = input_ids.gather(1, src)
        mask = mask.gather(1, src)
        emb = self.backbone.get_input_embeddings()(ids)
        q = self.queries[None].expand(b, -1, -1).to(emb.dtype)
        x = torch.cat([emb, q], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(b, self.num_queries)], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        h = self.backbone(inputs_embeds=x, attention_mask=full_mask, position_ids=positions, use_cache=False)
        states = h.last_hidden_state[:, -self.num_queries:].to(self.h2z[0].weight.dtype)
        out = self.h2z(states)  # [B, n_q, 2 D / n_q]
        half = out.size(-1) // 2
        mu = out[..., :half].reshape(b, self.dim_z)
        logvar = out[..., half:].reshape(b, self.dim_z)
        return mu.float(), logvar.float()


class LatentPrefixAdapter(nn.Module):
    """z -> a key/value prefix of ``prefix_len`` positions in every layer of a frozen causal LM (spec 3.2).

    Per layer l: P_l = RMSNorm_l(MLP_l(z)).reshape(n_p, d) with MLP_l = Linear(D, a) -> GELU -> Linear(a, n_p d);
    K_l, V_l = the LM's own (frozen) ``k_proj``/``v_proj`` of layer l applied to P_l, RoPE at positions 0..n_p-1.
    Only the MLPs and norms are parameters of this module; the LM is passed to :meth:`forward` and never stored.

    Args:
        config: the LM's config (hidden_size, num_hidden_layers, rms_norm_eps).
        dim_z: D. prefix_len: n_p. hidden: a (None: floor(sqrt(d))).
    """

    def __init__(self, config: Any, dim_z: int = 32, prefix_len: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        d = config.hidden_size
        a = hidden if hidden is not None else math.isqrt(d)
        self.prefix_len, self.d = prefix_len, d
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim_z, a), nn.GELU(), nn.Linear(a, prefix_len * d))
            for _ in range(config.num_hidden_layers)
        )
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in range(config.num_hidden_layers))

    def forward(self, z: Tensor, lm: nn.Module) -> Any:
        """A ``transformers.DynamicCache`` holding ``prefix_len`` positions per layer for latents z [B, D].

        The cache is differentiable w.r.t. z and the adapter (it is a fresh object: the LM appends to it in place).
        """
        from transformers import DynamicCache

        decoder = _decoder(lm)
        b = z.size(0)
        dtype = next(decoder.parameters()).dtype
        positions = torch.arange(self.prefix_len, device=z.device)[None].expand(b, -1)
        cache = DynamicCache(config=decoder.config)
        cos = sin = None
        for i, layer in enumerate(decoder.layers):
            p = self.norms[i](self.mlps[i](z.to(self.mlps[i][0].weight.dtype)).view(b, self.prefix_len, self.d))
            p = p.to(dtype)
            if cos is None:
                cos, sin = decoder.rotary_emb(p, positions)
            attn = layer.self_attn
            shape = (b, self.prefix_len, -1, attn.head_dim)
            k = attn.k_proj(p).view(shape).transpose(1, 2)
            v = attn.v_proj(p).view(shape).transpose(1, 2)
            k = _rope(k, cos, sin)
            cache.update(k, v, i)
        return cache


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [B, H, n, hd] (transformers' ``rotate_half`` convention)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., : x.size(-1) // 2], x[..., x.size(-1) // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class GSkip(nn.Module):
    """Gradient-only skip (spec 3.2): g = mean_k RMSNorm(Linear(d, d)(SiLU(Linear(D, d)(z_k)))) over samples z_k ~ q;
    returns ``g - g.detach()``, zero in value, so adding it to the LM's last hidden state changes no logit but gives
    dL/dz a short path.

    Args:
        dim_z: D. hidden_size: d. eps: RMSNorm epsilon.
    """

    def __init__(self, dim_z: int, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_z, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def forward(self, z_samples: Tensor) -> Tensor:
        """z_samples [B, S, D] -> [B, d] (value exactly 0)."""
        g = self.norm(self.net(z_samples)).mean(1)
        return g - g.detach()


class CallCounter:
    """Counts forward calls of modules through forward hooks (``with CallCounter(layers) as c: ...; c.count``).

    Args:
        modules: the modules to watch (e.g. an LM's decoder layers).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.count = 0
        self._handles: list[Any] = []

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def attach(self) -> CallCounter:
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> CallCounter:  # noqa: PYI034
        return self.attach()

    def __exit__(self, *_: object) -> None:
        self.detach()
