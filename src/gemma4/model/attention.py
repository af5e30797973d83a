"""Position-based attention masks, the per-forward context, and the attention op itself.

Every key carries the absolute position of its token (-1 for an empty slot or a padding token). A query at position
p may read a key at position k when 0 <= k <= p and, on sliding layers, p - k < window. Because masks depend only on
positions, the same rule serves a full forward, a ring-buffer cache (whose slots are out of order) and a left-padded
batch (each row has its own positions), with no special cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels
from ..config import SLIDING
from ..options import options


def attention_mask(query_positions: torch.Tensor, query_valid: torch.Tensor, key_positions: torch.Tensor,
                   window: int | None, query_blocks: torch.Tensor | None = None,
                   key_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [batch, 1, queries, keys]; True means "may attend".

    `*_blocks` (0 = text, n > 0 = the n-th run of image / video-frame tokens of the row) let tokens of one image
    see each other in both directions, as the reference does with `use_bidirectional_attention="vision"`:
    AND(window, OR(causal, same block)). The window bounds only how far back a key may lie (q - k < window), so a
    token of an image longer than the window still sees every later token of its image. Callers pass blocks for
    sliding layers only: the reference keeps global layers causal."""
    q = query_positions[:, :, None]  # [B, Lq, 1]
    k = key_positions[:, None, :]  # [B, 1, Lk]
    allowed = k <= q
    if query_blocks is not None:
        allowed |= (query_blocks[:, :, None] == key_blocks[:, None, :]) & (query_blocks[:, :, None] > 0)
    allowed &= k >= 0
    if window is not None:
        allowed &= q - k < window
    # Padding queries may look anywhere: their outputs are discarded, and an all-False row would make NaNs.
    allowed |= ~query_valid[:, :, None]
    return allowed[:, None]


