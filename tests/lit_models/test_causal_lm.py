"""CausalLMFineTune on llama-tiny: the loss by hand, adapter-only training (LoRA, QLoRA), gradient accumulation
equivalence, adapter-only checkpoints, generation-based scoring and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_models.causal_lm import CausalLMFineTune


def _batch(lengths: list[int], prompt: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch; the first ``prompt`` tokens of each row are prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 5000, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, prompt:n] = ids[i, prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "max_steps": 2, "default_root_dir": tmp_path,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def test_loss_is_the_summed_cross_entropy_of_response_tokens() -> None:
    model = CausalLMFineTune(model="llama-tiny")
    batch = _batch([7, 5], prompt=3)
    loss, ntokens = model._loss_sum(batch)
    assert ntokens == (7 - 3) + (5 - 3)
    with torch.no_grad():
        logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = 0.0
    for i, n in enumerate([7, 5]):
        for t in range(3, n):  # token t is predicted from position t - 1
            expected -= F.log_softmax(logits[i, t - 1].double(), -1)[batch["input_ids"][i, t]].item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapter_modes_train_only_adapters(mode: str, tmp_path: Path) -> None:
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    model = CausalLMFineTune(model="llama-tiny", mode=mode, lr=1e-2, warmup_ratio=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batches = [_batch([9, 6], prompt=2, seed=s) for s in range(2)]
    _trainer(tmp_path).fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    after = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n], p), n
    changed = [n for n, p in trainable.items() if not torch.equal(after[n], p)]
    assert len(changed) == len(trainable)


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """Batch 4 x 1 and 2 x 2 micro-batches with different token counts give the same update (token-level mean)."""
    big = _batch([9, 4, 7, 5], prompt=2, seed=3)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    results = []
    for data, accumulate in (([big], 1), (halves, 2)):
        L.seed_everything(0)
        model = CausalLMFineTune(model="llama-tiny")
        # SGD with lr 1 makes the update equal to the normalised gradient (Adam's first step is ~sign(g)).
        model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=1.0)
        trainer = _trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate)
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_adapter_checkpoint_holds_only_adapters_and_restores_them(tmp_path: Path) -> None:
    model = CausalLMFineTune(model="llama-tiny", mode="lora", lr=1e-2, warmup_ratio=0.0)
    trainer = _trainer(tmp_path)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([_batch([6, 6], 2)], batch_size=None))
    path = tmp_path / "adapters.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert set(ckpt["state_dict"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    restored = CausalLMFineTune.load_from_checkpoint(path)
    ids = torch.tensor([[1, 504, 3575, 282]])
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(ids), model.eval()(ids))


class _EvalData(L.LightningDataModule):
    def __init__(self, metas: list[dict[str, Any]]) -> None:
        super().__init__()
        self.metas = metas

    def test_dataloader(self) -> Any:
        ids = torch.tensor([[2, 2, 1, 504], [1, 504, 3575, 282]])
        batches = [
            {"input_ids": ids[: len(chunk)], "attention_mask": ids[: len(chunk)].ne(2).long(), "meta": chunk}
            for chunk in (self.metas[i : i + 2] for i in range(0, len(self.metas), 2))
        ]
        return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _run_test(tmp_path: Path, model: CausalLMFineTune, metas: list[dict[str, Any]], outputs: list[str]) -> dict:
    it = iter(outputs)
    model.generate_text = lambda input_ids, attention_mask: [next(it) for _ in range(input_ids.size(0))]
    trainer = _trainer(tmp_path)
    (metrics,) = trainer.test(model, datamodule=_EvalData(metas), verbose=False)
    return metrics


def test_math_scoring_per_language_and_predictions_file(tmp_path: Path) -> None:
    metas = [
        {"id": "1-en", "lang": "en", "answer": "1600", "prompt": "q"},
        {"id": "2-en", "lang": "en", "answer": "12", "prompt": "q"},
        {"id": "1-de", "lang": "de", "answer": "10", "prompt": "q"},
        {"id": "2-de", "lang": "de", "answer": "-3", "prompt": "q"},
    ]
    outputs = ["So the total is $1,600.", "I cannot tell.", "Also 10 %", "Das sind 5 Äpfel."]
    model = CausalLMFineTune(model="llama-tiny", eval_task="math")
    metrics = _run_test(tmp_path, model, metas, outputs)
    assert metrics["test/acc_en"] == 0.5 and metrics["test/acc_de"] == 0.5 and metrics["test/acc_avg"] == 0.5
    assert metrics["test/no_answer_en"] == 0.5 and metrics["test/no_answer_de"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert rows[0]["output"] == outputs[0] and rows[0]["pred"] == 1600.0


def test_translation_scoring_uses_sacrebleu(tmp_path: Path) -> None:
    import sacrebleu

    metas = [
        {"id": "a", "lang": "en-de", "references": ["Am Anfang schuf Gott den Himmel und die Erde."]},
        {"id": "b", "lang": "en-de", "response": "Und die Erde war wüst und leer."},
    ]
    outputs = ["Am Anfang schuf Gott den Himmel und die Erde.", "Und die Erde war leer."]
    metrics = _run_test(tmp_path, CausalLMFineTune(model="llama-tiny", eval_task="translation"), metas, outputs)
    refs = [[metas[0]["references"][0], metas[1]["response"]]]
    assert metrics["test/sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, refs).score, abs=1e-4)
    assert metrics["test/chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, refs).score, abs=1e-4)


def test_generation_decodes_only_new_tokens_from_left_padded_prompts() -> None:
    model = CausalLMFineTune(model="llama-tiny", max_new_tokens=4)
    tok = model.tokenizer
    prompts = ["Hello there, how are you today?", "Hi"]
    left = tok.__class__.from_pretrained(tok.name_or_path, padding_side="left")
    enc = left(prompts, return_tensors="pt", padding=True)
    batched = model.generate_text(enc.input_ids, enc.attention_mask)
    single = []
    for p in prompts:
        one = left([p], return_tensors="pt")
        single.append(model.generate_text(one.input_ids, one.attention_mask))
    assert batched == [s[0] for s in single]  # left padding does not change greedy outputs


def test_errors_name_the_config_key() -> None:
    from lit_models.hf import load_tokenizer

    with pytest.raises(ValueError, match=r"lora_target_modules: \['nope'\] match no module"):
        CausalLMFineTune(model="llama-tiny", mode="lora", lora_target_modules=["q_proj", "nope"])
    with pytest.raises(ValueError, match="does not fit the model"):
        CausalLMFineTune(
            model="llama-tiny", tokenizer=load_tokenizer("smollm2-135m"), model_config_overrides={"vocab_size": 128}
        )
    with pytest.raises(ValueError, match="lora_r must be positive"):
        CausalLMFineTune(model="llama-tiny", mode="lora", lora_r=0)


def test_adamw_8bit_steps(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = CausalLMFineTune(model="llama-tiny", optimizer="adamw_8bit", lr=1e-2, warmup_ratio=0.0)
    before = model.model.lm_head.weight.detach().clone()
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([_batch([6, 6], 2)], batch_size=None))
    assert isinstance(trainer.optimizers[0], bnb.optim.AdamW8bit)
    assert not torch.equal(before, model.model.lm_head.weight)


def test_unscorable_gold_fails_on_the_first_batch(tmp_path: Path) -> None:
    metas = [{"id": "0013-es", "lang": "es", "answer": "{w*r+x-w*n}"}, {"id": "x", "lang": "es", "answer": "3"}]
    model = CausalLMFineTune(model="llama-tiny", eval_task="math")
    calls = []
    model.generate_text = lambda input_ids, attention_mask: calls.append(1) or ["1"] * input_ids.size(0)
    with pytest.raises(ValueError, match=r"test record '0013-es': eval_task=math needs a numeric 'answer'"):
        _trainer(tmp_path).test(model, datamodule=_EvalData(metas), verbose=False)
    assert not calls  # nothing was generated before the error
