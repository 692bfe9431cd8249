"""SpeechFusionST: speech translation with gated FBank + SSL multi-view fusion (GSGN) at the encoder input.

Source: spec ``speech_fusion.md`` (Shan et al., ICASSP 2025, arXiv 2501.08057; equations are the project's reading
of the paper's figure, see the spec's tags). Encoder input: FBank -> :class:`Conv1dSubsampler`; SSL features or
k-means units -> :class:`SSLProjection` -> :func:`align_frames` to the FBank branch's length; both fused once by
``fusion`` (``gated`` GSGN, ``concat``, or the single-view baselines ``fbank`` / ``ssl``), then sinusoidal positions,
dropout, ``acoustic_layers`` + ``textual_layers`` pre-norm Transformer layers and the PCformer foundation's pre-norm
decoder (:class:`lit_models.nn.seq2seq.EncoderDecoderTransformer`, beam search, SacreBLEU evaluation from
:class:`lit_models.seq2seq_eval.Seq2SeqEvaluation`). Loss: label-smoothed cross-entropy summed over target tokens and
normalised per update (:class:`lit_models.token_loss.TokenSumLoss`), plus ``ctc_weight`` x CTC on the acoustic
encoder output against the English transcript when ``ctc_weight > 0`` (the figure's acoustic/textual stack).

Protocol used by :mod:`callbacks.multi_stage_dropout` and :mod:`callbacks.gradient_conflict`:
``views()``, ``loss_on(batch, views)``, ``shared_parameter_groups()``, ``set_view_dropout(p_drop, p_feat)`` and
``view_dropout_stats()``.

Batches: see :mod:`datamodules.mustc`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import sacrebleu
import torch
from torch import Tensor, nn

from lit_models.nn.beam_search import beam_search
from lit_models.nn.fusion_gate import VIEWS, build_fusion
from lit_models.nn.pc_layer import PreNormEncoderBlock
from lit_models.nn.seq2seq import EncoderDecoderTransformer, EncoderOut
from lit_models.nn.speech_frontend import (
    Conv1dSubsampler,
    SSLProjection,
    align_frames,
    lengths_to_pad_mask,
    subsampled_lengths,
)
from lit_models.nn.transformer import PreNormDecoder, SinusoidalPositionalEmbedding
from lit_models.seq2seq_eval import Seq2SeqEvaluation, inverse_sqrt_lambda, label_smoothed_nll_loss
from lit_models.token_loss import TokenSumLoss

__all__ = ["SpeechFusionST"]


class _SpeechEncoderStack(nn.Module):
    """Acoustic layers, then textual layers, then the final LayerNorm: ``(x [B,T,d], pad_mask [B,T]) -> [B,T,d]``."""

    def __init__(self, acoustic: int, textual: int, d_model: int, n_heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation_dropout: float) -> None:
        super().__init__()

        def block() -> PreNormEncoderBlock:
            return PreNormEncoderBlock(d_model, n_heads, ffn_dim, dropout, attention_dropout, activation_dropout)

        self.acoustic = nn.ModuleList(block() for _ in range(acoustic))
        self.textual = nn.ModuleList(block() for _ in range(textual))
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        for layer in self.acoustic:
            x = layer(x, pad_mask)
        self.acoustic_out = x  # read by the CTC head (acoustic encoder output, before the textual layers)
        for layer in self.textual:
            x = layer(x, pad_mask)
        return self.final_norm(x)


class _PrecomputedEncoder(nn.Module):
    """Decoding-protocol adapter for :func:`beam_search`: ``encode`` returns an encoder output computed beforehand
    (the speech encoder has no token input); everything else is delegated to the wrapped model."""

    def __init__(self, model: EncoderDecoderTransformer, enc: EncoderOut) -> None:
        super().__init__()
        self.model, self.enc, self.max_positions = model, enc, model.max_positions

    def encode(self, _src: Tensor) -> EncoderOut:
        return self.enc

    def decode(self, prev: Tensor, enc: EncoderOut, cache: Any = None) -> Tensor:
        return self.model.decode(prev, enc, cache)

    def init_cache(self) -> Any:
        return self.model.init_cache()

    def reorder_cache(self, cache: Any, order: Tensor) -> Any:
        return self.model.reorder_cache(cache, order)

    def reorder_encoder_out(self, enc: EncoderOut, order: Tensor) -> EncoderOut:
        return self.model.reorder_encoder_out(enc, order)


class SpeechFusionST(TokenSumLoss, Seq2SeqEvaluation, L.LightningModule):
    """Speech-to-text translation over FBank and SSL views (spec section 4).

    Args:
        tokenizer: the DataModule's target tokenizer (linked by ``train.py``; not stored in hyperparameters).
        vocab_size, pad_id, bos_id, eos_id: taken from ``tokenizer`` when None.
        fusion: ``gated`` (GSGN), ``concat`` (Linear over the concatenation), ``fbank`` or ``ssl`` (single view).
        d_model, n_heads, ffn_dim: Transformer sizes. acoustic_layers, textual_layers, decoder_layers: depths.
        dropout, attention_dropout, activation_dropout: residual / attention / FFN-activation dropout.
        fbank_dim: FBank bins. conv_channels, conv_kernel_sizes: the FBank subsampler (fairseq defaults 1024, (5, 5)).
        ssl_type: ``continuous`` (features [B,T_s,ssl_dim]) or ``discrete`` (unit ids, ``num_units``).
        ssl_dim: SSL feature width (Whisper tiny 384; checked against the DataModule at setup).
        num_units: k-means units K (discrete).
        gate_hidden, gate_granularity, gate_sharing, gate_detach_inputs, gate_bias_slot, gate_temperature,
            gate_residual: :class:`lit_models.nn.fusion_gate.GSGNFusion` arguments.
        label_smoothing: epsilon.
        ctc_weight: weight of the auxiliary CTC loss on the acoustic encoder output (after ``acoustic_layers``,
            before ``textual_layers``) against the English transcript (``src_tokens``; the DataModule serves them
            with ``data.source_vocab_size``); 0 = off (plain S2T). Total loss = label-smoothed CE + ctc_weight * CTC,
            both summed (CTC over utterances; blank = id 0, the pad id, which never occurs in transcripts).
        source_vocab_size: CTC output classes (>= the source tokenizer's size; required when ``ctc_weight > 0``).
        lr, warmup_steps, warmup_init_lr, betas, weight_decay, clip: AdamW with fairseq's inverse-sqrt schedule.
        beam_size, val_beam_size: beams for test/predict and for validation. lenpen: length penalty.
        max_len_a, max_len_b: at most ``a * encoder_frames + b`` output tokens.
        max_positions: longest target (decoder positions).
        test_view_sets: view sets scored at test time: the full set logs ``test/sacrebleu``; every set also logs
            ``test/sacrebleu_<views>`` (e.g. ``test/sacrebleu_fbank`` = SSL removed).
        val_bleu_max_sentences: BLEU on an evenly spaced validation subset of at most this size.
        sacrebleu_tokenize: sacrebleu tokenizer. hypotheses_file, predictions_file: output files of test/predict.

    Raises:
        ValueError: bad ``fusion``/gate arguments, ``ctc_weight != 0``, no tokenizer and no vocab ids.
    """

    EVAL_TIME_HPARAMS = ("beam_size", "val_beam_size", "lenpen", "max_len_a", "max_len_b", "test_view_sets",
                         "val_bleu_max_sentences", "sacrebleu_tokenize", "hypotheses_file", "predictions_file")

    def __init__(
        self,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        fusion: Literal["gated", "concat", "fbank", "ssl"] = "gated",
        d_model: int = 256,
        n_heads: int = 4,
        ffn_dim: int = 2048,
        acoustic_layers: int = 12,
        textual_layers: int = 0,
        decoder_layers: int = 6,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        fbank_dim: int = 80,
        conv_channels: int = 1024,
        conv_kernel_sizes: tuple[int, ...] = (5, 5),
        ssl_type: Literal["discrete", "continuous"] = "continuous",
        ssl_dim: int = 768,
        num_units: int = 500,
        gate_hidden: int = 64,
        gate_granularity: Literal["frame", "channel"] = "frame",
        gate_sharing: Literal["per_view", "shared"] = "per_view",
        gate_detach_inputs: bool = True,
        gate_bias_slot: bool = True,
        gate_temperature: float = 1.0,
        gate_residual: Literal["none", "fbank"] = "none",
        label_smoothing: float = 0.1,
        ctc_weight: float = 0.0,
        source_vocab_size: int | None = None,
        lr: float = 2e-3,
        warmup_steps: int = 10000,
        warmup_init_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.0,
        beam_size: int = 5,
        val_beam_size: int = 5,
        lenpen: float = 1.0,
        max_len_a: float = 0.0,
        max_len_b: int = 200,
        max_positions: int = 1024,
        test_view_sets: list[list[str]] = [["fbank", "ssl"], ["fbank"], ["ssl"]],  # noqa: B006
        val_bleu_max_sentences: int | None = None,
        sacrebleu_tokenize: str = "13a",
        hypotheses_file: str | None = None,
        predictions_file: str | None = None,
    ) -> None:
        super().__init__()
        if fusion not in ("gated", "concat", "fbank", "ssl"):
            raise ValueError(f"model.init_args.fusion must be gated, concat, fbank or ssl; got {fusion!r}")
        if ctc_weight < 0:
            raise ValueError(f"model.init_args.ctc_weight must be >= 0, got {ctc_weight}")
        if ctc_weight > 0 and not source_vocab_size:
            raise ValueError("model.init_args.ctc_weight > 0 needs source_vocab_size (and data.source_vocab_size)")
        for name, value in (("beam_size", beam_size), ("val_beam_size", val_beam_size)):
            if value < 1:
                raise ValueError(f"model.init_args.{name} must be >= 1, got {value}")
        for vs in test_view_sets:
            if not vs or any(v not in VIEWS for v in vs):
                raise ValueError(f"model.init_args.test_view_sets: each set must be a non-empty subset of {VIEWS}")
        if tokenizer is not None:
            vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
            pad_id = tokenizer.pad_id if pad_id is None else pad_id
            bos_id = tokenizer.bos_id if bos_id is None else bos_id
            eos_id = tokenizer.eos_id if eos_id is None else eos_id
            if vocab_size != tokenizer.vocab_size:
                raise ValueError(f"model.vocab_size={vocab_size} but the tokenizer has {tokenizer.vocab_size} ids")
        if None in (vocab_size, pad_id, bos_id, eos_id):
            raise ValueError(
                "SpeechFusionST needs a tokenizer (linked from the DataModule) or vocab_size/pad/bos/eos ids"
            )
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.hparams.update(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        self.tokenizer = tokenizer
        self.uses = {"gated": ["fbank", "ssl"], "concat": ["fbank", "ssl"], "fbank": ["fbank"], "ssl": ["ssl"]}[fusion]

        self.fbank_frontend = (
            Conv1dSubsampler(fbank_dim, conv_channels, d_model, tuple(conv_kernel_sizes)) if "fbank" in self.uses
            else None
        )
        self.num_conv_layers = len(tuple(conv_kernel_sizes))
        self.ssl_frontend = (
            SSLProjection(ssl_type, d_model, in_dim=ssl_dim, num_units=num_units) if "ssl" in self.uses else None
        )
        self.fusion = build_fusion(
            fusion, d_model, gate_hidden=gate_hidden, granularity=gate_granularity, sharing=gate_sharing,
            detach_inputs=gate_detach_inputs, bias_slot=gate_bias_slot, temperature=gate_temperature,
            residual=gate_residual,
        )
        self.embed_positions = SinusoidalPositionalEmbedding(d_model, pad_id, init_size=1024)
        self.input_dropout = nn.Dropout(dropout)
        stack = _SpeechEncoderStack(acoustic_layers, textual_layers, d_model, n_heads, ffn_dim, dropout,
                                    attention_dropout, activation_dropout)
        decoder = PreNormDecoder(num_layers=decoder_layers, d_model=d_model, n_heads=n_heads, ffn_dim=ffn_dim,
                                 dropout=dropout, attention_dropout=attention_dropout,
                                 activation_dropout=activation_dropout)
        self.model = EncoderDecoderTransformer(stack, decoder, vocab_size, pad_id, d_model, dropout, max_positions,
                                               share_all_embeddings=True)
        self.ctc_proj = nn.Linear(d_model, source_vocab_size) if ctc_weight > 0 else None
        self._alphas: dict[str, Tensor] = {}
        self._ctc: Tensor | None = None
        self._best = (-1.0, -1)

    # ------------------------------------------------------------------ protocol for the callbacks
    def views(self) -> list[str]:
        """Views this model fuses (``["fbank", "ssl"]`` for gated/concat)."""
        return list(self.uses)

    def set_view_dropout(self, p_drop: dict[str, float], p_feat: dict[str, float]) -> None:
        """Set view-dropout / feature-dropout probabilities (keys ``fbank``/``ssl``)."""
        self.fusion.set_view_dropout(p_drop, p_feat)

    def view_dropout_stats(self) -> dict[str, float]:
        """Fractions of utterances whose view was dropped in the last training forward."""
        return dict(self.fusion.view_dropout.last_dropped)

    def shared_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters after the fusion, grouped: ``acoustic.<i>``, ``textual``, ``decoder`` (decoder, embeddings,
        final norms). Front-ends and gates are excluded (spec 3.6)."""
        stack = self.model.encoder
        groups: dict[str, list[nn.Parameter]] = {
            f"acoustic.{i}": list(layer.parameters()) for i, layer in enumerate(stack.acoustic)
        }
        if len(stack.textual):
            groups["textual"] = list(stack.textual.parameters())
        groups["decoder"] = list(self.model.decoder.parameters()) + list(self.model.decoder_embed.parameters()) + list(
            stack.final_norm.parameters()
        )
        if self.ctc_proj is not None:
            groups["ctc"] = list(self.ctc_proj.parameters())
        return groups

    def loss_on(self, batch: dict[str, Any], views: set[str] | list[str]) -> Tensor:
        """Mean (per target token) training criterion on ``batch`` with only ``views`` present."""
        loss, _, ntokens, _ = self._loss_sums(batch, views=set(views))
        return loss / max(ntokens, 1)

    # ------------------------------------------------------------------ encoder
    def _present(self, batch: dict[str, Any], views: set[str] | None) -> Tensor:
        bsz = batch["target"].size(0) if "target" in batch else batch["id"].size(0)
        cols = []
        for v in VIEWS:
            ok = v in self.uses and v in batch and (views is None or v in views)
            cols.append(torch.full((bsz,), ok, dtype=torch.bool, device=self.device))
        return torch.stack(cols, dim=1)

    def _frame_lengths(self, batch: dict[str, Any]) -> Tensor:
        """Encoder frames per utterance: the FBank branch's subsampled length (SSL-only data: ceil(T_s / 2))."""
        if "fbank_lengths" in batch:
            return subsampled_lengths(batch["fbank_lengths"], self.num_conv_layers)
        return subsampled_lengths(batch["ssl_lengths"], 1)

    def encode(self, batch: dict[str, Any], views: set[str] | None = None) -> EncoderOut:
        """batch -> :class:`EncoderOut` (out [B, T, d], pad_mask [B, T]); ``views`` restricts the present views.

        Raises:
            ValueError: a view the fusion needs is missing from the batch (e.g. ``fusion: gated`` with one view).
        """
        for v in self.uses:
            if v not in batch and (views is None or v in views):
                raise ValueError(f"fusion={self.hparams.fusion!r} needs the {v!r} view but the batch has no {v!r} "
                                 "(check data.views)")
        present = self._present(batch, views)
        if not bool(present.any(dim=1).all()):
            raise ValueError(f"views={sorted(views or [])} leaves no view the model uses ({self.uses})")
        if self.training and self.hparams.fusion in ("gated", "concat"):
            present = self.fusion.view_dropout.drop_views(present)
        lengths = self._frame_lengths(batch)
        t_max = int(lengths.max())
        pad_mask = lengths_to_pad_mask(lengths, t_max)
        h: dict[str, Tensor] = {}
        if self.fbank_frontend is not None and bool(present[:, 0].any()):
            hf, _ = self.fbank_frontend(batch["fbank"], batch["fbank_lengths"])
            h["fbank"] = hf[:, :t_max]
        if self.ssl_frontend is not None and bool(present[:, 1].any()):
            hs = self.ssl_frontend(batch["ssl"])
            h["ssl"] = align_frames(hs, batch["ssl_lengths"], lengths, t_max)
        h = self.fusion.view_dropout.feature_dropout(h)
        fused, alphas = self.fusion(h, present, pad_mask)
        self._alphas = {k: v.detach() for k, v in alphas.items()}
        self._alpha_mask = ~pad_mask
        marker = torch.where(pad_mask, self.hparams.pad_id, self.hparams.pad_id + 1)
        x = self.input_dropout(fused + self.embed_positions(marker).to(fused.dtype))
        return EncoderOut(self.model.encoder(x, pad_mask), pad_mask)

    def forward(self, batch: dict[str, Any], views: set[str] | None = None) -> Tensor:
        """Teacher-forced logits [B, U, V]."""
        return self.model.decode(batch["prev_output_tokens"], self.encode(batch, views))

    def _loss_sums(self, batch: dict[str, Any], views: set[str] | None = None) -> tuple[Tensor, Tensor, int, Tensor]:
        enc = self.encode(batch, views)
        logits = self.model.decode(batch["prev_output_tokens"], enc)
        target = batch["target"]
        loss, nll = label_smoothed_nll_loss(logits, target, self.hparams.label_smoothing, self.hparams.pad_id)
        mask = target.ne(self.hparams.pad_id)
        correct = (logits.argmax(-1).eq(target) & mask).sum()
        self._ctc = None
        if self.ctc_proj is not None:
            self._ctc = self.ctc_loss(batch, enc)
            loss = loss + self.hparams.ctc_weight * self._ctc
        return loss, nll, int(batch.get("ntokens") or int(mask.sum())), correct

    def ctc_loss(self, batch: dict[str, Any], enc: EncoderOut) -> Tensor:
        """Summed CTC loss of the acoustic encoder output against ``src_tokens`` (blank = 0).

        Raises:
            ValueError: the batch has no ``src_tokens`` (set ``data.init_args.source_vocab_size``).
        """
        if "src_tokens" not in batch:
            raise ValueError("model.init_args.ctc_weight > 0 needs transcripts in the batch: set "
                             "data.init_args.source_vocab_size")
        lprobs = torch.log_softmax(self.ctc_proj(self.model.encoder.acoustic_out).float(), dim=-1)  # B x T x V
        input_lengths = (~enc.pad_mask).sum(dim=1)
        return torch.nn.functional.ctc_loss(
            lprobs.transpose(0, 1), batch["src_tokens"], input_lengths, batch["src_lengths"], blank=0,
            reduction="sum", zero_infinity=True,
        )

    def _alpha_metrics(self, prefix: str) -> dict[str, Tensor]:
        if not self._alphas:
            return {}
        m = self._alpha_mask.to(next(iter(self._alphas.values())).dtype)
        return {f"{prefix}gate/alpha_{k}": (v * m).sum() / m.sum().clamp(min=1) for k, v in self._alphas.items()}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, nll, ntokens, correct = self._loss_sums(batch)
        self.count_tokens(ntokens)
        n, bsz = max(ntokens, 1), batch["target"].size(0)
        self.log("loss", loss.detach() / n, prog_bar=True, logger=False, batch_size=bsz)
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            metrics = {"train/loss": loss.detach() / n, "train/nll": nll.detach() / n, "train/acc": correct.float() / n}
            if self._ctc is not None:
                metrics["train/ctc_loss"] = self._ctc.detach() / max(int(batch["src_lengths"].sum()), 1)
            metrics.update({k: v for k, v in self._alpha_metrics("").items()})
            rate = self.tokens_per_s()
            if rate is not None:
                metrics["train/tokens_per_s"] = torch.tensor(rate)
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=bsz)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_lambda(hp.lr, hp.warmup_steps, hp.warmup_init_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """Check the DataModule's SSL sizes against ``ssl_dim`` / ``num_units`` (they cannot be linked generically).

        Raises:
            ValueError: naming ``model.init_args.ssl_dim`` or ``num_units`` and both values.
        """
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        src_tok = getattr(dm, "source_tokenizer", None)
        if self.ctc_proj is not None and src_tok is not None and src_tok.vocab_size > self.hparams.source_vocab_size:
            raise ValueError(f"model.init_args.source_vocab_size={self.hparams.source_vocab_size} is smaller than the "
                             f"source tokenizer ({src_tok.vocab_size} pieces)")
        if dm is None or self.ssl_frontend is None or "ssl" not in getattr(dm, "views", []):
            return
        if self.hparams.ssl_type == "continuous" and getattr(dm.hparams, "ssl_type", "continuous") == "continuous":
            if dm.ssl_dim != self.hparams.ssl_dim:
                raise ValueError(f"model.init_args.ssl_dim={self.hparams.ssl_dim} but the SSL encoder gives "
                                 f"{dm.ssl_dim}-dim features; set ssl_dim: {dm.ssl_dim}")
        elif self.hparams.ssl_type != getattr(dm.hparams, "ssl_type", None):
            raise ValueError(f"model.init_args.ssl_type={self.hparams.ssl_type} but data.init_args.ssl_type="
                             f"{dm.hparams.ssl_type}")
        elif dm.num_units != self.hparams.num_units:
            raise ValueError(f"model.init_args.num_units={self.hparams.num_units} but the k-means file has "
                             f"{dm.num_units} units; set num_units: {dm.num_units}")

    # ------------------------------------------------------------------ evaluation
    def _eval_losses(self, batch: dict[str, Any], prefix: str) -> None:
        loss, nll, ntokens, correct = self._loss_sums(batch)
        self.accumulate_eval_loss(prefix, loss.detach(), nll.detach(), ntokens)
        acc = self.__dict__.setdefault("_acc_sums", {}).setdefault(prefix, [0, 0])
        acc[0] += int(correct)
        acc[1] += ntokens
        alpha = self.__dict__.setdefault("_alpha_sums", {}).setdefault(prefix, {})
        for k, v in self._alpha_metrics("").items():
            s = alpha.setdefault(k, [0.0, 0])
            s[0] += float(v)
            s[1] += 1

    def _log_acc(self, prefix: str) -> None:
        acc = self.__dict__.get("_acc_sums", {}).pop(prefix, None)
        if acc is not None:
            self.log(f"{prefix}/acc", acc[0] / max(acc[1], 1))
        for k, (s, n) in self.__dict__.get("_alpha_sums", {}).pop(prefix, {}).items():
            self.log(f"{prefix}/{k}", s / max(n, 1))

    def generate(self, batch: dict[str, Any], views: set[str] | None = None, beam: int | None = None
                 ) -> list[list[int]]:
        """Beam search on a speech batch -> best token ids per utterance (``views`` restricts the input views)."""
        hp = self.hparams
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                enc = self.encode(batch, views)
            marker = torch.where(enc.pad_mask, hp.pad_id, hp.pad_id + 1)
            hyps = beam_search(
                _PrecomputedEncoder(self.model, enc), marker, bos_id=hp.bos_id, eos_id=hp.eos_id, pad_id=hp.pad_id,
                beam_size=beam or hp.beam_size, length_penalty=hp.lenpen, max_len_a=hp.max_len_a,
                max_len_b=hp.max_len_b,
            )
        finally:
            self.train(was_training)
        return [h[0].tokens if h else [] for h in hyps]

    def _subset(self, batch: dict[str, Any], keep: Tensor) -> dict[str, Any]:
        return {k: (v[keep] if isinstance(v, Tensor) and v.dim() > 0 and v.size(0) == keep.size(0) else v)
                for k, v in batch.items()}

    def _collect(self, batch: dict[str, Any], split: str) -> None:
        keep = self._selected(batch["id"], split)
        if not keep.any():
            return
        sub = self._subset(batch, keep)
        ids = sub["id"].tolist()
        if split == "validation":
            sets = [None]
        else:
            sets = [None] + [frozenset(v) for v in self.hparams.test_view_sets if set(v) <= set(self.uses)]
        for vs in dict.fromkeys(sets):
            hyps = self.generate(sub, set(vs) if vs else None,
                                 beam=self.hparams.val_beam_size if split == "validation" else None)
            store = self.__dict__.setdefault("_hyps", {}) if vs is None else (
                self.__dict__.setdefault("_view_hyps", {}).setdefault(vs, {}))
            for i, tokens in zip(ids, hyps):
                store[int(i)] = tokens

    def on_validation_epoch_end(self) -> None:
        self._log_eval_losses("val")
        score = self._bleu("val")
        self._log_acc("val")
        if score is not None and not self.trainer.sanity_checking:
            if score.score > self._best[0]:
                self._best = (float(score.score), int(self.current_epoch))
            self.log("val/best_epoch", float(self._best[1]))

    def on_test_epoch_end(self) -> None:
        view_hyps = self.__dict__.pop("_view_hyps", {})
        super().on_test_epoch_end()
        self._log_acc("test")
        refs = self._references("test")
        for vs, store in view_hyps.items():
            self.__dict__["_hyps"] = store
            hyps = self._gathered_hypotheses()
            metric = sacrebleu.metrics.BLEU(tokenize=self.hparams.sacrebleu_tokenize)
            score = metric.corpus_score([h for _, h in hyps], [[refs[i] for i, _ in hyps]])
            self.log("test/sacrebleu_" + "_".join(v for v in VIEWS if v in vs), float(score.score))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        hyps = self.generate(batch)
        store = self.__dict__.setdefault("_hyps", {})
        for i, tokens in zip(batch["id"].tolist(), hyps):
            store[int(i)] = tokens
        return [{"id": int(i), "hypothesis": self.tokenizer.decode(t)} for i, t in zip(batch["id"].tolist(), hyps)]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer_fingerprint"] = self.tokenizer.fingerprint
        checkpoint["speech_fusion_best"] = list(self._best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another target vocabulary than the current tokenizer's."""
        self._best = tuple(checkpoint.get("speech_fusion_best", (-1.0, -1)))  # type: ignore[assignment]
        saved = checkpoint.get("tokenizer_fingerprint")
        if self.tokenizer is not None and saved is not None and saved != self.tokenizer.fingerprint:
            raise ValueError(
                f"the tokenizer does not match the checkpoint (fingerprint {saved} vs {self.tokenizer.fingerprint}); "
                "point data.init_args.spm_model at the model the checkpoint was trained with"
            )
