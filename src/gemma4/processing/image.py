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


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
                patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> tuple[int, int]:
    """(height, width) the image is resized to: the aspect-preserving scale that exactly fills the patch budget,
    each side then floored to a multiple of pooling_kernel_size * patch_size.

    A side that floors to 0 (extreme aspect ratio) becomes one block; the other side then takes floor(ratio)
    blocks, capped at the budget's worth of blocks in a single row."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    block = pooling_kernel_size * patch_size
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    h = math.floor(scale * height / block) * block
    w = math.floor(scale * width / block) * block
    max_side = max_soft_tokens * block  # one row of blocks, all of the budget
    if h == 0 and w == 0:  # impossible for a positive budget; kept as a guard
        raise ValueError(f"cannot resize a {width}x{height} image into {max_soft_tokens} soft tokens")
    if h == 0:
        h, w = block, min(math.floor(width / height) * block, max_side)
    elif w == 0:
        h, w = min(math.floor(height / width) * block, max_side), block
    return h, w


def num_soft_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
                    patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> int:
    """Soft tokens an image of this size becomes (= the number of `<|image|>` tokens it takes in the prompt)."""
    _check_budget(max_soft_tokens)
    h, w = target_size(height, width, max_soft_tokens, patch_size, pooling_kernel_size)
    return (h // patch_size) * (w // patch_size) // pooling_kernel_size**2


def patchify(pixels: np.ndarray, patch_size: int = PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) -> patches (H/ps * W/ps, ps*ps*3), each flattened as (row, column, channel), in row-major patch
    order; and their (x, y) = (patch column, patch row) positions."""
    h, w, c = pixels.shape
    rows, cols = h // patch_size, w // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, c)  # (rows, ps, cols, ps, C)
    patches = patches.transpose(0, 2, 1, 3, 4).reshape(rows * cols, patch_size * patch_size * c)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")  # each (rows, cols)
    positions = np.stack([xs, ys], axis=-1).reshape(rows * cols, 2)
    return patches, positions


def resize_to_budget(image: Image.Image, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
                     patch_size: int = PATCH_SIZE, pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) float32 in [0, 1] at the budget's target size."""
    h, w = target_size(image.height, image.width, max_soft_tokens, patch_size, pooling_kernel_size)
    if (h, w) != (image.height, image.width):
        # PIL's bicubic widens its kernel when shrinking (antialiasing); it works on and rounds to uint8.
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


@dataclass
class ImageBatch:
    """Vision-tower inputs. P = max_soft_tokens * pooling_kernel_size**2 for the budget used."""

    pixel_values: torch.Tensor  # (B, P, 3 * patch_size**2) float32 in [0, 1]; zero rows for padding
    pixel_position_ids: torch.Tensor  # (B, P, 2) long (x, y); (-1, -1) for padding
    num_soft_tokens: list[int]  # per image: how many `<|image|>` tokens it takes

    def __len__(self) -> int:
        return len(self.num_soft_tokens)


def process_images(images, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS, patch_size: int = PATCH_SIZE,
                   pooling_kernel_size: int = POOLING_KERNEL_SIZE) -> ImageBatch:
    """One image or a list of images (any accepted source) -> a padded `ImageBatch` at the given budget."""
    _check_budget(max_soft_tokens)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given")
    max_patches = max_soft_tokens * pooling_kernel_size**2
    pixel_values = np.zeros((len(images), max_patches, 3 * patch_size**2), np.float32)
    position_ids = np.full((len(images), max_patches, 2), -1, np.int64)
    counts = []
    for i, source in enumerate(images):
        pixels = resize_to_budget(load_image(source), max_soft_tokens, patch_size, pooling_kernel_size)
        patches, positions = patchify(pixels, patch_size)
        pixel_values[i, : len(patches)] = patches
        position_ids[i, : len(patches)] = positions
        counts.append(len(patches) // pooling_kernel_size**2)
    return ImageBatch(torch.from_numpy(pixel_values), torch.from_numpy(position_ids), counts)


def image_prompt(num_tokens: int) -> str:
    """The text an image's `<|image|>` placeholder expands to."""
    return f"{BOI_TOKEN}{IMAGE_TOKEN * num_tokens}{EOI_TOKEN}"
