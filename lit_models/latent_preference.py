"""Latent preference alignment: CLaP once, then seconds of LLM-free Latent DPO per new user (spec
``shared/methods/latent_preference.md``).

Source: Zhang et al., *Disentangling Preference Representation and Text Generation for Efficient Individual Preference
Alignment*, COLING 2025 (arXiv 2412.20834; code https://github.com/zhangjf-nlp/LatentDPO, LLaMA port
``LLM-based-CVAE``). One module, three stages (``stage``):

- ``clap`` (one-time): a posterior encoder q(z|x,y) and a latent-to-prefix adapter learn, over a FROZEN causal LM, a
  32-dimensional latent space of (prompt, response) pairs: reconstruction NLL of each response given its prefix, the
  KL of the batch-aggregated posterior to N(0, I) (DG-KLD), and an in-batch contrastive loss (response k against the
  prefixes of the other K - 1 latents of the same prompt), with a gradient-only skip (G-Skip). Batches come from
  :class:`datamodules.preference.PreferenceDataModule` in ``one2many`` mode (one prompt, K responses).
  Logs ``train/loss``, ``clap/rec_nll``, ``clap/kl``, ``clap/contrastive``, ``clap/contrastive_acc``,
  ``clap/active_units`` (``train/`` and ``val/`` prefixed).
- ``latent_dpo`` (per user): loads the CLaP checkpoint (``clap_ckpt``), copies the posterior into a prompt-only prior
  pi_theta(z|x) whose head is re-zeroed (so pi_theta = pi_ref = N(0, I) at step 0), and trains only that prior with
  a DPO loss on closed-form Gaussian densities of 3 x 16 candidate latents per pair, scored by r(z) =
  sigmoid(log q_w(z) - log q_l(z)). **The LLM is never called in ``training_step``** (a forward-hook counter on its
  decoder blocks raises if it is) and its weights, the adapter and the posterior stay bit-identical.
- ``lora_dpo`` (the baseline): TRL-style sigmoid DPO through a peft LoRA adapter (r 8, alpha 8, q_proj/v_proj), the
  reference being the adapter disabled.

Metrics named as TRL names them: ``{train,val,test}/rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``. For Latent DPO "chosen"/"rejected" are the winning and
losing latents of each kept pair (rewards = beta h_theta(z), logps = log pi_theta(z|x)); extras ``ldpo/kept_pairs``,
``ldpo/policy_kl`` and in validation ``ldpo/expected_latent_reward``. Both DPO stages also log, in validation and test,
the sequence-level implicit-reward metrics ``val/seq/rewards/*`` on held-out pairs with the LLM (Latent DPO: the LM
with the prefix of the user's prior mean latent against the prefix of z = 0; LoRA-DPO: the same as its
``val/rewards/*``), so the two methods compare on one number. Wall time per user: ``time/seconds_per_user`` (Lightning's
``on_train_start`` to ``on_train_end``, minus validation runs and checkpoint writing, both also logged as
``time/seconds_validation`` and ``time/seconds_checkpointing``), ``time/seconds_per_step`` (median),
``time/llm_block_calls_per_step``; also kept in
:attr:`LatentPreferenceAlignment.user_time` and written to ``<log dir>/user_time.json``.

``predict`` generates for each prompt with the user's prior mean latent as prefix (``latent_sampling`` samples it),
greedy or top-k (``gen_top_k``), and writes ``predictions.jsonl``; ``lora_dpo`` generates with its adapter.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_models.causal_lm import CausalLMFineTune
from lit_models.nn.latent_preference import (
    CallCounter,
    GSkip,
    LatentEncoder,
    LatentPrefixAdapter,
    dg_kld,
    dpo_sigmoid_loss,
    gaussian_kl,
    gaussian_log_density,
    latent_dpo_loss,
    latent_reward,
    select_pairs,
)

__all__ = ["LatentPreferenceAlignment"]

_STAGES = ("clap", "latent_dpo", "lora_dpo")
#: Hyper-parameters that must agree between a CLaP checkpoint and a latent_dpo run.
_SHAPE_KEYS = ("dim_z", "num_queries", "prefix_len", "encoder_layers", "adapter_hidden", "use_gskip",
               "freeze_encoder_embeddings", "model", "model_config_overrides")


class LatentPreferenceAlignment(CausalLMFineTune):
    """CLaP / Latent DPO / LoRA-DPO on a causal LM (see the module docstring).

    Args:
        model: ``smollm2-135m``, a tiny random config (``llama-tiny``) or a local directory (:mod:`lit_models.hf`).
        tokenizer: linked from the DataModule by the CLI.
        stage: ``clap``, ``latent_dpo`` or ``lora_dpo``.
        dim_z, num_queries, prefix_len, encoder_layers: latent size D, encoder queries, prefix positions, encoder
            blocks (copied from the LM's first layers).
        adapter_hidden: adapter MLP width a (None: floor(sqrt(d))).
        freeze_encoder_embeddings: the encoders use the LM's frozen embeddings (else a trainable copy).
        posterior_reads_prompt: the posterior reads prompt + response (else the response only).
        use_gskip, gskip_samples: G-Skip and its number of latent samples.
        kl_mode, kl_samples: ``dg_marginal`` (default), ``dg_joint`` or ``standard`` KL, Monte-Carlo samples.
        density_eps: variance epsilon of the log-densities (the code's 1e-4; 0 is exact).
        use_contrastive: add the in-batch contrastive loss (needs one prompt with >= 2 responses per batch).
        contrastive_rolls: number of negative rolls r = 1..R (None: all K - 1).
        unfreeze_lm: CLaP only: train the LM too (the code's phase B).
        clap_ckpt: ``latent_dpo``: the CLaP checkpoint (``.ckpt`` of a ``stage: clap`` run).
        beta: DPO's beta. samples_per_source: latents drawn from each of N(0, I), q_w, q_l. evidence_ratio: rho (keeps
            about rho / 2 of the ordered pairs).
        pair_selection: ``quantile`` (GPT-2 code) or ``topk_pairs`` (LLaMA port).
        ldpo_objective: ``pairwise`` (default) or ``expectation``.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: ``lora_dpo``'s peft LoRA.
        lr, weight_decay, betas, warmup_ratio, lr_schedule: AdamW and its schedule (:class:`CausalLMFineTune`).
        max_new_tokens: generation length in ``predict``. gen_top_k: top-k sampling (None: greedy).
        latent_sampling: sample the user's latent instead of using its mean.
        gen_seed: seed of sampled generation.
        **kwargs: further :class:`~lit_models.causal_lm.CausalLMFineTune` arguments (``dtype``,
            ``model_config_overrides``, ...).

    Raises:
        ValueError: unknown stage / kl_mode / pair_selection / ldpo_objective (lists the allowed values),
            ``dim_z % num_queries != 0``, ``beta <= 0``, ``evidence_ratio`` outside (0, 1], ``samples_per_source <
            2``, a CLaP checkpoint whose shapes differ (lists both values); in ``clap``, a batch whose prompts differ
            or with K < 2 while ``use_contrastive``.
        FileNotFoundError: ``latent_dpo`` without ``clap_ckpt`` or with a missing file.
        ImportError: ``lora_dpo`` without peft.
        RuntimeError: the LLM was called inside a Latent DPO training step.
    """

    EVAL_TIME_HPARAMS = (*CausalLMFineTune.EVAL_TIME_HPARAMS, "gen_top_k", "latent_sampling", "gen_seed")

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Any = None,
        stage: Literal["clap", "latent_dpo", "lora_dpo"] = "clap",
        dim_z: int = 32,
        num_queries: int = 4,
        prefix_len: int = 4,
        encoder_layers: int = 2,
        adapter_hidden: int | None = None,
        freeze_encoder_embeddings: bool = True,
        posterior_reads_prompt: bool = True,
        use_gskip: bool = True,
        gskip_samples: int = 32,
        kl_mode: Literal["dg_marginal", "dg_joint", "standard"] = "dg_marginal",
        kl_samples: int = 16,
        density_eps: float = 0.0,
        use_contrastive: bool = True,
        contrastive_rolls: int | None = None,
        unfreeze_lm: bool = False,
        clap_ckpt: str | None = None,
        beta: float = 0.1,
        samples_per_source: int = 16,
        evidence_ratio: float = 0.5,
        pair_selection: Literal["quantile", "topk_pairs"] = "quantile",
        ldpo_objective: Literal["pairwise", "expectation"] = "pairwise",
        lora_r: int = 8,
        lora_alpha: int = 8,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | str = ["q_proj", "v_proj"],  # noqa: B006
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "linear",
        max_new_tokens: int = 48,
        gen_top_k: int | None = None,
        latent_sampling: bool = False,
        gen_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        for name, value, allowed in (
            ("stage", stage, _STAGES), ("kl_mode", kl_mode, ("dg_marginal", "dg_joint", "standard")),
            ("pair_selection", pair_selection, ("quantile", "topk_pairs")),
            ("ldpo_objective", ldpo_objective, ("pairwise", "expectation")),
        ):
            if value not in allowed:
                raise ValueError(f"model.init_args.{name} must be one of {list(allowed)}, got {value!r}")
        if dim_z % num_queries != 0:
            raise ValueError(f"model.init_args.dim_z ({dim_z}) must be divisible by num_queries ({num_queries})")
        if beta <= 0:
            raise ValueError(f"model.init_args.beta must be > 0, got {beta}")
        if not 0 < evidence_ratio <= 1:
            raise ValueError(f"model.init_args.evidence_ratio must be in (0, 1], got {evidence_ratio}")
        if samples_per_source < 2:
            raise ValueError(f"model.init_args.samples_per_source must be >= 2, got {samples_per_source}")
        if stage == "latent_dpo":
            if clap_ckpt is None:
                raise FileNotFoundError("model.init_args.clap_ckpt is required for stage latent_dpo: train the CLaP "
                                        "stage first (python train.py fit --config configs/latent_preference/"
                                        "clap_demo.yaml) and point clap_ckpt to its checkpoint")
            if not Path(clap_ckpt).is_file():
                raise FileNotFoundError(f"model.init_args.clap_ckpt: {clap_ckpt} does not exist; train the CLaP stage "
                                        "first (python train.py fit --config configs/latent_preference/clap_demo.yaml)")
        if stage == "lora_dpo":
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ImportError("stage lora_dpo needs peft: pip install peft")
        kwargs.pop("mode", None)  # derived from the stage (kept in saved hyper-parameters)
        super().__init__(
            model=model, tokenizer=tokenizer, mode="lora" if stage == "lora_dpo" else "full", lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=lora_target_modules, lr=lr,
            weight_decay=weight_decay, betas=betas, warmup_ratio=warmup_ratio, lr_schedule=lr_schedule,
            max_new_tokens=max_new_tokens, **kwargs,
        )
        self.hparams["mode"] = self._weights_mode()
        self.stage = stage
        self.user_time: dict[str, float] = {}
        self._step_times: list[float] = []
        self._llm_calls: list[int] = []
        self._t_train = self._t_step = self._t_val = 0.0
        self._val_s = self._ckpt_s = 0.0
        self._counter: CallCounter | None = None
        if stage == "lora_dpo":
            return
        lm = self.model
        for p in lm.parameters():
            p.requires_grad_(stage == "clap" and unfreeze_lm)
        cfg = lm.config
        self.posterior = LatentEncoder(lm, dim_z, num_queries, encoder_layers, freeze_encoder_embeddings)
        self.adapter = LatentPrefixAdapter(cfg, dim_z, prefix_len, adapter_hidden)
        self.gskip = GSkip(dim_z, cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6)) if use_gskip else None
        self.prior: LatentEncoder | None = None
        if stage == "latent_dpo":
            self._load_clap(clap_ckpt)
            emb = lm.get_input_embeddings()
            self.prior = copy.deepcopy(self.posterior, memo={id(emb): emb, id(emb.weight): emb.weight})
            self.prior.zero_head()
            for module in (self.posterior, self.adapter, self.gskip):
                if module is not None:
                    module.requires_grad_(False)
            for p in self.prior.trainable_parameters():
                p.requires_grad_(True)

    def _weights_mode(self) -> str:
        return "lora" if self.hparams.stage == "lora_dpo" else "full"

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _load_clap(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = ckpt.get("hyper_parameters", {})
        if hp.get("stage") != "clap":
            raise ValueError(f"model.init_args.clap_ckpt: {path} is a stage={hp.get('stage')!r} checkpoint, not clap")
        diff = [f"{k}: checkpoint {hp.get(k)!r}, config {self.hparams.get(k)!r}" for k in _SHAPE_KEYS
                if k in hp and hp.get(k) != self.hparams.get(k)]
        if diff:
            raise ValueError(f"model.init_args.clap_ckpt {path} does not match this config: {'; '.join(diff)}")
        state = ckpt["state_dict"]
        own = {k: v for k, v in self.state_dict().items() if k.split(".")[0] in ("posterior", "adapter", "gskip")}
        shared = {k for k in own if k.endswith("backbone.embed_tokens.weight") and self.hparams.freeze_encoder_embeddings}
        missing = sorted(set(own) - set(state) - shared)
        if missing:
            raise ValueError(f"model.init_args.clap_ckpt {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        rank_zero_info(f"[latent_preference] loaded CLaP posterior, adapter and G-Skip from {path}")

    def _frozen_keys(self, keys: Any) -> set[str]:
        """State-dict keys not stored in checkpoints: the LM (rebuilt from ``model``) and shared embeddings."""
        lm_frozen = not (self.stage == "clap" and self.hparams.unfreeze_lm)
        shared = self.hparams.freeze_encoder_embeddings
        return {k for k in keys if (k.startswith("model.") and lm_frozen)
                or (shared and k.endswith("backbone.embed_tokens.weight"))}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.stage == "lora_dpo":
            super().on_save_checkpoint(checkpoint)
            return
        drop = self._frozen_keys(checkpoint["state_dict"])
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in drop}
        checkpoint["litlab_latent_without_lm"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not checkpoint.get("litlab_latent_without_lm"):
            super().on_load_checkpoint(checkpoint)
            return
        own = self.state_dict()
        for k in self._frozen_keys(own):
            checkpoint["state_dict"].setdefault(k, own[k])

    # ------------------------------------------------------------------------------------------------ LM pieces
    def _lm_blocks(self) -> list[torch.nn.Module]:
        decoder, _ = self._decoder_and_head()
        return [self.model, *decoder.layers]

    def _response_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, cache: Any = None,
                        skip: Tensor | None = None) -> Tensor:
        """Summed log-probabilities [B] of the response tokens (``labels != -100``) of right-padded rows, optionally
        after a latent prefix ``cache`` (positions continue after it) and with a G-Skip term [B, d] added to the last
        hidden state."""
        decoder, head = self._decoder_and_head()
        if cache is not None:
            b, t = input_ids.shape
            n_p = self.hparams.prefix_len
            mask = torch.cat([attention_mask.new_ones(b, n_p), attention_mask], dim=1)
            pos = (n_p + torch.arange(t, device=input_ids.device))[None].expand(b, -1)
            hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True).last_hidden_state
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if skip is not None:
            hidden = hidden + skip[:, None].to(hidden.dtype)
        targets = labels[:, 1:]
        keep = targets.ne(-100)
        logits = head(hidden[:, :-1][keep]).float()
        token_lp = -F.cross_entropy(logits, targets[keep], reduction="none")
        rows = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(targets)[keep]
        return torch.zeros(input_ids.size(0), device=token_lp.device).index_add(0, rows, token_lp)

    def _posterior_mask(self, attention_mask: Tensor, labels: Tensor) -> Tensor:
        if self.hparams.posterior_reads_prompt:
            return attention_mask
        return attention_mask * labels.ne(-100).long()

    # ------------------------------------------------------------------------------------------------ CLaP
    def _clap_losses(self, batch: dict[str, Any], contrastive: bool) -> dict[str, Tensor]:
        hp = self.hparams
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        k = ids.size(0)
        if hp.use_contrastive:
            group = batch.get("group")
            if k < 2 or group is None or bool((group != group[0]).any()):
                raise ValueError("contrastive loss needs >=2 responses sharing one prompt: use data.init_args.mode "
                                 "one2many (or model.init_args.use_contrastive false)")
        mu, logvar = self.posterior(ids, self._posterior_mask(mask, labels))
        std = (0.5 * logvar.clamp(-20, 20)).exp()
        z = mu + std * torch.randn_like(mu)
        skip = None
        if self.gskip is not None:
            zs = mu[:, None] + std[:, None] * torch.randn(k, hp.gskip_samples, hp.dim_z, device=mu.device)
            skip = self.gskip(zs)
        logp0 = self._response_logps(ids, mask, labels, self.adapter(z, self.model), skip)
        out = {"rec_nll": -logp0.mean(), "kl": dg_kld(mu, logvar, hp.kl_samples, hp.kl_mode)}
        loss = out["rec_nll"] + out["kl"]
        if hp.use_contrastive and contrastive:
            rolls = k - 1 if hp.contrastive_rolls is None else min(hp.contrastive_rolls, k - 1)
            scores = [logp0]
            for r in range(1, rolls + 1):
                scores.append(self._response_logps(ids, mask, labels, self.adapter(z.roll(r, 0), self.model)))
            logits = torch.stack(scores, dim=1)  # [K, R+1]: -NLL of y_k under z_{k-r}
            target = torch.zeros(k, dtype=torch.long, device=logits.device)
            out["contrastive"] = F.cross_entropy(logits, target)
            out["contrastive_acc"] = (logits.detach().argmax(1) == 0).float().mean()
            loss = loss + out["contrastive"]
        out["active_units"] = (mu.detach().var(0, unbiased=False) > 0.01).sum().float()
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------------------------------------ Latent DPO
    def _latent_dpo(self, batch: dict[str, Any], expected_reward: bool = False) -> dict[str, Tensor]:
        """Latent DPO loss and metrics of a pairs batch; never calls the LLM."""
        hp = self.hparams
        assert self.prior is not None
        with torch.no_grad():
            mu_w, s_w = self.posterior(batch["chosen_input_ids"],
                                       self._posterior_mask(batch["chosen_attention_mask"], batch["chosen_labels"]))
            mu_l, s_l = self.posterior(batch["rejected_input_ids"],
                                       self._posterior_mask(batch["rejected_attention_mask"], batch["rejected_labels"]))
            b, d = mu_w.shape
            n = hp.samples_per_source
            eps = torch.randn(b, 3, n, d, device=mu_w.device)
            cands = torch.cat([eps[:, 0], mu_w[:, None] + (0.5 * s_w)[:, None].exp() * eps[:, 1],
                               mu_l[:, None] + (0.5 * s_l)[:, None].exp() * eps[:, 2]], dim=1)  # [B, 3n, D]
            log_w = gaussian_log_density(cands, mu_w[:, None], s_w[:, None], hp.density_eps)
            log_l = gaussian_log_density(cands, mu_l[:, None], s_l[:, None], hp.density_eps)
            reward = torch.sigmoid(log_w - log_l)
            mask = select_pairs(reward, hp.evidence_ratio, hp.pair_selection, score=log_w - log_l)
            zeros = torch.zeros_like(cands)
            log_ref = gaussian_log_density(cands, zeros, zeros)
        mu_p, s_p = self.prior(batch["prompt_ids"], batch["prompt_mask"])
        log_pi = gaussian_log_density(cands, mu_p[:, None], s_p[:, None], hp.density_eps)
        h = log_pi - log_ref
        pair_loss, margins = latent_dpo_loss(h, mask, hp.beta)
        out: dict[str, Tensor] = {}
        if hp.ldpo_objective == "expectation":
            zs = mu_p[:, None] + (0.5 * s_p)[:, None].exp() * torch.randn(b, n, d, device=mu_p.device)
            r = latent_reward(zs, mu_w, s_w, mu_l, s_l, hp.density_eps)
            kl_term = gaussian_log_density(zs, mu_p[:, None], s_p[:, None]) - gaussian_log_density(
                zs, torch.zeros_like(zs), torch.zeros_like(zs))
            out["loss"] = (hp.beta * kl_term - r).mean()
        else:
            out["loss"] = pair_loss
        kept = mask.sum().clamp(min=1.0)
        rew = hp.beta * h.detach()
        out["rewards/chosen"] = (rew[:, :, None] * mask).sum() / kept
        out["rewards/rejected"] = (rew[:, None, :] * mask).sum() / kept
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["rewards/accuracies"] = ((margins.detach() > 0).float() * mask).sum() / kept
        out["logps/chosen"] = (log_pi.detach()[:, :, None] * mask).sum() / kept
        out["logps/rejected"] = (log_pi.detach()[:, None, :] * mask).sum() / kept
        out["ldpo/kept_pairs"] = mask.sum() / b
        out["ldpo/policy_kl"] = gaussian_kl(mu_p.detach(), s_p.detach()).mean()
        if expected_reward:
            with torch.no_grad():
                zs = mu_p[:, None] + (0.5 * s_p)[:, None].exp() * torch.randn(b, 16, d, device=mu_p.device)
                out["ldpo/expected_latent_reward"] = latent_reward(zs, mu_w, s_w, mu_l, s_l).mean()
        return out

    def user_latent(self, prompt_ids: Tensor, prompt_mask: Tensor, sample: bool = False) -> Tensor:
        """The user's latent z [B, D] for prompts: the prior's mean (or a sample); zeros (N(0, I)'s mean) before
        Latent DPO."""
        if self.prior is None:
            return torch.zeros(prompt_ids.size(0), self.hparams.dim_z, device=prompt_ids.device)
        mu, s = self.prior(prompt_ids, prompt_mask)
        return mu + (0.5 * s).exp() * torch.randn_like(mu) if sample else mu

    # ------------------------------------------------------------------------------------------------ sequence DPO
    def _pair_logps(self, batch: dict[str, Any], cache_fn: Any = None) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) summed response log-probs [B] in one forward pass of 2B rows."""
        c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
        width = max(c_ids.size(1), r_ids.size(1))
        pad = int(self.tokenizer.pad_token_id)

        def widen(x: Tensor, value: int) -> Tensor:
            return F.pad(x, (0, width - x.size(1)), value=value)

        ids = torch.cat([widen(c_ids, pad), widen(r_ids, pad)])
        mask = torch.cat([widen(batch["chosen_attention_mask"], 0), widen(batch["rejected_attention_mask"], 0)])
        labels = torch.cat([widen(batch["chosen_labels"], -100), widen(batch["rejected_labels"], -100)])
        cache = cache_fn() if cache_fn is not None else None
        lp = self._response_logps(ids, mask, labels, cache)
        b = c_ids.size(0)
        return lp[:b], lp[b:]

    def _sequence_dpo(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """TRL's sigmoid DPO loss and metrics; policy/reference = LoRA on/off (``lora_dpo``) or the LM with the
        prefix of the user's prior mean / of z = 0 (``latent_dpo``, evaluation only)."""
        hp = self.hparams
        if self.stage == "lora_dpo":
            pc, pr = self._pair_logps(batch)
            with torch.no_grad(), self.model.disable_adapter():
                rc, rr = self._pair_logps(batch)
        else:
            z = self.user_latent(batch["prompt_ids"], batch["prompt_mask"])
            z2 = torch.cat([z, z])
            pc, pr = self._pair_logps(batch, lambda: self.adapter(z2, self.model))
            rc, rr = self._pair_logps(batch, lambda: self.adapter(torch.zeros_like(z2), self.model))
        losses, cr, rj = dpo_sigmoid_loss(pc, pr, rc, rr, hp.beta)
        return {
            "loss": losses.mean(), "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
            "rewards/margins": (cr - rj).mean(), "rewards/accuracies": (cr > rj).float().mean(),
            "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
        }

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.stage == "clap":
            out = self._clap_losses(batch, contrastive=True)
            metrics = {f"train/{k}" if k == "loss" else f"train/clap/{k}": v.detach() for k, v in out.items()}
            bsz = batch["input_ids"].size(0)
        elif self.stage == "latent_dpo":
            out = self._latent_dpo(batch)
            metrics = {f"train/{k}": v.detach() for k, v in out.items()}
            bsz = batch["prompt_ids"].size(0)
        else:
            out = self._sequence_dpo(batch)
            metrics = {f"train/{k}": v.detach() for k, v in out.items()}
            bsz = batch["prompt_ids"].size(0)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=bsz)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=bsz)
        return out["loss"]

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        if self.stage == "clap":
            out = self._clap_losses(batch, contrastive=self.hparams.use_contrastive)
            metrics = {f"{prefix}/{k}" if k == "loss" else f"{prefix}/clap/{k}": v for k, v in out.items()}
            bsz = batch["input_ids"].size(0)
        else:
            bsz = batch["prompt_ids"].size(0)
            seq = self._sequence_dpo(batch)
            if self.stage == "latent_dpo":
                out = self._latent_dpo(batch, expected_reward=True)
                metrics = {f"{prefix}/{k}": v for k, v in out.items()}
            else:
                metrics = {f"{prefix}/{k}": v for k, v in seq.items()}
            metrics.update({f"{prefix}/seq/{k}": v for k, v in seq.items() if k != "loss"})
        self.log_dict({k: v.detach().float() for k, v in metrics.items()}, on_step=False, on_epoch=True,
                      batch_size=bsz, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._t_val = time.perf_counter()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._val_s += time.perf_counter() - self._t_val

    def on_test_epoch_start(self) -> None:
        pass

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        needed = "labels" if self.stage == "clap" else "chosen_input_ids"
        if needed not in batch:
            mode = "one2many" if self.stage == "clap" else "pairs"
            raise ValueError(f"stage {self.stage} tests on data.init_args.mode {mode} batches; use predict to generate")
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------------ timing + isolation
    def on_fit_start(self) -> None:
        from lit_models.hf import count_parameters

        total, trainable = count_parameters(self), count_parameters(self, trainable_only=True)
        rank_zero_info(f"[latent_preference] {self.hparams.model}, stage {self.stage}: {trainable:,} trainable of "
                       f"{total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")

    def on_train_start(self) -> None:
        self._t_train = time.perf_counter()
        self._val_s = self._ckpt_s = 0.0
        trainer = self.trainer
        save = trainer.save_checkpoint

        def timed_save(*args: Any, **kwargs: Any) -> Any:  # checkpoint I/O is not training time
            t0 = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                self._ckpt_s += time.perf_counter() - t0

        trainer.save_checkpoint = timed_save  # an instance attribute, removed in on_train_end
        self._step_times, self._llm_calls = [], []
        self._counter = CallCounter(self._lm_blocks()).attach()  # counted in every stage; an error in latent_dpo

    def on_predict_start(self) -> None:
        if self.stage == "latent_dpo" and self.trainer.ckpt_path is None:
            rank_zero_warn("predict in stage latent_dpo without --ckpt_path: the prior is untrained, so every prompt "
                           "gets the N(0, I) mean latent, not a user's; pass the user's latent_dpo checkpoint")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.count = 0
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._step_times.append(time.perf_counter() - self._t_step)
        if self._counter is not None:
            calls = self._counter.count
            self._llm_calls.append(calls)
            if calls and self.stage == "latent_dpo":
                raise RuntimeError(f"latent_dpo: the LLM ran {calls} block forward(s) in training step {batch_idx}; "
                                   "the per-user stage must not call it")
            self.log("time/llm_block_calls_per_step", float(calls), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self) -> None:
        if self._counter is not None:
            self._counter.detach()
            self._counter = None
        if "save_checkpoint" in vars(self.trainer):
            del self.trainer.save_checkpoint
        total = time.perf_counter() - self._t_train - self._val_s - self._ckpt_s
        self.user_time = {
            "time/seconds_per_user": total,
            "time/seconds_per_step": statistics.median(self._step_times) if self._step_times else 0.0,
            "time/seconds_train_steps": float(sum(self._step_times)),
            "time/steps": float(len(self._step_times)),
            "time/llm_block_calls_per_step": float(max(self._llm_calls, default=0)),
            "time/seconds_validation": self._val_s,
            "time/seconds_checkpointing": self._ckpt_s,
        }
        what = "the one-time stage" if self.stage == "clap" else "this user"
        rank_zero_info(f"[latent_preference] stage {self.stage}: {total:.2f} s for {what} "
                       f"({len(self._step_times)} steps, median {self.user_time['time/seconds_per_step']:.4f} s)")
        for logger in self.loggers:
            logger.log_metrics(self.user_time, step=self.global_step)
        if self.loggers and self.trainer.is_global_zero and self.trainer.log_dir:  # a run directory exists
            out_dir = Path(self.trainer.log_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "user_time.json").write_text(json.dumps({"stage": self.stage, **self.user_time}, indent=1) + "\n")

    # ------------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_with_latent(self, prompt_ids: Tensor, prompt_mask: Tensor, z: Tensor | None = None) -> list[str]:
        """Decode left-padded prompts [B, T] after the prefix of latent z [B, D] (default: the user's latent,
        :meth:`user_latent`); greedy, or top-k sampling with ``gen_top_k``. Returns the new text of each row."""
        hp = self.hparams
        was_training = self.training
        self.eval()
        if z is None:
            z = self.user_latent(prompt_ids, prompt_mask, sample=hp.latent_sampling)
        decoder, head = self._decoder_and_head()
        b = prompt_ids.size(0)
        n_p = hp.prefix_len
        cache = self.adapter(z, self.model)
        mask = torch.cat([prompt_mask.new_ones(b, n_p), prompt_mask], dim=1)
        pos = n_p + (prompt_mask.cumsum(1) - 1).clamp(min=0)
        gen = torch.Generator(device=prompt_ids.device).manual_seed(hp.gen_seed)
        eos, pad = int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id)
        done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
        tokens: list[Tensor] = []
        ids = prompt_ids
        for _ in range(hp.max_new_tokens):
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True).last_hidden_state[:, -1]
            logits = head(hidden).float()
            if hp.gen_top_k:
                vals, idx = logits.topk(hp.gen_top_k, dim=-1)
                pick = torch.multinomial(vals.softmax(-1), 1, generator=gen)
                nxt = idx.gather(1, pick).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            done |= nxt.eq(eos)
            if bool(done.all()):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = pos[:, -1:] + 1
        if was_training:
            self.train()
        out = torch.stack(tokens, dim=1) if tokens else prompt_ids.new_zeros(b, 0)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def _generate_records(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        if self.stage == "lora_dpo":
            outputs = self.generate_text(batch["input_ids"], batch["attention_mask"])
        else:
            outputs = self.generate_with_latent(batch["prompt_ids"], batch["prompt_mask"])
        return [{**meta, "stage": self.stage, "output": text} for meta, text in zip(batch["meta"], outputs, strict=True)]
