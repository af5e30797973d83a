"""Paged KV memory (`KVPools`: the engine's, through its BlockManager, and KVCache's) and its view for one forward
(`PagedCacheView`: the interface `attention.ForwardContext` reads).

Per row of the batch: a block table for the global layers, a ring for the sliding layers and how many tokens are
already cached. A prefill chunk gathers the row's cached K/V into a contiguous [B, Hkv, T, D] tensor, appends this
forward's K/V, and writes the new K/V into the pools; masks stay position-based (every gathered slot carries its
position, -1 = empty). A decode step on CUDA gathers nothing: the new K/V are written first, and the decode kernel
reads the pools through each row's own slots (`key_slots`): its ring, with the new position in the new token's slot,
and its blocks in position order, both scanned only up to the query's position (`num_keys`).

`kv_cache_dtype="fp8"`: the pools hold float8 e4m3 values with a float32 scale per (layer, KV head) for keys and one
for values: stored = fp8(clamp(x / scale, +-448)), read = fp8 * scale, rounded to the model dtype. Every writer and
reader applies them (this module's plain path, `kernels.norm.qkv_norm_rope_store`, `kernels.attention`; the decode
kernel multiplies its scores and output by the scales instead of each value, the same up to that rounding)."""

from __future__ import annotations

import functools

import torch

from .. import kernels
from ..config import FULL, SLIDING, TextConfig


