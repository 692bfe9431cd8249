"""Train only chosen sub-modules of chosen decoder layers; freeze everything else (SLAM, Fan et al., COLING 2025,
arXiv 2501.03681, section 3.2 of the spec ``slam.md``: the FFN ``up_proj``/``down_proj`` of the layers that handle
multilingualism).

The official code (``fmm170/SLAM``, ``--special_train_layers L --only_mlp``) freezes every parameter and unfreezes
those whose names contain ``layers.{i}.mlp.up_proj`` / ``layers.{i}.mlp.down_proj``. Here names are matched relative to
the decoder-layer list with the anchored pattern ``(^|.)(layers|h).{i}.{pattern}(.|$)``, so ``layers.1`` never
matches ``layers.11``, and the same callback works for LLaMA, Mistral, Qwen2 (``model.layers``) and GPT-2
(``transformer.h``; ``auto`` patterns ``mlp.c_fc``, ``mlp.c_proj``), peft-wrapped or not.

Order of events under ``Trainer.fit``: ``setup("fit")`` freezes (before ``configure_optimizers`` runs), then
``on_fit_start`` checks that the optimizer holds exactly the trainable parameters. A frozen parameter in the optimizer
means it was built before freezing, which would waste optimizer memory and, with weight decay, change frozen weights:
that is an error, as is a pattern that matches nothing.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lit_models.hf import count_parameters
from lit_models.nn.layer_selection import find_decoder_layers, model_fingerprint

__all__ = ["LayerSelectiveFreezing", "default_patterns"]

_GPT2_STYLE = ("gpt2", "gpt_neo", "gptj", "gpt_bigcode")


def default_patterns(model: torch.nn.Module) -> list[str]:
    """SLAM's FFN matrices by architecture: ``mlp.c_fc``/``mlp.c_proj`` for GPT-2 style, else ``mlp.up_proj``/
    ``mlp.down_proj`` (LLaMA, Mistral, Qwen2, SmolLM2)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return ["mlp.c_fc", "mlp.c_proj"] if model_type in _GPT2_STYLE else ["mlp.up_proj", "mlp.down_proj"]


