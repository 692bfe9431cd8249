"""SLAM: fine-tune only the FFN of the layers that handle multilingualism (Fan et al., COLING 2025, arXiv 2501.03681).

SLAM finds the decoder layers whose FFN neurons behave most differently across languages (``scripts/select_layers.py``,
:mod:`lit_models.nn.layer_selection`) and trains, in one supervised stage, only their ``mlp.up_proj`` and
``mlp.down_proj`` matrices (6.5-8 % of a 7B/13B LLaMA-2), everything else frozen (spec ``slam.md`` 3.2-3.3). The
loss is the foundation's response-token cross-entropy and the evaluation its generation-based math scoring
(``test/acc_<lang>``, ``test/acc_avg``), so SLAM, full fine-tuning and LoRA differ by one switch:

    python train.py fit --config configs/slam/demo_smollm2.yaml                          # SLAM, layers 0-5
    python train.py fit --config configs/slam/demo_smollm2.yaml --model.init_args.mode full   # every weight
    python train.py fit --config configs/slam/demo_smollm2.yaml --model.init_args.mode lora   # peft LoRA

The freezing is :class:`callbacks.layer_freezing.LayerSelectiveFreezing` applied when the model is built, before the
optimizer exists, which then holds only the selected matrices (8 bytes of AdamW state per trainable parameter).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from callbacks.layer_freezing import LayerSelectiveFreezing
from lit_models.causal_lm import CausalLMFineTune

__all__ = ["SLAM"]


class SLAM(CausalLMFineTune):
    """:class:`~lit_models.causal_lm.CausalLMFineTune` with ``mode: slam`` (selected layers' FFN only).

    Args:
        mode: ``slam`` (train ``patterns`` of ``layers`` only), or the foundation's ``full`` / ``lora`` / ``qlora``
            on the same data and evaluation (the comparison is this one switch).
        layers: decoder layers to train (0-based); the paper's released scripts use 0-4 (7B) and 0-5 (13B).
        layers_file: instead, the JSON of ``scripts/select_layers.py`` (its ``selected``; the model must match its
            fingerprint).
        random_layers: instead, ``n`` layers drawn with ``random_layers_seed`` (the random-layer baseline).
        patterns: sub-modules trained in those layers; ``auto``: ``mlp.up_proj``, ``mlp.down_proj`` (GPT-2:
            ``mlp.c_fc``, ``mlp.c_proj``).
        extra_trainable: parameter-name components trained as well (e.g. ``embed_tokens``).
        **kwargs: everything else as :class:`~lit_models.causal_lm.CausalLMFineTune` (``model``, ``lr``, ...).

    Logged at the start of fit: ``trainable_params``, ``total_params``, ``trainable_fraction``.

    Raises:
        ValueError: ``mode=slam`` without exactly one of ``layers``, ``layers_file``, ``random_layers``; layers out of
            range or patterns matching nothing (see :class:`~callbacks.layer_freezing.LayerSelectiveFreezing`).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        tokenizer: Any = None,
        mode: Literal["slam", "full", "lora", "qlora"] = "slam",
        layers: list[int] | None = None,
        layers_file: str | None = None,
        random_layers: int | None = None,
        random_layers_seed: int = 0,
        patterns: list[str] | Literal["auto"] = "auto",
        extra_trainable: list[str] = [],  # noqa: B006 (jsonargparse needs a literal default)
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lr: float = 2e-5,
        warmup_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        eval_task: Literal["none", "math", "translation"] = "math",
        max_new_tokens: int = 600,
        answer_extraction: Literal["signed", "mathoctopus"] = "mathoctopus",
        **kwargs: Any,
    ) -> None:
        self._slam_mode = mode
        if mode not in ("slam", "full", "lora", "qlora"):
            raise ValueError(f"model.init_args.mode must be slam, full, lora or qlora; got {mode!r}")
        super().__init__(model=model, tokenizer=tokenizer, mode=mode, dtype=dtype, lr=lr, warmup_ratio=warmup_ratio,
                         lr_schedule=lr_schedule, eval_task=eval_task, max_new_tokens=max_new_tokens,
                         answer_extraction=answer_extraction, **kwargs)
        self.freezing: LayerSelectiveFreezing | None = None
        if mode == "slam":
            self.freezing = LayerSelectiveFreezing(
                layers=layers, layers_file=layers_file, random_layers=random_layers, seed=random_layers_seed,
                patterns=patterns, extra_trainable=extra_trainable,
            )
            self.freezing.apply(self.model)
            rank_zero_info("[SLAM]\n" + self.freezing.table(self.model))
        elif any(v is not None for v in (layers, layers_file, random_layers)):
            rank_zero_info(f"[SLAM] mode={mode}: layers/layers_file/random_layers are ignored (every weight, or LoRA, "
                           "trains)")

    def _weights_mode(self) -> str:
        return "full" if self._slam_mode == "slam" else self._slam_mode

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.freezing is not None:
            stats = self.freezing.stats
            for logger in self.loggers:
                logger.log_metrics({k: float(stats[k]) for k in ("trainable_params", "total_params",
                                                                 "trainable_fraction")}, step=0)
