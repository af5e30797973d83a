"""Video input processing, and the prompt expansion shared by all modalities.

A video becomes a sequence of sampled frames, each processed like an image at a 70-soft-token budget, and is
written into the prompt frame by frame, each frame preceded by its `mm:ss` timestamp:
    "00:00 <|image><|video|>...<|video|><image|> 00:02 <|image><|video|>...<image|> ..."
(as transformers' Gemma4Processor does). The frames go through the vision tower like a batch of images; their
soft tokens fill the `<|video|>` positions in order.

Frame sampling (`sampling=`):
  "uniform" (default, the reference's): `num_frames` (32) frames at indices floor(i * total / num_frames);
             a video with fewer frames uses all of them (the reference raises instead).
  "1fps":    one frame per second (floor(duration) frames spread the same way, at least 1), at most
             `max_seconds` (60) frames: a longer video gets 60 frames spread over its whole length.
Timestamps are frame_index / fps. Frames given without an fps are timed at 24 fps, as in the reference.

Decoding video files needs the optional PyAV package (`pip install av`); without it pass the frames yourself
(a list of images or a (T, H, W, 3) uint8 array).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from gemma4.processing.audio import AUDIO_TOKEN, audio_prompt
from gemma4.processing.image import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, image_prompt, process_images

VIDEO_TOKEN = "<|video|>"
VIDEO_MAX_SOFT_TOKENS = 70
DEFAULT_NUM_FRAMES = 32
DEFAULT_FPS = 24.0  # assumed for frames passed without an fps (the reference's fallback)
MAX_SECONDS_1FPS = 60


def sample_frame_indices(total_frames: int, fps: float | None = None, sampling: str = "uniform",
                         num_frames: int = DEFAULT_NUM_FRAMES, max_seconds: int = MAX_SECONDS_1FPS) -> np.ndarray:
    """Indices of the frames to keep, see the module docstring."""
    if total_frames <= 0:
        raise ValueError("video has no frames")
    if sampling == "uniform":
        count = min(num_frames, total_frames)
    elif sampling == "1fps":
        if not fps or fps <= 0:
            raise ValueError("1 fps sampling needs the video's fps")
        count = min(max(1, int(total_frames / fps)), max_seconds, total_frames)
    else:
        raise ValueError(f"unknown frame sampling {sampling!r}; use 'uniform' or '1fps'")
    return np.arange(count, dtype=np.int64) * total_frames // count


def format_timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_prompt(tokens_per_frame: int, timestamps: list[float]) -> str:
    """The text a video's `<|video|>` placeholder expands to."""
    frame = f"{BOI_TOKEN}{VIDEO_TOKEN * tokens_per_frame}{EOI_TOKEN}"
    return " ".join(f"{format_timestamp(t)} {frame}" for t in timestamps)


