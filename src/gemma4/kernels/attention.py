"""Split-K ("flash-decoding") attention for one query token per row: the decode twin of `model.attention.attend`.

A decode step has one query per row, so a kernel that gives each (row, head) one program leaves most of a GPU idle at
batch 1. Here the candidate keys of each row are cut into `num_splits` ranges; program (row * Hkv + kv head, split)
runs an online softmax over its range for all G query heads sharing that kv head (a [G_pad, D] tile, so the K/V
block is read once per kv head and both products run on tl.dot), and writes an fp32 partial output with its
log-sum-exp. A second small kernel merges the splits.

Masking is `attention_mask`'s rule, from positions only: key j is visible iff 0 <= kpos <= qpos and, with a window,
qpos - kpos < window. The grid depends on shapes only and the per-row bound `num_keys` is read on the device, so a
launch can be captured in a CUDA graph: keys past the bound are never loaded, they just leave splits idle.

An fp8 (e4m3) cache is read with its per-head scales. A head's scale is one number, so it moves out of the products:
the fp8 K/V tiles enter tl.dot as their exact values (rounding.dot_operand: a few integer instructions per four
values), the scores are multiplied by the key scale and the output by the value scale, in fp32. model/paged_cache.py's
`dequantize_kv` instead rounds each fp8 * scale to the model dtype, so the two differ by that rounding (relative
2^-9 of a value in bf16).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .pdl import after_previous_kernel, launch_options
from .rounding import dot_operand
from .tuning import config


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # fp32 operands get exact fp32 products ("ieee", not tf32); bf16 ones run on tensor cores either way.
    if UPCAST:  # Triton's interpreter multiplies bf16 tiles as raw bits; fp32 holds their values exactly
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _block_keys(block, end, qpos, window, kpos_row, stride_pn, slots_row, stride_sn, k_row, stride_kn, v_row,
                stride_vn, d_mask, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                OLDER: tl.constexpr):
    """Candidates [block, block + BLOCK_N) of one row and kv head: their positions, visibility, cache rows and K/V
    tiles. With OLDER the key at the query's own position is left out of the tiles (`_add_new_key` adds it)."""
    offs_n = block + tl.arange(0, BLOCK_N)
    in_range = offs_n < end
    kpos = tl.load(kpos_row + offs_n * stride_pn, mask=in_range, other=-1)
    visible = (kpos >= 0) & (kpos <= qpos)
    if HAS_WINDOW:
        visible = visible & (qpos - kpos < window)
    if PAGED:  # candidate j lives at pool row slots[b, j] (the pools' batch stride is 0)
        rows = tl.load(slots_row + offs_n * stride_sn, mask=in_range, other=0).to(tl.int64)
    else:
        rows = offs_n.to(tl.int64)
    # Invisible keys are not loaded (zeros instead), so empty slots cost no bandwidth and their garbage
    # (even NaN) cannot leak in through 0 * NaN.
    loaded = visible & (kpos < qpos) if OLDER else visible
    kv_mask = loaded[:, None] & d_mask[None, :]
    k = tl.load(k_row + rows[:, None] * stride_kn, mask=kv_mask, other=0.0)
    v = tl.load(v_row + rows[:, None] * stride_vn, mask=kv_mask, other=0.0)
    return kpos, visible, rows, k, v


@triton.jit
def _add_new_key(kpos, visible, rows, k, v, qpos, k_row, stride_kn, v_row, stride_vn, d_mask):
    """The tiles of `_block_keys(..., OLDER=True)` with the key at the query's position loaded in (after the wait)."""
    new = (visible & (kpos == qpos))[:, None] & d_mask[None, :]
    k = tl.where(new, tl.load(k_row + rows[:, None] * stride_kn, mask=new, other=0.0), k)
    v = tl.where(new, tl.load(v_row + rows[:, None] * stride_vn, mask=new, other=0.0), v)
    return k, v


