"""What the PCformer benchmarks share: the demo model's sizes (read from its YAML) and a Marian model of the same size.

The demo config is the single source of truth for sizes, so a benchmark always measures what the demo trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "pcformer" / "demo_bible_en_de.yaml"

#: architecture switches of the two demo variants (everything else from the demo YAML)
ARCHS = {
    "vanilla": {"arch": "transformer", "order": 1, "corrector": "none"},
    "pcformer": {"arch": "pcformer", "order": 2, "corrector": "multistep", "coefficients": "ema", "ema_alpha": 0.5},
}


def demo_sizes() -> dict[str, Any]:
    """Model sizes and optimisation settings of ``configs/pcformer/demo_bible_en_de.yaml`` (PCformer defaults fill in
    what the YAML leaves out)."""
    from lit_models.pcformer import PCformerTranslation
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(PCformerTranslation.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    init_args = yaml.safe_load(DEMO_CONFIG.read_text())["model"]["init_args"]
    merged = {**defaults, **init_args}
    keys = (
        "d_model", "ffn_dim", "n_heads", "encoder_layers", "decoder_layers", "dropout", "attention_dropout",
        "activation_dropout", "max_positions", "share_all_embeddings", "lr", "warmup_steps", "label_smoothing",
    )
    return {k: merged[k] for k in keys}


def marian_config(dims: dict[str, Any], info: dict[str, Any]) -> Any:
    """A ``transformers.MarianConfig`` with our model's dimensions, dropouts, vocabulary and special ids (SDPA)."""
    from transformers import MarianConfig

    cfg = MarianConfig(
        vocab_size=info["vocab_size"],
        d_model=dims["d_model"],
        encoder_layers=dims["encoder_layers"],
        decoder_layers=dims["decoder_layers"],
        encoder_attention_heads=dims["n_heads"],
        decoder_attention_heads=dims["n_heads"],
        encoder_ffn_dim=dims["ffn_dim"],
        decoder_ffn_dim=dims["ffn_dim"],
        activation_function="relu",
        dropout=dims["dropout"],
        attention_dropout=dims["attention_dropout"],
        activation_dropout=dims["activation_dropout"],
        max_position_embeddings=dims["max_positions"],
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=info["pad_id"],
        eos_token_id=info["eos_id"],
        decoder_start_token_id=info["bos_id"],
        forced_eos_token_id=info["eos_id"],
        bos_token_id=info["bos_id"],
    )
    cfg._attn_implementation = "sdpa"
    return cfg
