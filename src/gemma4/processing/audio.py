"""Audio input processing for the Gemma 4 audio tower (same features as transformers' Gemma4AudioFeatureExtractor).

Steps: decode -> mono float32 -> resample to 16 kHz -> 128-bin log-mel spectrogram, one frame per 10 ms, with
a mask of the frames that lie entirely on real audio. The audio tower turns every 4 frames into one soft token,
so a clip of N samples takes ceil((ceil(N / 160) - 1) / 4) tokens, about one per 40 ms (750 for 30 s).

Accepted sources: numpy arrays or tensors with their sampling rate (`(array, rate)` or `sampling_rate=`), file
paths, raw encoded bytes, base64 text with its `format` (OpenAI's `input_audio` {"data", "format"}), and data
URLs (`data:audio/wav;base64,...`). WAV (PCM 8/16/24/32-bit, float 32/64) is decoded with the standard
library; FLAC/OGG/MP3/... need the optional `soundfile` or `av` (PyAV) package.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from .data_url import decode_base64, decode_data_url

SAMPLING_RATE = 16_000
MAX_SECONDS = 30
MAX_SAMPLES = MAX_SECONDS * SAMPLING_RATE
MAX_SOFT_TOKENS = 750
NUM_MEL_BINS = 128
FRAME_LENGTH = 320  # 20 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames
FFT_LENGTH = 512
MEL_FLOOR = 1e-3
PAD_TO_MULTIPLE = 128  # samples; the reference pads every batch to a multiple of this

BOA_TOKEN = "<|audio>"
EOA_TOKEN = "<audio|>"
AUDIO_TOKEN = "<|audio|>"


# --- decoding --------------------------------------------------------------------------------------------------

def _to_mono_float(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.size == 0:
        raise ValueError("audio is empty")
    if samples.ndim == 2:  # (frames, channels) or (channels, frames): average the (smaller) channel axis
        samples = samples.mean(axis=1 if samples.shape[1] <= samples.shape[0] else 0)
    elif samples.ndim != 1:
        raise ValueError(f"audio array must be 1-D (or 2-D with channels), got shape {samples.shape}")
    if np.issubdtype(samples.dtype, np.signedinteger):  # PCM integers: full scale -> [-1, 1)
        samples = samples / float(np.iinfo(samples.dtype).max + 1)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"audio array must hold floats in [-1, 1] or signed PCM integers, got {samples.dtype}")
    if not np.isfinite(samples).all():
        raise ValueError("audio contains NaN or infinite samples")
    return samples.astype(np.float32)


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """RIFF/WAVE with PCM (8-bit unsigned, 16/24/32-bit signed) or IEEE float samples -> (frames, channels)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("cannot read audio: not a RIFF/WAVE file")
    fmt, payload, pos = None, None, 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt = body
        elif chunk_id == b"data":
            payload = body
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or len(fmt) < 16 or payload is None:
        raise ValueError("cannot read audio: WAV file lacks a fmt or data chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])  # byte rate and block align unused
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag starts the sub-format GUID
        tag = struct.unpack("<H", fmt[24:26])[0]
    if channels == 0 or rate == 0:
        raise ValueError("cannot read audio: WAV header has zero channels or sampling rate")
    width = bits // 8
    payload = payload[: len(payload) // (width * channels) * width * channels]
    if tag == 1 and width == 1:
        samples = (np.frombuffer(payload, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        samples = np.frombuffer(payload, dtype).astype(np.float64) / float(2 ** (bits - 1))
    elif tag == 1 and width == 3:  # little-endian 24-bit: widen to int32 by placing the bytes high
        raw = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        widened = np.zeros((len(raw), 4), np.uint8)
        widened[:, 1:] = raw
        samples = widened.view("<i4")[:, 0].astype(np.float64) / float(2**31)
    elif tag == 3 and width in (4, 8):
        samples = np.frombuffer(payload, np.dtype(f"<f{width}")).astype(np.float64)
    else:
        raise ValueError(f"cannot read audio: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return samples.reshape(-1, channels), rate


def _sniff_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    if data[4:8] == b"ftyp":
        return "m4a"
    return {b"fLaC": "flac", b"OggS": "ogg"}.get(data[:4], "unknown")


def _decode_with_optional_packages(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    soundfile_error = None
    try:
        import soundfile
        return soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - fall through to PyAV, then report
        soundfile_error = e
    try:
        import av
    except ImportError:
        if soundfile_error is None:
            raise ValueError(f"decoding {fmt} audio needs the optional package 'soundfile' or 'av' "
                             "(pip install soundfile); WAV works without them") from None
        raise ValueError(f"cannot read audio: soundfile failed to decode it ({soundfile_error})") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            chunks = [frame.to_ndarray() for frame in container.decode(stream)]
            rate = stream.rate
    except Exception as e:  # noqa: BLE001 - PyAV raises many types
        raise ValueError(f"cannot read audio: PyAV failed to decode it ({e})") from None
    if not chunks:
        raise ValueError("cannot read audio: no audio frames in the stream")
    samples = np.concatenate([c.reshape(c.shape[0], -1) if c.ndim == 2 else c[None] for c in chunks], axis=1)
    if np.issubdtype(samples.dtype, np.integer):
        samples = samples.astype(np.float64) / float(np.iinfo(samples.dtype).max + 1)
    return samples.T, rate


def decode_audio(data: bytes, format: str | None = None) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (mono float32 samples, sampling rate)."""
    if not data:
        raise ValueError("cannot read audio: the data is empty")
    fmt = _sniff_format(data)
    if fmt == "wav" or (fmt == "unknown" and (format or "").lower() == "wav"):
        samples, rate = _decode_wav(data)
    else:
        samples, rate = _decode_with_optional_packages(data, (format or fmt).lower())
    return _to_mono_float(np.asarray(samples, np.float64)), int(rate)


def load_audio(source, sampling_rate: int | None = None, format: str | None = None) -> np.ndarray:
    """Any accepted source -> mono float32 samples at 16 kHz, no longer than 30 s."""
    if isinstance(source, tuple) and len(source) == 2 and not isinstance(source[0], (str, bytes)):
        source, sampling_rate = source
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, (np.ndarray, list)):
        if sampling_rate is None:
            raise ValueError("an audio array needs its sampling_rate")
        samples, rate = _to_mono_float(np.asarray(source)), int(sampling_rate)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        samples, rate = decode_audio(bytes(source), format)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:"):
            mime, raw = decode_data_url(text, "audio")
            samples, rate = decode_audio(raw, format or mime.rpartition("/")[2] or None)
        elif os.path.isfile(text):
            with open(text, "rb") as f:
                samples, rate = decode_audio(f.read(), format or os.path.splitext(text)[1].lstrip(".") or None)
        elif format is not None:  # OpenAI `input_audio` style: base64 text plus a format name ("wav", "mp3", ...)
            samples, rate = decode_audio(decode_base64(text, "audio"), format)
        else:
            raise ValueError(f"cannot read audio: no such file {text!r} (pass format= for base64 data)")
    else:
        raise ValueError(f"unsupported audio input of type {type(source).__name__}")
    if rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {rate}")
    seconds = len(samples) / rate
    if seconds > MAX_SECONDS:
        raise ValueError(f"audio is {seconds:.2f} s long; Gemma 4 accepts at most {MAX_SECONDS} s per clip")
    return resample(samples, rate, SAMPLING_RATE)


# --- resampling ------------------------------------------------------------------------------------------------

def resample(samples: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE, zero_crossings: int = 16,
             rolloff: float = 0.99, beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling with a polyphase windowed-sinc filter (Kaiser window), written in numpy;
    comparable to torchaudio's `sinc_interp_kaiser`.

    Output sample n sits at input position p = n * orig / target. It is the sum over nearby input samples k of
    x[k] * h(p - k), where h is a sinc low-pass at `rolloff` times the lower of the two Nyquist frequencies,
    tapered by a Kaiser window to `zero_crossings` zero crossings each side. p's fractional part takes only
    `up` distinct values (orig/target = down/up in lowest terms), so the filter is tabulated once per phase."""
    samples = np.asarray(samples, np.float32)
    if orig_rate == target_rate:
        return samples.copy()
    g = math.gcd(int(orig_rate), int(target_rate))
    up, down = target_rate // g, orig_rate // g
    cutoff = rolloff * min(1.0, target_rate / orig_rate)  # in cycles per input sample, times 2 (1 = Nyquist)
    half_width = math.ceil(zero_crossings / cutoff)  # taps each side, in input samples
    taps = np.arange(-half_width + 1, half_width + 1)  # k - floor(p)
    phases = np.arange(up) / up  # fractional part of p
    t = phases[:, None] - taps[None, :]  # (up, taps): p - k
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (t / half_width) ** 2, 0.0, None))) / np.i0(beta)
    filters = (cutoff * np.sinc(cutoff * t) * window * (np.abs(t) <= half_width)).astype(np.float32)

    num_out = math.ceil(len(samples) * up / down)
    padded = np.pad(samples, (half_width, half_width + 1))  # zeros beyond both ends
    out = np.empty(num_out, np.float32)
    for start in range(0, num_out, 1 << 15):  # bounded memory: (chunk, taps) gathers
        n = np.arange(start, min(start + (1 << 15), num_out))
        base, phase = (n * down) // up, (n * down) % up
        windows = padded[base[:, None] + taps[None, :] + half_width]
        out[start:start + len(n)] = np.einsum("nt,nt->n", windows, filters[phase])
    return out


# --- log-mel features ------------------------------------------------------------------------------------------

def mel_filter_bank() -> np.ndarray:
    """(257, 128) triangular filters for the FFT bins, centres evenly spaced on the HTK mel scale from 0 to 8 kHz,
    peak 1, no area normalisation. The top filter is narrower than a bin and may be all zero (as in the reference)."""
    edges_mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + 8000.0 / 700.0), NUM_MEL_BINS + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)  # (130,) Hz: left, centre, right of each filter
    freqs = np.linspace(0, SAMPLING_RATE // 2, FFT_LENGTH // 2 + 1)[:, None]  # (257, 1) Hz of each FFT bin
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    return np.maximum(0.0, np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)))


