"""KV caches shaped by layer type.

* Sliding layers keep a ring buffer of `sliding_window` slots: a token at position p lives in slot p % window.
  Memory is constant in the context length.
* Global layers keep a static buffer indexed by position, so each row of a left-padded batch simply fills its
  own positions.
* KV-shared layers own nothing: they read the K/V their producer layer just returned.

Each buffer has one extra "trash" slot at the end: padding tokens, and tokens of a long chunk that fall out of the
window before the chunk ends, are written there instead of branching, and the trash slot is never attended to.

This is the cache `Model.forward(cache=...)` takes for incremental forwards by hand (and the parity tests); the
engine keeps its K/V in paged pools instead (engine/block_manager.py, viewed per forward by paged_cache.py). Both
offer the interface `attention.ForwardContext` reads (begin / update / write_target / stored / key_positions /
new_key_slots / num_keys / key_slots / end).

A decode step through the decode kernel (`begin(..., in_place=True)`: one token per row on CUDA) copies nothing: the
new K/V are written into the ring and the buffers first, and the kernel reads them in place. Writing first is safe on
a ring: the slot the new token takes held position p - window, which a query at p no longer sees.
"""

from __future__ import annotations

import torch

from ..config import FULL, SLIDING, TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={config.max_position_embeddings}")
        self.window = config.sliding_window
        self.max_len = max_len
        self.batch_size = batch_size
        self.layer_types = config.layer_types
        slots = {SLIDING: self.window + 1, FULL: max_len + 1}  # + the trash slot
        self.keys, self.values = kv_buffers(config, lambda kind, heads, dim: (batch_size, heads, slots[kind], dim),
                                            dtype, device)
        # Position held by each ring slot (-1 = empty); the same for every sliding layer.
        self.ring_positions = torch.full((batch_size, self.window + 1), -1, dtype=torch.long, device=device)
        self.length = 0  # global slots [0, length) may hold keys
        self.row_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens seen per row
        self._plan: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def next_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Positions that continue each row: padding takes no position (and gets 0)."""
        if valid.shape[1] == 1:  # a decode step: one launch
            return torch.where(valid, self.row_lengths[:, None], 0)
        positions = self.row_lengths[:, None] + valid.long().cumsum(dim=1) - 1
        return positions.masked_fill(~valid, 0)

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, in_place: bool = False) -> None:
        """Plan where this forward's tokens go. positions/valid: [B, L]. `in_place`: the decode kernel attends (one
        token per row; ForwardContext.decode_kernel decides)."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch {self.batch_size}, got {positions.shape[0]}")
        self.in_place = in_place
        top = int(torch.where(valid, positions, -1).max()) if valid.any() else -1
        if top >= self.max_len:
            raise ValueError(f"position {top} does not fit a cache of max_len={self.max_len}")
        end = max(self.length, top + 1)  # slot s holds position s
        length = positions.shape[1]
        # Of a chunk longer than the window only the last `window` tokens of each row stay in the ring.
        row_top = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)
        keep = valid & (positions > row_top - self.window)
        ring_slots = torch.where(keep, positions % self.window, self.window)
        new_positions = torch.where(valid, positions, -1)
        # Sliding keys: in place, the ring with the new position at its slot; otherwise the ring as it was, then the
        # whole chunk.
        sliding = (self.ring_positions.scatter(1, ring_slots, new_positions) if self.in_place
                   else torch.cat([self.ring_positions[:, : self.window], new_positions], dim=1))
        self._plan = {
            "end": end,
            "row_top": row_top,
            "ring_slots": ring_slots,
            "global_slots": torch.where(valid, positions, self.max_len),
            "new_positions": new_positions,
            SLIDING: sliding,
            FULL: torch.arange(end, device=positions.device).expand(self.batch_size, end),
            ("slots", SLIDING): self.window + torch.arange(length, device=positions.device).expand_as(positions),
            ("slots", FULL): torch.where(valid, positions, 0),
        }

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Write this forward's K/V ([B, Hkv, L, D]) and return all K/V the layer attends to. Not for in-place decode
        steps: their layers write the new K/V straight to `write_target` (kernels.norm.qkv_norm_rope_store)."""
        assert not self.in_place, "in-place decode steps write through write_target"
        cache_k, cache_v, slots = self.write_target(layer_idx)
        if self.layer_types[layer_idx] == SLIDING:
            # Attend over the ring as it was plus the whole chunk, then keep the chunk's tail in the ring.
            all_k = torch.cat([cache_k[:, :, : self.window], key], dim=2)
            all_v = torch.cat([cache_v[:, :, : self.window], value], dim=2)
            _scatter_slots(cache_k, slots, key)
            _scatter_slots(cache_v, slots, value)
            return all_k, all_v
        _scatter_slots(cache_k, slots, key)
        _scatter_slots(cache_v, slots, value)
        return self.stored(layer_idx)

    def write_target(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key buffer, value buffer, slots [B, L]): token t of row b goes to buffer[b, :, slots[b, t]]."""
        slots = self._plan["ring_slots" if self.layer_types[layer_idx] == SLIDING else "global_slots"]
        return self.keys[layer_idx], self.values[layer_idx], slots

    def stored(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Once this forward's K/V are written (on sliding layers: by an in-place decode step): all K/V the layer
        attends to."""
        cache_k, cache_v = self.keys[layer_idx], self.values[layer_idx]
        if self.layer_types[layer_idx] == SLIDING:
            return cache_k, cache_v
        return cache_k[:, :, : self._plan["end"]], cache_v[:, :, : self._plan["end"]]

    def key_positions(self, layer_type: str) -> torch.Tensor:
        return self._plan[layer_type]

    def new_key_slots(self, layer_type: str) -> torch.Tensor:
        return self._plan[("slots", layer_type)]

    def num_keys(self, layer_type: str, query_positions: torch.Tensor) -> torch.Tensor | None:
        """How many leading key slots a query at each position [B] may need: a global buffer holds position s in slot
        s, so nothing past the query's own position (the decode kernel skips the rest, unread)."""
        return query_positions + 1 if layer_type == FULL else None

    def key_slots(self, layer_type: str) -> None:
        return None  # keys are read from the [B, Hkv, slots, D] tensors `update` returns

    def end(self) -> None:
        """Commit the forward: the ring now holds the new tokens, the global buffers are longer."""
        plan, self._plan = self._plan, None
        self.ring_positions.scatter_(1, plan["ring_slots"], plan["new_positions"])
        self.ring_positions[:, self.window].fill_(-1)  # the trash slot never holds a visible key
        self.length = plan["end"]
        self.row_lengths = torch.maximum(self.row_lengths, plan["row_top"][:, 0] + 1)


def kv_buffers(config: TextConfig, shape, dtype: torch.dtype, device) -> tuple[dict, dict]:
    """Zeroed K and V buffers {layer: tensor} of every layer that owns K/V (KV-shared layers own none), shaped
    `shape(layer_type, kv_heads, head_dim)`. K=V layers store values separately too: v_norm(k) lacks k_norm and
    RoPE."""
    keys, values = {}, {}
    for i, layer_type in enumerate(config.layer_types):
        if not config.is_kv_shared(i):
            size = shape(layer_type, config.layer_num_kv_heads[i], config.layer_head_dims[i])
            keys[i] = torch.zeros(size, dtype=dtype, device=device)
            values[i] = torch.zeros(size, dtype=dtype, device=device)
    return keys, values


def _scatter_slots(buffer: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """buffer[b, :, slots[b, t]] = new[b, :, t] for every row b and token t."""
    batch, heads, length, dim = new.shape
    index = slots[:, None, :, None].expand(batch, heads, length, dim)
    buffer.scatter_(2, index, new.to(buffer.dtype))
