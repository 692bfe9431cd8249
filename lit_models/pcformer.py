"""PCformer: predictor-corrector Transformer for machine translation (Li et al., NeurIPS 2024, arXiv 2411.03042).

The whole method lives in the encoder (:class:`lit_models.nn.pc_layer.PCTransformerEncoder`): each layer is a
high-order predictor (RK2/RK4 stages of one shared block, combined with EMA coefficients gamma_i = alpha(1-alpha)^(K-i))
followed by a multistep corrector over all previous layer states. The decoder is a standard pre-norm decoder. With
``arch="transformer"`` (``order=1, corrector="none"``) the same module is the vanilla pre-norm Transformer baseline.

Spec: ``../shared/methods/pcformer.md``. Training follows fairseq: label-smoothed cross-entropy normalised by the
number of target tokens of the whole update (across gradient accumulation and DDP ranks), Adam, inverse-sqrt schedule.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from lit_models.nn.beam_search import beam_search
from lit_models.nn.pc_layer import PCTransformerEncoder
from lit_models.nn.seq2seq import EncoderDecoderTransformer
from lit_models.nn.transformer import PreNormDecoder
from lit_models.seq2seq_eval import Seq2SeqEvaluation, inverse_sqrt_lambda, label_smoothed_nll_loss
from lit_models.token_loss import TokenSumLoss


class PCformerTranslation(TokenSumLoss, Seq2SeqEvaluation, L.LightningModule):
    """Encoder-decoder translation model with a predictor-corrector encoder (spec section 4).

    Args:
        tokenizer: the DataModule's tokenizer (linked by ``train.py``; not stored in hyperparameters). Needs
            ``decode(ids) -> str``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id`` and ``fingerprint``.
        vocab_size, pad_id, bos_id, eos_id: taken from ``tokenizer`` when None (and then stored, so that
            ``load_from_checkpoint`` can rebuild the model without the tokenizer).
        arch: ``pcformer`` or ``transformer`` (vanilla pre-norm baseline; requires ``order=1, corrector="none"``).
        d_model, ffn_dim, n_heads, encoder_layers, decoder_layers: sizes.
        dropout, attention_dropout, activation_dropout: residual, attention-probability and FFN-activation dropout.
        order: predictor order K in {1, 2, 4}. corrector: ``multistep`` (paper) or ``none``.
        ema_alpha: initial alpha of the EMA coefficients, in (0, 1). learn_alpha: make alpha trainable.
        alpha_scope: ``shared`` scalar, per-``layer`` or per-``channel``.
        f_scope: stage function: ``full_block`` (official code) or ``residual_branch`` (ODE maths).
        coefficients: ``ema`` (paper), ``rk`` (ODE-Transformer) or ``gated`` (K=2 only).
        stage_norm: per-stage LayerNorm (official ``--rk-norm``).
        history_rowsum_penalty: lambda of the optional penalty on rows of W not summing to 1.
        pc_in_decoder: must be False (decoder-side PC is not implemented).
        decoder_history: ``none`` or ``learnable_dense`` (DLCL).
        share_all_embeddings: one embedding for source, target and output projection.
        max_positions: longest sequence the positional embedding accepts.
        rel_pos_max_distance: 0 = off; k > 0 = Shaw key-only relative attention clipped at k.
        label_smoothing: epsilon of the label-smoothed cross-entropy (fairseq form).
        lr, betas, weight_decay: AdamW settings (decoupled weight decay as in fairseq's Adam).
        warmup_steps, warmup_init_lr: inverse-sqrt schedule: linear warmup from ``warmup_init_lr`` to ``lr``, then
            ``lr * sqrt(warmup_steps / step)``.
        beam_size, length_penalty, max_len_a, max_len_b: beam search (fairseq semantics, spec section 3).
        val_bleu_max_sentences: score BLEU on a fixed, evenly spaced subset of at most this many validation sentences.
        compute_tok_bleu: also report ``test/bleu_tok`` (compound-split tokenized BLEU, for pretokenized data).
        sacrebleu_tokenize: sacrebleu tokenizer (``13a`` default, ``intl`` available).
        hypotheses_file: where ``test`` writes its hypotheses (default ``<log_dir>/hypotheses.test.txt``).
        predictions_file: where ``predict`` writes its outputs (default ``<log_dir>/predictions.txt``).

    Raises:
        ValueError: invalid architecture combinations (spec section 11), or no tokenizer and no vocab_size.
        NotImplementedError: ``pc_in_decoder=True``.
    """

    #: Taken from the command line / config, not from a checkpoint, by ``train.py validate|test|predict``.
    EVAL_TIME_HPARAMS = (
        "beam_size", "length_penalty", "max_len_a", "max_len_b", "val_bleu_max_sentences", "compute_tok_bleu",
        "sacrebleu_tokenize", "hypotheses_file", "predictions_file",
    )

    def __init__(
        self,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        arch: Literal["pcformer", "transformer"] = "pcformer",
        d_model: int = 512,
        ffn_dim: int = 2048,
        n_heads: int = 8,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        order: int = 2,
        corrector: Literal["none", "multistep"] = "multistep",
        ema_alpha: float = 0.5,
        learn_alpha: bool = True,
        alpha_scope: Literal["shared", "layer", "channel"] = "shared",
        f_scope: Literal["full_block", "residual_branch"] = "full_block",
        coefficients: Literal["ema", "rk", "gated"] = "ema",
        stage_norm: bool = False,
        history_rowsum_penalty: float = 0.0,
        pc_in_decoder: bool = False,
        decoder_history: Literal["none", "learnable_dense"] = "none",
        share_all_embeddings: bool = True,
        max_positions: int = 1024,
        rel_pos_max_distance: int = 0,
        label_smoothing: float = 0.1,
        lr: float = 7e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.0,
        warmup_steps: int = 4000,
        warmup_init_lr: float = 1e-7,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len_a: float = 1.2,
        max_len_b: int = 10,
        val_bleu_max_sentences: int | None = None,
        compute_tok_bleu: bool = False,
        sacrebleu_tokenize: str = "13a",
        hypotheses_file: str | None = None,
        predictions_file: str | None = None,
    ) -> None:
        super().__init__()
        if arch == "transformer" and (order != 1 or corrector != "none"):
            raise ValueError("arch=transformer requires order=1, corrector=none")
        if arch not in ("pcformer", "transformer"):
            raise ValueError(f"arch must be one of ['pcformer', 'transformer'], got {arch!r}")
        if pc_in_decoder:
            raise NotImplementedError("pc_in_decoder=True: decoder-side PC needs per-stage KV caches (spec section 11)")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if max_len_a < 0:
            raise ValueError(f"max_len_a must be >= 0, got {max_len_a}")
        if tokenizer is not None:
            vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
            pad_id = tokenizer.pad_id if pad_id is None else pad_id
            bos_id = tokenizer.bos_id if bos_id is None else bos_id
            eos_id = tokenizer.eos_id if eos_id is None else eos_id
            if vocab_size != tokenizer.vocab_size:
                raise ValueError(
                    f"the tokenizer does not match the checkpoint/config: model.vocab_size={vocab_size} but the "
                    f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} ids; point "
                    "data.tokenizer_path at the tokenizer the model was trained with"
                )
        if vocab_size is None or pad_id is None or bos_id is None or eos_id is None:
            raise ValueError(
                "PCformerTranslation needs a tokenizer (linked from the DataModule by train.py) or explicit "
                "vocab_size, pad_id, bos_id and eos_id"
            )
        # The CLI logs the full config; logger=False avoids clashing with the DataModule's requested vocab_size.
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        # Under LightningCLI the hparams are the config as given: record the ids the tokenizer resolved.
        self.hparams.update(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        self.tokenizer = tokenizer

        encoder = PCTransformerEncoder(
            num_layers=encoder_layers,
            d_model=d_model,
            n_heads=n_heads,
            ffn_dim=ffn_dim,
            order=order,
            corrector=corrector,
            ema_alpha=ema_alpha,
            alpha_scope=alpha_scope,
            learn_alpha=learn_alpha,
            f_scope=f_scope,
            coefficients=coefficients,
            stage_norm=stage_norm,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
            rel_pos_max_distance=rel_pos_max_distance,
        )
        decoder = PreNormDecoder(
            num_layers=decoder_layers,
            d_model=d_model,
            n_heads=n_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
            history=decoder_history,
            rel_pos_max_distance=rel_pos_max_distance,
        )
        self.model = EncoderDecoderTransformer(
            encoder=encoder,
            decoder=decoder,
            vocab_size=vocab_size,
            pad_id=pad_id,
            d_model=d_model,
            dropout=dropout,
            max_positions=max_positions,
            share_all_embeddings=share_all_embeddings,
        )

    # ------------------------------------------------------------------ forward and loss
    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor) -> Tensor:
        """Teacher-forced logits. ``src_tokens`` [B, S], ``prev_output_tokens`` [B, T] -> [B, T, V]."""
        return self.model(src_tokens, prev_output_tokens)

    def _loss_sums(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, int]:
        """Summed label-smoothed loss and summed NLL over the batch's non-pad target tokens, and their count."""
        logits = self(batch["src_tokens"], batch["prev_output_tokens"])
        loss, nll = label_smoothed_nll_loss(
            logits, batch["target"], self.hparams.label_smoothing, ignore_index=self.hparams.pad_id
        )
        # The collate function counts tokens on the host; counting here would sync the GPU every step.
        ntokens = batch.get("ntokens")
        if ntokens is None:
            ntokens = batch["target"].ne(self.hparams.pad_id).sum()
        return loss, nll, int(ntokens)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Returns the *summed* loss; gradients are divided by the update's token count in ``on_before_optimizer_step``.

        Metrics are logged on Lightning's logging steps only (``log_every_n_steps``): ``train/tokens_per_s`` is the
        wall-clock average since the previous logging step (validation excluded).
        """
        loss, nll, ntokens = self._loss_sums(batch)
        encoder = self.model.encoder
        if self.hparams.history_rowsum_penalty > 0:
            loss = loss + self.hparams.history_rowsum_penalty * encoder.rowsum_penalty() * ntokens
        self.count_tokens(ntokens)
        n, bsz = max(ntokens, 1), batch["target"].size(0)
        self.log("loss", loss.detach() / n, prog_bar=True, logger=False, batch_size=bsz)
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            metrics = {"train/loss": loss.detach() / n, "train/nll": nll.detach() / n}
            metrics["train/ppl"] = torch.exp(metrics["train/nll"].clamp(max=50))
            rate = self.tokens_per_s()
            if rate is not None:
                metrics["train/tokens_per_s"] = torch.tensor(rate)
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=bsz)
            # pc_stats reads parameters back to the host: only on logging steps.
            self.log_dict(encoder.pc_stats(), on_step=True, on_epoch=False, batch_size=bsz)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _eval_losses(self, batch: dict[str, Tensor], prefix: str) -> None:
        loss, nll, ntokens = self._loss_sums(batch)
        self.accumulate_eval_loss(prefix, loss.detach(), nll.detach(), ntokens)

    def generate(self, src_tokens: Tensor) -> list[list[int]]:
        """Beam search with the configured settings. ``src_tokens`` [B, S] -> best token ids per sentence."""
        hyps = beam_search(
            self.model,
            src_tokens,
            bos_id=self.hparams.bos_id,
            eos_id=self.hparams.eos_id,
            pad_id=self.hparams.pad_id,
            beam_size=self.hparams.beam_size,
            length_penalty=self.hparams.length_penalty,
            max_len_a=self.hparams.max_len_a,
            max_len_b=self.hparams.max_len_b,
        )
        return [h[0].tokens if h else [] for h in hyps]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decoupled weight decay, as fairseq's Adam) with the inverse-sqrt schedule, stepped every update."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, inverse_sqrt_lambda(hp.lr, hp.warmup_steps, hp.warmup_init_lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer_fingerprint"] = self.tokenizer.fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another vocabulary than the current tokenizer's."""
        saved = checkpoint.get("tokenizer_fingerprint")
        hp = checkpoint.get("hyper_parameters", {})
        if self.tokenizer is None:
            return
        if hp.get("vocab_size") not in (None, self.tokenizer.vocab_size) or (
            saved is not None and saved != self.tokenizer.fingerprint
        ):
            raise ValueError(
                f"the tokenizer does not match the checkpoint: checkpoint vocab_size={hp.get('vocab_size')} "
                f"fingerprint={saved}, current tokenizer vocab_size={self.tokenizer.vocab_size} "
                f"fingerprint={self.tokenizer.fingerprint} ({getattr(self.tokenizer, 'path', '?')}); "
                "point data.tokenizer_path at the tokenizer the checkpoint was trained with"
            )


__all__ = ["PCformerTranslation"]
