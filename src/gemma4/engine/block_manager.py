"""The engine's KV memory (model/paged_cache.py's KVPools) with its free lists. Every global layer shares one block
table per sequence (block j holds positions [j*B, (j+1)*B)), so one free list serves all of them."""

from __future__ import annotations

import torch

from ..model.paged_cache import KVPools
from .sequence import Sequence


class BlockManager(KVPools):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.free_blocks = list(range(self.num_blocks))
        self.free_rings = list(range(self.max_num_seqs))

    def block_tables(self, seqs: list[Sequence], width: int, rows: int | None = None) -> torch.Tensor:
        """[rows, width] (host): each sequence's blocks padded with the trash block; rows past them all trash."""
        trash = self.trash_block
        padded = [seq.block_table + [trash] * (width - len(seq.block_table)) for seq in seqs]
        return torch.tensor(padded + [[trash] * width] * ((rows or len(seqs)) - len(seqs)), dtype=torch.long)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / max(self.num_blocks, 1)

    def can_admit(self, seq: Sequence) -> bool:
        """Room for the whole known sequence plus one decode token."""
        return bool(self.free_rings) and self.blocks_for(len(seq) + 1) <= len(self.free_blocks)

    def admit(self, seq: Sequence) -> None:
        seq.ring_slot = self.free_rings.pop()
        start = seq.ring_slot * self.window
        self.ring_positions[start:start + self.window] = -1
        self.reserve(seq, len(seq))
        seq.num_cached = 0

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure blocks exist for positions [0, num_tokens). False when out of blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self.free_blocks):
            return False
        seq.block_table.extend(self.free_blocks.pop() for _ in range(max(need, 0)))
        return True

    def release(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.ring_slot >= 0:
            self.free_rings.append(seq.ring_slot)
        seq.ring_slot = -1
        seq.num_cached = 0
