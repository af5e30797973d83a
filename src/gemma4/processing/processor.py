"""`gemma4.Processor`: prompt text + images / audio / videos -> the inputs `gemma4.Model` takes.

    processor = gemma4.Processor.from_pretrained(checkpoint_dir)
    prompt = processor.apply_chat_template(messages)            # one <|image|> / <|audio|> / <|video|> per item
    inputs = processor(text=prompt, images=[img1, img2], audio=[clip])
    logits = model(**inputs)
    out = model.generate(**inputs, max_new_tokens=64)

Outputs equal transformers' `Gemma4Processor` for the same inputs (same keys; `mm_token_type_ids` is included for
compatibility, gemma4 derives what it needs from the placeholder tokens). Batches are padded on the left (the
tokenizer's `padding_side`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from .audio import AUDIO_TOKEN, MAX_SOFT_TOKENS as AUDIO_MAX_SOFT_TOKENS, process_audio
from .image import DEFAULT_MAX_SOFT_TOKENS, IMAGE_TOKEN, process_images
from .tokenizer import Tokenizer, read_json_object, resolve_tokenizer_dir
from .video import DEFAULT_NUM_FRAMES, VIDEO_MAX_SOFT_TOKENS, VIDEO_TOKEN, expand_prompt, process_videos


class ProcessorOutput(dict):
    """A dict of model inputs; `.to(device, dtype)` moves every tensor and casts the floating ones."""

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ProcessorOutput":
        return ProcessorOutput({key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
                                if isinstance(value, torch.Tensor) else value for key, value in self.items()})


def _is_group(item) -> bool:
    """A prompt's own list of items, as opposed to one item. An audio clip given as (samples, rate) is one item."""
    return isinstance(item, list) or (isinstance(item, tuple)
                                      and not (len(item) == 2 and isinstance(item[1], (int, float))))


def _per_prompt(items, texts: list[str], token: str, what: str) -> list[list]:
    """Split the media of a batch among its prompts by their placeholders (a nested list is taken as is, except
    for videos, whose frame lists look alike)."""
    counts = [t.count(token) for t in texts]
    if items is None:
        return [[] for _ in texts]
    flat = list(items) if isinstance(items, (list, tuple)) else [items]
    if what != "videos" and flat and len(flat) == len(texts) and all(map(_is_group, flat)):
        nested = [list(group) for group in flat]
    else:
        if sum(counts) != len(flat):
            raise ValueError(f"the prompt{'s have' if len(texts) > 1 else ' has'} {sum(counts)} {token} "
                             f"placeholders but {len(flat)} {what} were given")
        nested = _split(flat, counts)
    for i, (n, group) in enumerate(zip(counts, nested)):
        if n != len(group):
            raise ValueError(f"prompt {i} has {n} {token} placeholders but {len(group)} {what} were given")
    return nested


def _split(items, sizes) -> list[list]:
    """`items` cut into consecutive runs of the given sizes."""
    it = iter(items)
    return [list(islice(it, n)) for n in sizes]


