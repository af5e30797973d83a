"""Gemma 4 audio encoder (E2B/E4B): a Conformer over log-mel frames.

Input (what `gemma4.processing.audio` produces, identical to transformers' Gemma4AudioFeatureExtractor):
  input_features      (B, T, 128) log-mel frames, 10 ms apart
  input_features_mask (B, T) bool, True for frames fully covered by real audio (padding frames are False)

Pipeline: two stride-2 3x3 convolutions (time and frequency /4: one output step per 40 ms) -> linear to
hidden_size -> Conformer layers (half-step FFN, chunked local self-attention with relative positions, light
causal depthwise conv, half-step FFN) -> linear to `output_proj_dims`. The frame mask is subsampled alongside
(every other step, twice); the soft tokens handed to the text model are the outputs where it is True.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma4.config import AudioConfig
from gemma4.model.common import ClippableLinear, MultimodalEmbedder, RMSNorm, activation


def _clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Symmetric clamp by `gradient_clipping` (1e10 in the released configs: in fp32 a guard against inf)."""
    bound = min(bound, torch.finfo(x.dtype).max)
    return torch.clamp(x, -bound, bound)


class SubsampleLayer(nn.Module):
    """Masked 3x3 stride-2 conv over (time, frequency), channel LayerNorm (no bias), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x, mask):
        """x (B, C, T, F), mask (B, T) -> (B, C', ceil(T/2), ceil(F/2)), mask of every other frame."""
        x = self.conv((x * mask[:, None, :, None]).to(self.conv.weight.dtype))
        # LayerNorm over channels. Back to a contiguous NCHW tensor: the layout picks the next conv's kernel, and
        # this one sums in the reference's order.
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)).contiguous()
        return x, mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        # Flattened (frequency/4, channel) width. The checkpoint computes the frequency extent as c0 // 4,
        # which is right because c0 equals the 128 mel bins in every released config; we keep its shape.
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def forward(self, features, mask):
        x, mask = self.layer0(features[:, None], mask)  # (B, 1, T, 128) -> (B, c0, T/2, 64)
        x, mask = self.layer1(x, mask)  # -> (B, c1, T/4, 32)
        b, _, t, _ = x.shape
        x = x.permute(0, 2, 3, 1).reshape(b, t, -1)  # (B, T/4, 32 * c1), frequency-major
        return self.input_proj_linear(x), mask


class FeedForward(nn.Module):
    """Macaron half-step FFN: x + residual_weight * norm(W2 act(W1 norm(x)))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        d, clip = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(d, 4 * d, clip)
        self.ffw_layer_2 = ClippableLinear(4 * d, d, clip)
        self.pre_layer_norm = RMSNorm(d, config.rms_norm_eps)
        self.post_layer_norm = RMSNorm(d, config.rms_norm_eps)
        self.act = activation(config.hidden_act)
        self.clip, self.scale = config.gradient_clipping, config.residual_weight

    def forward(self, x):
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(self.pre_layer_norm(_clamp(x, self.clip)))))
        return x + self.post_layer_norm(_clamp(h, self.clip)) * self.scale


class LightConv(nn.Module):
    """x + W_out act(norm(causal_depthwise_conv(GLU(W_in norm(x)))))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        d, clip = config.hidden_size, config.use_clipped_linears
        self.linear_start = ClippableLinear(d, 2 * d, clip)
        self.linear_end = ClippableLinear(d, d, clip)
        self.depthwise_conv1d = nn.Conv1d(d, d, config.conv_kernel_size, groups=d, bias=False)
        self.pre_layer_norm = RMSNorm(d, config.rms_norm_eps)
        self.conv_norm = RMSNorm(d, config.rms_norm_eps)
        self.act = activation(config.hidden_act)
        self.clip = config.gradient_clipping

    def forward(self, x):
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # (B, T, D): first half * sigmoid(second)
        # Causal: left-pad by kernel - 1 so step t sees steps t - kernel + 1 .. t only.
        h = F.pad(h.transpose(1, 2), (self.depthwise_conv1d.kernel_size[0] - 1, 0))  # (B, D, T + k - 1)
        h = self.depthwise_conv1d(h).transpose(1, 2)
        return x + self.linear_end(self.act(self.conv_norm(_clamp(h, self.clip))))


