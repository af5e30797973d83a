"""Image input processing for the Gemma 4 vision tower (same outputs as transformers' Gemma4ImageProcessorPil).

Per image: decode -> RGB -> aspect-preserving resize so that both sides are multiples of
pooling_kernel_size * patch_size (48 px) and the patch count fits the soft-token budget (PIL bicubic, which
antialiases when shrinking) -> pixels / 255 -> 16x16 patches with (x, y) patch positions -> pad to the budget.

Accepted sources: PIL images, numpy arrays (H x W, H x W x {1,3,4}; uint8, or floats in [0, 1]), file paths,
raw encoded bytes, and data URLs (`data:image/png;base64,...`).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from .data_url import decode_data_url

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
BLOCK = POOLING_KERNEL_SIZE * PATCH_SIZE  # 48 px: the side of the 3x3 patches that pool into one soft token
DEFAULT_MAX_SOFT_TOKENS = 280

BOI_TOKEN = "<|image>"  # begins an image's soft tokens
EOI_TOKEN = "<image|>"  # ends it
IMAGE_TOKEN = "<|image|>"  # one per soft token after expansion; one per image in a chat-template prompt


# --- decoding --------------------------------------------------------------------------------------------------

def _decode_bytes(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ValueError(f"cannot read image from {what}: it is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image from {what}: not a decodable image ({e})") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ValueError(f"image array has zero size (shape {array.shape})")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels-first (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be H x W or H x W x 1/3/4, got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):  # floats are read as [0, 1] intensities
            array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
        elif array.min() < 0 or array.max() > 255:
            raise ValueError(f"integer image array must hold values in [0, 255], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 4:
        # Blend onto white with the alpha channel, rounding to uint8 (the reference's formula for arrays).
        alpha = array[..., 3:] / 255.0
        array = np.round(alpha * array[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return Image.fromarray(array)


def load_image(source) -> Image.Image:
    """Any accepted source -> an RGB PIL image; transparency is composited onto white, as the reference does."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, torch.Tensor):
        image = _from_array(source.detach().cpu().numpy())
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode_bytes(bytes(source), "bytes")
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:"):
            _, data = decode_data_url(text, "image")
            image = _decode_bytes(data, "data URL")
        elif text.startswith(("http://", "https://")):
            raise ValueError("image URLs are not fetched; download the image and pass its bytes or path")
        elif not os.path.isfile(text):
            raise ValueError(f"cannot read image: no such file {text!r}")
        else:
            with open(text, "rb") as f:
                image = _decode_bytes(f.read(), f"file {text!r}")
    else:
        raise ValueError(f"unsupported image input of type {type(source).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Transparent pixels show the white background, not whatever colour they happen to store.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --- geometry --------------------------------------------------------------------------------------------------

def _check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> tuple[int, int]:
    """(height, width) the image is resized to: the aspect-preserving scale that exactly fills the patch budget,
    each side then floored to a multiple of the 48 px block (one soft token after pooling).

    A side that floors to 0 (extreme aspect ratio) becomes one block; the other side then takes floor(ratio)
    blocks, capped at the budget's worth of blocks in a single row."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    scale = math.sqrt(max_soft_tokens * BLOCK**2 / (height * width))
    h = math.floor(scale * height / BLOCK) * BLOCK
    w = math.floor(scale * width / BLOCK) * BLOCK
    max_side = max_soft_tokens * BLOCK  # one row of blocks, all of the budget
    if h == 0:
        h, w = BLOCK, min(math.floor(width / height) * BLOCK, max_side)
    elif w == 0:
        h, w = min(math.floor(height / width) * BLOCK, max_side), BLOCK
    return h, w


def num_soft_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> int:
    """Soft tokens an image of this size becomes (= the number of `<|image|>` tokens it takes in the prompt)."""
    _check_budget(max_soft_tokens)
    h, w = target_size(height, width, max_soft_tokens)
    return (h // BLOCK) * (w // BLOCK)


def _patches(image: Image.Image, max_soft_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB image at the budget's target size -> its 16x16 patches of pixels / 255 in row-major order, each
    flattened as (row, column, channel), and their (x, y) = (patch column, patch row) positions."""
    h, w = target_size(image.height, image.width, max_soft_tokens)
    if (h, w) != (image.height, image.width):
        # PIL's bicubic widens its kernel when shrinking (antialiasing); it works on and rounds to uint8.
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    rows, cols = h // PATCH_SIZE, w // PATCH_SIZE
    patches = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")  # each (rows, cols)
    return patches, np.stack([xs, ys], axis=-1).reshape(rows * cols, 2)


@dataclass
class ImageBatch:
    """Vision-tower inputs. P = max_soft_tokens * 9 (3x3 patches pool into one soft token)."""

    pixel_values: torch.Tensor  # (B, P, 3 * 16 * 16) float32 in [0, 1]; zero rows for padding
    pixel_position_ids: torch.Tensor  # (B, P, 2) long (x, y); (-1, -1) for padding
    num_soft_tokens: list[int]  # per image: how many `<|image|>` tokens it takes

    def __len__(self) -> int:
        return len(self.num_soft_tokens)


def process_images(images, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> ImageBatch:
    """One image or a list of images (any accepted source) -> a padded `ImageBatch` at the given budget."""
    _check_budget(max_soft_tokens)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given")
    max_patches = max_soft_tokens * POOLING_KERNEL_SIZE**2
    pixel_values = np.zeros((len(images), max_patches, 3 * PATCH_SIZE**2), np.float32)
    position_ids = np.full((len(images), max_patches, 2), -1, np.int64)
    counts = []
    for i, source in enumerate(images):
        patches, positions = _patches(load_image(source), max_soft_tokens)
        pixel_values[i, : len(patches)] = patches
        position_ids[i, : len(patches)] = positions
        counts.append(len(patches) // POOLING_KERNEL_SIZE**2)
    return ImageBatch(torch.from_numpy(pixel_values), torch.from_numpy(position_ids), counts)


def image_prompt(num_tokens: int) -> str:
    """The text an image's `<|image|>` placeholder expands to."""
    return f"{BOI_TOKEN}{IMAGE_TOKEN * num_tokens}{EOI_TOKEN}"
