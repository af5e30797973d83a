"""Audio feature parity against transformers 5.24's Gemma4AudioFeatureExtractor, resampling, decoding, errors."""

from __future__ import annotations

import base64
import io
import struct
import types
import warnings
import wave

import numpy as np
import pytest
import torch

from gemma4.processing import audio as A

fe_module = pytest.importorskip("transformers.models.gemma4.feature_extraction_gemma4")
processing_module = pytest.importorskip("transformers.models.gemma4.processing_gemma4")


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fe_module.Gemma4AudioFeatureExtractor()  # defaults == the official processor_config.json


def speech_like(n: int, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Harmonics with a wandering pitch, amplitude envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 12))
    return (0.2 * voice * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(n)).astype(
        np.float32)


def reference_token_count(mask: np.ndarray) -> int:
    holder = types.SimpleNamespace(boa_token="<|audio>", eoa_token="<audio|>", audio_token="<|audio|>")
    text = processing_module.Gemma4Processor.replace_audio_token(holder, {"input_features_mask": [mask]}, 0)
    return text.count("<|audio|>")


@pytest.mark.parametrize("n", [161, 400, 1000, 16_000, 16_001, 33_333, 123_457, 480_000])
def test_single_clip_matches_reference(reference, n):
    x = speech_like(n, seed=n)
    ref = reference([x], return_tensors="np")
    batch = A.process_audio(x, sampling_rate=16_000)
    assert batch.input_features.shape == ref["input_features"].shape
    assert np.abs(batch.input_features.numpy() - ref["input_features"]).max() <= 1e-5
    assert np.array_equal(batch.input_features_mask.numpy(), ref["input_features_mask"])
    assert batch.num_soft_tokens == [A.num_soft_tokens(n)] == [reference_token_count(ref["input_features_mask"][0])]


def test_batch_matches_reference(reference):
    clips = [speech_like(n, seed=n) for n in (5_000, 16_000, 777, 48_123)]
    ref = reference(clips, return_tensors="np")
    batch = A.process_audio(clips, sampling_rate=16_000)
    assert batch.input_features.shape == ref["input_features"].shape
    assert np.abs(batch.input_features.numpy() - ref["input_features"]).max() <= 1e-5
    assert np.array_equal(batch.input_features_mask.numpy(), ref["input_features_mask"])
    assert batch.num_soft_tokens == [reference_token_count(m) for m in ref["input_features_mask"]]


def test_soft_token_counts():
    assert A.num_soft_tokens(A.MAX_SAMPLES) == 750
    for n in range(161, 20_000, 37):  # the mask arithmetic, simulated directly
        valid = np.arange(A.num_frames(n)) * 160 + 160 < n
        assert A.num_soft_tokens(n) == valid[::2][::2].sum()
        assert abs(A.num_soft_tokens(n) - np.ceil(n / 16 / 40)) <= 1  # ~ one token per 40 ms


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
@pytest.mark.parametrize("freq", [440.0, 2_500.0])
def test_resampling_preserves_a_sine(rate, freq):
    seconds = 0.5
    x = np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    y = A.resample(x, rate, 16_000)
    assert len(y) == int(np.ceil(len(x) * 16_000 / rate))
    expected = np.sin(2 * np.pi * freq * np.arange(len(y)) / 16_000)
    middle = slice(800, len(y) - 800)  # away from the zero-padded ends
    assert np.abs(y[middle] - expected[middle]).max() < 2e-3


def test_resampling_removes_content_above_the_new_nyquist():
    rate = 48_000
    x = np.sin(2 * np.pi * 11_000 * np.arange(rate) / rate).astype(np.float32)  # above 8 kHz
    y = A.resample(x, rate, 16_000)
    assert np.abs(y[800:-800]).max() < 1e-3


