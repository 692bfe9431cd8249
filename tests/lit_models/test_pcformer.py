"""PCformerTranslation: loss, schedule, token-normalised gradient accumulation and configuration errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_models.pcformer import PCformerTranslation
from lit_models.seq2seq_eval import inverse_sqrt_lambda, label_smoothed_nll_loss

PAD, BOS, EOS, V = 0, 2, 3, 40


def make_module(cls: type[PCformerTranslation] = PCformerTranslation, **kw) -> PCformerTranslation:
    args = dict(
        vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, d_model=32, ffn_dim=64, n_heads=4, encoder_layers=2,
        decoder_layers=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, warmup_steps=0, lr=1e-3,
    )
    args.update(kw)
    return cls(**args)


def collate(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    s, t = max(len(p[0]) for p in pairs) + 1, max(len(p[1]) for p in pairs) + 1
    src = torch.full((len(pairs), s), PAD)
    prev = torch.full((len(pairs), t), PAD)
    tgt = torch.full((len(pairs), t), PAD)
    for i, (a, b) in enumerate(pairs):
        src[i, : len(a) + 1] = torch.tensor(a + [EOS])
        prev[i, : len(b) + 1] = torch.tensor([BOS] + b)
        tgt[i, : len(b) + 1] = torch.tensor(b + [EOS])
    return {"src_tokens": src, "prev_output_tokens": prev, "target": tgt, "id": torch.arange(len(pairs))}


def test_label_smoothed_loss_matches_pytorch_and_fairseq_form() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, V), torch.randint(4, V, (2, 5))
    target[1, 3:] = PAD
    loss, nll = label_smoothed_nll_loss(logits, target, 0.1, ignore_index=PAD)
    ref = F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    ref_nll = F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=PAD, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, ref_nll)


def test_inverse_sqrt_schedule() -> None:
    f = inverse_sqrt_lambda(1e-3, warmup_steps=4, warmup_init_lr=1e-7)
    assert f(0) * 1e-3 == pytest.approx(1e-7)
    assert f(2) * 1e-3 == pytest.approx(1e-7 + 2 * (1e-3 - 1e-7) / 4)
    assert f(4) == pytest.approx(1.0) and f(16) == pytest.approx(0.5)


class _RecordGrads(PCformerTranslation):
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.recorded = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def _one_update(batches: list[dict[str, torch.Tensor]], accumulate: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = make_module(_RecordGrads)
    trainer = L.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return model.recorded


def test_gradient_accumulation_equals_one_big_batch() -> None:
    """Batch 8 x 1 == batch 4 x 2 on the same sentences (unequal token counts): gradients per target token."""
    g = torch.Generator().manual_seed(1)
    pairs = [
        (torch.randint(4, V, (int(n),), generator=g).tolist(), torch.randint(4, V, (int(m),), generator=g).tolist())
        for n, m in zip(torch.randint(2, 9, (8,), generator=g), torch.randint(1, 12, (8,), generator=g))
    ]
    big = _one_update([collate(pairs)], accumulate=1)
    small = _one_update([collate(pairs[:4]), collate(pairs[4:])], accumulate=2)
    assert big.keys() == small.keys()
    for k in big:
        torch.testing.assert_close(big[k], small[k], rtol=1e-4, atol=1e-6, msg=k)


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="arch=transformer requires order=1, corrector=none"):
        make_module(arch="transformer", order=2, corrector="multistep")
    with pytest.raises(NotImplementedError, match="pc_in_decoder"):
        make_module(pc_in_decoder=True)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        make_module(beam_size=0)
    with pytest.raises(ValueError, match="order must be 1, 2 or 4, got 3"):
        make_module(order=3)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PCformerTranslation()


def test_vanilla_and_pcformer_parameter_difference_is_the_pc_overhead() -> None:
    """pcformer - transformer = |alpha| + 2(L+1)^2 + 4 L d (spec check 5), through the LightningModule."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    pc = make_module(d_model=64, ffn_dim=128, encoder_layers=3)
    vanilla = make_module(d_model=64, ffn_dim=128, encoder_layers=3, arch="transformer", order=1, corrector="none")
    assert n(pc) - n(vanilla) == 801
