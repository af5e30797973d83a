"""Products of a few to a few hundred activation rows with a quantized weight (model/quantized.py's QuantizedWeight):
decode steps of a batch of sequences, one token each, on a quantized model. The plain twin (`QuantizedWeight.linear`)
writes the whole weight dequantized to the model dtype and reads it back for F.linear: 1 + 2 + 2 bytes a weight
(8-bit) where 1 would do. Here each program turns [BLOCK_N, BLOCK_K] tiles of the stored values into the activations'
dtype in registers and multiplies them with the activations' [BLOCK_M, BLOCK_K] tile on the tensor cores.

Numerics: 8-bit values with a scale per row (fp8 e4m3, int8) enter tl.dot as they are (exact in the activations'
dtype; fp8 to bf16 on the integer ALUs, FP8_TO_BF16) and each output's fp32 sum is multiplied by its row's scale, as
the GEMVs and the MoE kernels do; the twin rounds each q * scale to the activations' dtype first, so 16-bit outputs
differ from it by about an ulp. The other formats (int4, 8-bit in groups or blocks: scales that vary along K) use the
twin's dequantized weight exactly, w = q * scale in fp32 rounded once to the activations' dtype. Then tl.dot with fp32
accumulation and one rounding of the output: those equal F.linear(x, weight.dequantize(x.dtype)) up to the fp32
summation order. fp32 activations multiply in fp32 ("ieee", not tf32).

For many rows (prefill) dequantizing once and calling cuBLAS should win: the dequantized weight's extra traffic is
small against the arithmetic, and cuBLAS's GEMMs are better tuned. `max_rows` says up to where the model should call
this kernel (configs/, MAX_M; to be measured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.quantized import QuantizedWeight
from .attention import _dot, _sm_count
from .counters import finished_counters
from .gemv import INT4_WORDS, PER_ROW, _quantized_format, exact_fp32, format_prefix
from .pdl import after_previous_kernel, launch_options
from .rounding import dot_operand, round_to, store_fp8
from .tuning import config, for_format


@triton.jit
def _dequantized_tile(w_ptr, scale_ptr, rows, k0, N, stride_wn, stride_sn, stride_sk, K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                      SCALE_ROWS: tl.constexpr, TILE_GROUPS: tl.constexpr, dtype: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Weight rows `rows` [BLOCK_N], inputs k0 .. k0 + BLOCK_K, dequantized as the twin does: q * scale in fp32,
    rounded to `dtype` (in the interpreter kept in fp32: its casts to bf16 truncate, and `_dot` multiplies in fp32
    there anyway). Masked rows and inputs are 0 (int4: nibbles of -8 times a masked scale of 0, or, per channel, times
    the zero inputs)."""
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    if WFMT == INT4_WORDS:  # [BLOCK_N, BLOCK_K // 8] words -> [BLOCK_N, BLOCK_K // 8, 8] nibbles
        words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(w_rows + words[None, :], mask=row_ok[:, None] & (words < K // 8)[None, :], other=0)
        shifts = tl.arange(0, 8) * 4
        q = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF) - 8  # the mask undoes the sign's extension
        q = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K))  # element j: word j // 8, nibble j % 8
    else:  # fp8 e4m3 or int8 (the pointer's type): both exact in fp32
        cols = k0 + tl.arange(0, BLOCK_K)
        q = exact_fp32(tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0))
    if WFMT == PER_ROW:
        scale = tl.load(scale_ptr + rows.to(tl.int64) * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        w = q * scale[:, None]
    else:  # a scale per GROUP inputs (and SCALE_ROWS rows): TILE_GROUPS in the tile (1 where GROUP >= BLOCK_K)
        TILE_GROUP: tl.constexpr = BLOCK_K // TILE_GROUPS
        groups = (k0 + tl.arange(0, TILE_GROUPS) * TILE_GROUP) // GROUP
        mask = row_ok[:, None] & (groups < (K + GROUP - 1) // GROUP)[None, :]
        scale_rows = scale_ptr + (rows // SCALE_ROWS).to(tl.int64)[:, None] * stride_sn
        scale = tl.load(scale_rows + (groups * stride_sk)[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.reshape(tl.reshape(q, (BLOCK_N, TILE_GROUPS, TILE_GROUP)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    if INTERPRET:
        return round_to(w, dtype)
    else:
        return w.to(dtype)  # cvt.rn: round to nearest even, as torch's .to(dtype)


@triton.jit
def _quantized_matmul_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, part_ptr, counter_ptr, M, N, stride_xm, stride_om,
                             stride_part, stride_wn, stride_sn, stride_sk, K: tl.constexpr, WFMT: tl.constexpr,
                             GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                             TILE_GROUPS: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k], w the weight in format WFMT (gemv.py's codes) dequantized to x's dtype.
    Programs are ordered row block fastest: those sharing a weight tile run together and read it once from HBM.
    SPLIT_K > 1 (more programs where the output's tiles alone leave SMs idle): program_id(1) sums a K_SPLIT slice of
    the inputs into part [SPLIT_K, M, N] (fp32, scaled), and the tile's last slice to finish adds the slices."""
    row_blocks = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % row_blocks
    pid_n = tl.program_id(0) // row_blocks
    K_SPLIT: tl.constexpr = (K + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K) * BLOCK_K  # whole steps a slice
    if SPLIT_K == 1:
        first = 0
    else:
        first = tl.program_id(1) * K_SPLIT
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows: output columns
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    after_previous_kernel(PDL)
    # wgmma reads its A operand from registers, its B operand only from shared memory. With fp8 weights per row
    # (their exact values turned into the activations' dtype in registers) and both tiles 64 rows or more (wgmma
    # either way) the product runs transposed, out.T = w @ x.T: the weight tile is A, where it was converted, and the
    # activations' tile B, as it was loaded into shared memory; x @ w.T would first store the converted weights to
    # shared memory. Smaller tiles run mma.sync, which reads both operands from registers.
    TRANSPOSED: tl.constexpr = (WFMT == PER_ROW and w_ptr.dtype.element_ty == tl.float8e4nv and BLOCK_M >= 64
                                and BLOCK_N >= 64)
    if TRANSPOSED:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, K_SPLIT, BLOCK_K):  # inputs past K (the last slice's tail) load as zeros
        k0 = first + step
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        if WFMT == PER_ROW:  # the exact 8-bit values; their rows' scales wait for the fp32 sums
            w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
            w = dot_operand(tl.load(w_rows + ks[None, :], mask=(cols < N)[:, None] & (ks < K)[None, :], other=0.0),
                            x, INTERPRET, PAIRS=TRANSPOSED)
        else:
            w = _dequantized_tile(w_ptr, scale_ptr, cols, k0, N, stride_wn, stride_sn, stride_sk, K, BLOCK_N, BLOCK_K,
                                  WFMT, GROUP, SCALE_ROWS, TILE_GROUPS, dtype, INTERPRET)
        if TRANSPOSED:
            acc += _dot(w, tl.trans(x), INTERPRET)
        else:
            acc += _dot(x, tl.trans(w), INTERPRET)
    if WFMT == PER_ROW:
        scale = tl.load(scale_ptr + cols.to(tl.int64) * stride_sn, mask=cols < N, other=0.0).to(tl.float32)
        if TRANSPOSED:
            acc = tl.trans(acc * scale[:, None])
        else:
            acc *= scale[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if SPLIT_K > 1:
        # The tile's last slice to finish adds the slices' sums in split order (deterministic): its acquire pairs with
        # the other slices' releases (acq_rel atomics), so their stores are visible to it; it then re-arms the tile's
        # counter for the next launch (CUDA-graph replays included).
        slices = part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]  # slice s at + s * stride_part
        tl.store(slices + tl.program_id(1) * stride_part, acc, mask=mask)
        finished = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel")
        if finished == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # read past L1: other programs have just written them
                acc += tl.load(slices + split * stride_part, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, round_to(acc, dtype).to(dtype), mask=mask)
            tl.atomic_xchg(counter_ptr + tl.program_id(0), 0, sem="relaxed")
    else:
        # One rounding of the fp32 sums (by hand: the interpreter's cast to bf16 truncates).
        tl.store(out, round_to(acc, dtype).to(dtype), mask=mask)


@triton.jit
def _dequantize_kernel(w_ptr, scale_ptr, out_ptr, N, stride_wn, stride_sn, stride_sk, K: tl.constexpr,
                       WFMT: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr, INTERPRET: tl.constexpr):
    """out [N, K] (contiguous) = the twin's dequantized weight, one [BLOCK_N, BLOCK_K] tile a program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequantized_tile(w_ptr, scale_ptr, rows, k0, N, stride_wn, stride_sn, stride_sk, K, BLOCK_N, BLOCK_K, WFMT,
                          GROUP, SCALE_ROWS, TILE_GROUPS, out_ptr.dtype.element_ty, INTERPRET)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], w,
             mask=(rows < N)[:, None] & (cols < K)[None, :])


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, K: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One row a program: its amax, then q = x / (amax / 448) rounded to fp8 e4m3 (model/quantized.py `fp8_rows`)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    after_previous_kernel(PDL)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1.1754943508222875e-38), 448.0)
    for k0 in tl.static_range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        store_fp8(q_ptr + row * K + cols, x, scale, cols < K)
    tl.store(scale_ptr + row, scale)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model/quantized.py `fp8_rows` in one launch: rows [M, K] -> (fp8 e4m3 [M, K], fp32 scales [M, 1])."""
    m, k_in = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    quantized = torch.empty(m, k_in, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _fp8_rows_kernel[(m,)](x, quantized, scale, x.stride(0), k_in, BLOCK_K=min(2048, triton.next_power_of_2(k_in)),
                               num_warps=4, **launch_options(x))
    return quantized, scale


def _as_one_matrix(weight: QuantizedWeight) -> QuantizedWeight:
    """Stacked matrices [..., N, K] (the experts) as one [.. * N, K] where that is a view of their values and scales
    that keeps each row's scales (not for block scales, whose row blocks would straddle the matrices)."""
    if weight.values.dim() <= 2 or weight.scheme.strategy == "block" or weight.chunk or \
            weight.cpu_scales_and_zeros is not None:  # the CPU's int4 layouts: refused as they are
        return weight
    values, scale = weight.values, weight.scale
    try:
        values, scale = values.view(-1, values.shape[-1]), scale.view(-1, scale.shape[-1])
    except RuntimeError:  # not viewable: left to the twin
        return weight
    return QuantizedWeight(values, scale, weight.scheme)


def dequantize_supported(weight: QuantizedWeight) -> str | None:
    """Why `dequantize` cannot read this QuantizedWeight, or None where it can: what quantized_matmul reads, and
    stacks of such matrices whose values and scales are contiguous."""
    return quantized_matmul_supported(_as_one_matrix(weight))


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """weight.dequantize(dtype), bit for bit, in one pass: the stored values and scales read once, the matrix written
    once (3 bytes a value for 8-bit weights into bf16), where the twin's cast and product pass over 2- or 4-byte
    intermediates (7 bytes a value, and a second matrix's worth of memory at its peak). For prefill products and the
    grouped experts (model/fused.py `dense`)."""
    matrix = _as_one_matrix(weight)
    fmt = _quantized_format(matrix)
    if isinstance(fmt, str):
        raise ValueError(f"dequantize does not read this {weight.scheme.name} weight: {fmt}")
    constexprs, stride_sn, stride_sk = fmt
    n_out, k_in = matrix.shape
    out = torch.empty(n_out, k_in, dtype=dtype, device=matrix.values.device)
    if out.numel():
        block_n, block_k, warps = config("quantized_matmul", out.device)["DEQUANTIZE_TILES"]
        block_k = min(block_k, max(16, triton.next_power_of_2(k_in)))
        tile_groups = 1 if constexprs["WFMT"] == PER_ROW.value else max(block_k // constexprs["GROUP"], 1)
        _dequantize_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(k_in, block_k))](
            matrix.values, matrix.scale, out, n_out, matrix.values.stride(0), stride_sn, stride_sk, k_in,
            **constexprs, BLOCK_N=block_n, BLOCK_K=block_k, TILE_GROUPS=tile_groups, INTERPRET=not out.is_cuda,
            num_warps=warps)
    return out.view(weight.shape)


def quantized_matmul_supported(weight: QuantizedWeight) -> str | None:
    """Why `quantized_matmul` cannot read this QuantizedWeight, or None where it can: the GEMV kernels' formats
    (gemv.quantized_supported: one [N, K] matrix with unit stride along K, any row stride; fp8/int8 per channel, in
    groups or in blocks of a power of 2 of inputs; int4 packed in int32 per channel or in groups of 8 inputs or
    more)."""
    fmt = _quantized_format(weight)
    return fmt if isinstance(fmt, str) else None


def _tuned(device: torch.device | None, weight: QuantizedWeight | None) -> dict:
    """The quantized_matmul table (tuning.py) for the weight's format: its own keys (INT4_, BYTE_) where it has them."""
    fmt = _quantized_format(weight) if weight is not None else None
    prefix = format_prefix(fmt[0]["WFMT"]) if isinstance(fmt, tuple) else ""
    return for_format(config("quantized_matmul", device), prefix)


def max_rows(device: torch.device | None = None, weight: QuantizedWeight | None = None) -> int:
    """Activation rows up to which `quantized_matmul` beats dequantizing the weight and cuBLAS (configs/, MAX_M; the
    weight's format's own where the table has one)."""
    return _tuned(device, weight)["MAX_M"]


def _tiles(m: int, n: int, k: int, device: torch.device, tiles: tuple | None,
           weight: QuantizedWeight | None = None) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K): `tiles`, else the first TILES_BY_M entry (of the weight's
    format) that covers m rows; each block shrinks to the power of 2 over its side (16 at least, for tl.dot). The
    tile's SPLIT_K (1 where left out) is the most slices of K: a product takes only as many as bring its programs up
    to the SMs (a large one, the LM head say, none: its slices' fp32 sums would cost more traffic than they save), and
    no more than the BLOCK_K steps there are."""
    if tiles is None:
        tiles = next(entry[1:] for entry in _tuned(device, weight)["TILES_BY_M"] if entry[0] is None or m <= entry[0])
    block_m, block_n, block_k, warps, stages, *split = tiles
    block_m, block_n, block_k = (min(block, max(16, triton.next_power_of_2(side)))
                                 for block, side in ((block_m, m), (block_n, n), (block_k, k)))
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = min(split[0] if split else 1, triton.cdiv(k, block_k), triton.cdiv(_sm_count(torch.device(device)),
                                                                                  programs))
    return block_m, block_n, block_k, warps, stages, split_k


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight, tiles: tuple | None = None) -> torch.Tensor:
    """x @ W.T for x [..., K] (bf16, fp16 or fp32; any number of rows) and a QuantizedWeight W [N, K] that
    `quantized_matmul_supported` accepts, in x's dtype: F.linear(x, weight.dequantize(x.dtype)) up to the fp32
    summation order. tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, SPLIT_K]), by default the tuned ones
    (tuning.py)."""
    fmt = _quantized_format(weight)
    if isinstance(fmt, str):
        raise ValueError(f"quantized_matmul does not read this {weight.scheme.name} weight: {fmt}")
    constexprs, stride_sn, stride_sk = fmt
    n_out, k_in = weight.shape
    assert x.shape[-1] == k_in, f"x has {x.shape[-1]} inputs, the weight {k_in}"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    rows = x.reshape(-1, k_in)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return out.reshape(*x.shape[:-1], n_out)
    block_m, block_n, block_k, warps, stages, split_k = _tiles(m, n_out, k_in, x.device, tiles, weight)
    assert block_k % 16 == 0 and not block_k & (block_k - 1), block_k  # powers of 2, whole int4 words
    per_row = constexprs["WFMT"] == PER_ROW.value
    tile_groups = 1 if per_row else max(block_k // constexprs["GROUP"], 1)  # scales a weight row takes per tile
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n_out, block_n), split_k)
    part, counters = out, out  # unused with one slice
    if split_k > 1:
        part = torch.empty(split_k, m, n_out, dtype=torch.float32, device=x.device)
        counters = finished_counters("quantized_matmul", x.device, grid[0])
    _quantized_matmul_kernel[grid](
        rows, weight.values, weight.scale, out, part, counters, m, n_out, rows.stride(0), out.stride(0),
        part.stride(0), weight.values.stride(0), stride_sn, stride_sk, k_in, **constexprs, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, TILE_GROUPS=tile_groups, INTERPRET=not x.is_cuda,
        num_warps=warps, num_stages=stages, **launch_options(x))
    return out.reshape(*x.shape[:-1], n_out)
