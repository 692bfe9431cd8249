"""LatentPreferenceAlignment on the tiny random Llama: spec 10's acceptance checks (zero init, isolation, no LLM
compute in Latent DPO, contrastive and G-Skip sanity, direction on a toy task), LoRA-DPO's start at log 2, generation
with a latent prefix against a full re-forward, checkpoints without the LM, and the required errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules.preference import PreferenceDataModule
from lit_models.latent_preference import LatentPreferenceAlignment
from lit_models.nn.latent_preference import CallCounter

TINY = {"model": "llama-tiny"}
ROWS = [
    {"prompt": f"What is {a} + {a}?", "chosen": f"Das ist {2 * a}. #### {2 * a}", "rejected": f"It is {2 * a}. #### {2 * a}",
     "user": "u"}
    for a in range(1, 9)
]


@pytest.fixture(scope="module")
def dm(tmp_path_factory: pytest.TempPathFactory) -> PreferenceDataModule:
    path = tmp_path_factory.mktemp("lp") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    data = PreferenceDataModule(tokenizer="llama-tiny", train_path=str(path), val_path=str(path), batch_size=4,
                                eval_batch_size=4)
    data.setup("fit")
    return data


def _batch(dm: PreferenceDataModule, n: int = 4) -> dict:
    return next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=n,
                                                 collate_fn=dm.train_dataloader().collate_fn)))


@pytest.fixture(scope="module")
def clap_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLaP checkpoint (as Lightning writes it, through on_save_checkpoint) with a non-trivial posterior head and
    adapter, so that chosen and rejected responses get different posteriors."""
    torch.manual_seed(0)
    clap = LatentPreferenceAlignment(stage="clap", **TINY)
    with torch.no_grad():
        nn.init.normal_(clap.posterior.h2z[-1].weight, std=0.02)  # posteriors apart, r(z) ~ 0.5 at the start
        for mlp in clap.adapter.mlps:
            nn.init.normal_(mlp[-1].weight, std=0.5)
    ckpt = {"state_dict": clap.state_dict(), "hyper_parameters": dict(clap.hparams)}
    clap.on_save_checkpoint(ckpt)
    assert ckpt["litlab_latent_without_lm"] and not any(k.startswith("model.") for k in ckpt["state_dict"])
    assert "posterior.backbone.embed_tokens.weight" not in ckpt["state_dict"]  # the shared frozen embedding
    path = tmp_path_factory.mktemp("clap") / "clap.ckpt"
    torch.save(ckpt, path)
    return path


def _ldpo(clap_ckpt: Path, **kw: object) -> LatentPreferenceAlignment:
    return LatentPreferenceAlignment(stage="latent_dpo", clap_ckpt=str(clap_ckpt), **TINY, **kw)


def test_zero_init_prior_and_first_loss_is_log2(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    m = _ldpo(clap_ckpt)
    b = _batch(dm)
    mu, s = m.prior(b["prompt_ids"], b["prompt_mask"])
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(s, torch.zeros_like(s))
    out = m._latent_dpo(b)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    # posterior loaded from the checkpoint (not re-initialised): chosen and rejected latents differ
    mw, _ = m.posterior(b["chosen_input_ids"], b["chosen_attention_mask"])
    ml, _ = m.posterior(b["rejected_input_ids"], b["rejected_attention_mask"])
    assert (mw - ml).abs().max().item() > 1e-3
    assert 0 < out["ldpo/kept_pairs"].item() <= 48 * 47


def test_latent_dpo_isolation_and_no_llm_calls(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    import lightning as L

    m = _ldpo(clap_ckpt, lr=1e-2)
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("prior.")
              or k.endswith("embed_tokens.weight")}
    prior0 = {k: v.clone() for k, v in m.prior.state_dict().items()}
    b = _batch(dm)
    with CallCounter(m._lm_blocks()) as counter:
        loss = m.training_step(b, 0) if m._trainer is not None else m._latent_dpo(b)["loss"]
        loss.backward()
    assert counter.count == 0  # neither the LM nor any of its decoder blocks ran
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("prior.") for n in with_grad)
    m.zero_grad(set_to_none=True)
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(m, datamodule=dm)
    assert m.user_time["time/steps"] == 5 and m.user_time["time/llm_block_calls_per_step"] == 0
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # LM, adapter, posterior bit-identical
    assert any(not torch.equal(m.prior.state_dict()[k], v) for k, v in prior0.items())
    # the counter does see the LLM when it runs: sequence-level validation metrics call it
    with CallCounter(m._lm_blocks()) as counter, torch.no_grad():
        m._sequence_dpo(b)
    assert counter.count > 0


