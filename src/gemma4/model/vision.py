"""Gemma 4 vision encoder: patches -> bidirectional transformer -> 3x3 position-aware pooling -> soft tokens.

Input format (what `gemma4.processing.image` produces, identical to transformers' Gemma4ImageProcessor):
  pixel_values       (B, P, 3 * patch_size**2) float in [0, 1]; each row one 16x16 patch, flattened as
                     (row-in-patch, column-in-patch, channel); images are padded with zero rows to the same P
  pixel_position_ids (B, P, 2) long, (x, y) = (patch column, patch row); padding rows are (-1, -1)
P = max_soft_tokens * pooling_kernel_size**2 for the budget the batch was processed with. Every image's patch grid
has sides divisible by pooling_kernel_size, so each image yields (#real patches) / k**2 soft tokens.

`VisionTower.forward` returns the soft tokens of all images packed along one axis, image after image, like the
reference's `last_hidden_state`; `image_features` projects them into the text model and splits them per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.config import VisionConfig
from gemma4.model.attention import attend
from gemma4.model.common import ClippableLinear, MultimodalEmbedder, RMSNorm, activation, apply_rope


class VisionRotary(nn.Module):
    """2-D axial RoPE: the first half of each head's channels rotate with the patch column (x), the second half
    with the patch row (y); each half is ordinary half-split RoPE with head_dim/4 frequencies."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        half = config.head_dim // 2  # channels per axis
        theta = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # (head_dim/4,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, 2) positions -> cos, sin of shape (B, P, head_dim), laid out [x, x, y, y] by quarter."""
        angles = position_ids[..., None].float() * self.inv_freq  # (B, P, 2, head_dim/4)
        angles = torch.cat([angles[:, :, 0], angles[:, :, 0], angles[:, :, 1], angles[:, :, 1]], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, P, heads, head_dim); cos/sin (B, P, head_dim) from `cos_sin`."""
        cos, sin = cos[:, :, None], sin[:, :, None]
        x_axis, y_axis = x.chunk(2, dim=-1)
        (cos_x, cos_y), (sin_x, sin_y) = cos.chunk(2, dim=-1), sin.chunk(2, dim=-1)
        return torch.cat([apply_rope(x_axis, cos_x, sin_x), apply_rope(y_axis, cos_y, sin_y)], dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with RMS-normalised q/k (learned scale) and v (no scale); because q and k
    are normalised, the logits are not scaled by 1/sqrt(head_dim) (scale 1.0)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        clip, d, hd = config.use_clipped_linears, config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = ClippableLinear(d, self.num_heads * hd, clip)
        self.k_proj = ClippableLinear(d, self.num_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(d, self.num_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.num_heads * hd, d, clip)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.v_norm = RMSNorm(hd, config.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, key_valid):
        """x (B, P, D); key_valid (B, P) bool, False for padding patches (never attended to)."""
        b, p, _ = x.shape
        q = VisionRotary.apply(self.q_norm(self.q_proj(x).view(b, p, self.num_heads, self.head_dim)), cos, sin)
        k = VisionRotary.apply(self.k_norm(self.k_proj(x).view(b, p, self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(b, p, self.num_kv_heads, self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, P, head_dim)
        return self.o_proj(attend(q, k, v, key_valid[:, None, None, :]))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        clip, d, f = config.use_clipped_linears, config.hidden_size, config.intermediate_size
        self.gate_proj = ClippableLinear(d, f, clip)
        self.up_proj = ClippableLinear(d, f, clip)
        self.down_proj = ClippableLinear(f, d, clip)
        self.act = activation(config.hidden_activation)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    """Pre-norm block with extra norms on each branch's output (sandwich norm), as in the Gemma text model."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x, cos, sin, key_valid):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_valid))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.rotary_emb = VisionRotary(config)  # no persistent state: nothing in the checkpoint
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, position_ids, key_valid):
        cos, sin = self.rotary_emb.cos_sin(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, key_valid)
        return x


