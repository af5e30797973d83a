"""Gemma 4's drafter for speculative decoding (`model_type: gemma4_assistant`, transformers 5.24's
`Gemma4AssistantForCausalLM`).

A small decoder whose layers have queries only: every layer attends to K/V computed by the *target* model, the K/V
of the target's last sliding layer for its sliding layers and of its last global layer for its global layers (the
drafter keeps no cache). One drafting step:

    x      = pre_projection(concat(target_embedding(last token), target hidden state))   [B, L, hidden]
    h      = decoder layers over x (queries at the last seen token's position) + final norm
    logits = h @ lm_head.T   (dense head, tied to `model.embed_tokens`; no softcap)
             or the clustered head (E2B / E4B: `use_ordered_embeddings`), which scores only the tokens of the
             `centroid_intermediate_top_k` best of `num_centroids` clusters
    next   = post_projection(h)   [B, L, backbone]: the "target hidden state" fed to the next drafting step

The target's part (its embedding of the token, its last hidden state, its K/V) comes in as explicit inputs: this
module never sees the target model or the engine. Parameter names equal the checkpoint keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import SLIDING, ConfigError, TextConfig, _JsonConfig
from .attention import ForwardContext
from .text import TextModel


@dataclass
class AssistantConfig(_JsonConfig):
    """`config.json` of a drafter. Defaults are transformers 5.24's `Gemma4AssistantConfig` defaults."""

    model_type: str = "gemma4_assistant"
    text_config: TextConfig = field(default_factory=TextConfig)
    backbone_hidden_size: int = 1536  # the target's hidden size
    use_ordered_embeddings: bool = False  # True: the clustered head
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssistantConfig:
        model_type = data.get("model_type") if isinstance(data, dict) else None
        if model_type != "gemma4_assistant":
            raise ConfigError(f"not a drafter config: model_type is {model_type!r}, expected 'gemma4_assistant'")
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json of model_type 'gemma4_assistant' needs a 'text_config' object")
        return super().from_dict({**data, "text_config": drafter_text_config(text)})

    def __post_init__(self):
        text = self.text_config
        # The same restrictions as the reference's validate_architecture.
        for name, allowed in (("hidden_size_per_layer_input", 0), ("enable_moe_block", False),
                              ("use_double_wide_mlp", False)):
            if getattr(text, name) != allowed:
                raise ConfigError(f"a drafter's text_config.{name} must be {allowed!r}, got {getattr(text, name)!r}")
        if self.use_ordered_embeddings and text.vocab_size % self.num_centroids:
            raise ConfigError(f"vocab_size {text.vocab_size} is not a multiple of num_centroids {self.num_centroids}")
        if self.use_ordered_embeddings and not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
            raise ConfigError(f"centroid_intermediate_top_k={self.centroid_intermediate_top_k} must be in "
                              f"[1, num_centroids]")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out.setdefault("architectures", ["Gemma4AssistantForCausalLM"])
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AssistantConfig:
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: point to a drafter checkpoint directory")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def drafter_text_config(data: dict[str, Any]) -> TextConfig:
    """A drafter's `text_config`: every layer is KV-shared (num_kv_shared_layers = num_hidden_layers; the reference
    fills that in when the file leaves it at 0). TextConfig requires a producer layer for shared layers, which a
    drafter has only in the target, so it is built without sharing and then marked all-shared: every layer reads
    the target K/V of its own type, handed in under its own index (kv_source_layer[i] = i)."""
    n = data.get("num_hidden_layers", TextConfig.num_hidden_layers)
    shared = data.get("num_kv_shared_layers") or n
    if shared != n:
        raise ConfigError(f"every layer of a drafter shares the target's K/V: num_kv_shared_layers must be {n}, "
                          f"got {shared}")
    # No per-layer embeddings unless the file says so (TextConfig's default is E2B's 256).
    text = TextConfig.from_dict({"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                 **data, "num_kv_shared_layers": 0})
    text.num_kv_shared_layers = n
    text.kv_sharing_modes = ["reuse"] * n
    return text


class SharedKV(NamedTuple):
    """The K/V of one target layer, as the drafter reads it: key and value [B, Hkv, S, D] (after the target's k/v
    norms and RoPE), and each key's absolute position [B, S] (-1: padding or an empty slot)."""

    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor


class PagedKV(NamedTuple):
    """The target's K/V read in place from its paged pools (model/paged_cache.py), instead of `SharedKV` tensors:
    `view` planned with `begin_read` (each row's keys below its num_cached), `pools` {layer type: (key pool, value
    pool)} of the target layers the drafter reads. Only with the decode kernel (CUDA); shapes stay fixed whatever the
    context, so a drafting round can be captured in a CUDA graph."""

    view: object
    pools: dict


class DraftOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, vocab], the model dtype
    hidden: torch.Tensor  # [B, L, backbone_hidden_size]: the target-hidden input of the next drafting step


def drafter_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, Lq, S]: which target keys a drafter query reads.

    The reference builds *bidirectional* masks here (its queries sit at the position of the last token the target
    has seen, so every key handed in is in the past): global layers read every valid key; sliding layers read the keys
    within `window` positions of the query, the bound inclusive (|q - k| <= window in its mask function), i.e.
    window + 1 keys, one more than the target's own sliding layers read. With contiguous keys ending at the query's
    position this is exactly the reference's "last window + 1 keys of the sliding K/V" (it flips the key axis to get
    them)."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = (k >= 0).expand(-1, q.shape[1], -1)
    if window is not None:
        allowed = allowed & ((q - k).abs() <= window)
    return allowed[:, None]


