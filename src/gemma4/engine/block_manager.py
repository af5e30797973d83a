"""The engine's KV memory (model/paged_cache.py's KVPools) with its free lists and the prefix cache. Every global
layer shares one block table per sequence (block j holds positions [j*B, (j+1)*B)), so one free list serves all of
them; each running sequence owns one sliding-window ring.

Prefix caching (docs/architecture.md, "Prefix caching"): a full block of prompt tokens is named by a hash chained
over every token (and media soft token) before it, so equal names mean equal K/V. Blocks are shared between sequences
with reference counts; a block nobody holds stays cached until its slot is needed (least recently used first, a
chain's tail before its head). Global layers need nothing else, KV-shared layers read their producer's cache, but a
sliding layer at position p reads the keys of [p - window, p), which a sequence's ring overwrites as it moves on: a hit
at position b also needs the ring as it was at b. So at a few points b of a prompt the ring is copied into a snapshot
ring, and a later prompt starting with the same b tokens starts from those blocks and a copy of that snapshot. The
points: the block boundary at or before the end of the prompt's first turn (its first stop token, `<turn|>`: a system
prompt that other conversations share), the one at or before the prompt's end (an agent's next step, another sample of
the same prompt), each moved before an image it would fall inside, and the last one a sequence computed when it ends
(the next turn of the same conversation, which resends the reply). Hits land only there: a prefix shared up to another
point (two conversations that diverge in their third turn) hits at the last point before. For that last snapshot,
taken after the sequence has moved up to a block past it, rings keep `block_size` slots more than the window. The
sequence's snapshot at the end of its prompt (past the first turn) then becomes the least recently used unless another
sequence started from it: under pressure a conversation keeps one ring, beside the first turn's."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from ..config import SLIDING, TextConfig
from ..model.paged_cache import KVPools
from .sequence import Sequence


class BlockManager(KVPools):
    def __init__(self, config: TextConfig, num_blocks: int, block_size: int, max_num_seqs: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_dtype: str = "auto", snapshot_rings: int = 0,
                 turn_ends: frozenset[int] = frozenset(), ring_extra: int = 0):
        """`snapshot_rings`: rings kept for the prefix cache's window snapshots (0: no prefix caching); `turn_ends`:
        the token ids that end a chat turn (the engine's stop ids); `ring_extra`: the ring slots past the window
        that verify steps write (KVPools; their speculative tokens), to which prefix caching adds its own
        (`ring_slots_past_window`)."""
        super().__init__(config, num_blocks, block_size, max_num_seqs, dtype, device, kv_cache_dtype,
                         num_rings=max_num_seqs + snapshot_rings,
                         ring_extra=self.ring_slots_past_window(ring_extra, block_size, snapshot_rings > 0))
        self.draft_slots = ring_extra
        self.free_blocks = list(range(self.num_blocks))
        self.free_rings = list(range(self.max_num_seqs))
        self.caching, self.turn_ends = snapshot_rings > 0, turn_ends
        self.refs = [0] * self.num_blocks
        self.cached: dict[bytes, int] = {}  # block name -> block holding it
        self.names: dict[int, bytes] = {}  # the reverse
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self.free_snapshots = list(range(self.max_num_seqs, self.num_rings))
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # name of the block ending at b -> ring, oldest first
        self.reused: set[bytes] = set()  # snapshots that a sequence started from
        self.prompt_tokens = 0  # prompt tokens admitted, and how many of them came from the cache
        self.hit_tokens = 0

    @staticmethod
    def ring_slots_past_window(draft_slots: int, block_size: int, caching: bool) -> int:
        """KVPools' `ring_extra`: a verify step's draft tokens and, with prefix caching, a block's worth, so that an
        ending sequence's ring still holds the window before its last block boundary (`_keep_end`)."""
        return draft_slots + (block_size if caching else 0)

    def block_tables(self, seqs: list[Sequence], width: int, rows: int | None = None) -> torch.Tensor:
        """[rows, width] (host): each sequence's blocks padded with the trash block; rows past them all trash."""
        trash = self.trash_block
        padded = [seq.block_table + [trash] * (width - len(seq.block_table)) for seq in seqs]
        return torch.tensor(padded + [[trash] * width] * ((rows or len(seqs)) - len(seqs)), dtype=torch.long)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / max(self.num_blocks, 1)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / max(self.prompt_tokens, 1)

    def cached_prefix(self, seq: Sequence) -> int:
        """How many of `seq`'s first tokens the cache holds, in whole blocks, at a snapshot point, fewer than its
        length (the last token is always computed: its logits give the next output token). 0 for a sequence that
        still needs its prompt's logprobs: cached positions have no logits."""
        if not self.caching or seq.prompt_scores is not None:
            return 0
        names = self._names(seq, (len(seq) - 1) // self.block_size)  # a preempted sequence's outputs included
        chain = 0
        while chain < len(names) and names[chain] in self.cached:
            chain += 1
        return next((j * self.block_size for j in range(chain, 0, -1) if names[j - 1] in self.snapshots), 0)

    def can_admit(self, seq: Sequence, cached: int = 0) -> bool:
        """Room for the whole known sequence plus one decode token, `cached` tokens of it from the prefix cache."""
        hits = cached // self.block_size
        idle_hits = sum(self.cached[name] in self.evictable for name in self._names(seq, hits))
        need = self.blocks_for(len(seq) + 1) - hits
        return bool(self.free_rings) and need <= self.num_free - idle_hits

    def admit(self, seq: Sequence, cached: int = 0) -> None:
        """Give `seq` a ring and its blocks; its first `cached` tokens (`cached_prefix`) come from the cache."""
        seq.ring_slot = self.free_rings.pop()
        hits = cached // self.block_size
        if hits:
            names = self._names(seq, hits)
            for name in names:
                block = self.cached[name]
                self.evictable.pop(block, None)
                self.refs[block] += 1
                seq.block_table.append(block)
            self.snapshots.move_to_end(names[-1])
            self.reused.add(names[-1])
            self._copy_ring(self.snapshots[names[-1]], seq.ring_slot)
        else:
            start = seq.ring_slot * self.ring_size
            self.ring_positions[start:start + self.ring_size] = -1
        self.reserve(seq, len(seq))
        seq.num_cached = cached
        self.prompt_tokens += len(seq.prompt_ids)
        self.hit_tokens += min(cached, len(seq.prompt_ids))
        seq.snapshot_points = [point for point in self._snapshot_points(seq) if point > cached]
        self._split(seq)

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure blocks exist for positions [0, num_tokens). False when out of blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(max(need, 0)):
            block = self.free_blocks.pop() if self.free_blocks else self._evict()
            self.refs[block] = 1
            seq.block_table.append(block)
        return True

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s ring and blocks (those the prefix cache names stay cached), after a snapshot at the last block
        boundary it computed unless it failed."""
        if self.caching and seq.ring_slot >= 0 and seq.finish_reason != "error":
            self._keep_end(seq)
        for block in reversed(seq.block_table):  # a chain's tail first: it is evicted first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.names:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        if seq.ring_slot >= 0:
            self.free_rings.append(seq.ring_slot)
        seq.ring_slot = -1
        seq.num_cached = 0

    def snapshot(self, seq: Sequence) -> None:
        """After a step: at each snapshot point b that `seq` has now computed (its ring still holding the window
        before b), name its blocks up to b and keep a copy of its ring."""
        done = seq.num_cached
        while seq.snapshot_points and seq.snapshot_points[0] <= done:
            point = seq.snapshot_points.pop(0)
            if done == point or done <= self.window:  # else the ring has moved past b (the split prevents it)
                name = self._keep(seq, point)
                if name is not None and point > self._point_before(seq, self._first_turn_end(seq)):
                    seq.own_snapshot = name
        self._split(seq)

    def _keep_end(self, seq: Sequence) -> None:
        """Snapshot at the last block boundary b of the tokens `seq` computed (the host knows them all: a token still
        on the device is not among them). Its ring holds the window before b if no position past
        num_cached + draft_slots - ring_extra was written: the furthest a step reaches is a rejected draft's,
        num_cached - 1 + draft_slots, and ring_extra - draft_slots = block_size."""
        known = min(seq.num_cached, len(seq) - int(seq.pending))
        point = known // self.block_size * self.block_size
        if point == 0 or point < seq.num_cached + self.draft_slots - (self.ring_size - self.window):
            return
        own = seq.own_snapshot
        if own in self.snapshots and own not in self.reused:  # the conversation goes on from the end's: first to go
            self.snapshots.move_to_end(own, last=False)
        self._keep(seq, point)

    def _split(self, seq: Sequence) -> None:
        """A ring keeps the last `window` positions: unless the whole prompt fits in it, a snapshot needs a chunk
        that ends exactly at its point."""
        points = seq.snapshot_points
        seq.split_at = points[0] if points and len(seq.prompt_ids) > self.window else 0

    def _keep(self, seq: Sequence, point: int) -> bytes | None:
        """Name `seq`'s blocks up to `point` and snapshot its ring there; the snapshot's name if it is new."""
        names = self._names(seq, point // self.block_size)
        for name, block in zip(names, seq.block_table):
            if name not in self.cached:
                self.cached[name], self.names[block] = block, name
        if names[-1] in self.snapshots:
            self.snapshots.move_to_end(names[-1])
            return None
        if self.free_snapshots:
            ring = self.free_snapshots.pop()
        else:
            evicted, ring = self.snapshots.popitem(last=False)
            self.reused.discard(evicted)
        self._copy_ring(seq.ring_slot, ring)
        positions = self.ring_positions[ring * self.ring_size:(ring + 1) * self.ring_size]
        positions.masked_fill_(positions >= point, -1)  # the positions past b (a prompt within one window, a reply)
        self.snapshots[names[-1]] = ring
        return names[-1]

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix and the hit counts (blocks that sequences hold stay theirs)."""
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.names.clear()
        self.free_snapshots.extend(self.snapshots.values())
        self.snapshots.clear()
        self.reused.clear()
        self.prompt_tokens = self.hit_tokens = 0

    def _evict(self) -> int:
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.names.pop(block)]
        return block

    def _copy_ring(self, src: int, dst: int) -> None:
        w = self.ring_size
        for i in self.keys:
            if self.layer_types[i] == SLIDING:
                for pools in (self.keys, self.values):
                    pools[i][:, dst * w:(dst + 1) * w] = pools[i][:, src * w:(src + 1) * w]
        self.ring_positions[dst * w:(dst + 1) * w] = self.ring_positions[src * w:(src + 1) * w]

    def _snapshot_points(self, seq: Sequence) -> list[int]:
        """The block boundaries at or before the end of the prompt's first turn and of the prompt, each moved
        before an image it would fall inside; ascending, without 0."""
        if not self.caching:
            return []
        points = {self._point_before(seq, end) for end in (self._first_turn_end(seq), len(seq.prompt_ids))}
        return sorted(points - {0})

    def _first_turn_end(self, seq: Sequence) -> int:
        return next((i + 1 for i, token in enumerate(seq.prompt_ids) if token in self.turn_ends), len(seq.prompt_ids))

    def _point_before(self, seq: Sequence, end: int) -> int:
        """The block boundary at or before `end`, moved before an image it would fall inside."""
        point = end // self.block_size * self.block_size
        for start, stop in reversed(seq.media.vision_runs if seq.media is not None else []):
            if start < point < stop:  # moved before one image, it may fall inside the one before
                point = start // self.block_size * self.block_size
        return point

    def _names(self, seq: Sequence, count: int) -> list[bytes]:
        """The chained names of the first `count` full blocks of `seq`'s tokens, prompt and outputs (each computed
        once per sequence)."""
        names, bs = seq.block_names, self.block_size
        if len(names) < count:
            tokens = seq.prompt_ids if count * bs <= len(seq.prompt_ids) else seq.tokens
            media = seq.media if seq.media is not None and len(seq.media) else None
            features = media.features.detach().cpu().contiguous() if media is not None else None
            for i in range(len(names), count):
                digest = hashlib.blake2b(names[-1] if names else b"", digest_size=16)
                digest.update(array("q", tokens[i * bs:(i + 1) * bs]).tobytes())
                if media is not None:  # the soft tokens filling this block's positions, as bytes
                    lo, hi = torch.searchsorted(media.positions, torch.tensor([i * bs, (i + 1) * bs])).tolist()
                    if hi > lo:
                        digest.update(array("q", media.positions[lo:hi].tolist()).tobytes())
                        digest.update(features[lo:hi].view(torch.uint8).numpy().tobytes())
                names.append(digest.digest())
        return names[:count]
