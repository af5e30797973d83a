"""Image processing parity against transformers 5.24's Gemma4ImageProcessorPil, input sources, and errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from gemma4.processing.image import (SUPPORTED_SOFT_TOKENS, image_prompt, load_image, num_soft_tokens,
                                     process_images, target_size)

pil_module = pytest.importorskip("transformers.models.gemma4.image_processing_pil_gemma4")


@pytest.fixture(scope="module")
def reference():
    return pil_module.Gemma4ImageProcessorPil()


def photo(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A real-looking test image: smooth colour gradients, a hard edge and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                128 + 100 * np.sin(x / 7.0 + y / 11.0) * (x > width / 3)]
    if mode == "RGBA":
        channels.append(255 * (y / max(height - 1, 1)))
    pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, len(channels)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode)


def assert_same(ours, ref):
    assert ours.num_soft_tokens == [int(n) for n in ref["num_soft_tokens_per_image"]]
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_position_ids.dtype == torch.int64
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert torch.equal(ours.pixel_position_ids, ref["image_position_ids"])
    assert (ours.pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("size", [(480, 640), (1080, 720), (37, 1500), (1600, 23), (50, 50), (1200, 1200)])
@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_matches_reference(reference, size, budget):
    image = photo(*size, seed=size[0] + budget)
    ref = reference(image, max_soft_tokens=budget, return_tensors="pt")
    assert_same(process_images(image, max_soft_tokens=budget), ref)


@pytest.mark.parametrize("budget", [140, 560])
def test_batch_of_mixed_sizes_and_modes(reference, budget):
    images = [photo(300, 200, 1), photo(90, 700, 2, mode="RGBA"), photo(256, 256, 3).convert("L"),
              photo(64, 48, 4).convert("P")]
    ref = reference(images, max_soft_tokens=budget, return_tensors="pt")
    assert_same(process_images(images, max_soft_tokens=budget), ref)


def test_numpy_rgba_and_grayscale_arrays_match_reference(reference):
    rgba = np.asarray(photo(120, 90, 5, mode="RGBA"))
    gray = np.asarray(photo(70, 130, 6).convert("L"))
    for ours, theirs in ((rgba, rgba), (gray, gray[..., None]), (gray[..., None], gray[..., None]),
                         (np.asarray(photo(33, 77, 7)),) * 2):
        ref = reference(theirs, max_soft_tokens=70, return_tensors="pt")  # it takes no 2-D arrays
        assert_same(process_images(ours, max_soft_tokens=70), ref)


def test_soft_token_count_formula():
    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        budget = int(rng.choice(SUPPORTED_SOFT_TOKENS))
        expected = get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
        assert target_size(h, w, budget) == expected
        assert num_soft_tokens(h, w, budget) == (expected[0] // 16) * (expected[1] // 16) // 9 <= budget


def test_sources_decode_to_the_same_pixels(tmp_path):
    image = photo(60, 80, 9)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.array(image)
    for source in (image, expected, data, bytearray(data), str(path), path, url, torch.from_numpy(expected),
                   expected.astype(np.float32) / 255.0, expected.transpose(2, 0, 1)):
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
    batch = process_images([str(path), url], max_soft_tokens=70)
    assert torch.equal(batch.pixel_values[0], batch.pixel_values[1])


def test_image_prompt():
    assert image_prompt(3) == "<|image>" + "<|image|>" * 3 + "<image|>"


@pytest.mark.parametrize("source, message", [
    (b"definitely not an image", "cannot read image from bytes"),
    (b"", "empty"),
    ("/no/such/file.png", "no such file"),
    ("data:image/png;base64,@@@", "invalid base64"),
    ("data:image/png,abc", "data URL"),
    ("data:image/png;base64," + base64.b64encode(b"junk").decode(), "cannot read image from data URL"),
    (np.zeros((0, 10, 3), np.uint8), "zero size"),
    (np.zeros((10, 10, 5), np.uint8), "shape"),
    (Image.new("RGB", (0, 0)), "zero size"),
    (12345, "unsupported image input"),
])
def test_bad_inputs_raise_one_line_value_errors(source, message):
    with pytest.raises(ValueError, match=message) as info:
        process_images(source)
    assert "\n" not in str(info.value)


def test_unsupported_budget():
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        process_images(photo(10, 10), max_soft_tokens=100)
