"""Flash attention for many queries per row (prefill, chunked prefill, a cache-free forward): the twin of
`model.attention.attend` with `attention_mask`'s rule computed from positions inside the kernel.

Program (query tile, row * H + head, value slice) runs an online softmax over the row's keys tile by tile, and only
over the span of key tiles that some query of its tile may see: `_key_tile_ranges` works the spans out from per-tile
position bounds once per forward, on the device. So a sliding layer reads about window + BLOCK_M keys per query tile
instead of all of them (the ring plus a 4K chunk is 5x a 1K window), and a causal global layer half its keys. Inside
the span each tile's [BLOCK_M, BLOCK_N] visibility is computed from positions; no mask tensor is built (loads under
a per-tile skip branch would not be software-pipelined).

Visibility is `attention_mask`'s: key j is visible to query i iff kpos_j >= 0 and (kpos_j <= qpos_i, or both tokens
lie in one image block, blocks > 0), and with a window qpos_i - kpos_j < window. Padding queries see nothing and
get zeros (`attention_mask` lets them see everything to avoid NaNs; their outputs are discarded either way).

A program may accumulate a BLOCK_DV slice of the value dims only (QK^T, over all dims, is then computed once per
slice): the tile choice below trades that recomputation against the fp32 accumulator's registers.

A short chunk over a long context (a chat's next turn after its cached prefix: a few hundred queries, thousands of
keys) has few query tiles, and so too few programs for the GPU's SMs: where its keys are several times its queries,
each tile's key span is also cut into `num_splits` ranges, whose programs write fp32 partial outputs with their
log-sum-exp, merged by the decode kernel's combine (attention.py), as flash-decoding does for one query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _dot, _online_softmax_step, _wanted_splits, combine_splits
from .tuning import tile


@triton.jit
def _attend_tile(start, m_i, l_i, acc, q, qpos, qblock, window, num_keys, kpos_row, kblock_row, k_head, stride_kn,
                 v_head, stride_vn, offs_d, offs_dv, d_mask, dv_mask,
                 BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr):
    """One step of the online softmax over keys [start, start + BLOCK_N)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kpos = tl.load(kpos_row + offs_n, mask=offs_n < num_keys, other=-1)
    # int32 positions: the [BLOCK_M, BLOCK_N] comparisons are half the work of int64 ones
    visible = kpos[None, :] <= qpos[:, None]
    if HAS_BLOCKS:
        kblock = tl.load(kblock_row + offs_n, mask=offs_n < num_keys, other=0)
        visible |= (qblock[:, None] == kblock[None, :]) & (qblock[:, None] > 0)
    visible &= (kpos[None, :] >= 0) & (qpos[:, None] >= 0)
    if HAS_WINDOW:
        visible &= qpos[:, None] - kpos[None, :] < window
    # Empty slots (position -1) are not loaded (zeros instead): their contents, even NaN, never leak in.
    key_used = kpos >= 0
    rows = offs_n.to(tl.int64)[:, None]
    k = tl.load(k_head + rows * stride_kn + offs_d[None, :], mask=key_used[:, None] & d_mask[None, :], other=0.0)
    v = tl.load(v_head + rows * stride_vn + offs_dv[None, :], mask=key_used[:, None] & dv_mask[None, :], other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET)  # [BLOCK_M, BLOCK_N] fp32; scale 1.0 (q/k norms set the scale)
    return _online_softmax_step(tl.where(visible, s, float("-inf")), v, m_i, l_i, acc, q.dtype, INTERPRET)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr, qpos_ptr, kpos_ptr, qblock_ptr, kblock_ptr,
                    ranges_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb,
                    stride_vh, stride_vn, stride_ob, stride_om, stride_qpb, stride_kpb, num_heads, num_queries,
                    num_keys, head_dim, window, num_tiles, num_splits, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr):
    # The last query tiles see the most keys (causal): launch them first, so the short ones fill the tail.
    tile = num_tiles - 1 - tl.program_id(0)
    row_head, value_slice, split = tl.program_id(1), tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
    b, h = (row_head // num_heads).to(tl.int64), (row_head % num_heads).to(tl.int64)
    kv_head = h // GROUPS
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = value_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_mask, d_mask, dv_mask = offs_m < num_queries, offs_d < head_dim, offs_dv < head_dim

    qpos = tl.load(qpos_ptr + b * stride_qpb + offs_m, mask=m_mask, other=-1)  # -1 on padding queries
    qblock = qpos  # unused without blocks
    if HAS_BLOCKS:
        qblock = tl.load(qblock_ptr + b * stride_qpb + offs_m, mask=m_mask, other=0)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_head = k_ptr + b * stride_kb + kv_head * stride_kh
    v_head = v_ptr + b * stride_vb + kv_head * stride_vh
    kpos_row, kblock_row = kpos_ptr + b * stride_kpb, kblock_ptr + b * stride_kpb
    # Only the key tiles some query of this tile may see (worked out before the launch: `_key_tile_ranges`), and of
    # those this split's share, in whole tiles.
    span_start = tl.load(ranges_ptr + (b * num_tiles + tile) * 2)
    span_end = tl.load(ranges_ptr + (b * num_tiles + tile) * 2 + 1)
    per_split = tl.cdiv(tl.cdiv(span_end - span_start, BLOCK_N), num_splits) * BLOCK_N
    key_start = span_start + split * per_split
    key_end = tl.minimum(key_start + per_split, span_end)
    if INTERPRET:  # the interpreter (with numpy 2) cannot take a tensor as a range() bound
        start = key_start
        while start < key_end:
            m_i, l_i, acc = _attend_tile(start, m_i, l_i, acc, q, qpos, qblock, window, num_keys, kpos_row,
                                         kblock_row, k_head, stride_kn, v_head, stride_vn, offs_d, offs_dv, d_mask,
                                         dv_mask, BLOCK_N, HAS_WINDOW, HAS_BLOCKS, INTERPRET)
            start += BLOCK_N
    else:  # a for loop is software-pipelined: the next tile's K/V loads overlap this tile's math
        for start in range(key_start, key_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(start, m_i, l_i, acc, q, qpos, qblock, window, num_keys, kpos_row,
                                         kblock_row, k_head, stride_kn, v_head, stride_vn, offs_d, offs_dv, d_mask,
                                         dv_mask, BLOCK_N, HAS_WINDOW, HAS_BLOCKS, INTERPRET)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_mask = m_mask[:, None] & dv_mask[None, :]
    if num_splits == 1:
        out_rows = out_ptr + b * stride_ob + offs_m[:, None] * stride_om + h * head_dim
        tl.store(out_rows + offs_dv[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:  # part [B, Lq, H, splits, D] and lse [B, Lq, H, splits], as the combine kernel reads them
        row = ((b * num_queries + offs_m) * num_heads + h) * num_splits + split
        tl.store(part_ptr + row[:, None] * head_dim + offs_dv[None, :], out, mask=o_mask)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=m_mask & (value_slice == 0))


def _tiles(head_dim: int, itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DV, num_warps) for a head_dim (padded to a power of two): on the GPU the tuned ones
    (tuning.py; fp32's are small: Q alone would not fit shared memory), on the CPU (the interpreter, tests) small
    ones, so that short test sequences still span several tiles."""
    if device.type != "cuda":
        return 16, 16, min(head_dim, 32), 1
    key = "FP32_TILES" if itemsize > 2 else "TILES" if head_dim <= 256 else "WIDE_HEAD_TILES"
    block_m, block_n, block_dv, warps = tile("prefill_attention", key, device)
    return block_m, block_n, block_dv or head_dim, warps


def _key_tile_ranges(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, qblocks: torch.Tensor | None,
                     kblocks: torch.Tensor | None, block_m: int, block_n: int) -> torch.Tensor:
    """[B, query tiles, 2] int32: the first key and the end of the last key tile that any query of the tile may see
    (both multiples of block_n; start == end when none), from per-tile position bounds. Invisible tiles inside that
    span (out-of-order ring slots) are computed and masked; outside it they are never touched. qpos/kpos: int32 with
    -1 for padding / empty slots."""
    batch, num_keys = kpos.shape
    none = torch.iinfo(torch.int32).max

    def bounds(x, size, used):  # [B, L] -> per tile of `size`: least and largest used value (else none, -1)
        x, used = (torch.nn.functional.pad(t, (0, -t.shape[1] % size), value=fill).view(batch, -1, size)
                   for t, fill in ((x, -1), (used, False)))
        return torch.where(used, x, none).amin(-1), torch.where(used, x, -1).amax(-1)

    q_lo, q_hi = bounds(qpos, block_m, qpos >= 0)  # [B, Tq]
    k_lo, k_hi = bounds(kpos, block_n, kpos >= 0)  # [B, Tk]
    q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    needed = k_lo <= q_hi  # some key at or before some query (an empty side fails here or in the line below)
    if qblocks is not None:  # or both tiles hold tokens of image blocks whose id ranges overlap
        qb_lo, qb_hi = bounds(qblocks, block_m, (qblocks > 0) & (qpos >= 0))
        kb_lo, kb_hi = bounds(kblocks, block_n, (kblocks > 0) & (kpos >= 0))
        needed |= (kb_lo[:, None, :] <= qb_hi[:, :, None]) & (qb_lo[:, :, None] <= kb_hi[:, None, :])
    needed &= (k_hi >= 0) & (q_hi >= 0)
    if window is not None:
        needed &= q_lo - k_hi < window  # some key within the window of some query
    index = torch.arange(needed.shape[2], device=kpos.device, dtype=torch.int32)
    end = torch.where(needed, index + 1, 0).amax(-1)
    start = torch.minimum(torch.where(needed, index, none).amin(-1), end)
    return torch.stack([start * block_n, torch.clamp(end * block_n, max=num_keys)], dim=-1).to(torch.int32)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_positions: torch.Tensor,
                      query_valid: torch.Tensor, key_positions: torch.Tensor, window: int | None = None,
                      query_blocks: torch.Tensor | None = None, key_blocks: torch.Tensor | None = None,
                      plans: dict | None = None, tiles: tuple[int, int, int, int] | None = None,
                      num_stages: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """query [B, H, Lq, D] over key/value [B, Hkv, Lk, D] -> [B, Lq, H * D] in query's dtype (scale 1.0).

    query_positions/query_valid [B, Lq]; key_positions [B, Lk] (-1 = empty slot or padding); query_blocks [B, Lq]
    and key_blocks [B, Lk] (image block ids, 0 = text) for bidirectional image attention; `window` for sliding
    layers. H = G * Hkv: query head h reads kv head h // G. `plans`: a dict kept by the caller for as long as these
    positions hold (one forward), where the per-tile key ranges are kept between layers. `tiles` overrides
    (BLOCK_M, BLOCK_N, BLOCK_DV, warps), num_stages the tuned stages, num_splits the key ranges per query tile
    (by default from shapes, see below)."""
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads, num_keys = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    assert groups * num_kv_heads == num_heads, "query heads must be a multiple of kv heads"
    assert query.dtype == key.dtype == value.dtype, "query, key and value must share a dtype"
    assert key_positions.shape == (batch, num_keys) and query_positions.shape == (batch, num_queries)
    assert (query_blocks is None) == (key_blocks is None), "blocks come for queries and keys together"
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, block_dv, warps = tiles or _tiles(block_d, query.element_size(), query.device)
    plans = {} if plans is None else plans
    if (block_m, block_n) not in plans:
        qpos = torch.where(query_valid, query_positions, -1).to(torch.int32).contiguous()
        kpos = key_positions.to(torch.int32).contiguous()
        qblocks, kblocks = (b if b is None else b.to(torch.int32).contiguous() for b in (query_blocks, key_blocks))
        ranges = _key_tile_ranges(qpos, kpos, window, qblocks, kblocks, block_m, block_n)
        plans[block_m, block_n] = qpos, kpos, qblocks, kblocks, ranges
    qpos, kpos, qblocks, kblocks, ranges = plans[block_m, block_n]

    out = torch.empty(batch, num_queries, num_heads * head_dim, dtype=query.dtype, device=query.device)
    num_tiles, value_slices = triton.cdiv(num_queries, block_m), triton.cdiv(head_dim, block_dv)
    # Splits only for keys several times the queries (a chunk after a long cached prefix), each of 4 key tiles at
    # least: a new prompt's spans are short, and partials and a merge would cost it more than they gain.
    splits = num_splits or 1
    if num_splits is None and num_keys >= 4 * num_queries:
        splits = max(1, min(_wanted_splits(num_tiles * batch * num_heads * value_slices, query.device),
                            triton.cdiv(num_keys, 4 * block_n)))
    part = lse = out  # unwritten with one split
    if splits > 1:
        part = torch.empty(batch * num_queries * num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch * num_queries * num_heads, splits, dtype=torch.float32, device=query.device)
    _prefill_kernel[(num_tiles, batch * num_heads, value_slices * splits)](
        query, key, value, out, part, lse, qpos, kpos, qblocks if qblocks is not None else qpos,
        kblocks if kblocks is not None else kpos, ranges, *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        out.stride(0), out.stride(1), qpos.stride(0), kpos.stride(0), num_heads, num_queries, num_keys, head_dim,
        window or 0, num_tiles, splits, GROUPS=groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_DV=block_dv, HAS_WINDOW=window is not None, HAS_BLOCKS=qblocks is not None, INTERPRET=not query.is_cuda,
        num_warps=warps, num_stages=num_stages or tile("prefill_attention", "num_stages", query.device))
    if splits > 1:  # out [B, Lq, H * D] is [(b, query, head), D]: one merge per row of the partials
        combine_splits(part, lse, out, PDL=False)
    return out
