"""Merging image, video and audio soft tokens into the text embeddings, as transformers' `Gemma4Model.forward` does.

The prompt holds one placeholder token per soft token (`<|image|>`, `<|video|>`, `<|audio|>`, see
`gemma4.processing.video.expand_prompt`). At those positions:
  * the token lookup (main embedding and per-layer embedding) uses the pad id instead of the placeholder id;
  * the main embedding is then replaced by the tower's soft tokens, in order: images (batch order), then video
    frames, then audio clips, each filling its own placeholder kind left to right, row after row.
Placeholders without media of their kind (e.g. one the model generated) keep the pad embedding, as in the reference;
a mismatch between the placeholders and the soft tokens of given media is a ValueError.
With `text_config.use_bidirectional_attention == "vision"` (26B-A4B, 31B) each run of consecutive image/video
placeholders is one block whose tokens see each other in both directions on sliding layers (see attention.py);
audio tokens never form blocks, exactly like the reference's `mm_token_type_ids` in {1, 2}.
"""

from __future__ import annotations

import dataclasses

import torch

from .audio import audio_features
from .vision import image_features

# Processor outputs the model does not need: the placeholders already say where every soft token goes.
_UNUSED = {"mm_token_type_ids", "num_frames_per_video", "token_type_ids"}


def placeholder_masks(config, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean [B, L] masks of the image, video and audio placeholder tokens."""
    return {"image": input_ids == config.image_token_id, "video": input_ids == config.video_token_id,
            "audio": input_ids == config.audio_token_id}


def vision_blocks(is_vision: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L] long: 0 for other tokens, k for the k-th run of consecutive vision tokens of the row
    (the reference's `get_block_sequence_ids_for_mask`, shifted by one so that 0 means "no block")."""
    previous = torch.zeros_like(is_vision)
    previous[:, 1:] = is_vision[:, :-1]
    starts = is_vision & ~previous
    return torch.where(is_vision, starts.long().cumsum(dim=1), 0)


def prepare_tower(tower: torch.nn.Module, device: torch.device) -> None:
    """Compute a tower's derived buffers (RoPE / sinusoid frequencies, not checkpoint state) for real, in fp32, on
    `device`. The loader builds the model on `meta` and fills only checkpoint tensors, so these would otherwise stay
    on `meta` (or be left uninitialised by `to_empty`, or be cast to the weights' dtype). Done once per device."""
    if getattr(tower, "_derived_buffers_device", None) == device:
        return
    # A layer-less copy (with a 1-row position table) builds the same buffers cheaply on the CPU.
    small = dataclasses.replace(tower.config, num_hidden_layers=0)
    if hasattr(small, "position_embedding_size"):
        small = dataclasses.replace(small, position_embedding_size=1)
    with torch.device("cpu"):
        fresh = dict(type(tower)(small).named_buffers())
    for name in set(fresh) - set(tower.state_dict()):  # the derived (non-persistent) buffers
        owner, _, leaf = name.rpartition(".")
        tower.get_submodule(owner)._buffers[leaf] = fresh[name].to(device)
    tower._derived_buffers_device = device


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: list[torch.Tensor], what: str,
             placeholder: str) -> torch.Tensor:
    tokens = torch.cat(features, dim=0) if features else embeds.new_zeros(0, embeds.shape[-1])
    found = int(mask.sum())
    if found != tokens.shape[0]:
        raise ValueError(f"the prompt has {found} {placeholder} placeholder tokens but the {what} give "
                         f"{tokens.shape[0]} soft tokens ({', '.join(str(len(f)) for f in features)} per item); "
                         "build the prompt with gemma4.Processor (or expand_prompt) from the same inputs")
    return embeds.masked_scatter(mask[..., None], tokens.to(embeds.dtype))