def test_resampled_features_match_reference_on_the_same_waveform(reference):
    x44 = speech_like(44_100, rate=44_100, seed=1)
    y = A.resample(x44, 44_100, 16_000)
    ref = reference([y], return_tensors="np")
    batch = A.process_audio((x44, 44_100))
    assert np.abs(batch.input_features.numpy() - ref["input_features"]).max() <= 1e-5


def _wav_bytes(samples: np.ndarray, rate: int, width: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        scaled = np.round(samples * (2 ** (8 * width - 1) - 1)).astype(np.int64)
        if width == 1:
            data = (scaled + 128).astype(np.uint8).tobytes()
        elif width == 3:
            data = b"".join(int(v).to_bytes(3, "little", signed=True) for v in scaled.ravel())
        else:
            data = scaled.astype(f"<i{width}").tobytes()
        w.writeframes(data)
    return buffer.getvalue()


def _float_wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("width, tolerance", [(1, 1e-2), (2, 1e-4), (3, 1e-6), (4, 1e-6)])
def test_wav_decoding(width, tolerance):
    x = speech_like(4_000)
    samples, rate = A.decode_audio(_wav_bytes(x, 16_000, width))
    assert rate == 16_000 and np.abs(samples - x).max() < tolerance


def test_float_and_stereo_wav_and_sources(tmp_path):
    x = speech_like(8_000)
    samples, rate = A.decode_audio(_float_wav_bytes(x, 16_000))
    assert rate == 16_000 and np.array_equal(samples, x)
    stereo = np.stack([x, -x * 0.5], -1)
    mono, _ = A.decode_audio(_wav_bytes(stereo, 16_000, 2, channels=2))
    assert np.abs(mono - x * 0.25).max() < 1e-4

    data = _wav_bytes(x, 8_000, 2)
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    expected = A.load_audio(x, sampling_rate=8_000)
    for source, kwargs in ((data, {}), (str(path), {}), (path, {}), (b64, {"format": "wav"}),
                           ("data:audio/wav;base64," + b64, {})):
        assert np.abs(A.load_audio(source, **kwargs) - expected).max() < 1e-4
    assert np.array_equal(A.load_audio(torch.from_numpy(x), sampling_rate=16_000), x)
    pcm16 = np.round(x * 32767).astype(np.int16)
    assert np.abs(A.load_audio(pcm16, sampling_rate=16_000) - x).max() < 1e-4


def test_audio_prompt():
    assert A.audio_prompt(2) == "<|audio><|audio|><|audio|><audio|>"


@pytest.mark.parametrize("source, kwargs, message", [
    (np.zeros(A.MAX_SAMPLES + 1, np.float32), {"sampling_rate": 16_000}, "at most 30 s"),
    (np.zeros(44_100 * 31, np.float32), {"sampling_rate": 44_100}, "at most 30 s"),
    (np.zeros(100, np.float32), {"sampling_rate": 16_000}, "too short"),
    (np.zeros(0, np.float32), {"sampling_rate": 16_000}, "empty"),
    (np.zeros(1000, np.float32), {}, "needs its sampling_rate"),
    (np.array([0.0, np.nan] * 500), {"sampling_rate": 16_000}, "NaN"),
    (b"RIFF\x00\x00\x00\x00WAVEjunk", {}, "lacks a fmt or data chunk"),
    (b"", {}, "empty"),
    ("/no/such/clip.wav", {}, "no such file"),
    ("@@not base64@@", {"format": "mp3"}, "invalid base64"),
    (42, {}, "unsupported audio input"),
])
def test_bad_inputs_raise_one_line_value_errors(source, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        A.process_audio(source, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("header, name", [(b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3\x03", "mp3")])
def test_compressed_formats_need_an_optional_decoder(header, name):
    try:
        import soundfile  # noqa: F401
        pytest.skip("soundfile is installed")
    except ImportError:
        pass
    try:
        import av  # noqa: F401
        pytest.skip("PyAV is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=f"decoding {name} audio needs the optional package 'soundfile'"):
        A.process_audio(header + b"\x00" * 64)
