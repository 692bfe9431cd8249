"""The project's LightningCLI: ``python train.py fit|validate|test|predict --config ...``.

- Subclass mode for model and data; the DataModule's ``tokenizer`` is linked into the model at instantiation, so
  vocabulary size and special ids are never typed twice (the model derives them from the tokenizer).
- ``checkpoint:`` configures the :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (``save_last`` on);
  a LearningRateMonitor is added whenever a logger is configured, and RNGStateCheckpoint (exact resume) always.
- The full config is saved as ``config.yaml`` beside the run (overwrite allowed) and sent to every logger (W&B).
- ``fit --test_after_fit true`` runs ``test`` on the final (averaged, if CheckpointAveraging is on) weights and prints
  the test metrics and the checkpoint path.
- ``--ckpt_path last`` resumes from ``<checkpoint.dirpath>/last.ckpt`` and is an error when there is none (Lightning
  alone would warn and silently start afresh); a ``ckpt_path`` that does not exist or cannot be read is an error too.
  A fresh ``fit`` refuses a checkpoint directory that already holds checkpoints (another run's files would be
  averaged or resumed); with ``test_after_fit`` the test split is loaded before training, so a missing file fails early.
- With ``ckpt_path``, Lightning takes the model's hyper-parameters from the checkpoint; a model's
  ``EVAL_TIME_HPARAMS`` (decoding settings, output files) keep their values from the command line and config; other
  settings that differ are listed on stderr, and a model's ``CKPT_IDENTITY_HPARAMS`` that differ are an error.
- W&B runs offline unless ``WANDB_MODE`` is set (e.g. ``WANDB_MODE=online`` after ``wandb login``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.rng_state import RNGStateCheckpoint


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and also sends the full config to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class LitlabCLI(LightningCLI):
    """LightningCLI with the project's links, default callbacks and resume checks (see module docstring)."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggedSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        # Accepted by every subcommand so one YAML serves fit and test; only fit acts on it.
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run test on the final (averaged) weights and print the metrics and checkpoint path",
        )

    def instantiate_classes(self) -> None:
        """Instantiate model, data and trainer; a constructor's error (``model.init_args.alpha must be ...``) is
        re-raised on its own instead of inside jsonargparse's "Does not validate against any of the Union subtypes"
        report, which prints the whole config namespace twice and buries the message."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            reason = union_error_reason(str(err))
            if reason is None:
                raise
            raise ValueError(reason) from None

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model config with a checkpoint's hyper-parameters; keep the current values of the
        model's ``EVAL_TIME_HPARAMS`` (decoding settings, output files) so ``test --model.init_args.beam_size 5``
        means what it says."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:  # truncated file, not a checkpoint, unsafe pickle
            raise ValueError(f"cannot read checkpoint {ckpt_path}: {err}") from err
        hparams = dict(ckpt.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None) or self.config[subcommand].model.get("class_path")
        if not hparams or class_path is None:
            return
        module_name, _, cls_name = class_path.rpartition(".")
        model_cls = getattr(importlib.import_module(module_name), cls_name)
        for key in getattr(model_cls, "EVAL_TIME_HPARAMS", ()):
            hparams.pop(key, None)
        self._compare_ckpt_hparams(ckpt_path, model_cls, hparams, self.config[subcommand].model)
        update = {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyper-parameters stored in {ckpt_path} failed\n")
            raise

    @staticmethod
    def _compare_ckpt_hparams(ckpt_path: str, model_cls: type, hparams: dict[str, Any], model_cfg: Any) -> None:
        """Say which configured model settings the checkpoint overrides (stderr), and refuse a model's
        ``CKPT_IDENTITY_HPARAMS`` (e.g. the base LM that early-exit gates were trained on) when they differ.

        Raises:
            ValueError: a ``CKPT_IDENTITY_HPARAMS`` key whose configured value differs from the checkpoint's.
        """
        init_args = model_cfg.get("init_args") if model_cfg is not None else None
        if init_args is None:
            return
        current = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
        differing = {k: (current[k], v) for k, v in hparams.items() if k in current and k != "tokenizer"
                     and _plain(current[k]) != _plain(v)}
        identity = [k for k in getattr(model_cls, "CKPT_IDENTITY_HPARAMS", ()) if k in differing]
        if identity:
            detail = "; ".join(f"{k}: checkpoint {differing[k][1]!r}, config {differing[k][0]!r}" for k in identity)
            raise ValueError(
                f"checkpoint {ckpt_path} was trained for another setting of model.init_args ({detail}); "
                f"use the checkpoint's values (e.g. --model.init_args.{identity[0]} {differing[identity[0]][1]!r}) "
                "or train for this one"
            )
        if differing:
            shown = ", ".join(f"{k}={v[1]!r} (config: {v[0]!r})" for k, v in sorted(differing.items()))
            sys.stderr.write(f"[litlab] {ckpt_path}: the checkpoint's hyper-parameters replace the config's: {shown}\n")

    # -------------------------------------------------------------- resume checks
    def _check_ckpt_path(self, subcommand: str) -> None:
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            dirpath = self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback else None
            if dirpath is None:
                raise FileNotFoundError(
                    "--ckpt_path last needs a fixed checkpoint directory: set checkpoint.dirpath in the config"
                )
            last = Path(dirpath) / "last.ckpt"
            if not last.is_file():
                raise FileNotFoundError(f"--ckpt_path last: there is no checkpoint to resume from at {last}")
            return
        if ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path: checkpoint file not found: {ckpt_path}")

    def _add_default_callbacks(self) -> None:
        # Present for every subcommand, so checkpoints written by fit restore without "missing callback" warnings.
        if not any(isinstance(c, RNGStateCheckpoint) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(RNGStateCheckpoint())
        if self.trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))

    def _refuse_stale_checkpoints(self) -> None:
        """A fresh fit must not share its checkpoint directory with an earlier run: CheckpointAveraging and
        ``--ckpt_path last`` would mix the two runs' files."""
        ckpt = self.trainer.checkpoint_callback
        if self.config["fit"].get("ckpt_path") is not None or ckpt is None or ckpt.dirpath is None:
            return
        existing = sorted(Path(ckpt.dirpath).glob("*.ckpt"))
        if existing:
            raise FileExistsError(
                f"checkpoint.dirpath {ckpt.dirpath} already holds {len(existing)} checkpoint(s) of an earlier run "
                f"({existing[0].name}, ...): continue it with --ckpt_path last, or start afresh with another "
                "--checkpoint.dirpath (or delete that directory)"
            )

    def before_fit(self) -> None:
        self._check_ckpt_path("fit")
        self._refuse_stale_checkpoints()
        if self.config["fit"].get("test_after_fit"):
            # Fail now, not after training, if the test split cannot be read.
            self.datamodule.setup("test")
        self._add_default_callbacks()

    def before_validate(self) -> None:
        self._check_ckpt_path("validate")
        self._add_default_callbacks()

    def before_test(self) -> None:
        self._check_ckpt_path("test")
        self._add_default_callbacks()

    def before_predict(self) -> None:
        self._check_ckpt_path("predict")
        self._add_default_callbacks()

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit"):
            return
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        averaged = next((getattr(c, "output_path", None) for c in self.trainer.callbacks if hasattr(c, "output_path")), None)
        ckpt = self.trainer.checkpoint_callback
        lines = [f"{k} = {float(v):.4f}" for k, v in sorted(self.trainer.callback_metrics.items()) if k.startswith("test/")]
        if averaged is not None:
            lines.append(f"averaged checkpoint: {averaged}")
        if ckpt is not None and ckpt.last_model_path:
            lines.append(f"last checkpoint: {ckpt.last_model_path}")
        rank_zero_info("\n".join(["", "=" * 60, *lines, "=" * 60]))


def union_error_reason(message: str) -> str | None:
    """The constructor errors inside a jsonargparse union report (the ``Errors:`` bullets other than the
    ``Expected a <class 'NoneType'>`` alternative), joined; None when ``message`` is not such a report."""
    if "Does not validate against any of the Union subtypes" not in message or "\nErrors:\n" not in message:
        return None
    body = message.split("\nErrors:\n", 1)[1].split("\nGiven value type:", 1)[0]
    bullets: list[list[str]] = []
    for line in body.splitlines():
        if line.startswith("  - "):
            bullets.append([line[4:]])
        elif bullets:
            bullets[-1].append(line.strip())
    reasons = [" ".join(b).strip() for b in bullets if not b[0].startswith("Expected a <class 'NoneType'>")]
    return "\n".join(reasons) if reasons else None


def main(args: Any = None) -> LitlabCLI:
    """Entry point of ``train.py``. ``args``: a list of CLI arguments or a dict (tests); None reads ``sys.argv``."""
    return LitlabCLI(args=args)


def _plain(value: Any) -> Any:
    """A comparable plain value: jsonargparse Namespaces as dicts, tuples as lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