def test_llm_call_in_latent_dpo_step_is_an_error(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    import lightning as L

    m = _ldpo(clap_ckpt)
    original = m._latent_dpo

    def leaking(batch: dict, expected_reward: bool = False) -> dict:
        m.model(input_ids=batch["prompt_ids"][:, :2])
        return original(batch, expected_reward)

    m._latent_dpo = leaking  # type: ignore[method-assign]
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    with pytest.raises(RuntimeError, match="latent_dpo: the LLM ran 3 block forward"):
        trainer.fit(m, datamodule=dm)


def test_direction_on_toy_task(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    torch.manual_seed(0)
    m = _ldpo(clap_ckpt)
    b = _batch(dm, 4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    start = m._latent_dpo(b, expected_reward=True)["ldpo/expected_latent_reward"].item()
    for _ in range(60):
        loss = m._latent_dpo(b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = m._latent_dpo(b, expected_reward=True)
    assert end["ldpo/expected_latent_reward"].item() >= start + 0.1
    assert end["rewards/accuracies"].item() > 0.6 and end["loss"].item() < math.log(2)


def test_contrastive_is_log_k_when_the_adapter_ignores_z_and_gskip_carries_gradient(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "responses": ["4", "four", "vier", "quatre"]}) + "\n")
    data = PreferenceDataModule(tokenizer="llama-tiny", train_path=str(path), mode="one2many", group_size=4)
    data.setup("fit")
    b = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    m = LatentPreferenceAlignment(stage="clap", **TINY)
    with torch.no_grad():
        nn.init.normal_(m.posterior.h2z[-1].weight, std=0.3)
        for mlp in m.adapter.mlps:
            for p in mlp.parameters():
                p.zero_()
    out = m._clap_losses(b, contrastive=True)
    assert out["contrastive"].item() == pytest.approx(math.log(4), abs=1e-5)
    # with the adapter blind to z, the reconstruction reaches the posterior only through G-Skip
    grads = torch.autograd.grad(out["rec_nll"], [m.posterior.h2z[-1].weight], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum().item() > 0
    m_no = LatentPreferenceAlignment(stage="clap", use_gskip=False, **TINY)
    m_no.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gskip.")})
    out_no = m_no._clap_losses(b, contrastive=False)
    grad_no = torch.autograd.grad(out_no["rec_nll"], [m_no.posterior.h2z[-1].weight], allow_unused=True)[0]
    assert grad_no is None or grad_no.abs().sum().item() == 0.0
    bad = dict(b, group=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="contrastive loss needs >=2 responses sharing one prompt"):
        m._clap_losses(bad, contrastive=True)


def test_lora_dpo_starts_at_log2_with_reference_equal_to_base(dm: PreferenceDataModule) -> None:
    m = LatentPreferenceAlignment(stage="lora_dpo", **TINY)
    b = _batch(dm)
    out = m._sequence_dpo(b)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards/chosen"].abs().max().item() == 0.0
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert out["logps/chosen"].item() < 0


def test_generation_with_prefix_matches_full_reforward(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    m = _ldpo(clap_ckpt, max_new_tokens=5)
    with torch.no_grad():
        nn.init.normal_(m.prior.h2z[-1].weight, std=0.3)
    m.eval()
    b = _batch(dm, 2)
    ids, mask = b["prompt_ids"], b["prompt_mask"]
    z = m.user_latent(ids, mask)
    assert z.abs().max().item() > 0
    texts = m.generate_with_latent(ids, mask)
    decoder, head = m._decoder_and_head()
    n_p = m.hparams.prefix_len
    for i in range(2):
        seq = ids[i][mask[i].bool()][None]
        for _ in range(5):  # greedy by full re-forward with a fresh prefix cache each time
            pos = (n_p + torch.arange(seq.size(1)))[None]
            with torch.no_grad():
                h = decoder(input_ids=seq, attention_mask=torch.ones(1, n_p + seq.size(1), dtype=torch.long),
                            position_ids=pos, cache=m.adapter(z[i:i + 1], m.model), use_cache=True).last_hidden_state
            seq = torch.cat([seq, head(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
        new = seq[0, int(mask[i].sum()):]
        assert texts[i] == m.tokenizer.decode(new, skip_special_tokens=True)


def test_checkpoint_roundtrip_without_lm(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    m = _ldpo(clap_ckpt)
    with torch.no_grad():
        nn.init.normal_(m.prior.h2z[-1].weight)
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith("model.") for k in ckpt["state_dict"])
    fresh = _ldpo(clap_ckpt)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(fresh.prior.h2z[-1].weight, m.prior.h2z[-1].weight)


def test_required_errors(clap_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clap_ckpt is required for stage latent_dpo"):
        LatentPreferenceAlignment(stage="latent_dpo", **TINY)
    with pytest.raises(FileNotFoundError, match="clap_ckpt: .*missing.ckpt does not exist"):
        LatentPreferenceAlignment(stage="latent_dpo", clap_ckpt=str(tmp_path / "missing.ckpt"), **TINY)
    with pytest.raises(ValueError, match=r"dim_z: checkpoint 32, config 16"):
        LatentPreferenceAlignment(stage="latent_dpo", clap_ckpt=str(clap_ckpt), dim_z=16, **TINY)
    with pytest.raises(ValueError, match=r"stage must be one of \['clap', 'latent_dpo', 'lora_dpo'\]"):
        LatentPreferenceAlignment(stage="sft", **TINY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pair_selection must be one of"):
        LatentPreferenceAlignment(pair_selection="all", **TINY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dim_z \(30\) must be divisible by num_queries \(4\)"):
        LatentPreferenceAlignment(dim_z=30, **TINY)
    with pytest.raises(ValueError, match="beta must be > 0"):
        LatentPreferenceAlignment(beta=0.0, **TINY)
    with pytest.raises(ValueError, match=r"evidence_ratio must be in \(0, 1\]"):
        LatentPreferenceAlignment(evidence_ratio=1.5, **TINY)
    with pytest.raises(ValueError, match="samples_per_source must be >= 2"):
        LatentPreferenceAlignment(samples_per_source=1, **TINY)


def test_expectation_objective_and_response_only_posterior(dm: PreferenceDataModule, clap_ckpt: Path) -> None:
    m = _ldpo(clap_ckpt, ldpo_objective="expectation")
    b = _batch(dm)
    out = m._latent_dpo(b)
    # at pi = N(0, I) the KL term is 0 in expectation per sample: loss = mean(beta * 0 - r(z)) = -E r(z)
    assert -1.0 <= out["loss"].item() <= 0.0
    out["loss"].backward()
    assert m.prior.h2z[-1].weight.grad is not None and m.prior.h2z[-1].weight.grad.abs().sum().item() > 0
    clap = LatentPreferenceAlignment(stage="clap", posterior_reads_prompt=False, **TINY)
    with torch.no_grad():
        nn.init.normal_(clap.posterior.h2z[-1].weight, std=0.3)
    ids, mask, labels = b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_labels"]
    reads = clap._posterior_mask(mask, labels)
    assert torch.equal(reads, labels.ne(-100).long())  # response tokens only
    response = [ids[i][reads[i].bool()] for i in range(2)]
    alone = torch.nn.utils.rnn.pad_sequence(response, batch_first=True, padding_value=2)
    alone_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in response], batch_first=True)
    torch.testing.assert_close(clap.posterior(ids[:2], reads[:2])[0], clap.posterior(alone, alone_mask)[0],
                               rtol=1e-5, atol=1e-5)