def merge_media(model, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                image_position_ids: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_position_ids: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                input_features_mask: torch.Tensor | None = None,
                **ignored) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(embeds [B, L, H] scaled and merged, ids for the per-layer-embedding lookup [B, L], blocks [B, L] or None)."""
    if unknown := set(ignored) - _UNUSED:
        raise TypeError(f"unexpected model inputs {sorted(unknown)}; multimodal inputs are pixel_values, "
                        "image_position_ids, pixel_values_videos, video_position_ids, input_features, "
                        "input_features_mask")
    config, backbone = model.config, model.model
    masks = placeholder_masks(config, input_ids)
    placeholders = masks["image"] | masks["video"] | masks["audio"]
    pad_id = config.text_config.pad_token_id or 0
    ple_ids = input_ids.masked_fill(placeholders, pad_id)
    embeds = model.text.embed_tokens(ple_ids)

    for kind, pixels, positions, what in (("image", pixel_values, image_position_ids, "images"),
                                          ("video", pixel_values_videos, video_position_ids, "video frames")):
        if pixels is None:  # placeholders without media keep the pad embedding, as in the reference
            continue
        if backbone.vision_tower is None:
            raise ValueError(f"{what} were given but this model has no vision tower (its config has no "
                             "vision_config, or it was loaded with with_towers=False)")
        if positions is None:
            raise ValueError(f"{what} need their patch positions: pass {kind}_position_ids as the processor "
                             "returns them")
        prepare_tower(backbone.vision_tower, model.device)
        features = image_features(backbone.vision_tower, backbone.embed_vision, pixels.to(model.device),
                                  positions.to(model.device))
        embeds = _scatter(embeds, masks[kind], features, what, f"<|{kind}|>")

    if input_features is not None:
        if backbone.audio_tower is None:
            raise ValueError("audio was given but this model has no audio tower (only the E2B and E4B sizes "
                             "take audio; or the model was loaded with with_towers=False)")
        prepare_tower(backbone.audio_tower, model.device)
        feats = input_features.to(device=model.device, dtype=model.dtype)
        feats_mask = None if input_features_mask is None else input_features_mask.to(model.device).bool()
        features = audio_features(backbone.audio_tower, backbone.embed_audio, feats, feats_mask)
        embeds = _scatter(embeds, masks["audio"], features, "audio clips", "<|audio|>")

    blocks = None
    # Like the reference, which builds blocks only from the prefill's mm_token_type_ids: decode steps are causal.
    if config.text_config.use_bidirectional_attention == "vision" and (
            pixel_values is not None or pixel_values_videos is not None):
        blocks = vision_blocks(masks["image"] | masks["video"])
    return embeds, ple_ids, blocks


# --- precomputed soft tokens (the serving engine) ---------------------------------------------------------------

@dataclasses.dataclass
class SoftTokens:
    """One prompt's media, already through the towers: `features[i]` fills prompt position `positions[i]`.

    positions: [N] long, ascending; features: [N, text hidden size]; vision_runs: [start, end) of each run of
    consecutive image/video tokens (one image, or one video frame). A run must be embedded within one forward for
    the bidirectional vision mask to match a single full forward, so the engine never splits one across chunks."""

    positions: torch.Tensor
    features: torch.Tensor
    vision_runs: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.positions.shape[0])


@torch.no_grad()
def compute_soft_tokens(model, input_ids: list[int] | torch.Tensor, **media) -> SoftTokens:
    """Run the towers once for one prompt (processor outputs for that prompt) and keep the soft tokens with the
    positions they fill; the same checks as a forward with these media (a ValueError on any mismatch)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    return batch_soft_tokens(model, ids, None, **media)[0]


@torch.no_grad()
def batch_soft_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **media) -> list[SoftTokens]:
    """`compute_soft_tokens` for a (left-padded) batch and its processor outputs: one SoftTokens per row, its
    positions counted in the row's prompt without the padding."""
    ids = input_ids.to(model.device)
    embeds, _, _ = merge_media(model, ids, **media)
    # Only placeholders of given media are filled (the others keep the pad embedding).
    given = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}
    masks = {kind: mask & (media.get(given[kind]) is not None)
             for kind, mask in placeholder_masks(model.config, ids).items()}
    vision = masks["image"] | masks["video"]
    filled = vision | masks["audio"]
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(ids.device).bool()
    result = []
    for row in range(ids.shape[0]):
        keep = valid[row]
        positions = filled[row][keep].nonzero().flatten()
        result.append(SoftTokens(positions.cpu(), embeds[row][keep][positions].detach(),
                                 vision_runs(vision[row][keep].tolist())))
    return result


def vision_runs(is_vision: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive True values (the tokens of one image or video frame)."""
    runs, start = [], None
    for i, flag in enumerate(list(is_vision) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def merge_soft_tokens(model, input_ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Like `merge_media`, with precomputed soft tokens: `features` [N, H] fill the True positions of `mask`
    [B, L] in row-major order (placeholders elsewhere read as pad). With `use_bidirectional_attention ==
    "vision"`, runs of filled image/video placeholders get block ids, so each must lie whole in this forward."""
    embeds, ple_ids, _ = merge_media(model, input_ids)
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"media_embeds: the mask has {int(mask.sum())} positions but {features.shape[0]} "
                         "soft tokens were given")
    embeds = embeds.masked_scatter(mask[..., None], features.to(device=embeds.device, dtype=embeds.dtype))
    blocks = None
    if model.config.text_config.use_bidirectional_attention == "vision":
        masks = placeholder_masks(model.config, input_ids)
        vision = mask & (masks["image"] | masks["video"])
        if bool(vision.any()):
            blocks = vision_blocks(vision)
    return embeds, ple_ids, blocks
