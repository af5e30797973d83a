"""KVCache: the cache `Model.forward(cache=...)` takes for incremental forwards by hand (and the parity tests): the
engine's paged memory (`KVPools`, see paged_cache.py) with a fixed layout, row b owning ring b of every sliding layer
and blocks [b * n, (b + 1) * n) of every global layer (n blocks of `max_len` tokens). Each forward goes through a
`PagedCacheView` of it, as an engine step does, so both paths share one implementation (every row keeps its own
positions: a left-padded batch needs no special case). `kv_cache_dtype`: "auto" (the model dtype) or "fp8" (see
paged_cache.py)."""

from __future__ import annotations

import torch

from ..config import TextConfig
from .paged_cache import KVPools, PagedCacheView

BLOCK_SIZE = 16


class KVCache:
    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_dtype: str = "auto"):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={config.max_position_embeddings}")
        self.batch_size, self.max_len = batch_size, max_len
        blocks = -(-max_len // BLOCK_SIZE)
        self.pools = KVPools(config, batch_size * blocks, BLOCK_SIZE, batch_size, dtype, device,
                              kv_cache_dtype)
        self.block_tables = torch.arange(batch_size * blocks, device=device).view(batch_size, blocks)
        self.ring_slots = torch.arange(batch_size, device=device)
        self.row_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.view: PagedCacheView | None = None

    @property
    def nbytes(self) -> int:
        return self.pools.nbytes

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, in_place: bool = False) -> None:
        """Plan where this forward's tokens go. positions/valid: [B, L]. `in_place`: the decode kernel attends (one
        token per row; ForwardContext.decode_kernel decides)."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache was made for batch {self.batch_size}, got {positions.shape[0]}")
        top = int(torch.where(valid, positions, -1).max()) if valid.any() else -1
        if top >= self.max_len:
            raise ValueError(f"position {top} does not fit a cache of max_len={self.max_len}")
        self.view = PagedCacheView(self.pools, self.block_tables, self.ring_slots, self.row_lengths)
        self.view.begin(positions, valid, in_place)
        self.row_lengths = torch.maximum(self.row_lengths, torch.where(valid, positions + 1, 0).amax(dim=1))

    def __getattr__(self, name: str):
        """update / write_target / key_positions / new_key_slots / num_keys / key_slots: this forward's view's."""
        if name.startswith("_") or self.__dict__.get("view") is None:
            raise AttributeError(name)
        return getattr(self.view, name)

    def end(self) -> None:
        self.view.end()
        self.view = None