class ClusteredHead(nn.Module):
    """E2B / E4B drafters' output head (`masked_embedding` in the checkpoint): the vocabulary is split into
    `num_centroids` clusters of vocab / num_centroids tokens (`token_ordering` lists the token ids cluster after
    cluster); `centroids` scores the clusters, and only the tokens of the top-k clusters get a logit from the (tied)
    LM head. Every other token gets one value below all of them: the smallest computed logit of the whole batch minus
    1, as in the reference (so a row's filler depends on the other rows; greedy drafts never pick it)."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        hidden, vocab = config.text_config.hidden_size, config.text_config.vocab_size
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(hidden, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(vocab, dtype=torch.long))

    def candidates(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, their logits), each [B, L, top_k * cluster_size]: the tokens the head scores."""
        _, clusters = self.centroids(hidden).topk(self.top_k, dim=-1)  # [B, L, top_k]
        members = self.token_ordering.view(self.num_centroids, -1)  # [clusters, cluster_size] token ids
        token_ids = members[clusters].flatten(-2)  # [B, L, top_k * cluster_size]
        rows = lm_head[token_ids]  # [B, L, C, H]
        # One dot product per candidate token, as the reference computes it ([.., 1, H] @ [.., H, C]).
        logits = (hidden.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        return token_ids, logits

    def forward(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        token_ids, logits = self.candidates(hidden, lm_head)
        filler = logits.min() - 1.0
        out = filler.expand(*hidden.shape[:-1], lm_head.shape[0]).to(logits.dtype).clone()
        return out.scatter_(-1, token_ids, logits)


class Assistant(nn.Module):
    """The drafter. `forward` runs one drafting step for every row of a batch; see the module docstring."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        text = config.text_config
        self.config = config
        self.model = TextModel(text)  # its embed_tokens is read only as the tied LM head
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, config.backbone_hidden_size, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.masked_embedding = ClusteredHead(config) if config.use_ordered_embeddings else None
        self.gather_vocabulary = None  # set by distributed/sharding.py when a dense head's rows are split over ranks

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, token_embeds: torch.Tensor, target_hidden: torch.Tensor, positions: torch.Tensor,
                target_kv: dict[str, SharedKV] | PagedKV) -> DraftOutput:
        """token_embeds [B, L, backbone]: the target's (scaled) input embedding of the last token; target_hidden
        [B, L, backbone]: the target's last hidden state there (or the previous step's `DraftOutput.hidden`);
        positions [B, L]: the queries' positions (the reference keeps the last seen token's position for every step
        of a drafting round); target_kv: {"sliding_attention": SharedKV, "full_attention": SharedKV} of the target's
        last sliding and last global layer (or PagedKV: the same read in place)."""
        text = self.config.text_config
        x = self.pre_projection(torch.cat([token_embeds, target_hidden], dim=-1))
        valid = torch.ones_like(positions, dtype=torch.bool)
        # Attention.forward reads a KV-shared layer's K/V from ctx.shared_kv[kv_source_layer] (= its own index here).
        if isinstance(target_kv, PagedKV):
            # The decode kernel's window rule is q - k < window: window + 1 keeps drafter_mask's |q - k| <= window.
            ctx = ForwardContext(positions, valid, target_kv.view, sliding_window=text.sliding_window + 1)
            if not ctx.decode_kernel:
                raise ValueError("PagedKV needs the decode kernel (CUDA, kernels on): pass SharedKV tensors instead")
            ctx.shared_kv = {i: (*target_kv.pools[t], None) for i, t in enumerate(text.layer_types)}
        else:
            ctx = ForwardContext(positions=positions, valid=valid, sliding_window=text.sliding_window)
            masks = {layer_type: drafter_mask(positions, kv.positions, text.sliding_window if layer_type == SLIDING
                                              else None) for layer_type, kv in target_kv.items()}
            ctx.shared_kv = {i: (target_kv[t].key, target_kv[t].value, masks[t])
                             for i, t in enumerate(text.layer_types)}
        h = self.model(x, ctx)
        if self.masked_embedding is not None:
            logits = self.masked_embedding(h, self.lm_head_weight)
        else:
            logits = h @ self.lm_head_weight.T
            if self.gather_vocabulary is not None:  # tensor parallel: each rank's rows of the vocabulary, side by side
                logits = self.gather_vocabulary(logits)
        return DraftOutput(logits, self.post_projection(h))

    def ready_(self) -> Assistant:
        """Inference mode, as `Gemma4.ready_` leaves a loaded model."""
        return self.eval().requires_grad_(False)


