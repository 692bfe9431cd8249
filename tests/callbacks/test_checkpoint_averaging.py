"""CheckpointAveraging: exact element-wise means, integer buffers from the newest, clear errors (spec check 10)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.checkpoint_averaging import CheckpointAveraging, average_state_dicts


def _ckpt(step: int, scale: float) -> dict:
    return {
        "global_step": step,
        "epoch": 0,
        "hyper_parameters": {"d_model": 8},
        "state_dict": {
            "w": torch.full((2, 3), scale, dtype=torch.float32) + torch.arange(6, dtype=torch.float32).view(2, 3),
            "b": torch.tensor([scale], dtype=torch.float64),
            "num_batches_tracked": torch.tensor(step, dtype=torch.long),
            "flag": torch.tensor([step % 2 == 0]),
        },
    }


def _write(tmp_path: Path, steps_scales: list[tuple[int, float]]) -> None:
    for step, scale in steps_scales:
        torch.save(_ckpt(step, scale), tmp_path / f"step{step:07d}.ckpt")


def test_average_is_elementwise_mean_with_newest_integer_buffers(tmp_path: Path) -> None:
    _write(tmp_path, [(100, 1.0), (200, 2.0), (300, 4.0), (400, 7.0)])
    torch.save(_ckpt(400, 7.0), tmp_path / "last.ckpt")  # a duplicate of the newest: ignored
    cb = CheckpointAveraging(last_n=3, checkpoint_dir=str(tmp_path))
    out, averaged, n = cb.average(tmp_path)
    assert n == 3 and out == tmp_path / "averaged.ckpt" and out.is_file()
    sd = torch.load(out, weights_only=False)["state_dict"]
    expected_w = (torch.arange(6, dtype=torch.float64).view(2, 3) + (2.0 + 4.0 + 7.0) / 3).float()
    assert torch.equal(sd["w"], expected_w)
    assert sd["w"].dtype == torch.float32 and sd["b"].dtype == torch.float64
    assert sd["b"].item() == pytest.approx((2.0 + 4.0 + 7.0) / 3, abs=0)
    assert sd["num_batches_tracked"].item() == 400 and sd["flag"].item() is True
    assert averaged["global_step"] == 400 and averaged["hyper_parameters"] == {"d_model": 8}
    assert [Path(p).name for p in averaged["averaged_from"]] == [f"step{s:07d}.ckpt" for s in (200, 300, 400)]


def test_last_ckpt_counts_when_it_holds_a_newer_step(tmp_path: Path) -> None:
    """max_steps not a multiple of the checkpoint interval: the final weights (only in last.ckpt) are averaged."""
    _write(tmp_path, [(100, 1.0), (200, 2.0)])
    torch.save(_ckpt(250, 6.0), tmp_path / "last.ckpt")
    _, averaged, n = CheckpointAveraging(last_n=2).average(tmp_path)
    assert n == 2 and averaged["global_step"] == 250 and averaged["state_dict"]["b"].item() == 4.0


def test_a_rerun_v1_checkpoint_replaces_the_older_file_of_the_same_step(tmp_path: Path) -> None:
    import os

    _write(tmp_path, [(100, 1.0), (200, 2.0)])
    torch.save(_ckpt(200, 8.0), tmp_path / "step0000200-v1.ckpt")
    os.utime(tmp_path / "step0000200.ckpt", (1, 1))  # the first run's file is older
    _, averaged, n = CheckpointAveraging(last_n=1).average(tmp_path)
    assert n == 1 and averaged["state_dict"]["b"].item() == 8.0


def test_fewer_than_last_n_warns_and_averages_what_exists(tmp_path: Path) -> None:
    _write(tmp_path, [(10, 1.0), (20, 3.0)])
    with pytest.warns(UserWarning, match="only 2 checkpoint"):
        _, averaged, n = CheckpointAveraging(last_n=5).average(tmp_path)
    assert n == 2 and averaged["state_dict"]["b"].item() == 2.0


def test_no_checkpoints_is_an_error_naming_the_directory(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=f"no checkpoints to average in {tmp_path}"):
        CheckpointAveraging(last_n=2).average(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: sd.pop("w"), "missing key 'w'"),
        (lambda sd: sd.__setitem__("extra", torch.zeros(1)), "unexpected key 'extra'"),
        (lambda sd: sd.__setitem__("w", torch.zeros(3, 2)), r"key 'w': shape \(3, 2\)"),
        (lambda sd: sd.__setitem__("w", torch.zeros(2, 3, dtype=torch.float64)), "key 'w': dtype torch.float64"),
    ],
)
def test_mismatched_checkpoints_raise_naming_the_key(mutate, message: str) -> None:
    old, new = _ckpt(1, 1.0)["state_dict"], _ckpt(2, 2.0)["state_dict"]
    mutate(old)
    with pytest.raises(ValueError, match=message):
        average_state_dicts([old, new])


def test_last_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="last_n must be >= 1"):
        CheckpointAveraging(last_n=0)


def test_on_fit_end_loads_the_average_into_the_model(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    sds = []
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(-step))
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
        torch.save({"global_step": step, "state_dict": sds[-1]}, tmp_path / f"s{step}.ckpt")
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[], global_step=2, callbacks=[],
        strategy=SimpleNamespace(barrier=lambda name: None),
    )
    CheckpointAveraging(last_n=2, checkpoint_dir=str(tmp_path)).on_fit_end(trainer, model)
    assert torch.equal(model.weight, torch.full((1, 2), 1.5)) and torch.equal(model.bias, torch.tensor([-1.5]))
