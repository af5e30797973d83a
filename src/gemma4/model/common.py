"""Small building blocks shared by the text decoder and the vision and audio towers.

Parameter and buffer names follow the transformers 5.23 checkpoint layout, so a tower's `state_dict()` keys are
exactly the checkpoint keys below its prefix (`model.vision_tower.`, `model.audio_tower.`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
                "swish": F.silu, "relu": F.relu}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: pair i is dims i and i + D/2 of x's last dim (D); cos/sin broadcast to x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """x / rms(x), times a learned per-channel `weight` (used as is: the towers do not add 1 to it).

    Computed in fp32 whatever the input dtype. `with_scale=False` gives the parameter-free variant (no state)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x):
            from ..kernels.norm import rms_norm
            return rms_norm(x, self.weight, self.eps)
        if kernels.cpu_enabled(x) and x.is_contiguous():
            from ..kernels.cpu import rms_norm
            return rms_norm(x, self.weight, self.eps)
        h = x.float()
        # pow(-0.5) rather than rsqrt: that is what the reference (and its JAX origin) computes.
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.to(x.dtype)


class ClippableLinear(nn.Module):
    """A bias-free linear layer whose input and output may be clamped to ranges stored in the checkpoint.

    The E2B/E4B towers were trained with these activation clips (scalars `input_min/max`, `output_min/max`,
    persistent buffers, +-inf when unused). Without `clip` the buffers do not exist, as in the 26B/31B towers."""

    def __init__(self, in_features: int, out_features: int, clip: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clip = clip
        if clip:
            for side in ("input", "output"):
                self.register_buffer(f"{side}_min", torch.tensor(-float("inf")))
                self.register_buffer(f"{side}_max", torch.tensor(float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clip:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class MultimodalEmbedder(nn.Module):
    """Maps tower outputs into the text model's embedding space: parameter-free RMSNorm, then a linear projection.

    State-dict keys equal those under `model.embed_vision.` / `model.embed_audio.` (only
    `embedding_projection.weight`, shape (text_hidden, in_dim))."""

    def __init__(self, tower_config, text_config):
        super().__init__()
        # in_dim: the tower's width; the audio tower ends with its own projection to `output_proj_dims`.
        in_dim = getattr(tower_config, "output_proj_dims", tower_config.hidden_size)
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps=tower_config.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, text_config.hidden_size, bias=False)

    def forward(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(soft_tokens))