# Up to this many queries per row, `attend` multiplies out the scores itself (decode steps, drafts' verification): the
# CPU's fused SDPA kernel costs about ten times as much per call there.
FEW_QUERIES = 8


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """query [B, H, Lq, D], key/value [B, Hkv, Lk, D] -> [B, Lq, H * D]. Grouped-query attention: KV head j serves
    query heads j * H / Hkv ... (j + 1) * H / Hkv - 1.

    The scale is 1.0: q_norm and k_norm already fix the logits' magnitude."""
    batch, heads, length, dim = query.shape
    if (length <= FEW_QUERIES and kernels.cpu_enabled(query) and mask.dtype == torch.bool
            and query.dtype == key.dtype == value.dtype):
        from ..kernels.cpu import attend as attend_kernel
        return attend_kernel(query, key, value, mask)
    if length <= FEW_QUERIES:
        # Each KV head's query heads as rows of one product; scores, softmax and the weighted sum in fp32 (as the
        # fused kernels accumulate), rounded once to the model dtype.
        kv_heads, wide = key.shape[1], torch.promote_types(query.dtype, torch.float32)
        rows = query.reshape(batch, kv_heads, heads // kv_heads * length, dim).to(wide)
        scores = (rows @ key.to(wide).transpose(-1, -2)).unflatten(2, (heads // kv_heads, length))
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask [B, 1, Lq, Lk] -> [B, 1, 1, Lq, Lk]
        out = (scores.softmax(-1).flatten(2, 3) @ value.to(wide)).to(query.dtype).view(batch, heads, length, dim)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=1.0,
                                             enable_gqa=heads != key.shape[1])
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def attend_one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_positions: torch.Tensor,
                     query_positions: torch.Tensor, window: int | None, **keys) -> torch.Tensor:
    """query [B, H, 1, D] -> [B, 1, H * D] through the split-K decode kernel (`keys`: its slots, num_keys,
    new_key_only)."""
    from ..kernels.attention import decode_attention
    out = decode_attention(query[:, :, 0], key, value, key_positions, query_positions, window, **keys)
    return out.reshape(query.shape[0], 1, -1)


@dataclass(frozen=True)
class MaskRule:
    """What `attention_mask` would materialize, for a kernel that applies the rule itself from positions."""

    query_positions: torch.Tensor  # [B, Lq]
    query_valid: torch.Tensor  # [B, Lq]
    key_positions: torch.Tensor  # [B, Lk]
    window: int | None
    query_blocks: torch.Tensor | None = None  # [B, Lq] / [B, Lk] image block ids on sliding layers with images
    key_blocks: torch.Tensor | None = None
    plans: dict = field(default_factory=dict)  # the kernel's per-tile key ranges, shared by the layers of a forward

    def last_query_only(self) -> MaskRule:
        blocks = self.query_blocks[:, -1:] if self.query_blocks is not None else None
        return MaskRule(self.query_positions[:, -1:], self.query_valid[:, -1:], self.key_positions, self.window,
                        blocks, self.key_blocks)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if query.shape[2] == 1 and self.query_blocks is None:
            # One query per row (KV-shared layers of a last-position-only prefill): the split-K decode kernel
            # spreads the keys over the SMs, where the prefill kernel would scan them all in one program per head.
            # A padding query sees what position 0 sees; its output is discarded.
            return attend_one_query(query, key, value, self.key_positions, self.query_positions[:, 0], self.window,
                                    any_length=True)
        from ..kernels.prefill_attention import prefill_attention
        return prefill_attention(query, key, value, self.query_positions, self.query_valid, self.key_positions,
                                 self.window, self.query_blocks, self.key_blocks, self.plans)


@dataclass
class ForwardContext:
    """What every layer of one forward shares: positions, padding, the cache, and K/V handed to KV-shared layers."""

    positions: torch.Tensor  # [B, L] absolute position of each token
    valid: torch.Tensor  # [B, L] False on padding
    cache: object | None = None  # a KVCache (see cache.py) or None for a cache-free forward
    blocks: torch.Tensor | None = None  # [B, L] image block ids for bidirectional vision attention
    sliding_window: int = 0
    masks: dict = field(default_factory=dict)  # layer type -> mask, built once per forward
    shared_kv: dict = field(default_factory=dict)  # producer layer index -> (key, value)
    cpu_decode: bool = False  # a CPU decode step whose layers run as one C call (TextModel.decodes_on_cpu)

    def __post_init__(self):
        # One token per row over a cache, on CUDA: the split-K decode kernel reads only the keys a row may see (up
        # to the written prefix of a global layer's buffer), maps query heads to KV heads without copies, and needs
        # no mask tensors. The cache follows this decision (`begin(..., in_place=...)`): each layer writes its new K/V
        # into the cache's buffers first (in the kernel of its q/k/v norms, Attention.forward), and the attention
        # reads the buffers as they are.
        # The CPU's one-call decode steps (`cpu_decode`) attend in place too.
        self.decode_kernel = self.cache is not None and self.positions.shape[1] == 1 and (
            kernels.enabled(self.positions) or self.cpu_decode)
        # Any other forward on CUDA: the flash prefill kernel, which applies the mask rule from positions itself
        # (the "mask" handed around is then a MaskRule, never a [B, 1, Lq, Lk] tensor).
        # The prefill_kernel option off: SDPA with a boolean mask instead (comparisons).
        self.prefill_kernel = not self.decode_kernel and kernels.enabled(self.positions) and options().prefill_kernel

    def attend(self, layer_type: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """query [B, H, Lq, D] over key/value [B, Hkv, Lk, D] -> [B, Lq, H * D]."""
        if isinstance(mask, MaskRule):
            return mask.attend(query, key, value)
        if not self.decode_kernel:
            return attend(query, key, value, mask)
        window = self.sliding_window if layer_type == SLIDING else None
        # The kernel before this one (Attention.forward's store) wrote only each row's key at its query position.
        return attend_one_query(query, key, value, self.cache.key_positions(layer_type), self.positions[:, 0], window,
                                slots=self.cache.key_slots(layer_type), num_keys=self.cache.num_keys(layer_type),
                                new_key_only=True)

    def keys_and_values(self, layer_idx: int, layer_type: str, key: torch.Tensor, value: torch.Tensor):
        """Store this layer's new K/V and return everything the layer attends to, with the mask."""
        if self.cache is not None:
            key, value = self.cache.update(layer_idx, key, value)
        if layer_type not in self.masks:
            window = self.sliding_window if layer_type == SLIDING else None
            key_positions = (self.cache.key_positions(layer_type) if self.cache is not None
                             else torch.where(self.valid, self.positions, -1))
            # Image blocks on sliding layers only: global layers stay causal, images included (as in the reference).
            blocks = key_blocks = self.blocks if window is not None else None
            if blocks is not None and self.cache is not None:
                # Image tokens see each other bidirectionally only within one forward: cached keys count as text.
                slots = self.cache.new_key_slots(layer_type)  # [B, L] where each new token sits among the keys
                # amax: a padding token (block 0) sharing a slot with a real token never erases its block.
                key_blocks = torch.zeros_like(key_positions, dtype=blocks.dtype).scatter_reduce(
                    1, slots, blocks, reduce="amax")
            rule = MaskRule if self.prefill_kernel else attention_mask
            self.masks[layer_type] = rule(self.positions, self.valid, key_positions, window, blocks, key_blocks)
        return key, value, self.masks[layer_type]