class ChunkedAttention(nn.Module):
    """Local self-attention computed block by block.

    Queries are cut into blocks of `chunk` steps; block n attends to a context of keys starting `past` steps
    before it: positions n*chunk - past .. n*chunk + chunk + future - 1 (context width W). Which of those keys
    are visible is decided by the mask built in `AudioTower.block_mask`.

    Logit of query q and key k: q.k (content) + q.r (position), where r is a learned projection of a
    sinusoidal embedding of the offset, then a tanh soft cap. Scales: queries are multiplied by
    softplus(per_dim_scale) / (sqrt(head_dim) ln 2) and keys by ln(1 + e) / ln 2, fixed factors of the trained
    model (softplus(0) = ln 2, so with zero per_dim_scale the product is the usual 1/sqrt(head_dim) * 1.9).
    """

    def __init__(self, config: AudioConfig):
        super().__init__()
        d, clip = config.hidden_size, config.use_clipped_linears
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap = config.attention_logit_cap
        self.invalid = config.attention_invalid_logits_value
        self.q_proj = ClippableLinear(d, d, clip)
        self.k_proj = ClippableLinear(d, d, clip)
        self.v_proj = ClippableLinear(d, d, clip)
        self.post = ClippableLinear(d, d, clip)
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def _context_windows(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """(B, T, H, hd) -> (B, num_blocks, W, H, hd): the keys/values each query block sees (zeros off the ends)."""
        right = num_blocks * self.chunk + self.future - x.shape[1]
        x = F.pad(x, (0, 0, 0, 0, self.past, right))  # (B, past + blocks*chunk + future, H, hd)
        return x.unfold(1, self.context, self.chunk).movedim(-1, 2)

    def _position_term(self, q: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """q (B, N, C, H, hd), rel (R, H, hd) embeddings of the R = W//2 + 1 offsets listed from W//2 down to 0.

        The reference scores q against every rel[p], then shifts (Transformer-XL): query i, key j of a block
        gets the score of rel[j - i] when 0 <= j - i < R. Other pairs get 0 here; in the reference they get
        leftovers of the shift, but those pairs are always masked out, so the two agree on every used logit."""
        scores = torch.einsum("bnchd,rhd->bhncr", q, rel)  # (B, H, N, C, R)
        c, r = scores.shape[-2], scores.shape[-1]
        offset = torch.arange(self.context, device=q.device)[None, :] - torch.arange(c, device=q.device)[:, None]
        inside = (offset >= 0) & (offset < r)  # (C, W)
        index = offset.clamp(0, r - 1).expand(*scores.shape[:-1], -1)  # (B, H, N, C, W)
        return scores.gather(-1, index) * inside

    def forward(self, x: torch.Tensor, rel_embedding: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); rel_embedding (R, D); allowed (B, 1, N, chunk, W) bool from `AudioTower.block_mask`."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        # Scaled in the reference's order (by the constant, then by softplus), so the rounding matches too.
        q = self.q_proj(x).float().view(shape) * (self.head_dim**-0.5 / math.log(2)) * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).float().view(shape) * (math.log1p(math.e) / math.log(2))
        v = self.v_proj(x).float().view(shape)

        num_blocks = allowed.shape[2]
        q = F.pad(q, (0, 0, 0, 0, 0, num_blocks * self.chunk - t)).view(
            b, num_blocks, self.chunk, self.num_heads, self.head_dim)  # (B, N, C, H, hd)
        k, v = self._context_windows(k, num_blocks), self._context_windows(v, num_blocks)  # (B, N, W, H, hd)
        rel = self.relative_k_proj(rel_embedding).float().view(-1, self.num_heads, self.head_dim)

        logits = torch.einsum("bnchd,bnwhd->bhncw", q, k) + self._position_term(q, rel)  # (B, H, N, C, W)
        logits = torch.tanh(logits / self.cap) * self.cap
        logits = logits.masked_fill(~allowed, self.invalid)
        probs = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhncw,bnwhd->bnchd", probs, v).reshape(b, num_blocks * self.chunk, -1)[:, :t]
        return self.post(out.to(x.dtype))


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        d = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = ChunkedAttention(config)
        self.lconv1d = LightConv(config)
        self.norm_pre_attn = RMSNorm(d, config.rms_norm_eps)
        self.norm_post_attn = RMSNorm(d, config.rms_norm_eps)
        self.norm_out = RMSNorm(d, config.rms_norm_eps)
        self.clip = config.gradient_clipping

    def forward(self, x, rel_embedding, allowed):
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), rel_embedding, allowed)
        x = x + self.norm_post_attn(_clamp(h, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class AudioTower(nn.Module):
    """The audio encoder. `state_dict()` keys == checkpoint keys under `model.audio_tower.`."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        if len(config.subsampling_conv_channels) != 2:
            raise ValueError("the audio tower has exactly two subsampling convolutions")
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)
        # Sinusoid frequencies of the relative-position embedding (derived, not in the checkpoint).
        half = config.hidden_size // 2
        inv_timescales = torch.exp(torch.arange(half) * -(math.log(10_000.0) / max(half - 1, 1)))
        self.register_buffer("inv_timescales", inv_timescales, persistent=False)

    def relative_position_embedding(self, dtype: torch.dtype) -> torch.Tensor:
        """(R, D) [sin | cos] embeddings of the offsets W//2, W//2 - 1, ..., 0 (W = attention context width)."""
        c = self.config
        width = c.attention_chunk_size + c.attention_context_left - 1 + c.attention_context_right
        offsets = torch.arange(width // 2, -1, -1, device=self.inv_timescales.device, dtype=torch.float)
        angles = offsets[:, None] * self.inv_timescales  # (R, D/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)

    def block_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """valid (B, T) -> allowed (B, 1, N, chunk, W): may query i of block n attend to context key j?

        Query step s = n*chunk + i, key step u = n*chunk - past + j. Allowed when both lie inside the sequence,
        the key is real audio, and 0 <= s - u < context_left - 1 or 0 < u - s < context_right (the reference's
        sliding window: the oldest step of the context, s - u = context_left - 1, is never attended, and with
        context_right = 0 neither is any future step)."""
        c = self.config
        chunk, past, right = c.attention_chunk_size, c.attention_context_left - 1, c.attention_context_right
        t = valid.shape[1]
        num_blocks = -(-t // chunk)
        width = chunk + past + right
        query = torch.arange(num_blocks * chunk, device=valid.device).view(num_blocks, chunk, 1)
        key = (torch.arange(num_blocks, device=valid.device) * chunk - past).view(num_blocks, 1, 1) + torch.arange(
            width, device=valid.device)  # (N, 1, W)
        distance = query - key  # (N, C, W)
        in_window = ((distance >= 0) & (distance < past)) | ((distance < 0) & (-distance < right))
        in_window &= (query < t) & (key >= 0) & (key < t)
        key_valid = valid[:, key.clamp(0, t - 1).squeeze(1)]  # (B, N, W)
        return (in_window[None] & key_valid[:, :, None, :])[:, None]

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 128), (B, T) bool -> hidden (B, ceil(ceil(T/2)/2), output_proj_dims) and its validity mask (False:
        padding, whose values are meaningless and must be dropped)."""
        if input_features_mask is None:
            input_features_mask = torch.ones(input_features.shape[:2], dtype=torch.bool, device=input_features.device)
        x, valid = self.subsample_conv_projection(input_features, input_features_mask.bool())
        rel_embedding = self.relative_position_embedding(x.dtype)
        allowed = self.block_mask(valid)
        for layer in self.layers:
            x = layer(x, rel_embedding, allowed)
        return self.output_proj(x), valid


def audio_features(tower: AudioTower, embed_audio: MultimodalEmbedder, input_features: torch.Tensor,
                   input_features_mask: torch.Tensor) -> list[torch.Tensor]:
    """What the text model inserts for each audio clip: a list of (num_soft_tokens_i, text_hidden_size) tensors,
    equal to transformers' `embed_audio(get_audio_features(...).last_hidden_state)[mask]` per clip."""
    hidden, valid = tower(input_features, input_features_mask)
    return [tokens[keep] for tokens, keep in zip(embed_audio(hidden), valid)]
