"""train.py end to end for every speech_fusion config: 2 steps on a tiny generated MuST-C tree with a tiny random
Wav2Vec2 as the SSL encoder (spec section 10, check 10), exact-stage resume, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_models.cli import main
from lit_models.nn.ssl_encoders import save_tiny_ssl_model
from tests.datamodules.test_mustc import make_tiny_mustc
from tests.run_logs import metric, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "speech_fusion").glob("*.yaml"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny MuST-C tree, tiny random Wav2Vec2, and k-means units fitted on it (for the discrete config)."""
    from scripts.fit_ssl_kmeans import fit_kmeans

    base = tmp_path_factory.mktemp("speech")
    tree = make_tiny_mustc(base / "mustc")
    enc = save_tiny_ssl_model(base / "w2v", "wav2vec2")
    km = base / "km8.pt"
    fit_kmeans(str(tree), str(km), num_units=8, ssl_encoder="hf", ssl_path=str(enc), ssl_layer=1,
               cache_dir=str(base / "cache"))
    return {"tree": tree, "enc": enc, "km": km, "cache": base / "cache"}


def tiny_args(config: Path, assets: dict[str, Path], run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(run_dir), "name": "logs"}}]
    discrete = "ssl_type: discrete" in config.read_text()
    args = [
        "--config", str(config),
        "--data.init_args.demo", "null",
        "--data.init_args.root", str(assets["tree"]),
        "--data.init_args.ssl_encoder", "hf",
        "--data.init_args.ssl_path", str(assets["enc"]),
        "--data.init_args.ssl_layer", "1",
        "--data.init_args.cache_dir", str(assets["cache"]),
        "--data.init_args.vocab_size", "40",
        "--data.init_args.max_tokens", "400",
        "--data.init_args.num_workers", "0",
        "--model.init_args.d_model", "16",
        "--model.init_args.n_heads", "2",
        "--model.init_args.ffn_dim", "32",
        "--model.init_args.acoustic_layers", "2",
        "--model.init_args.decoder_layers", "1",
        "--model.init_args.conv_channels", "16",
        "--model.init_args.gate_hidden", "8",
        "--model.init_args.ssl_dim", "32",
        "--model.init_args.beam_size", "2",
        "--model.init_args.val_beam_size", "1",
        "--model.init_args.max_len_b", "4",
        "--model.init_args.warmup_steps", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "32-true",
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", "1",
        "--checkpoint.save_top_k", "-1",
        "--checkpoint.monitor", "null",
    ]
    if discrete:
        args += ["--data.init_args.kmeans_path", str(assets["km"]), "--model.init_args.num_units", "8"]
    return [*args, *extra]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_speech_config_fits_two_steps(config: Path, assets: dict[str, Path], tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(config, assets, tmp_path)])
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/sacrebleu", "test/sacrebleu"):
        assert metric(rows, key) >= 0.0
    assert 0.0 <= metric(rows, "val/sacrebleu") <= 100.0
    fusion = cli.model.hparams.fusion
    hyps = list((tmp_path / "logs").glob("version_*/hypotheses.test.txt"))
    assert hyps and len(hyps[0].read_text().splitlines()) == 2  # tst-COMMON has 2 segments
    if fusion == "gated":
        # gate values, dropout stage and gradient cosine are logged; alpha_fbank + alpha_ssl + alpha_bias <= 1 each
        a = [metric(rows, f"gate/alpha_{v}") for v in ("fbank", "ssl", "bias")]
        assert all(0.0 < x < 1.0 for x in a)
        assert metric(rows, "dropout/stage") == 0.0
        cos = metric(rows, "train/grad_cos_fbank_ssl")
        assert -1.0 <= cos <= 1.0
        for v in ("fbank_ssl", "fbank", "ssl"):
            assert 0.0 <= metric(rows, f"test/sacrebleu_{v}") <= 100.0
        if config.stem == "mustc_en_de":  # k-means units (discrete SSL view) reach the model's unit embedding
            batch = next(iter(cli.datamodule.val_dataloader()))
            assert batch["ssl"].dtype == torch.long and 0 <= int(batch["ssl"].min()) <= int(batch["ssl"].max()) < 8
            assert cli.model.ssl_frontend.embed.num_embeddings == 8
    else:
        assert not any(k.startswith("gate/") for k in rows[0])
        assert fusion in ("fbank", "ssl")
        # a single-view baseline has no parameters for the other view
        other = "ssl_frontend" if fusion == "fbank" else "fbank_frontend"
        assert getattr(cli.model, other) is None


def test_resume_continues_the_dropout_stage(assets: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/speech_fusion/demo_en_de.yaml"
    base = ["--test_after_fit", "false"]
    cli = main(["fit", *tiny_args(config, assets, tmp_path, *base, steps=2)])
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "MultiStageDropout")
    assert cb.stage == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("MultiStageDropout"))
    assert state["stage"] == 0 and state["boundaries"] == [4, 10]
    # resuming with --ckpt_path last runs the remaining steps from the saved position
    cli2 = main(["fit", *tiny_args(config, assets, tmp_path, *base, "--ckpt_path", "last", steps=3)])
    assert cli2.trainer.global_step == 3
    # test on the checkpoint: decoding settings (EVAL_TIME_HPARAMS) come from the command line, not the checkpoint
    cli3 = main(["test", *tiny_args(config, assets, tmp_path / "t"), "--ckpt_path",
                 str(tmp_path / "checkpoints" / "last.ckpt"), "--model.init_args.test_view_sets", "[[fbank]]"])
    metrics = cli3.trainer.callback_metrics
    assert "test/sacrebleu_fbank" in metrics and "test/sacrebleu_ssl" not in metrics
    assert cli3.model.hparams.test_view_sets == [["fbank"]] and cli3.model.hparams.fusion == "gated"


