"""Video frames, frame sampling, timestamps and prompt expansion, against transformers 5.24's pieces.

transformers' Gemma4VideoProcessor needs torchvision (absent here), so the reference is assembled from what
it is made of: `default_sample_indices_fn`, `VideoMetadata.timestamps`, per-frame patches as the (PIL) image
processor makes them at 70 soft tokens, and `Gemma4Processor.replace_video_token` / `get_text_with_replacements`.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch

from gemma4.processing.audio import audio_prompt
from gemma4.processing.image import image_prompt
from gemma4.processing.video import (expand_prompt, format_timestamp, process_videos, sample_frame_indices,
                                     video_prompt)

video_utils = pytest.importorskip("transformers.video_utils")
processing_utils = pytest.importorskip("transformers.processing_utils")
gemma4_processing = pytest.importorskip("transformers.models.gemma4.processing_gemma4")
pil_module = pytest.importorskip("transformers.models.gemma4.image_processing_pil_gemma4")

HOLDER = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", image_token="<|image|>",
                               video_token="<|video|>", audio_token="<|audio|>", boa_token="<|audio>",
                               eoa_token="<audio|>", all_special_multimodal_tokens=["<|image|>", "<|video|>",
                                                                                  "<|audio|>"])


def clip(frames: int, height: int = 90, width: int = 160, seed: int = 0) -> np.ndarray:
    """A moving gradient with noise: (frames, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = [np.stack([(x + 3 * t) % 256, (y * 2 + t) % 256, (x + y) % 256], -1) + rng.normal(0, 8, (height, width, 3))
           for t in range(frames)]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("total, fps", [(300, 30.0), (40, 24.0), (7, 10.0), (1000, 25.0)])
def test_uniform_sampling_matches_reference(total, fps):
    meta = video_utils.VideoMetadata(total_num_frames=total, fps=fps)
    if total >= 32:
        expected = video_utils.default_sample_indices_fn(meta, num_frames=32)
        assert np.array_equal(sample_frame_indices(total, fps), expected)
    else:  # the reference refuses; we keep every frame
        assert np.array_equal(sample_frame_indices(total, fps), np.arange(total))


def test_one_fps_sampling():
    meta = video_utils.VideoMetadata(total_num_frames=300, fps=30.0)
    assert np.array_equal(sample_frame_indices(300, 30.0, "1fps"),
                          video_utils.default_sample_indices_fn(meta, fps=1))  # 10 s -> 10 frames
    long = sample_frame_indices(30 * 90, 30.0, "1fps")  # 90 s: capped at 60 frames over the whole video
    assert len(long) == 60 and long[-1] > 30 * 80
    assert len(sample_frame_indices(5, 30.0, "1fps")) == 1
    with pytest.raises(ValueError, match="needs the video's fps"):
        sample_frame_indices(100, None, "1fps")


def test_frames_match_reference_image_patches_and_prompt():
    video = clip(64, seed=1)
    batch = process_videos(video, fps=8.0)
    indices = sample_frame_indices(64, 8.0)
    ref = pil_module.Gemma4ImageProcessorPil()([f for f in video[indices]], max_soft_tokens=70, return_tensors="pt")
    assert batch.num_frames_per_video == [32]
    assert batch.pixel_values_videos.shape == (32, 630, 768)
    assert torch.equal(batch.video_position_ids, ref["image_position_ids"])
    assert (batch.pixel_values_videos - ref["pixel_values"]).abs().max().item() <= 1e-6
    assert batch.num_soft_tokens_per_frame == [int(ref["num_soft_tokens_per_image"][0])]

    meta = video_utils.VideoMetadata(total_num_frames=64, fps=8.0, frames_indices=list(indices))
    inputs = {"num_soft_tokens_per_video": batch.num_soft_tokens_per_frame, "video_metadata": [meta]}
    expected = gemma4_processing.Gemma4Processor.replace_video_token(HOLDER, inputs, 0)
    assert batch.prompts()[0] == expected
    assert expected.startswith("00:00 <|image><|video|>") and "00:07 <|image>" in expected


def test_several_videos_and_frame_lists():
    frames = [f for f in clip(5, 48, 200, seed=2)]
    batch = process_videos([clip(40, seed=3), frames], fps=[20.0, None], sampling="uniform")
    assert batch.num_frames_per_video == [32, 5]
    assert batch.pixel_values_videos.shape[0] == 37
    assert batch.timestamps[1] == [i / 24.0 for i in range(5)]  # no fps: the reference's 24 fps fallback
    assert batch.num_soft_tokens_per_frame[1] <= 70


def test_timestamps():
    assert [format_timestamp(s) for s in (0, 59.9, 60, 61.5, 3599)] == ["00:00", "00:59", "01:00", "01:01", "59:59"]


def test_file_input_needs_pyav(tmp_path):
    try:
        import av  # noqa: F401
        pytest.skip("PyAV is installed")
    except ImportError:
        pass
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(ValueError, match=r"optional package 'av' \(pip install av\)"):
        process_videos(str(path))
    with pytest.raises(ValueError, match="no such file"):
        process_videos("/no/such/video.mp4")


def test_expand_prompt_matches_reference_replacement():
    text = "<start_of_turn>user\n\n\n<|image|>\n\nWhat is this <|audio|>?\n\n<|video|>\n\n and <|image|><end_of_turn>"
    videos = [(2, [0.0, 1.5, 61.0])]
    expanded, counts = expand_prompt(text, image_tokens=[3, 1], audio_tokens=[4], videos=videos)
    meta = video_utils.VideoMetadata(total_num_frames=100, fps=2.0, frames_indices=[0, 3, 122])
    ref_video = gemma4_processing.Gemma4Processor.replace_video_token(
        HOLDER, {"num_soft_tokens_per_video": [2], "video_metadata": [meta]}, 0)
    ref, _ = processing_utils.ProcessorMixin.get_text_with_replacements(
        HOLDER, [text], images_replacements=[image_prompt(3), image_prompt(1)],
        videos_replacements=[ref_video], audio_replacements=[audio_prompt(4)])
    assert expanded == ref[0]
    assert counts == {"image": [3, 1], "audio": [4], "video": [6]}
    assert expanded.count("<|image|>") == 4 and expanded.count("<|video|>") == 6 and expanded.count("<|audio|>") == 4


def test_expand_prompt_count_mismatch():
    with pytest.raises(ValueError, match=re.escape("1 <|image|> placeholders but 2 image inputs")):
        expand_prompt("<|image|>", image_tokens=[1, 2])
    assert expand_prompt("no media", image_tokens=[])[0] == "no media"
    assert video_prompt(1, [0.0]) == "00:00 <|image><|video|><image|>"