@dataclass(eq=False)
class Processor:
    """Tokenizer plus the image, audio and video processors, with the checkpoint's processor_config.json settings."""

    tokenizer: Tokenizer
    image_max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS
    video_max_soft_tokens: int = VIDEO_MAX_SOFT_TOKENS
    video_num_frames: int = DEFAULT_NUM_FRAMES
    audio_seq_length: int = AUDIO_MAX_SOFT_TOKENS

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None) -> "Processor":
        """Tokenizer files and processor_config.json of a checkpoint (defaults where the file is absent)."""
        directory = resolve_tokenizer_dir(path_or_repo, revision)
        tokenizer = Tokenizer.from_pretrained(directory)
        config_file = Path(directory) / "processor_config.json"
        settings = read_json_object(config_file) if config_file.is_file() else {}
        image = settings.get("image_processor") or {}
        video = settings.get("video_processor") or {}
        image_max_soft_tokens = image.get("max_soft_tokens", settings.get("image_seq_length", DEFAULT_MAX_SOFT_TOKENS))
        return cls(tokenizer, image_max_soft_tokens=image_max_soft_tokens,
                   video_max_soft_tokens=video.get("max_soft_tokens", VIDEO_MAX_SOFT_TOKENS),
                   video_num_frames=video.get("num_frames", DEFAULT_NUM_FRAMES),
                   audio_seq_length=settings.get("audio_seq_length", AUDIO_MAX_SOFT_TOKENS))

    def apply_chat_template(self, messages, **kwargs):
        """`Tokenizer.apply_chat_template`: one placeholder per media item, which `__call__` expands."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def parse_response(self, response, *, prefix=None, complete: bool = False) -> dict:
        """The generated answer as an assistant message (see `Tokenizer.parse_response`)."""
        return self.tokenizer.parse_response(response, prefix=prefix, complete=complete)

    def __call__(self, text: str | list[str], images=None, audio=None, videos=None,
                 max_soft_tokens: int | None = None, return_tensors: str | None = "pt",
                 add_special_tokens: bool | None = None, padding_side: str | None = None,
                 sampling_rate: int | None = None, video_fps=None, video_sampling: str = "uniform") -> ProcessorOutput:
        """Expand each placeholder into its soft-token run, tokenize, pad, and process the media.

        text: one prompt or a list (a batch). images / audio / videos: the items of all prompts in order of
              appearance (or, for images and audio, one list per prompt).
        max_soft_tokens: image token budget (70, 140, 280, 560 or 1120; default from processor_config.json).
        add_special_tokens: None adds `<bos>` unless the prompt already starts with it (chat-template output).
        Returns input_ids, attention_mask, mm_token_type_ids and, when given, pixel_values, image_position_ids,
        pixel_values_videos, video_position_ids, num_frames_per_video, input_features, input_features_mask."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if text is None:
            raise ValueError("text is required: write one <|image|>, <|audio|> or <|video|> placeholder per item")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        image_groups = _per_prompt(images, texts, IMAGE_TOKEN, "images")
        audio_groups = _per_prompt(audio, texts, AUDIO_TOKEN, "audio clips")
        video_groups = _per_prompt(videos, texts, VIDEO_TOKEN, "videos")
        flat_images, flat_audio, flat_videos = ([item for group in groups for item in group]
                                                for groups in (image_groups, audio_groups, video_groups))
        budget = max_soft_tokens or self.image_max_soft_tokens
        image_batch = process_images(flat_images, max_soft_tokens=budget) if flat_images else None
        audio_batch = process_audio(flat_audio, sampling_rate=sampling_rate) if flat_audio else None
        if flat_audio and max(audio_batch.num_soft_tokens) > self.audio_seq_length:
            raise ValueError(f"an audio clip gives {max(audio_batch.num_soft_tokens)} soft tokens, more than "
                             f"this processor's audio_seq_length={self.audio_seq_length}; shorten it")
        video_batch = process_videos(flat_videos, fps=video_fps, sampling=video_sampling,
                                     num_frames=self.video_num_frames,
                                     max_soft_tokens=self.video_max_soft_tokens) if flat_videos else None

        # Each prompt's share of the batch's soft-token counts (per video: tokens per frame and timestamps).
        image_tokens = _split(image_batch.num_soft_tokens if image_batch else [], map(len, image_groups))
        audio_tokens = _split(audio_batch.num_soft_tokens if audio_batch else [], map(len, audio_groups))
        video_tokens = _split(zip(video_batch.num_soft_tokens_per_frame, video_batch.timestamps) if video_batch else [],
                              map(len, video_groups))
        ids = []
        bos = self.tokenizer.bos_token
        for prompt, imgs, clips, vids in zip(texts, image_tokens, audio_tokens, video_tokens):
            expanded, _ = expand_prompt(prompt, image_tokens=imgs, audio_tokens=clips, videos=vids)
            special = add_special_tokens if add_special_tokens is not None else not (bos and prompt.startswith(bos))
            ids.append(self.tokenizer.encode(expanded, add_special_tokens=special))

        type_of = {self.tokenizer.token_to_id(token): kind
                   for token, kind in ((IMAGE_TOKEN, 1), (VIDEO_TOKEN, 2), (AUDIO_TOKEN, 3))}
        type_ids = [[type_of.get(t, 0) for t in row] for row in ids]
        mask = [[1] * len(row) for row in ids]
        out = ProcessorOutput()
        if return_tensors is None:
            out.update(input_ids=ids, attention_mask=mask, mm_token_type_ids=type_ids)
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            width = max(len(row) for row in ids)

            def padded(rows, value):
                fill = [[value] * (width - len(r)) for r in rows]
                return torch.tensor([f + r if side == "left" else r + f for r, f in zip(rows, fill)], dtype=torch.long)
            out.update(input_ids=padded(ids, pad), attention_mask=padded(mask, 0),
                       mm_token_type_ids=padded(type_ids, 0))
        if image_batch is not None:
            out.update(pixel_values=image_batch.pixel_values, image_position_ids=image_batch.pixel_position_ids)
        if video_batch is not None:
            out.update(pixel_values_videos=video_batch.pixel_values_videos,
                       video_position_ids=video_batch.video_position_ids,
                       num_frames_per_video=torch.tensor(video_batch.num_frames_per_video, dtype=torch.long))
        if audio_batch is not None:
            out.update(input_features=audio_batch.input_features, input_features_mask=audio_batch.input_features_mask)
        return out