@triton.jit
def _attend_keys(visible, k, v, m_i, l_i, acc, q, k_scale, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """One step of the online softmax over a block of keys (`_block_keys`)."""
    if FP8:  # exact values; the key scale multiplies the scores, the value scale the output (at the end)
        # K's products reduce along its contiguous dims, so its conversion may move into tl.dot's operand layout
        # (8-bit bytes through shared memory, half of bf16's); V's reduce across its rows: converted as loaded.
        k, v = dot_operand(k, q, INTERPRET), dot_operand(v, q, INTERPRET, KEEP_LAYOUT=True)
    s = _dot(q, tl.trans(k), INTERPRET)  # [G_PAD, BLOCK_N] fp32, scale 1.0
    if FP8:
        s = s * k_scale
    return _online_softmax_step(tl.where(visible[None, :], s, float("-inf")), v, m_i, l_i, acc, q.dtype, INTERPRET)


@triton.jit
def _attend_block(block, end, m_i, l_i, acc, q, qpos, window, kpos_row, stride_pn, slots_row, stride_sn, k_row,
                  stride_kn, v_row, stride_vn, d_mask, k_scale, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """Candidates [block, block + BLOCK_N) loaded and folded into the online softmax."""
    _, visible, _, k, v = _block_keys(block, end, qpos, window, kpos_row, stride_pn, slots_row, stride_sn, k_row,
                                      stride_kn, v_row, stride_vn, d_mask, BLOCK_N, PAGED, HAS_WINDOW, False)
    return _attend_keys(visible, k, v, m_i, l_i, acc, q, k_scale, FP8, INTERPRET)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Fold one block of scores s [M, N] (-inf where a key is invisible) and its values v [N, Dv] into each query
    row's running max m_i [M], running sum l_i of exp(s - m) and output acc [M, Dv] = sum exp(s - m) v; the weights
    exp(s - m) enter the product in `dtype`."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen no visible key m stays -inf; subtract 0 instead so exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)  # rescales the old state to the new max
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # p is rounded to the model dtype for the tensor-core product (as flash attention does); the sum stays fp32.
    acc = acc * alpha[:, None] + _dot(p.to(dtype), v, INTERPRET)
    return m_new, l_i, acc


# Arguments that follow the number of keys or a query's offset are never specialized (each value class would compile
# a kernel of its own, on a user's request, for the last-position-only prefill of a new prompt length); none of them
# addresses a vector load.
@triton.jit(do_not_specialize=["qpos_ptr", "nkeys_ptr", "stride_pb", "stride_sb", "num_candidates", "window",
                               "num_splits"])
def _split_kernel(q_ptr, k_ptr, v_ptr, kpos_ptr, qpos_ptr, slots_ptr, nkeys_ptr, part_ptr, lse_ptr, out_ptr,
                  k_scale_ptr, v_scale_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                  stride_vn, stride_pb, stride_pn, stride_sb, stride_sn, num_kv_heads, num_candidates, head_dim, window,
                  num_splits, GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_NUM_KEYS: tl.constexpr, FP8: tl.constexpr,
                  EARLY: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    # EARLY: the kernel before this one wrote at most the key at each row's query position (a decode step's store).
    # Everything else this kernel reads was written two or more launches back, by kernels complete before this one
    # starts (pdl.py): the positions, slots and the first block's other keys are loaded before the PDL wait, while
    # the kernels before still run, and the new key after it.
    if not EARLY:
        after_previous_kernel(PDL)
    pid, split = tl.program_id(0), tl.program_id(1)
    b, hk = (pid // num_kv_heads).to(tl.int64), (pid % num_kv_heads).to(tl.int64)  # int64: pools can be huge
    offs_g, offs_d = tl.arange(0, G_PAD), tl.arange(0, BLOCK_D)
    heads = hk * GROUPS + offs_g  # query heads of this kv head (rows >= GROUPS are padding for tl.dot)
    g_mask, d_mask = offs_g < GROUPS, offs_d < head_dim
    qpos = tl.load(qpos_ptr + b)

    # This split's share of the row's candidates [0, n), in whole blocks; n is read here, never on the host.
    n = num_candidates
    if HAS_NUM_KEYS:
        n = tl.minimum(tl.load(nkeys_ptr + b).to(tl.int32), n)
    per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, n)

    k_row = k_ptr + b * stride_kb + hk * stride_kh + offs_d[None, :]
    v_row = v_ptr + b * stride_vb + hk * stride_vh + offs_d[None, :]
    kpos_row, slots_row = kpos_ptr + b * stride_pb, slots_ptr + b * stride_sb
    k_scale, v_scale = 1.0, 1.0
    if FP8:  # this kv head's scales
        k_scale, v_scale = tl.load(k_scale_ptr + hk), tl.load(v_scale_ptr + hk)
    if EARLY:
        kpos, visible, rows, k, v = _block_keys(start, end, qpos, window, kpos_row, stride_pn, slots_row, stride_sn,
                                                k_row, stride_kn, v_row, stride_vn, d_mask, BLOCK_N, PAGED,
                                                HAS_WINDOW, True)
        after_previous_kernel(PDL)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    first = start
    if EARLY:
        k, v = _add_new_key(kpos, visible, rows, k, v, qpos, k_row, stride_kn, v_row, stride_vn, d_mask)
        m_i, l_i, acc = _attend_keys(visible, k, v, m_i, l_i, acc, q, k_scale, FP8, INTERPRET)
        first = start + BLOCK_N
    if INTERPRET:  # the interpreter (with numpy 2) cannot take a tensor as a range() bound
        block = first
        while block < end:
            m_i, l_i, acc = _attend_block(block, end, m_i, l_i, acc, q, qpos, window, kpos_row, stride_pn,
                                          slots_row, stride_sn, k_row, stride_kn, v_row, stride_vn, d_mask,
                                          k_scale, BLOCK_N, PAGED, HAS_WINDOW, FP8, INTERPRET)
            block += BLOCK_N
    else:  # a for loop is software-pipelined: the next block's K/V loads overlap this block's math
        for block in range(first, end, BLOCK_N):
            m_i, l_i, acc = _attend_block(block, end, m_i, l_i, acc, q, qpos, window, kpos_row, stride_pn,
                                          slots_row, stride_sn, k_row, stride_kn, v_row, stride_vn, d_mask,
                                          k_scale, BLOCK_N, PAGED, HAS_WINDOW, FP8, INTERPRET)

    # Partial output normalised by its own sum, with lse = m + log(l); a split that saw nothing has lse = -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FP8:
        out = out * v_scale
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b * num_kv_heads * GROUPS + heads) * num_splits + split  # part [B, H, splits, D], lse [B, H, splits]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if num_splits == 1:  # the partial is the answer (large batches): to out [B, H, D] directly, no merge launch
        tl.store(out_ptr + row[:, None] * head_dim + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(part_ptr + row[:, None] * head_dim + offs_d[None, :], out, mask=o_mask)
        tl.store(lse_ptr + row, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(part_ptr, lse_ptr, out_ptr, head_dim, num_splits, SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                    PDL: tl.constexpr):
    after_previous_kernel(PDL)
    pid = tl.program_id(0).to(tl.int64)  # one (row, query head); program_id(1): a BLOCK_D slice of its dims
    offs_s, offs_d = tl.arange(0, SPLITS_PAD), tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < num_splits, offs_d < head_dim
    lse = tl.load(lse_ptr + pid * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    # out = sum_i exp(lse_i) o_i / sum_i exp(lse_i), shifted by the max lse; a row that saw no key at all has every
    # weight 0 and gets 0 (where the reference, an all-False mask row, would give NaN).
    m = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))
    part = tl.load(part_ptr + (pid * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + pid * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one by one: a few splits suffice to exercise the merge


def _block_n(head_dim: int, itemsize: int, programs: int, candidates: int, device: torch.device,
             shrink: bool = True) -> int:
    """Keys per block (tuning.py, attention): MAX_BLOCK_N, halved while a [BLOCK_N, D] tile of K (and one of V) exceeds
    MAX_TILE_BYTES, so that the pipeline stages of both fit in shared memory. With `shrink`, at D <= SHRINK_MAX_HEAD_DIM
    where rows are split: halved while a tile exceeds SPLIT_MAX_TILE_BYTES (split programs read a few blocks each, and
    hide memory latency by sharing an SM with others, which smaller tiles' stages allow), then on, down to 16 keys
    (tl.dot's least), while the candidates have fewer blocks than `_wanted_splits`."""
    tuned = config("attention", device)
    wanted = _wanted_splits(programs, device)
    split = shrink and head_dim <= tuned["SHRINK_MAX_HEAD_DIM"] and wanted > 1
    max_tile_bytes = tuned["SPLIT_MAX_TILE_BYTES"] if split else tuned["MAX_TILE_BYTES"]
    block_n = tuned["MAX_BLOCK_N"]
    while block_n > 16 and block_n * head_dim * itemsize > max_tile_bytes:
        block_n //= 2
    while split and block_n > 16 and triton.cdiv(candidates, block_n) < wanted:
        block_n //= 2
    return block_n


def _wanted_splits(programs: int, device: torch.device) -> int:
    """Splits per (row, kv head) for about PROGRAMS_PER_SM programs per SM in all, at most MAX_SPLITS."""
    tuned = config("attention", device)
    return min(triton.cdiv(tuned["PROGRAMS_PER_SM"] * _sm_count(device), programs), tuned["MAX_SPLITS"])


def _warps(programs: int, tuned: dict) -> int:
    """The split kernel's warps: SMALL_GRID_WARPS where its grid is at most SMALL_GRID_PROGRAMS programs (a row of
    one kv head at batch 1: an SM holds one program, whose warps alone keep its loads in flight), else num_warps."""
    return tuned["SMALL_GRID_WARPS"] if programs <= tuned["SMALL_GRID_PROGRAMS"] else tuned["num_warps"]


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_positions: torch.Tensor,
                     query_positions: torch.Tensor, window: int | None = None, slots: torch.Tensor | None = None,
                     num_keys: torch.Tensor | None = None, num_splits: int | None = None,
                     block_n: int | None = None, any_length: bool = False, key_scale: torch.Tensor | None = None,
                     value_scale: torch.Tensor | None = None, new_key_only: bool = False) -> torch.Tensor:
    """One query token per row -> [B, H, D] in query's dtype (scale 1.0, as `attend`); a row that sees no key gets
    zeros. query [B, H, D]; key/value [B, Hkv, S_buf, D] (candidate j = key[b, :, j]), or with `slots` [B, S] pools
    [Hkv, N, D] (candidate j = pool[:, slots[b, j]]). key_positions [B, S] (-1 = empty), query_positions [B]. H = G *
    Hkv, query head h reads kv head h // G. num_keys [B] (on the device): only candidates [0, num_keys[b]) of row b
    are read. num_splits and block_n override the shape-based split count and keys per block (tuning, tests).
    `any_length`: blocks of keys as wide as the tile allows whatever their number, so that calls with ever new numbers
    of keys (a prefill's last position) share one compiled kernel; a decode step's number is fixed by its engine, and
    it takes the narrower blocks that spread short rows over more SMs. key/value may be float8 e4m3 (an fp8 cache),
    read with fp32 per-head scales [Hkv] `key_scale` / `value_scale` (None: the pools' own `kv_scales`, see
    model/paged_cache.py) applied to the scores and the output. `new_key_only`: of what this call reads, the two kernels
    launched before it wrote only the key (and value) at each row's query position, as a decode step's q/k/v product
    and store do (other keys, positions, slots and num_keys come from earlier kernels): the rest may then be read
    before the PDL wait."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads, candidates = key.shape[-3], key_positions.shape[1]
    groups = num_heads // num_kv_heads
    assert groups * num_kv_heads == num_heads, "query heads must be a multiple of kv heads"
    assert key.dtype == value.dtype, "key and value must share a dtype"
    fp8 = key.dtype == torch.float8_e4m3fn
    assert fp8 or query.dtype == key.dtype, "key and value hold query's dtype or float8 e4m3"
    if fp8:
        key_scale = key_scale if key_scale is not None else key.kv_scales
        value_scale = value_scale if value_scale is not None else value.kv_scales
        assert key_scale.dtype == value_scale.dtype == torch.float32 and key_scale.numel() == value_scale.numel() == \
            num_kv_heads
    else:
        key_scale = value_scale = query  # unread: the FP8 branch is compiled out
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1, "last dim must be contiguous"
    if slots is None:
        assert key.dim() == 4 and value.dim() == 4 and key.shape[0] == batch and key.shape[2] >= candidates
        k_strides, v_strides, slot_strides = key.stride()[:3], value.stride()[:3], (0, 0)
    else:  # pools [Hkv, N, D]: batch stride 0
        assert key.dim() == 3 and value.dim() == 3 and slots.shape == key_positions.shape
        k_strides, v_strides, slot_strides = (0, *key.stride()[:2]), (0, *value.stride()[:2]), slots.stride()[:2]

    query_positions = query_positions.contiguous()  # read as qpos[b]: a column of a [B, L] tensor is strided
    tuned = config("attention", query.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Tiles sized as for a cache of query's dtype (an fp8 tile is turned into one before the products).
    block_n = block_n or _block_n(block_d, query.element_size(), batch * num_kv_heads, candidates, query.device,
                                  shrink=not any_length)
    # From shapes only: the wanted splits, never more than blocks of keys.
    splits = num_splits or max(1, min(_wanted_splits(batch * num_kv_heads, query.device),
                                      triton.cdiv(candidates, block_n)))
    # The first block's K/V held in registers across the wait: only where they fit beside the pipelined loop's
    # (at 64 keys of D = 256 in bf16, or at D = 512, the sm_90 split kernel spills)
    early = new_key_only and block_d <= tuned["SHRINK_MAX_HEAD_DIM"] and \
        block_n * block_d * key.element_size() <= tuned["SPLIT_MAX_TILE_BYTES"]
    part = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype, device=query.device)
    _split_kernel[(batch * num_kv_heads, splits)](
        query, key, value, key_positions, query_positions, slots if slots is not None else key_positions,
        num_keys if num_keys is not None else query_positions, part, lse, out, key_scale, value_scale,
        *query.stride()[:2], *k_strides,
        *v_strides, *key_positions.stride()[:2], *slot_strides, num_kv_heads, candidates, head_dim, window or 0, splits,
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), BLOCK_N=block_n, BLOCK_D=block_d,
        PAGED=slots is not None, HAS_WINDOW=window is not None, HAS_NUM_KEYS=num_keys is not None, FP8=fp8,
        EARLY=early, INTERPRET=not out.is_cuda, num_warps=_warps(batch * num_kv_heads * splits, tuned),
        num_stages=tuned["num_stages"], **launch_options(out))
    if splits == 1:
        return out
    combine_splits(part, lse, out, **launch_options(query))
    return out


def combine_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, **launch) -> None:
    """Merge fp32 partial outputs part [..., splits, D] with their log-sum-exps lse [..., splits] into out (the
    leading dims' rows of D, contiguous) in place. Dims per merge program: a row spread over several, so that its
    [splits, D] partials (up to 128 KB) are read by several SMs at once; splits padded to MAX_SPLITS at least (one
    compiled kernel)."""
    splits, head_dim = part.shape[-2:]
    rows = lse.numel() // splits
    tuned = config("attention", part.device)
    combine_d = min(max(16, triton.next_power_of_2(head_dim)), tuned["COMBINE_BLOCK_D"])
    _combine_kernel[(rows, triton.cdiv(head_dim, combine_d))](
        part, lse, out, head_dim, splits, SPLITS_PAD=triton.next_power_of_2(max(splits, tuned["MAX_SPLITS"])),
        BLOCK_D=combine_d, **launch)