def test_gated_fusion_with_one_view_is_an_error(assets: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/speech_fusion/demo_en_de.yaml"
    with pytest.raises(ValueError, match="fusion='gated' needs the 'ssl' view"):
        main(["fit", *tiny_args(config, assets, tmp_path, "--data.init_args.views", "[fbank]")])


def test_ssl_dim_mismatch_is_an_error(assets: dict[str, Path], tmp_path: Path) -> None:
    config = ROOT / "configs/speech_fusion/demo_en_de.yaml"
    with pytest.raises(ValueError, match=r"model.init_args.ssl_dim=384 but the SSL encoder gives 32-dim"):
        main(["fit", *tiny_args(config, assets, tmp_path, "--model.init_args.ssl_dim", "384")])


@pytest.mark.parametrize("fusion", ["gated", "concat", "fbank", "ssl"])
def test_model_ignores_an_absent_view_exactly(fusion: str) -> None:
    """A view that is absent (single-view baselines, or ``views`` of the conflict probe / test view sets) has no
    influence on the output: replacing its features leaves the logits bit-identical."""
    from lit_models.speech_fusion import SpeechFusionST

    torch.manual_seed(0)
    model = SpeechFusionST(vocab_size=20, pad_id=0, bos_id=2, eos_id=3, fusion=fusion, d_model=16, n_heads=2,
                           ffn_dim=32, acoustic_layers=1, decoder_layers=1, conv_channels=16, ssl_dim=8,
                           gate_hidden=8, max_len_b=6).eval()
    batch = {"fbank": torch.randn(2, 40, 80), "fbank_lengths": torch.tensor([40, 31]),
             "ssl": torch.randn(2, 20, 8), "ssl_lengths": torch.tensor([20, 16]),
             "prev_output_tokens": torch.tensor([[2, 5, 6], [2, 7, 0]]), "target": torch.tensor([[5, 6, 3], [7, 3, 0]]),
             "id": torch.arange(2)}
    other_ssl = {**batch, "ssl": torch.randn(2, 20, 8)}
    other_fbank = {**batch, "fbank": torch.randn(2, 40, 80)}
    with torch.no_grad():
        if fusion in ("gated", "concat", "fbank"):
            views = {"fbank"} if fusion != "fbank" else None
            assert torch.equal(model(batch, views), model(other_ssl, views))
        if fusion in ("gated", "concat", "ssl"):
            views = {"ssl"} if fusion != "ssl" else None
            assert torch.equal(model(batch, views), model(other_fbank, views))
        if fusion in ("gated", "concat"):
            assert not torch.equal(model(batch), model(other_ssl))
        loss = model.loss_on(batch, set(model.views()))
        assert torch.isfinite(loss) and loss > 0
        hyps = model.generate(batch, beam=2)
        assert len(hyps) == 2 and all(len(h) <= model.hparams.max_len_b for h in hyps)


def test_ctc_on_the_acoustic_encoder(assets: dict[str, Path], tmp_path: Path) -> None:
    """The figure's stack: acoustic layers + CTC on the English transcript, then textual layers (spec 3.4)."""
    config = ROOT / "configs/speech_fusion/demo_en_de.yaml"
    cli = main(["fit", *tiny_args(config, assets, tmp_path, "--test_after_fit", "false", "--model.init_args.ctc_weight",
                                  "0.3", "--model.init_args.textual_layers", "1", "--model.init_args.source_vocab_size",
                                  "64", "--data.init_args.source_vocab_size", "40", steps=1)])
    rows = read_metrics(tmp_path)
    assert metric(rows, "train/ctc_loss") > 0
    for group in ("textual", "ctc", "acoustic.1"):
        assert -1.0 <= metric(rows, f"train/grad_cos_fbank_ssl/{group}") <= 1.0
    model, dm = cli.model.eval(), cli.datamodule
    batch = next(iter(dm.val_dataloader()))
    src_tok = dm.source_tokenizer
    assert [row[:n].tolist() for row, n in zip(batch["src_tokens"], batch["src_lengths"])] == [
        src_tok.encode(dm.sources("validation")[i]) for i in batch["id"].tolist()]
    with torch.no_grad():
        enc = model.encode(batch)
        lp = torch.log_softmax(model.ctc_proj(model.model.encoder.acoustic_out), -1).transpose(0, 1)
        direct = torch.nn.functional.ctc_loss(lp, batch["src_tokens"], (~enc.pad_mask).sum(1), batch["src_lengths"],
                                              blank=0, reduction="sum", zero_infinity=True)
        assert torch.allclose(model.ctc_loss(batch, enc), direct, rtol=1e-5)
        del batch["src_tokens"]
        with pytest.raises(ValueError, match="set data.init_args.source_vocab_size"):
            model.ctc_loss(batch, enc)


def test_unit_count_must_match_the_kmeans_file(assets: dict[str, Path], tmp_path: Path) -> None:
    """A model with more (or fewer) unit embeddings than the k-means file has units is a config error."""
    config = ROOT / "configs/speech_fusion/mustc_en_de.yaml"
    with pytest.raises(ValueError, match="num_units=16 but the k-means file has 8 units"):
        main(["fit", *tiny_args(config, assets, tmp_path, "--model.init_args.num_units", "16")])