_MEL_FILTERS = mel_filter_bank()
_WINDOW = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)  # periodic Hann


def num_frames(num_samples: int) -> int:
    """Mel frames for a (padded) waveform of this length."""
    padded = -(-num_samples // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    return max(0, (padded + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def log_mel(samples: np.ndarray, total_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono samples -> (frames, 128) float32 log-mel features and their (frames,) bool validity mask.

    Framing: the waveform is zero-padded to a multiple of 128 samples, plus 160 zeros in front so that frame i
    is centred on sample 160 i ("semicausal"). Frame i covers the 320 samples from 160 i (padded coordinates);
    it is valid iff all of them are real audio. Each frame: periodic Hann window, 512-point FFT magnitude,
    mel filters, log(. + 0.001). Invalid frames are set to 0. `total_frames` pads the result for batching."""
    samples = np.asarray(samples, np.float32)
    n = len(samples)
    frames_here = num_frames(n)
    total_frames = frames_here if total_frames is None else total_frames
    wave = np.pad(samples, (FRAME_LENGTH // 2, -n % PAD_TO_MULTIPLE))
    starts = np.arange(frames_here) * HOP_LENGTH
    frames = wave[starts[:, None] + np.arange(FRAME_LENGTH)[None, :]]  # (frames, 320)
    magnitude = np.abs(np.fft.rfft(frames * _WINDOW, n=FFT_LENGTH, axis=-1))  # (frames, 257)
    features = np.log(magnitude @ _MEL_FILTERS + MEL_FLOOR).astype(np.float32)  # (frames, 128)
    # The reference's analysis span is 321 samples (one extra, used only by pre-emphasis, which is off);
    # a frame is valid iff that span's last sample, padded index 160 i + 320, is real audio.
    valid = starts + FRAME_LENGTH - FRAME_LENGTH // 2 < n
    padding = total_frames - frames_here
    return np.pad(features * valid[:, None], ((0, padding), (0, 0))), np.pad(valid, (0, padding))


def num_soft_tokens(num_samples: int) -> int:
    """Audio soft tokens for a 16 kHz clip of this many samples (= `<|audio|>` tokens in the prompt).

    The valid mel frames are ceil(N / 160) - 1; each stride-2 convolution keeps every other one (rounding up)."""
    valid = max(0, -(-num_samples // HOP_LENGTH) - 1)
    return min(-(-valid // 4), MAX_SOFT_TOKENS)


@dataclass
class AudioBatch:
    input_features: torch.Tensor  # (B, T, 128) float32; zero for padding frames
    input_features_mask: torch.Tensor  # (B, T) bool, True for valid frames
    num_soft_tokens: list[int]  # per clip

    def __len__(self) -> int:
        return len(self.num_soft_tokens)


def process_audio(clips, sampling_rate: int | None = None, format: str | None = None) -> AudioBatch:
    """One clip or a list of clips (any accepted source; arrays take `sampling_rate`) -> a padded AudioBatch.

    The batch is padded to its longest clip rounded up to 128 samples, as the reference feature extractor does."""
    if not isinstance(clips, list):
        clips = [clips]
    if not clips:
        raise ValueError("no audio given")
    waves = [load_audio(c, sampling_rate, format) for c in clips]
    shortest = min(len(w) for w in waves)
    if shortest <= HOP_LENGTH:  # no valid mel frame, so no soft token
        raise ValueError(f"audio is too short ({shortest} samples at 16 kHz); it needs more than "
                         f"{HOP_LENGTH} samples (10 ms)")
    total = num_frames(max(len(w) for w in waves))
    features, masks = zip(*(log_mel(w, total) for w in waves))
    return AudioBatch(torch.from_numpy(np.stack(features)), torch.from_numpy(np.stack(masks)),
                      [num_soft_tokens(len(w)) for w in waves])


def audio_prompt(num_tokens: int) -> str:
    """The text an audio clip's `<|audio|>` placeholder expands to."""
    return f"{BOA_TOKEN}{AUDIO_TOKEN * num_tokens}{EOA_TOKEN}"