def _target(pl_module: torch.nn.Module) -> torch.nn.Module:
    """The network to freeze: ``pl_module.model`` when the LightningModule wraps one (CausalLMFineTune), else itself."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else pl_module


class LayerSelectiveFreezing(Callback):
    """Freeze every parameter except ``patterns`` in the decoder layers ``layers`` (plus ``extra_trainable``).

    Args:
        layers: decoder-layer indices to train (0-based).
        layers_file: instead of ``layers``, the JSON written by ``scripts/select_layers.py`` (its ``selected``); its
            model fingerprint must match the model.
        patterns: sub-module names inside a layer (``mlp.up_proj``, ``self_attn.q_proj``, ...); ``auto``: the FFN
            up/down projections of the architecture (:func:`default_patterns`).
        extra_trainable: further parameter-name components trained everywhere (e.g. ``embed_tokens``).
        random_layers: train ``n`` distinct layers drawn with ``seed`` instead (the random-layer baseline).
        seed: seed of ``random_layers``.
        expected_fraction: if set, the trainable fraction must be within ``fraction_tolerance`` of it.
        fraction_tolerance: absolute tolerance of ``expected_fraction``.

    After freezing, :attr:`stats` holds ``trainable_params``, ``total_params`` (tied weights once),
    ``trainable_fraction`` and ``layers``; they are logged at step 0 and printed with a per-layer table.

    Raises:
        ValueError: none or several of ``layers``/``layers_file``/``random_layers``; a layer index out of range (naming
            the model's layer count); a (layer, pattern) or ``extra_trainable`` entry that matches no parameter
            (listing the layer's sub-modules); a ``layers_file`` of another model; the fraction off
            ``expected_fraction``.
        RuntimeError: (``on_fit_start``) the optimizer holds frozen parameters or misses trainable ones (built before
            freezing, or parameters added afterwards).
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        layers_file: str | None = None,
        patterns: list[str] | Literal["auto"] = "auto",
        extra_trainable: list[str] = [],  # noqa: B006 (jsonargparse needs a literal default)
        random_layers: int | None = None,
        seed: int = 0,
        expected_fraction: float | None = None,
        fraction_tolerance: float = 1e-4,
    ) -> None:
        given = [name for name, value in (("layers", layers), ("layers_file", layers_file),
                                          ("random_layers", random_layers)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"LayerSelectiveFreezing needs exactly one of layers, layers_file, random_layers; got "
                             f"{given or 'none'}")
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError(f"LayerSelectiveFreezing.layers must be a non-empty list of distinct indices, got {layers}")
        if random_layers is not None and random_layers < 1:
            raise ValueError(f"LayerSelectiveFreezing.random_layers must be >= 1, got {random_layers}")
        if patterns != "auto" and (isinstance(patterns, str) or not patterns):
            raise ValueError(f"LayerSelectiveFreezing.patterns must be 'auto' or a non-empty list, got {patterns!r}")
        self.layers = sorted(layers) if layers is not None else None
        self.layers_file = layers_file
        self.patterns = patterns
        self.extra_trainable = list(extra_trainable)
        self.random_layers = random_layers
        self.seed = seed
        self.expected_fraction = expected_fraction
        self.fraction_tolerance = fraction_tolerance
        self.stats: dict[str, Any] = {}
        self.trainable_names: list[str] = []
        self._trainable_ids: set[int] = set()

    # ------------------------------------------------------------------ selection
    def resolve_layers(self, model: torch.nn.Module) -> list[int]:
        """The layer indices to train on ``model`` (validated against its layer count)."""
        n = len(find_decoder_layers(model))
        if self.random_layers is not None:
            if self.random_layers > n:
                raise ValueError(f"LayerSelectiveFreezing.random_layers={self.random_layers} exceeds the model's {n} "
                                 "decoder layers")
            return sorted(random.Random(self.seed).sample(range(n), self.random_layers))
        if self.layers_file is not None:
            path = Path(self.layers_file)
            if not path.is_file():
                raise FileNotFoundError(f"LayerSelectiveFreezing.layers_file not found: {path}")
            data = json.loads(path.read_text(encoding="utf-8"))
            mine = model_fingerprint(model)
            theirs = data.get("fingerprint")
            if theirs != mine:
                raise ValueError(f"LayerSelectiveFreezing.layers_file {path} was computed for a model with {theirs}, "
                                 f"but this model has {mine}: run scripts/select_layers.py on this model")
            layers = sorted(int(i) for i in data["selected"])
        else:
            layers = list(self.layers or [])
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"LayerSelectiveFreezing.layers {bad} out of range: the model has {n} decoder layers "
                             f"(indices 0-{n - 1})")
        return layers

    def apply(self, model: torch.nn.Module) -> dict[str, Any]:
        """Freeze ``model`` except the selection; returns (and keeps in :attr:`stats`) the parameter counts."""
        layers = self.resolve_layers(model)
        patterns = default_patterns(model) if self.patterns == "auto" else list(self.patterns)
        names = [name for name, _ in model.named_parameters()]
        chosen: set[str] = set()
        for i in layers:
            for pattern in patterns:
                regex = re.compile(rf"(^|\.)(layers|h)\.{i}\.{re.escape(pattern)}(\.|$)")
                hits = [n for n in names if regex.search(n)]
                if not hits:
                    prefix = re.compile(rf"(^|\.)(layers|h)\.{i}\.")
                    inside = sorted({re.split(rf"(?:^|\.)(?:layers|h)\.{i}\.", n, maxsplit=1)[-1].rsplit(".", 1)[0]
                                     for n in names if prefix.search(n)})
                    raise ValueError(f"LayerSelectiveFreezing: pattern {pattern!r} matches no parameter of layer {i} "
                                     f"(its sub-modules: {inside})")
                chosen.update(hits)
        for extra in self.extra_trainable:
            regex = re.compile(rf"(^|\.){re.escape(extra)}(\.|$)")
            hits = [n for n in names if regex.search(n)]
            if not hits:
                raise ValueError(f"LayerSelectiveFreezing.extra_trainable {extra!r} matches no parameter")
            chosen.update(hits)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        self.trainable_names = sorted(chosen)
        self._trainable_ids = {id(p) for n, p in model.named_parameters() if n in chosen}
        trainable = count_parameters(model, trainable_only=True)
        total = count_parameters(model)
        self.stats = {"trainable_params": trainable, "total_params": total,
                      "trainable_fraction": trainable / total if total else 0.0, "layers": layers,
                      "patterns": patterns}
        if self.expected_fraction is not None and \
                abs(self.stats["trainable_fraction"] - self.expected_fraction) > self.fraction_tolerance:
            raise ValueError(f"trainable fraction {self.stats['trainable_fraction']:.6f} differs from "
                             f"LayerSelectiveFreezing.expected_fraction={self.expected_fraction} (tolerance "
                             f"{self.fraction_tolerance})")
        return self.stats

    def table(self, model: torch.nn.Module) -> str:
        """Trainable parameters per layer and module, and the totals (after :meth:`apply`)."""
        rows: dict[tuple[int, str], int] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$", name)
                key = (int(m.group(1)), m.group(2).rsplit(".", 1)[0]) if m else (-1, name.rsplit(".", 1)[0])
                rows[key] = rows.get(key, 0) + param.numel()
        lines = [f"{'layer':>6}  {'module':<40}{'params':>14}"]
        lines += [f"{(str(i) if i >= 0 else '-'):>6}  {mod:<40}{n:>14,}" for (i, mod), n in sorted(rows.items())]
        s = self.stats
        lines.append(f"trainable {s['trainable_params']:,} of {s['total_params']:,} parameters "
                     f"({100 * s['trainable_fraction']:.4f} %), layers {s['layers']}, patterns {s['patterns']}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = _target(pl_module)
        self.apply(model)
        rank_zero_info("[LayerSelectiveFreezing]\n" + self.table(model))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        model = _target(pl_module)
        frozen = [n for n, p in model.named_parameters() if id(p) in in_optimizer and id(p) not in self._trainable_ids]
        if frozen:
            raise RuntimeError(f"the optimizer holds {len(frozen)} frozen parameter(s) ({frozen[:3]} ...): it was built "
                               "before LayerSelectiveFreezing froze the model; build it from requires_grad parameters "
                               "in configure_optimizers")
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in self._trainable_ids]
        if missing or extra:
            raise RuntimeError(f"trainable parameters changed after freezing: not in the optimizer {missing[:3]}, "
                               f"unexpectedly trainable {extra[:3]}")
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in self.stats.items()
                                if k in ("trainable_params", "total_params", "trainable_fraction")}, step=0)
            logger.log_hyperparams({"trainable_layers": self.stats["layers"],
                                    "trainable_patterns": self.stats["patterns"]})

    def state_dict(self) -> dict[str, Any]:
        return {"layers": list(self.stats.get("layers", [])), "trainable_names": list(self.trainable_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict.get("layers")
        if previous and self.stats.get("layers") and list(previous) != list(self.stats["layers"]):
            raise ValueError(f"the checkpoint trained layers {previous}, this run selects {self.stats['layers']}: "
                             "resume with the same LayerSelectiveFreezing settings")