def _load_frames(video, fps: float | None) -> tuple[np.ndarray | list, float | None]:
    """A video's frames and their rate (`fps`, else a file's own)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray) and video.ndim != 4:
        raise ValueError(f"a video array must be (frames, height, width, channels), got shape {video.shape}")
    if isinstance(video, (np.ndarray, list, tuple)):
        return video, fps
    if isinstance(video, (str, os.PathLike)) and not os.path.isfile(video):
        raise ValueError(f"cannot read video: no such file {os.fspath(video)!r}")
    if not isinstance(video, (str, os.PathLike, bytes, bytearray)):
        raise ValueError(f"unsupported video input of type {type(video).__name__}")
    try:
        import av
    except ImportError:
        raise ValueError("decoding video files needs the optional package 'av' (pip install av); "
                         "or pass the frames as a list of images or a (T, H, W, 3) array") from None
    try:
        with av.open(io.BytesIO(video) if isinstance(video, (bytes, bytearray)) else video) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            file_fps = float(stream.average_rate or stream.guessed_rate or 0) or None
    except Exception as e:  # noqa: BLE001 - PyAV raises many types
        raise ValueError(f"cannot read video: {e}") from None
    if not frames:
        raise ValueError("cannot read video: it has no frames")
    return np.stack(frames), fps or file_fps


@dataclass
class VideoBatch:
    """Vision-tower inputs for all frames of all videos, frame after frame (P = 70 * 9 = 630 by default)."""

    pixel_values_videos: torch.Tensor  # (total_frames, P, 3 * 16 * 16)
    video_position_ids: torch.Tensor  # (total_frames, P, 2), (-1, -1) padding
    num_frames_per_video: list[int]
    num_soft_tokens_per_frame: list[int]  # per video (all its frames share one size)
    timestamps: list[list[float]]  # per video, seconds of each kept frame

    def prompts(self) -> list[str]:
        return [video_prompt(n, ts) for n, ts in zip(self.num_soft_tokens_per_frame, self.timestamps)]


def process_videos(videos, fps=None, sampling: str = "uniform", num_frames: int = DEFAULT_NUM_FRAMES,
                   max_soft_tokens: int = VIDEO_MAX_SOFT_TOKENS) -> VideoBatch:
    """One video or a list of videos -> a `VideoBatch`.

    A video is a file path or bytes (needs PyAV), a (T, H, W, 3) uint8 array / tensor, or a list of frames (any
    image source accepted by `gemma4.processing.image`). `fps`: the source frame rate of frames given as such,
    one value or one per video."""
    if not isinstance(videos, list) or (videos and not _is_video(videos[0])):
        videos = [videos]  # a single video given as a list of frames
    fps_list = fps if isinstance(fps, (list, tuple)) else [fps] * len(videos)
    batches, timestamps = [], []
    for video, rate in zip(videos, fps_list):
        frames, rate = _load_frames(video, rate)
        indices = sample_frame_indices(len(frames), rate, sampling, num_frames)
        timestamps.append([float(i) / (rate or DEFAULT_FPS) for i in indices])
        batches.append(process_images([frames[i] for i in indices], max_soft_tokens=max_soft_tokens))
    return VideoBatch(torch.cat([b.pixel_values for b in batches]), torch.cat([b.pixel_position_ids for b in batches]),
                      [len(b) for b in batches], [b.num_soft_tokens[0] for b in batches], timestamps)


_VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def _is_video(item) -> bool:
    """Inside a list: is this item a whole video (a frame list, a (T, H, W, C) array, a video file path) rather
    than one frame of a single video?"""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item).lower().endswith(_VIDEO_SUFFIXES)
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == 4
    return isinstance(item, (list, tuple))


# --- prompt expansion ------------------------------------------------------------------------------------------

def expand_prompt(text: str, image_tokens=(), audio_tokens=(), videos=()) -> tuple[str, dict[str, list[int]]]:
    """Expand one placeholder per item into the soft-token run the model fills, like Gemma4Processor.

    text: a prompt as the chat template renders it, with one `<|image|>`, `<|audio|>` or `<|video|>` per item
          (in order of appearance per modality).
    image_tokens: soft tokens per image (`ImageBatch.num_soft_tokens`).
    audio_tokens: soft tokens per audio clip (`AudioBatch.num_soft_tokens`).
    videos: per video, (tokens per frame, frame timestamps in seconds) — `zip(VideoBatch.num_soft_tokens_per_frame,
            VideoBatch.timestamps)`.
    Returns the expanded text and the total soft tokens per item: {"image": [...], "audio": [...], "video": [...]}.

    All placeholders are replaced in a single left-to-right pass, so the `<|image|>` / `<|audio|>` tokens that an
    expansion inserts are never taken for further placeholders. A modality with no items is left untouched
    (the reference does the same)."""
    queues = {"image": [image_prompt(n) for n in image_tokens],
              "audio": [audio_prompt(n) for n in audio_tokens],
              "video": [video_prompt(n, ts) for n, ts in videos]}
    tokens = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN, "video": VIDEO_TOKEN}
    for kind, queue in queues.items():
        found = text.count(tokens[kind])
        if queue and found != len(queue):
            raise ValueError(f"the prompt has {found} {tokens[kind]} placeholders but {len(queue)} {kind} inputs")
    pattern = "|".join(f"(?P<{kind}>{re.escape(tokens[kind])})" for kind, q in queues.items() if q) or r"(?!)"
    iterators = {kind: iter(queue) for kind, queue in queues.items()}
    expanded = re.sub(pattern, lambda m: next(iterators[m.lastgroup]), text)
    counts = {"image": list(image_tokens), "audio": list(audio_tokens),
              "video": [n * len(ts) for n, ts in videos]}
    return expanded, counts
