"""MultiStageDropout: stage boundaries by epoch and step, realised drop fractions, resume in the right stage, and
config validation (spec section 10, check 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.multi_stage_dropout import MultiStageDropout
from lit_models.nn.fusion_gate import ViewDropout

STAGES = [
    {"p_drop_ssl": 0.0, "p_drop_fbank": 0.0},
    {"p_drop_ssl": 0.3, "p_feat_ssl": 0.1},
    {"p_drop_ssl": 0.15, "p_drop_fbank": 0.15, "p_feat_ssl": 0.1, "p_feat_fbank": 0.1},
]


class ToyViews(L.LightningModule):
    """Implements the view-dropout protocol with a real :class:`ViewDropout` and records the stage per step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.vd = ViewDropout()
        self.seen: list[tuple[int, int, float, float]] = []

    def set_view_dropout(self, p_drop: dict[str, float], p_feat: dict[str, float]) -> None:
        self.vd.set(p_drop, p_feat)

    def view_dropout_stats(self) -> dict[str, float]:
        return dict(self.vd.last_dropped)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.vd.train()
        self.vd.drop_views(torch.ones(64, 2, dtype=torch.bool))
        self.seen.append((self.current_epoch, self.global_step, self.vd.p_drop["ssl"], self.vd.p_drop["fbank"]))
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)


def _trainer(tmp_path: Path, cb: MultiStageDropout, **kw: Any) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", callbacks=[cb], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_stages_switch_at_epoch_boundaries_and_resume(tmp_path: Path) -> None:
    cb = MultiStageDropout(unit="epoch", boundaries=[2, 4], stages=STAGES)
    assert [cb.stage_at(e) for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    model = ToyViews()
    trainer = _trainer(tmp_path / "a", cb, max_epochs=4)
    trainer.fit(model)
    expected = {0: 0.0, 1: 0.0, 2: 0.3, 3: 0.3}
    assert [(e, p) for e, _, p, _ in model.seen] == [(e, expected[e]) for e in (0, 0, 1, 1, 2, 2, 3, 3)]
    # resume from the checkpoint written at the end of epoch 3 (stage 1): continues in stage 1 -> 2 at epoch 4
    ckpt = tmp_path / "e3.ckpt"
    cb_mid = MultiStageDropout(unit="epoch", boundaries=[2, 4], stages=STAGES)
    trainer_mid = _trainer(tmp_path / "b", cb_mid, max_epochs=3)
    trainer_mid.fit(ToyViews())
    trainer_mid.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if k.startswith("MultiStageDropout"))
    assert state == {"stage": 1, "boundaries": [2, 4], "unit": "epoch"}
    cb2 = MultiStageDropout(unit="epoch", boundaries=[2, 4], stages=STAGES)
    resumed = ToyViews()
    _trainer(tmp_path / "c", cb2, max_epochs=5).fit(resumed, ckpt_path=ckpt)
    assert [(e, p_s, p_f) for e, _, p_s, p_f in resumed.seen] == [(3, 0.3, 0.0), (3, 0.3, 0.0), (4, 0.15, 0.15),
                                                                   (4, 0.15, 0.15)]


def test_stages_by_step(tmp_path: Path) -> None:
    cb = MultiStageDropout(unit="step", boundaries=[1, 3], stages=STAGES)
    model = ToyViews()
    _trainer(tmp_path, cb, max_steps=5).fit(model)
    assert [(s, p) for _, s, p, _ in model.seen] == [(0, 0.0), (1, 0.3), (2, 0.3), (3, 0.15), (4, 0.15)]


def test_realised_fractions_match_probabilities() -> None:
    vd = ViewDropout()
    vd.set({"ssl": 0.15, "fbank": 0.15}, {})
    vd.train()
    torch.manual_seed(0)
    present = vd.drop_views(torch.ones(10_000, 2, dtype=torch.bool))
    assert abs(vd.last_dropped["ssl"] - 0.15) < 0.02 and abs(vd.last_dropped["fbank"] - 0.15) < 0.02
    assert int((~present).all(dim=1).sum()) == 0
    assert vd.last_dropped["ssl"] == int((~present[:, 1]).sum()) / 10_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boundaries": [2], "stages": STAGES}, r"len\(stages\)=3 must be len\(boundaries\)\+1=2"),
        ({"boundaries": [4, 2], "stages": STAGES}, "strictly increasing"),
        ({"boundaries": [2, 4], "stages": [{}, {"p_drop_ssl": 1.2}, {}]}, r"stages\[1\].p_drop_ssl must be in"),
        ({"boundaries": [2, 4], "stages": [{}, {}, {"p_drop_ssl": 0.6, "p_drop_fbank": 0.5}]},
         r"stages\[2\]: p_drop_ssl \+ p_drop_fbank must be <= 1"),
        ({"boundaries": [2, 4], "stages": [{}, {"p_drop_audio": 0.1}, {}]}, r"unknown key\(s\) \['p_drop_audio'\]"),
    ],
)
def test_invalid_schedules_name_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiStageDropout(**kwargs)
