"""GradientConflictMonitor: exact cosines on a 2-parameter toy (+1, -1, 0), nothing touched by the probe, probe size,
and the logged keys inside a Trainer run (spec section 10, check 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from callbacks.gradient_conflict import GradientConflictMonitor, group_cosines, probe_batch


class Toy(L.LightningModule):
    """L_fbank = w . theta, L_ssl = u . theta (+ a dropout that would change the loss in train mode)."""

    def __init__(self, w: list[float], u: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -1.5]))
        self.other = nn.Parameter(torch.tensor([1.0]))  # a "front-end" parameter: not shared, not measured
        self.w, self.u = torch.tensor(w), torch.tensor(u)
        self.drop = nn.Dropout(0.5)

    def views(self) -> list[str]:
        return ["fbank", "ssl"]

    def shared_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"theta": [self.theta]}

    def loss_on(self, batch: Any, views: set[str]) -> torch.Tensor:
        assert not self.training, "the probe must run in eval mode"
        vec = self.w if views == {"fbank"} else self.u
        return (self.drop(torch.ones(2)) * vec * self.theta).sum() + 0 * self.other.sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_on_train(batch)

    def loss_on_train(self, batch: Any) -> torch.Tensor:
        return ((self.w + self.u) * self.theta).sum() * self.other.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = {"fbank_lengths": torch.tensor([10, 20, 30, 40])}
        return torch.utils.data.DataLoader([data] * 3, batch_size=None)


@pytest.mark.parametrize(("u", "expected"), [([2.0, 4.0], 1.0), ([-1.0, -2.0], -1.0), ([2.0, -1.0], 0.0)])
def test_cosine_equals_direct_computation_and_touches_nothing(u: list[float], expected: float) -> None:
    w = [1.0, 2.0]
    model = Toy(w, u)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.loss_on_train(None).backward()
    opt.step()  # optimizer state exists
    before = ([p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()],
              {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
               for k, v in opt.state_dict()["state"].items()}, torch.get_rng_state())
    res = GradientConflictMonitor(every_n_steps=1).measure(model, {"fbank_lengths": torch.tensor([5])})
    wt, ut = torch.tensor(w), torch.tensor(u)
    direct = float(wt.dot(ut) / (wt.norm() * ut.norm()))
    assert res["theta"] == pytest.approx(expected, abs=1e-6) and res["all"] == pytest.approx(direct, abs=1e-6)
    assert res["norm_ratio"] == pytest.approx(float(ut.norm() / wt.norm()), rel=1e-6)
    assert model.training and model.drop.training
    for a, b in zip(before[0], model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(before[1], model.parameters()):
        assert torch.equal(a, b.grad)
    after = opt.state_dict()["state"]
    for k, v in before[2].items():
        for kk, vv in v.items():
            assert torch.equal(torch.as_tensor(vv), torch.as_tensor(after[k][kk]))
    assert torch.equal(before[3], torch.get_rng_state())


def test_probe_takes_leading_utterances_within_the_frame_fraction() -> None:
    batch = {"fbank_lengths": torch.tensor([30, 20, 40, 10]), "target_lengths": torch.tensor([3, 4, 5, 6]),
             "ntokens": 18, "id": torch.arange(4)}
    probe = probe_batch(batch, 0.5)  # 50 of 100 frames: the first two utterances
    assert probe["id"].tolist() == [0, 1] and probe["ntokens"] == 7
    assert probe_batch({"fbank_lengths": torch.tensor([90, 10])}, 0.5)["fbank_lengths"].tolist() == [90]


def test_unused_parameters_count_as_zero_gradients() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    res = group_cosines([torch.tensor([1.0, 0.0]), None], [torch.tensor([1.0, 0.0]), torch.ones(3)], [a, b],
                        {"a": [a], "b": [b]})
    assert res["a"] == pytest.approx(1.0) and res["b"] == 0.0 and res["all"] == pytest.approx(0.5)


def test_monitor_logs_inside_a_trainer_run(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    model = Toy([1.0, 2.0], [-1.0, -2.0])
    cb = GradientConflictMonitor(every_n_steps=2)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=3, callbacks=[cb],
                        logger=CSVLogger(tmp_path), log_every_n_steps=50, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model)
    assert cb.last["theta"] == pytest.approx(-1.0)
    # measured after steps 1 and 3 (every 2 from the first) and written at those steps despite log_every_n_steps=50
    import csv

    with open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    logged = [(int(r["step"]), float(r["train/grad_cos_fbank_ssl"])) for r in rows if r.get("train/grad_cos_fbank_ssl")]
    assert logged == [(1, pytest.approx(-1.0)), (3, pytest.approx(-1.0))]
    assert trainer.callback_metrics["train/grad_cos_fbank_ssl"] == pytest.approx(-1.0)
    assert trainer.callback_metrics["train/grad_cos_fbank_ssl/theta"] == pytest.approx(-1.0)
    assert trainer.callback_metrics["train/grad_cos_neg_frac"] == 1.0


def test_single_view_model_disables_the_monitor() -> None:
    class One(Toy):
        def views(self) -> list[str]:
            return ["fbank"]

    cb = GradientConflictMonitor()
    with pytest.warns(UserWarning, match="GradientConflictMonitor disabled"):
        cb.on_fit_start(None, One([1.0, 0.0], [0.0, 1.0]))  # type: ignore[arg-type]
    assert not cb.enabled
    with pytest.raises(ValueError, match="max_frame_fraction must be in"):
        GradientConflictMonitor(max_frame_fraction=0.0)