KV_CACHE_DTYPES = ("auto", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value; it has no infinity: a plain cast past 464 gives NaN


def kv_cache_dtype_for(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The pools' element dtype: "auto" the model's (`dtype`), "fp8" float8 e4m3. ValueError on any other name."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                         f"got {kv_cache_dtype!r}")
    return FP8 if kv_cache_dtype == "fp8" else dtype


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, T, D] (head dim third from last) -> fp8: x / scale saturated to +-448 (fp32 math, rounded to
    nearest even)."""
    return (x.float() / scale[:, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 x [..., Hkv, T, D] -> x * scale (fp32) rounded to `dtype`."""
    return (x.float() * scale[:, None, None]).to(dtype)


class KVPools:
    """Paged KV memory: per layer that owns K/V a flat pool [Hkv, slots, D]. Global layers: `num_blocks` blocks of
    `block_size` slots (a sequence's block table says which hold its positions); sliding layers: one ring of
    `ring_size` slots per sequence (`num_rings` rings: `max_num_seqs` unless the engine keeps more for its prefix
    cache), position p in slot p % ring_size, with the position each slot holds (-1 = empty) in `ring_positions`,
    shared by the sliding layers. `ring_size` is the window plus `ring_extra`: a speculative verify step writes up to
    that many positions past the accepted ones, and the window before them must survive their rejection. Each pool
    ends with a trash block / trash slot that padding writes to and that no query sees.

    `dtype`: the model's; `kv_cache_dtype` "auto" stores K/V in it, "fp8" in float8 e4m3 with per-head scales
    `key_scales[layer]` / `value_scales[layer]` (float32 [Hkv], 1.0: k_norm and v_norm leave K/V of RMS 1, well
    inside +-448). A checkpoint's calibrated scales are copied into them in place (`load_scales_`; CUDA graphs read
    these very tensors). An fp8 pool also carries its scales as `pool.kv_scales`, so that code handed only the pool
    (`write_target`'s callers, the decode kernel, KV-shared layers reading their producer's pools) applies them."""

    def __init__(self, config: TextConfig, num_blocks: int, block_size: int, max_num_seqs: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", kv_cache_dtype: str = "auto",
                 num_rings: int | None = None, ring_extra: int = 0):
        self.config, self.num_blocks, self.block_size, self.max_num_seqs = config, num_blocks, block_size, max_num_seqs
        self.window, self.layer_types = config.sliding_window, config.layer_types
        self.ring_size = self.window + ring_extra
        self.num_rings = max_num_seqs if num_rings is None else num_rings
        self.ring_trash, self.trash_block = self.num_rings * self.ring_size, num_blocks
        self.kv_cache_dtype, self.pool_dtype = kv_cache_dtype, kv_cache_dtype_for(kv_cache_dtype, dtype)
        # Zeroed K and V of every layer that owns K/V (KV-shared layers own none). K=V layers store values separately
        # too: v_norm(k) lacks k_norm and RoPE.
        self.keys, self.values = {}, {}
        self.key_scales, self.value_scales = {}, {}  # fp8 only
        for i, layer_type in enumerate(config.layer_types):
            if not config.is_kv_shared(i):
                slots = self.ring_trash + 1 if layer_type == SLIDING else (num_blocks + 1) * block_size
                shape = (config.layer_num_kv_heads[i], slots, config.layer_head_dims[i])
                self.keys[i] = torch.zeros(shape, dtype=self.pool_dtype, device=device)
                self.values[i] = torch.zeros(shape, dtype=self.pool_dtype, device=device)
                if self.pool_dtype == FP8:
                    for pools, scales in ((self.keys, self.key_scales), (self.values, self.value_scales)):
                        scales[i] = torch.ones(shape[0], dtype=torch.float32, device=device)
                        pools[i].kv_scales = scales[i]
        self.ring_positions = torch.full((self.ring_trash + 1,), -1, dtype=torch.long, device=device)

    def load_scales_(self, scales: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A checkpoint's calibrated scales (quantization.kv_cache_scales: layer -> key and value scales [Hkv]) into
        an fp8 pool's, in place; a cache of the model's dtype stores K/V as they are and needs none."""
        if self.pool_dtype != FP8:
            return
        for i, (key_scale, value_scale) in scales.items():
            if i in self.key_scales:
                self.key_scales[i].copy_(key_scale)
                self.value_scales[i].copy_(value_scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class PagedCacheView:
    prechecked = True  # positions and ids were checked by the engine (Model.forward then reads nothing back)

    def __init__(self, pools, block_tables: torch.Tensor, ring_slots: torch.Tensor, num_cached: torch.Tensor,
                 max_cached: int | None = None):
        """pools: KVPools (the engine's BlockManager, or a KVCache's).
        block_tables [B, nb] (padded with the trash block), ring_slots [B], num_cached [B]. `max_cached`: the most
        tokens any row has cached (known to the host): a prefill chunk gathers no global slot past it (None: every
        slot of the tables; the graphed decode step, which gathers nothing)."""
        self.pools = pools
        self.ring_size, self.block_size = pools.ring_size, pools.block_size
        self.layer_types = pools.layer_types
        self.block_tables, self.ring_slots, self.num_cached = block_tables, ring_slots, num_cached
        self.max_cached = max_cached
        self._plan: dict | None = None

    @functools.cached_property
    def global_gather(self) -> torch.Tensor:
        """Global layers: flat pool slot of every slot of each row's blocks (slot j holds position j)."""
        batch, nb = self.block_tables.shape
        offsets = torch.arange(self.block_size, device=self.block_tables.device)
        return (self.block_tables[:, :, None] * self.block_size + offsets).reshape(batch, nb * self.block_size)

    @property
    def prefix_gather(self) -> torch.Tensor:
        """A prefill chunk's cached global keys: the slots below max_cached (the rest hold no position yet)."""
        return self.global_gather if self.max_cached is None else self.global_gather[:, :self.max_cached]

    @functools.cached_property
    def ring_gather(self) -> torch.Tensor:
        """Sliding layers: flat pool slot of each row's ring."""
        size = self.ring_size
        return self.ring_slots[:, None] * size + torch.arange(size, device=self.ring_slots.device)

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, in_place: bool = False) -> None:
        """As KVCache.begin; `in_place` (ForwardContext.decode_kernel): attend over the pools without gathering."""
        self.in_place = in_place
        if in_place and kernels.enabled(positions):  # the same plan in one launch (kernels.step_inputs)
            return self._decode_plan_kernel(positions, valid)
        bs, pools, size = self.block_size, self.pools, self.ring_size
        new_positions = torch.where(valid, positions, -1)
        row_top = new_positions.amax(dim=1, keepdim=True)
        keep = valid & (positions > row_top - size)  # a long chunk leaves only its tail in the ring
        ring_write = torch.where(keep, self.ring_slots[:, None] * size + positions % size, pools.ring_trash)
        block_index = (positions // bs).clamp(max=self.block_tables.shape[1] - 1)
        block = torch.gather(self.block_tables, 1, block_index)
        global_write = torch.where(valid, block * bs + positions % bs, pools.trash_block * bs)
        length = positions.shape[1]
        self._plan = {"ring_write": ring_write, "global_write": global_write, "new_positions": new_positions}
        offsets = torch.arange(self.global_gather.shape[1], device=positions.device)[None]
        # A ring longer than the window (ring_extra) lists its slots from the window of the row's first query on: an
        # in-place decode's window is then the first min(query + 1, window) candidates, all a sliding layer reads,
        # and the older positions after them are never scanned; a gathered chunk takes the same order, so that a
        # decode step sums in the order the CPU decode kernel reproduces bit for bit. A ring of the window's size
        # lists slot 0 first.
        query = new_positions[:, :1]  # -1 for a padding row: it sees nothing
        first = (query - pools.window + 1).clamp(min=0) if size > pools.window else 0
        order = (first + torch.arange(size, device=positions.device)) % size
        self.ring_gather = self.ring_slots[:, None] * size + order
        # The decode kernel attends in place over the pools (see the module's docstring). The candidates are the
        # row's own slots, the new tokens' included (written before attending): the ring with the positions
        # [num_cached, query] at their slots (one position, but for the rows of a flattened verify step, which share
        # a sequence's ring and cache: paged_cache's `num_cached` is then the sequence's, not the row's), and the
        # global blocks in position order, visible up to the query's position.
        if in_place:
            latest = query - (query - order) % size  # the last position <= query in each slot
            ring = torch.where(latest >= self.num_cached[:, None], latest, pools.ring_positions[self.ring_gather])
            num_keys = query[:, 0] + 1
            self._plan.update({SLIDING: ring, FULL: torch.where(offsets <= query, offsets, -1),
                               ("num_keys", FULL): num_keys, ("num_keys", SLIDING): num_keys.clamp(max=pools.window)})
            return
        # Otherwise the row's cached K/V are gathered, then this chunk's appended: positions in that order. A ring
        # slot or block past num_cached holds a rejected draft's K/V (speculative decoding) or nothing: unseen.
        offsets = offsets[:, :self.prefix_gather.shape[1]]
        cached = torch.where(offsets < self.num_cached[:, None], offsets, -1)
        ring = pools.ring_positions[self.ring_gather]
        ring = torch.where(ring < self.num_cached[:, None], ring, -1)
        arange = torch.arange(length, device=positions.device).expand_as(positions)
        self._plan.update({
            SLIDING: torch.cat([ring, new_positions], dim=1),
            FULL: torch.cat([cached, new_positions], dim=1),
            ("slots", SLIDING): size + arange,
            ("slots", FULL): cached.shape[1] + arange,
        })

    def begin_read(self) -> None:
        """A plan for one query per row that attends in place to each row's keys below num_cached and writes
        nothing (speculative decoding's drafter, whose layers read the target's K/V: model/assistant.py); `end` is
        not called after it. Ring slots and blocks at or past num_cached (rejected drafts) are unseen."""
        self.in_place = True
        limit = self.num_cached[:, None]
        ring = self.pools.ring_positions[self.ring_gather]
        offsets = torch.arange(self.global_gather.shape[1], device=limit.device)[None]
        self._plan = {SLIDING: torch.where(ring < limit, ring, -1), FULL: torch.where(offsets < limit, offsets, -1),
                      ("num_keys", SLIDING): self.num_cached, ("num_keys", FULL): self.num_cached}

    def _decode_plan_kernel(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        from ..kernels.step_inputs import decode_plan
        pools = self.pools
        self.ring_gather, ring, self.global_gather, full, scalars = decode_plan(
            positions, valid, self.num_cached, self.ring_slots, self.block_tables, pools.ring_positions, pools.window,
            self.ring_size, self.block_size, pools.ring_trash, pools.trash_block)
        ring_write, global_write, new_positions, num_keys, window_keys = scalars[:, :, None].unbind(0)
        self._plan = {"ring_write": ring_write, "global_write": global_write, "new_positions": new_positions,
                      SLIDING: ring, FULL: full, ("num_keys", FULL): num_keys[:, 0],
                      ("num_keys", SLIDING): window_keys[:, 0]}

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """key/value [B, Hkv, L, D] -> all K/V the layer attends to: the row's cached K/V, then this chunk's. Not for
        in-place decode steps: their layers write straight to `write_target` (kernels.norm.qkv_norm_rope_store)."""
        assert not self.in_place, "in-place decode steps write through write_target"
        key_pool, value_pool, write = self.write_target(layer_idx)
        gather = self.ring_gather if self.layer_types[layer_idx] == SLIDING else self.prefix_gather
        out = []
        for pool, new in ((key_pool, key), (value_pool, value)):
            cached = pool[:, gather].permute(1, 0, 2, 3)  # [Hkv, B, T, D] -> [B, Hkv, T, D]
            scale = getattr(pool, "kv_scales", None)
            if scale is None:
                stored, cached = new.to(pool.dtype), cached.to(new.dtype)
            else:  # fp8: this chunk too attends to its K/V as stored (as a decode step, which reads them back)
                stored = quantize_kv(new, scale)
                cached, new = dequantize_kv(cached, scale, new.dtype), dequantize_kv(stored, scale, new.dtype)
            out.append(torch.cat([cached, new], dim=2))
            pool[:, write.reshape(-1)] = stored.transpose(0, 1).flatten(1, 2)  # new[b, :, t] to write[b, t]
        return out[0], out[1]

    def write_target(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key pool, value pool, slots [B, L]): token t of row b goes to pool[:, slots[b, t]]."""
        write = self._plan["ring_write" if self.layer_types[layer_idx] == SLIDING else "global_write"]
        return self.pools.keys[layer_idx], self.pools.values[layer_idx], write

    def key_positions(self, layer_type: str) -> torch.Tensor:
        return self._plan[layer_type]

    def new_key_slots(self, layer_type: str) -> torch.Tensor:
        return self._plan[("slots", layer_type)]

    def num_keys(self, layer_type: str) -> torch.Tensor:
        """In-place decode: how many of a row's candidates (`key_slots`) its query reads. Global layers: [0, query];
        slot j of a row's blocks holds position j. Sliding layers: the window's min(query + 1, window) positions,
        which `begin` puts first in the ring's candidates; slots past the query are empty (BlockManager.admit empties
        a ring) or hold rejected drafts past the query. Reading more candidates is correct too: the mask rule hides
        whatever lies outside the window (the CPU kernel reads the global count for both)."""
        return self._plan[("num_keys", layer_type)]

    def key_slots(self, layer_type: str) -> torch.Tensor:
        """In-place decode: each row's candidate keys as flat pool slots (its ring from the window's first position,
        or its blocks in order)."""
        return self.ring_gather if layer_type == SLIDING else self.global_gather

    def end(self) -> None:
        plan, self._plan = self._plan, None
        ring_positions = self.pools.ring_positions
        ring_positions[plan["ring_write"].reshape(-1)] = plan["new_positions"].reshape(-1)
        # fill_, not `[i] = -1`: assigning a Python number to one element copies a CPU scalar tensor, which a CUDA
        # graph capture refuses.
        ring_positions[self.pools.ring_trash:].fill_(-1)
