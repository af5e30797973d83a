"""Compressed audio (FLAC, OGG/Vorbis, MP3 via soundfile) and video files (via PyAV), decoded for real.

Both decoders are optional packages (the `media` extra); without them the one-line errors are tested in
test_audio_features.py / test_video.py instead."""

import io

import numpy as np
import pytest

from gemma4.processing.audio import process_audio
from gemma4.processing.video import process_videos

soundfile = pytest.importorskip("soundfile")
av = pytest.importorskip("av")


def tone(frequency: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_compressed_audio_decodes_to_the_same_features(fmt, rate):
    clip = tone(440.0, 1.0, rate)
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, rate, format=fmt)
    decoded = process_audio([buffer.getvalue()])
    reference = process_audio([clip], sampling_rate=rate)
    # Lossy codecs pad or trim a few milliseconds: at most one soft token of difference.
    assert abs(decoded.num_soft_tokens[0] - reference.num_soft_tokens[0]) <= 1
    from gemma4.processing.audio import load_audio
    samples = load_audio(buffer.getvalue())
    assert abs(dominant_frequency(samples) - 440.0) < 2.0


def test_compressed_audio_as_base64_with_format():
    import base64

    buffer = io.BytesIO()
    soundfile.write(buffer, tone(300.0, 0.5, 16_000), 16_000, format="FLAC")
    batch = process_audio([base64.b64encode(buffer.getvalue()).decode()], format="flac")
    assert batch.num_soft_tokens[0] > 0


def mp4(num_frames: int, fps: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(num_frames):
            frame = np.full((64, 96, 3), (i * 9) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_video_file_uniform_and_1fps(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4(num_frames=50, fps=10))  # 5 seconds
    uniform = process_videos(str(path))
    assert uniform.num_frames_per_video == [32]
    assert uniform.num_soft_tokens_per_frame == [uniform.num_soft_tokens_per_frame[0]]
    assert uniform.timestamps[0][0] == 0.0 and uniform.timestamps[0][-1] < 5.0
    per_second = process_videos(path.read_bytes(), sampling="1fps")
    assert per_second.num_frames_per_video == [5]
    assert per_second.timestamps[0] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert "00:04 <|image>" in per_second.prompts()[0]


def test_broken_video_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read video"):
        process_videos(str(path))