class PatchEmbedder(nn.Module):
    """Linear patch projection plus a learned 2-D position embedding: table[0][x] + table[1][y]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixel_values, position_ids, padding):
        # The processor leaves pixels in [0, 1]; the model was trained on [-1, 1].
        pixel_values = (2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype)
        safe = position_ids.clamp(min=0)  # padding rows (-1) look up row 0, then get a zero embedding
        pos = self.position_embedding_table[0][safe[..., 0]] + self.position_embedding_table[1][safe[..., 1]]
        pos = pos.masked_fill(padding[..., None], 0.0)
        return self.input_proj(pixel_values) + pos


class VisionTower(nn.Module):
    """The vision encoder. `state_dict()` keys == checkpoint keys under `model.vision_tower.`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:  # 26B/31B: a fixed affine map applied to the pooled tokens
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def num_soft_tokens(self, pixel_position_ids: torch.Tensor) -> list[int]:
        """Soft tokens each image of the batch yields: its real patches / k**2."""
        real = (pixel_position_ids != -1).all(dim=-1).sum(dim=-1)
        return (real // self.config.pooling_kernel_size**2).tolist()

    def _pool(self, hidden, position_ids, padding):
        """Average each k x k block of patches into one soft token; return (B, P/k**2, D) fp32 and its validity.

        An image whose grid is W x H patches (both multiples of k) fills output slots 0 .. (W/k)(H/k) - 1 in
        row-major block order; the remaining slots of the padded batch stay empty and are marked invalid."""
        b, p, d = hidden.shape
        k = self.config.pooling_kernel_size
        num_slots = p // k**2
        hidden = hidden.float().masked_fill(padding[..., None], 0.0)
        pos = position_ids.clamp(min=0)
        blocks_per_row = (pos[..., 0].amax(dim=-1, keepdim=True) + 1) // k  # (B, 1): W / k
        slot = pos[..., 0] // k + blocks_per_row * (pos[..., 1] // k)  # (B, P); padding rows -> slot 0, adds 0
        # The average as a matmul with a (B, P, slots) matrix of 1/k**2 entries: this is how the reference sums,
        # and the same order of float additions keeps the soft tokens bit-identical to it.
        weights = F.one_hot(slot, num_slots).float() / k**2
        pooled = weights.transpose(1, 2) @ hidden
        real = (~padding).sum(dim=-1, keepdim=True)
        valid = torch.arange(num_slots, device=hidden.device)[None] < real // k**2  # (B, P/k**2)
        return pooled, valid

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:
        """(B, P, 3*ps*ps), (B, P, 2) -> (sum of soft tokens over images, hidden_size), images in batch order."""
        padding = (pixel_position_ids == -1).all(dim=-1)  # (B, P)
        x = self.patch_embedder(pixel_values, pixel_position_ids, padding)
        x = self.encoder(x, pixel_position_ids, ~padding)
        pooled, valid = self._pool(x, pixel_position_ids, padding)
        # Scale by sqrt(hidden) in fp32: the result can exceed the fp16 range before standardisation.
        tokens = pooled[valid] * self.config.hidden_size**0.5  # (N, D): drops the empty slots, packs images
        if self.config.standardize:
            tokens = (tokens - self.std_bias.float()) * self.std_scale.float()
        return tokens.to(x.dtype)


def image_features(tower: VisionTower, embed_vision: MultimodalEmbedder, pixel_values: torch.Tensor,
                   pixel_position_ids: torch.Tensor) -> list[torch.Tensor]:
    """What the text model inserts for each image: a list of (num_soft_tokens_i, text_hidden_size) tensors, equal to
    transformers' `Gemma4Model.get_image_features(...).pooler_output`. For video frames too: one entry per frame."""
    tokens = embed_vision(tower(pixel_values, pixel_position_ids))
    return list(torch.split(tokens, tower.num_soft_tokens(pixel_position_ids)))
