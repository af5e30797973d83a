"""Matrix-vector products of decode steps at batch 1: out[n] = sum_k x[k] * weight[n, k], alone (`gemv`) or with the
gated activation (`gemv_gated`). Both can also take their input as the residual norms of an earlier product, not yet
applied (`norms`): each of their programs normalizes the row itself. The residual norms that follow a product are not
in its kernel: its last program to finish would apply them to the whole row, slower than a kernel of their own after
it (benchmarks/gemv.py --deferred).

cuBLAS picks tiles for matrix products; for one activation row it often splits K and adds a reduce kernel, or runs
tiles too few to fill the GPU, and its small products (under ~8 MB of weights) take well above the bandwidth floor.
Here each program streams BLOCK_N whole weight rows in BLOCK_K steps (16-byte loads along the contiguous K axis) and
keeps their dot products in fp32 registers: no second kernel, one rounding at the end, as cuBLAS rounds its fp32
accumulator. Where cuBLAS is still faster (big 31B matrices) the model does not call these (`model.fused.takes_gemv`).

Each kernel also reads quantized weights (model/quantized.py's QuantizedWeight: fp8 or int8 per channel, int4 packed
8 to a word in groups, 8-bit in groups or blocks) with their scales, 1 or 1/2 byte a weight instead of 2: the sums of
q * x in fp32, times the scales per row or per group (`quantized_supported` says which weights). The bigger int4
GEMVs run on the tensor cores instead, in int4_mma.py's kernel (`_mma_tiles`), which can also normalize its input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.quantized import QuantizedWeight
from . import int4_mma
from .activation import ACTIVATION_CODES, store_gated_rows
from .norm import _norm_weights, _residual_norms_values, deferred_norms_args, residual_rms_norm
from .pdl import after_previous_kernel, launch_options
from .rounding import round_to
from .tuning import config, for_format


@triton.jit
def _input_row(x_ptr, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps, K: tl.constexpr,
               BLOCK_K: tl.constexpr, NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr,
               PDL: tl.constexpr):
    """Waits for the previous kernel (PDL: the input is its output; the norm weights are loaded first), then returns
    the first BLOCK_K inputs as fp32 [1, BLOCK_K]. With NORMED, x_ptr holds an earlier product and the input is its
    residual norms (`gemv`'s `norms`), which every program computes from the whole row (K <= BLOCK_K; a few KB from
    L2, so that no program waits for another's output); program 0 also stores the new residual stream at new_ptr."""
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    norm_weights = (1.0, 1.0, 1.0)
    if NORMED:
        norm_weights = _norm_weights(nw_ptr, scalar_ptr, next_w_ptr, cols, mask, True, HAS_SCALAR, HAS_NEXT)
    after_previous_kernel(PDL)
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMED:
        dtype = new_ptr.dtype.element_ty
        residual = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w, scalar, next_w = norm_weights
        new, x = _residual_norms_values(x, residual, w, scalar, next_w, K, eps, next_eps, dtype, True, HAS_SCALAR,
                                        HAS_NEXT)
        x = round_to(x, dtype)
        if tl.program_id(0) == 0:
            tl.store(new_ptr + cols, new.to(dtype), mask=mask)
    return x[None, :]


# How the kernels read w_ptr (WFMT) and scale_ptr. Quantized formats multiply the fp32 sums of q * x by their
# scales: per row once at the end, per group (or block) of a row after summing the group. So the product is the fp32
# product of the dequantized weight (QuantizedWeight.dequantize) up to summation order, never rounded to the model
# dtype before the end.
INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)  # Triton's interpreter (tests on the CPU) runs no PTX
DENSE = tl.constexpr(0)        # the weight itself, in the model dtype; scale_ptr unused
PER_ROW = tl.constexpr(1)      # 8-bit values (fp8 e4m3 or int8: the pointer's type tells which), a scale per row
BLOCKS8 = tl.constexpr(3)      # 8-bit values, a scale per block of SCALE_ROWS rows and GROUP inputs (groups of a
                               # row: SCALE_ROWS 1)
INT4_WORDS = tl.constexpr(2)   # int4, 8 a 32-bit word (element j of a row: bits 4 * (j % 8) of word j // 8, as
                               # q + 8), a scale per GROUP inputs; read as [BLOCK_N, BLOCK_K // 8] words, nibble j of
                               # every word times its own input vector (inputs j, j + 8, ...), a group's scale
                               # broadcast to its words
# Scales of the grouped formats: scale_ptr[(row // SCALE_ROWS) * stride_sn + (input // GROUP) * stride_sk]
# (stride_sk 0: one scale a row read as a scale per group, as int4 per channel).


@triton.jit
def exact_fp32(w):
    """Weight values as fp32, exactly. int8 without a conversion instruction: its cast issues an I2F a value, a
    quarter-rate conversion as frequent as the values an int8 GEMV streams in; here 0x4B000080 + q read as fp32 is
    2^23 + 128 + q, minus 2^23 + 128. Other dtypes by their cast (fp8 e4m3: an F2FP to an fp16 pair and an fp16 ->
    fp32 add, no conversion a value; 16-bit floats: a shift)."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _rows_and_up(ptrs, mask, up_offset, HAS_UP: tl.constexpr):
    """The values at ptrs and, with HAS_UP, up_offset elements further (the up half of a fused gate/up weight):
    (gate, up), up = gate without HAS_UP. Masked values are 0."""
    w = tl.load(ptrs, mask=mask, other=0.0)
    u = w
    if HAS_UP:
        u = tl.load(ptrs + up_offset, mask=mask, other=0.0)
    return w, u


@triton.jit
def _grouped_tiles(w_ptr, rows, N, stride_wn, up_offset, k0, K: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_UP: tl.constexpr, GROUP: tl.constexpr):
    """The 8-bit values of inputs k0 .. k0 + BLOCK_K of rows `rows` (and of the up rows with HAS_UP) in groups, as
    [BLOCK_N, BLOCK_K // GROUP, GROUP]: (gate, up), up = gate without HAS_UP. Masked values are 0."""
    groups = tl.arange(0, BLOCK_K // GROUP)
    cols = (k0 + groups * GROUP)[:, None] + tl.arange(0, GROUP)[None, :]
    mask = (rows < N)[:, None, None] & (cols < K)[None, :, :]
    return _rows_and_up(w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn + cols[None, :, :], mask, up_offset,
                        HAS_UP)


@triton.jit
def _grouped_inputs(x_ptr, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Inputs k0 .. k0 + BLOCK_K as fp32 in the shape of a grouped tile's values: [BLOCK_K // GROUP, GROUP]."""
    cols = k0 + tl.arange(0, BLOCK_K // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)


@triton.jit
def _grouped_row(x, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """A [1, BLOCK_K] input row (_input_row's) in the shape of `_grouped_inputs`."""
    return tl.reshape(x, (BLOCK_K // GROUP, GROUP))


@triton.jit
def _grouped_dots(w, scale, x):
    """Each group's scale times its fp32 sum of q * x: [BLOCK_N, BLOCK_K // GROUP]."""
    return tl.sum(exact_fp32(w) * x[None, :, :], axis=2) * scale


@triton.jit
def _word_tiles(w_ptr, rows, N, stride_wn, up_offset, k0, K: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_UP: tl.constexpr):
    """int4 words of inputs k0 .. k0 + BLOCK_K of rows `rows` (and of the up rows): [BLOCK_N, BLOCK_K // 8] each,
    16-byte loads along K. Masked words are 0 (nibbles of -8, met by masked zero inputs or masked rows)."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (rows < N)[:, None] & (words < K // 8)[None, :]
    return _rows_and_up(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + words[None, :], mask, up_offset, HAS_UP)


@triton.jit
def _split8(x, BLOCK_K: tl.constexpr):
    """A [1, BLOCK_K] row as its 8 nibble-position vectors [BLOCK_K // 8]: x_j = inputs j, j + 8, j + 16, ..."""
    c0, c1 = tl.split(tl.reshape(x, (BLOCK_K // 8, 2, 2, 2)))  # index 4a + 2b + c of each word's 8 inputs
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    x0, x4 = tl.split(c0b0)
    x2, x6 = tl.split(c0b1)
    x1, x5 = tl.split(c1b0)
    x3, x7 = tl.split(c1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibble(w, j: tl.constexpr, x):
    """q * x for nibble j of words w ([BLOCK_N, W]) and its inputs x ([W], fp32, pre-scaled by 16^-p, p the
    nibble's place as `_scaled_inputs` gives them), q = nibble - 8. The nibble is masked in place into the mantissa of
    2^23 (one lop3: bits 0x4B000000 | n * 16^p read as the float 2^23 + n * 16^p, exact while 15 * 16^p < 2^23, so
    nibbles 5-7 are shifted down 20 bits first: places 0-4, then 0-2), minus 2^23 + 8 * 16^p: q * 16^p exactly, with
    no shift or int-to-float conversion per nibble; times x * 16^-p, q * x exactly."""
    place: tl.constexpr = j if j < 5 else j - 5
    if j >= 5:
        w = w >> 20  # the mask drops the sign extension
    mask: tl.constexpr = 0xF << (4 * place)
    if INTERPRET:
        bits = (w & mask) | 0x4B000000
    else:  # one lop3 ((a & b) | c) where the compiler emits an and and an or
        bits = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {mask}, 0x4B000000, 0xEA;", "=r,r", [w],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * 16 ** place)) * x[None, :]


@triton.jit
def _scaled_inputs(x0, x1, x2, x3, x4, x5, x6, x7):
    """The 8 nibble-position inputs (fp32) scaled as `_nibble` takes them: x_j * 16^-p (exact), p = j, then j - 5."""
    return (x0, x1 * 0.0625, x2 * 0.00390625, x3 * 0.000244140625, x4 * 0.0000152587890625, x5, x6 * 0.0625,
            x7 * 0.00390625)


@triton.jit
def _word_dots(w, scale, x0, x1, x2, x3, x4, x5, x6, x7):
    """Each word's scale times its fp32 sum of q * x over its 8 nibbles: [BLOCK_N, W]."""
    t = _nibble(w, 0, x0) + _nibble(w, 1, x1) + _nibble(w, 2, x2) + _nibble(w, 3, x3)
    t += _nibble(w, 4, x4) + _nibble(w, 5, x5) + _nibble(w, 6, x6) + _nibble(w, 7, x7)
    return t * scale


@triton.jit
def _word_inputs(x_ptr, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inputs k0 .. k0 + BLOCK_K as `_split8` gives them, loaded (fp32)."""
    cols = k0 + tl.arange(0, BLOCK_K // 8) * 8
    x0 = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + cols + 1, mask=cols < K, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + cols + 2, mask=cols < K, other=0.0).to(tl.float32)
    x3 = tl.load(x_ptr + cols + 3, mask=cols < K, other=0.0).to(tl.float32)
    x4 = tl.load(x_ptr + cols + 4, mask=cols < K, other=0.0).to(tl.float32)
    x5 = tl.load(x_ptr + cols + 5, mask=cols < K, other=0.0).to(tl.float32)
    x6 = tl.load(x_ptr + cols + 6, mask=cols < K, other=0.0).to(tl.float32)
    x7 = tl.load(x_ptr + cols + 7, mask=cols < K, other=0.0).to(tl.float32)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _word_scales(scale_ptr, rows, N, stride_sn, stride_sk, k0, K: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr):
    """Each word's scale as stored (bf16), [BLOCK_N, BLOCK_K // 8]: one load a group of words, broadcast to its words
    in registers (a load a word would multiply the L1 traffic); masked rows' and groups' scales are 0."""
    WORDS: tl.constexpr = min(GROUP // 8, BLOCK_K // 8)  # a group's words in the step
    groups = k0 // GROUP + tl.arange(0, BLOCK_K // 8 // WORDS)
    mask = (rows < N)[:, None] & (groups < (K + GROUP - 1) // GROUP)[None, :]
    s = tl.load(scale_ptr + rows.to(tl.int64)[:, None] * stride_sn + (groups * stride_sk)[None, :], mask=mask,
                other=0.0)
    if WORDS == 1:
        return s
    return tl.reshape(tl.broadcast_to(s[:, :, None], (s.shape[0], s.shape[1], WORDS)), (s.shape[0], BLOCK_K // 8))


@triton.jit
def _scales(scale_ptr, rows, N, stride_sn, stride_sk, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_UP: tl.constexpr,
            WFMT: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """fp32 scales of rows `rows` (and of the up rows N further with HAS_UP): [BLOCK_N] (PER_ROW), those of the
    groups of inputs k0 .. k0 + BLOCK_K, [BLOCK_N, BLOCK_K // GROUP] (grouped formats), or a scale a word,
    [BLOCK_N, BLOCK_K // 8] (int4); unused for DENSE.
    (gate, up), up = gate without HAS_UP. Masked rows' scales are 0."""
    row_ok = rows < N
    s = 0.0
    if WFMT == PER_ROW:
        s = tl.load(scale_ptr + rows.to(tl.int64) * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
    elif WFMT == INT4_WORDS:  # a scale a word
        s = _word_scales(scale_ptr, rows, N, stride_sn, stride_sk, k0, K, BLOCK_K, GROUP)
    elif WFMT != DENSE:
        groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        mask = row_ok[:, None] & (groups < (K + GROUP - 1) // GROUP)[None, :]
        ptrs = scale_ptr + (rows // SCALE_ROWS).to(tl.int64)[:, None] * stride_sn + (groups * stride_sk)[None, :]
        s = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    t = s
    if HAS_UP:
        if WFMT == PER_ROW:
            t = tl.load(scale_ptr + (rows + N).to(tl.int64) * stride_sn, mask=row_ok, other=0.0).to(tl.float32)
        elif WFMT == INT4_WORDS:
            t = _word_scales(scale_ptr, rows + N, N * 2, stride_sn, stride_sk, k0, K, BLOCK_K, GROUP)
        elif WFMT != DENSE:
            up_rows = ((rows + N) // SCALE_ROWS).to(tl.int64)
            up_ptrs = scale_ptr + up_rows[:, None] * stride_sn + (groups * stride_sk)[None, :]
            t = tl.load(up_ptrs, mask=mask, other=0.0).to(tl.float32)
    if WFMT == INT4_WORDS:
        s, t = s.to(tl.float32), t.to(tl.float32)
    return s, t


@triton.jit
def _first_tiles(w_ptr, scale_ptr, rows, N, stride_wn, stride_sn, stride_sk, up_offset, K: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_UP: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                 SCALE_ROWS: tl.constexpr):
    """The first BLOCK_K columns of weight rows `rows` [BLOCK_N] and, with HAS_UP, of the rows up_offset elements
    further (the up half of a fused gate/up weight), as stored, and their scales (`_scales`):
    (gate, up, gate scales, up scales), up = gate without HAS_UP."""
    if WFMT == DENSE or WFMT == PER_ROW:
        cols = tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        w, u = _rows_and_up(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :], mask, up_offset, HAS_UP)
    elif WFMT == INT4_WORDS:
        w, u = _word_tiles(w_ptr, rows, N, stride_wn, up_offset, 0, K, BLOCK_K, HAS_UP)
    else:
        w, u = _grouped_tiles(w_ptr, rows, N, stride_wn, up_offset, 0, K, BLOCK_K, HAS_UP, GROUP)
    w_scale, u_scale = _scales(scale_ptr, rows, N, stride_sn, stride_sk, 0, K, BLOCK_K, HAS_UP, WFMT, GROUP, SCALE_ROWS)
    return w, u, w_scale, u_scale


@triton.jit
def _dots(w, u, w_scale, u_scale, x, x_ptr, w_ptr, scale_ptr, rows, N, stride_wn, stride_sn, stride_sk, up_offset,
          K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_UP: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
          SCALE_ROWS: tl.constexpr):
    """fp32 dot products of the input row with weight rows `rows`, given their first tiles and scales
    (`_first_tiles`) and inputs x; the columns past BLOCK_K are read here: (gate, up), up = gate without HAS_UP."""
    if WFMT == DENSE or WFMT == PER_ROW:
        acc = exact_fp32(w) * x  # per-lane partial sums [BLOCK_N, BLOCK_K]: one reduction at the end
        acc_up = acc
        if HAS_UP:
            acc_up = exact_fp32(u) * x
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64) * stride_wn
        for k0 in range(BLOCK_K, K, BLOCK_K):  # never with NORMED (K <= BLOCK_K)
            cols = k0 + tl.arange(0, BLOCK_K)
            if K % BLOCK_K == 0:
                step_mask = row_ok[:, None]
            else:
                step_mask = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
            acc += exact_fp32(tl.load(w_rows[:, None] + cols[None, :], mask=step_mask, other=0.0)) * x
            if HAS_UP:
                u = tl.load(w_rows[:, None] + up_offset + cols[None, :], mask=step_mask, other=0.0)
                acc_up += exact_fp32(u) * x
        gate = tl.sum(acc, axis=1)
        up = gate
        if HAS_UP:
            up = tl.sum(acc_up, axis=1)
        if WFMT == PER_ROW:  # the row's scale times its sum of q * x (u_scale = w_scale without HAS_UP)
            gate, up = gate * w_scale, up * u_scale
    elif WFMT == INT4_WORDS:
        x0, x1, x2, x3, x4, x5, x6, x7 = _scaled_inputs(*_split8(x, BLOCK_K))
        acc = _word_dots(w, w_scale, x0, x1, x2, x3, x4, x5, x6, x7)  # [BLOCK_N, BLOCK_K // 8]: reduced at the end
        acc_up = acc
        if HAS_UP:
            acc_up = _word_dots(u, u_scale, x0, x1, x2, x3, x4, x5, x6, x7)
        for k0 in range(BLOCK_K, K, BLOCK_K):  # never with NORMED (K <= BLOCK_K)
            x0, x1, x2, x3, x4, x5, x6, x7 = _scaled_inputs(*_word_inputs(x_ptr, k0, K, BLOCK_K))
            step_w, step_u = _word_tiles(w_ptr, rows, N, stride_wn, up_offset, k0, K, BLOCK_K, HAS_UP)
            step_w_scale, step_u_scale = _scales(scale_ptr, rows, N, stride_sn, stride_sk, k0, K, BLOCK_K, HAS_UP,
                                                 WFMT, GROUP, SCALE_ROWS)
            acc += _word_dots(step_w, step_w_scale, x0, x1, x2, x3, x4, x5, x6, x7)
            if HAS_UP:
                acc_up += _word_dots(step_u, step_u_scale, x0, x1, x2, x3, x4, x5, x6, x7)
        gate = tl.sum(acc, axis=1)
        up = gate
        if HAS_UP:
            up = tl.sum(acc_up, axis=1)
    else:
        x = _grouped_row(x, BLOCK_K, GROUP)
        acc = _grouped_dots(w, w_scale, x)  # [BLOCK_N, BLOCK_K // GROUP]: one reduction at the end
        acc_up = acc
        if HAS_UP:
            acc_up = _grouped_dots(u, u_scale, x)
        for k0 in range(BLOCK_K, K, BLOCK_K):  # never with NORMED (K <= BLOCK_K)
            step_x = _grouped_inputs(x_ptr, k0, K, BLOCK_K, GROUP)
            step_w, step_u = _grouped_tiles(w_ptr, rows, N, stride_wn, up_offset, k0, K, BLOCK_K, HAS_UP, GROUP)
            step_w_scale, step_u_scale = _scales(scale_ptr, rows, N, stride_sn, stride_sk, k0, K, BLOCK_K, HAS_UP,
                                                 WFMT, GROUP, SCALE_ROWS)
            acc += _grouped_dots(step_w, step_w_scale, step_x)
            if HAS_UP:
                acc_up += _grouped_dots(step_u, step_u_scale, step_x)
        gate = tl.sum(acc, axis=1)
        up = gate
        if HAS_UP:
            up = tl.sum(acc_up, axis=1)
    return gate, up


# K is a compile-time constant in the GEMV kernels (one compilation per weight shape): a static trip count, which the
# interpreter also needs. The arguments from res_ptr to HAS_NEXT are _input_row's (NORMED: the input is the residual
# norms of an earlier product). A program takes GROUPS blocks of BLOCK_N rows, num_programs * BLOCK_N rows apart,
# and computes its input once for all of them: a program normalizing its input reads ~4 rows of K from L2 for it,
# as many bytes as 2-4 rows of weights. Each group's weights are loaded before the previous group's are multiplied.
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, mult_ptr, N, stride_wn, stride_sn, stride_sk, res_ptr, nw_ptr,
                 scalar_ptr, next_w_ptr, new_ptr, eps, next_eps, K: tl.constexpr, ACT: tl.constexpr,
                 GATED: tl.constexpr, HAS_UP: tl.constexpr, NORMED: tl.constexpr, HAS_SCALAR: tl.constexpr,
                 HAS_NEXT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
                 WFMT: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, PDL: tl.constexpr):
    """out = x @ weight.T, or with GATED act(gate) * up (gate/up: rows i and N + i with HAS_UP, else up from
    mult_ptr); N is the output width. The weight in format WFMT, its scales at scale_ptr."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    group_step = tl.num_programs(0) * BLOCK_N
    up_offset = N * stride_wn
    w, u, w_scale, u_scale = _first_tiles(w_ptr, scale_ptr, rows, N, stride_wn, stride_sn, stride_sk, up_offset, K,
                                          BLOCK_K, HAS_UP, WFMT, GROUP, SCALE_ROWS)
    x = _input_row(x_ptr, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps, K, BLOCK_K, NORMED,
                   HAS_SCALAR, HAS_NEXT, PDL)
    for group in tl.static_range(GROUPS):
        if group + 1 < GROUPS:
            next_w, next_u, next_w_scale, next_u_scale = _first_tiles(
                w_ptr, scale_ptr, rows + group_step, N, stride_wn, stride_sn, stride_sk, up_offset, K, BLOCK_K, HAS_UP,
                WFMT, GROUP, SCALE_ROWS)
        gate, up = _dots(w, u, w_scale, u_scale, x, x_ptr, w_ptr, scale_ptr, rows, N, stride_wn, stride_sn, stride_sk,
                         up_offset, K, BLOCK_K, HAS_UP, WFMT, GROUP, SCALE_ROWS)
        store_gated_rows(out_ptr, rows, N, gate, up, mult_ptr, ACT, GATED, HAS_UP)
        if group + 1 < GROUPS:
            w, u, w_scale, u_scale, rows = next_w, next_u, next_w_scale, next_u_scale, rows + group_step


# Widest input row a GEMV normalizes itself (`norms`): it holds the row in one tile of registers.
NORMED_MAX_K = 4096


def format_prefix(wfmt: int) -> str:
    """The prefix of a weight format's own keys in the tuned tables (tuning.py): INT4_ for int4, BYTE_ for 8-bit."""
    return {INT4_WORDS.value: "INT4_", PER_ROW.value: "BYTE_", BLOCKS8.value: "BYTE_"}.get(wfmt, "")


def _default_tiles(device: torch.device, k_in: int, normed: bool = False, gated: bool = False, width: int = 0,
                   wfmt: int = 0) -> tuple:
    """The tuned tiles (tuning.py: gemv) of a GEMV of `width` outputs over rows of k_in inputs, in weight format
    `wfmt`: a quantized format's own keys (prefixed INT4_ or BYTE_) where the table has them."""
    tuned = for_format(config("gemv", device), format_prefix(wfmt))
    if normed:
        tiles = tuned["NORMED_GATED_TILES" if gated else "NORMED_TILES"]
    else:
        tiles = tuned["WIDE_TILES"] if tuned["TILES"][1] < k_in <= tuned["WIDE_TILES"][1] else tuned["TILES"]
    # Groups share the program's input only when it is one BLOCK_K step; a longer row is reloaded for each group.
    return tiles[:4] if width < tuned["GROUPS_MIN_WIDTH"] or k_in > tiles[1] else tiles


def _tiles(x: torch.Tensor, k_in: int, tiles: tuple, normed: bool = False, group: int = 1) -> tuple:
    """(BLOCK_N, BLOCK_K, warps, stages, GROUPS) to launch `tiles` with (GROUPS 1 when it has four entries); BLOCK_K
    at least the weight format's `group` of inputs sharing a scale."""
    block_n, block_k, warps, stages, groups = (*tiles, 1)[:5]
    assert not normed or k_in <= NORMED_MAX_K, f"a GEMV normalizes rows of up to {NORMED_MAX_K} inputs, not {k_in}"
    block_k = triton.next_power_of_2(k_in) if normed else min(block_k, triton.next_power_of_2(k_in))
    block_k = max(block_k, group)
    # The interpreter runs programs one by one: 64 rows a program there (a row's arithmetic depends on BLOCK_K alone).
    return block_n if x.is_cuda else 64, block_k, warps, stages, groups


def _quantized_format(weight: QuantizedWeight) -> str | tuple[dict, int, int]:
    """A QuantizedWeight's (format constexprs, scale row stride, scale group stride) for the kernels, or why they
    cannot read it."""
    scheme, values, scale = weight.scheme, weight.values, weight.scale
    if values.dim() != 2 or scale.dim() != 2:
        return "not one matrix"
    if weight.chunk:
        return "int4 stored chunk by chunk (the CPU's layout)"
    k_in = weight.shape[1]
    if values.stride(-1) != 1:
        return "values without unit stride along K"
    if scheme.packed and values.dtype != torch.int32:
        return f"int4 values packed in {values.dtype}"
    if not scheme.packed and values.dtype not in (torch.float8_e4m3fn, torch.int8):
        return f"values of {values.dtype}"
    if scheme.strategy == "channel":
        if not scheme.packed:
            return dict(WFMT=PER_ROW.value, GROUP=1, SCALE_ROWS=1), scale.stride(0), 0
        # int4: its row's scale for every group of the widest that divides K
        group = next(g for g in (32, 16, 8) if k_in % g == 0)
        return dict(WFMT=INT4_WORDS.value, GROUP=group, SCALE_ROWS=1), scale.stride(0), 0
    group, scale_rows = (scheme.group_size, 1) if scheme.strategy == "group" else scheme.block[::-1]
    if group & (group - 1) or group < (8 if scheme.packed else 1) or (scheme.strategy == "group" and k_in % group):
        return f"groups of {group} inputs (a power of 2 that divides K)"
    wfmt = INT4_WORDS if scheme.packed else BLOCKS8
    return dict(WFMT=wfmt.value, GROUP=group, SCALE_ROWS=scale_rows), scale.stride(0), scale.stride(1)


def quantized_supported(weight: QuantizedWeight) -> str | None:
    """Why the kernels cannot read this QuantizedWeight, or None where they can: one [N, K] matrix (an expert's
    included), values with unit stride along K (any row stride: fused rows' views); fp8 e4m3 or int8 values, or int4
    packed in int32 words (K % 8 == 0); per channel, or in groups (blocks) of a power of 2 of inputs (at least 8
    for int4) that divides K (blocks: any K, any rows); scales of any float dtype and any strides."""
    fmt = _quantized_format(weight)
    return fmt if isinstance(fmt, str) else None


def _weight_args(weight: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int, int, dict]:
    """A weight's (values, scales, scale row stride, scale group stride, format constexprs) for the kernels: a
    model-dtype tensor (its own placeholder scales) or a QuantizedWeight."""
    if isinstance(weight, torch.Tensor):
        assert weight.stride(-1) == 1
        return weight, weight, 0, 0, dict(WFMT=DENSE.value, GROUP=1, SCALE_ROWS=1)
    fmt = _quantized_format(weight)
    if isinstance(fmt, str):
        raise ValueError(f"the GEMV kernels do not read this {weight.scheme.name} weight: {fmt}")
    constexprs, stride_sn, stride_sk = fmt
    return weight.values, weight.scale, stride_sn, stride_sk, constexprs


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, width: int, tiles: tuple | None,
                 norms: tuple | None, act: int | None = None, multiplier: torch.Tensor | None = None) -> torch.Tensor:
    assert x.shape[-1] == weight.shape[1] and x.numel() == x.shape[-1]
    mma_tiles = _mma_tiles(weight, x, act is not None, norms is not None) if tiles is None else None
    if mma_tiles is not None:
        if norms is not None and not int4_mma.fuses_norms(mma_tiles):
            x, norms = _normed_input(x, norms), None
        return int4_mma.product(x, weight, act, multiplier, mma_tiles, norms)
    if norms is not None and weight.shape[1] > NORMED_MAX_K:  # a row too wide for one tile: the norms' own kernel
        x, norms = _normed_input(x, norms), None
    k_in, normed, gated = weight.shape[1], norms is not None, act is not None  # act: the gated activation's code
    values, scale, stride_sn, stride_sk, fmt = _weight_args(weight)
    tiles = tiles or _default_tiles(x.device, k_in, normed, gated, width, fmt["WFMT"])
    block_n, block_k, warps, stages, groups = _tiles(x, k_in, tiles, normed, fmt["GROUP"])
    x = x.contiguous()
    input_args, input_flags = deferred_norms_args(x, norms)
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(width, block_n * groups),)](
        x, values, scale, out, multiplier.contiguous() if multiplier is not None else x, width, values.stride(0),
        stride_sn, stride_sk, *input_args, k_in, ACT=act or 0, GATED=gated, HAS_UP=gated and multiplier is None,
        **input_flags, BLOCK_N=block_n, BLOCK_K=block_k, GROUPS=groups, **fmt, num_warps=warps, num_stages=stages,
        **launch_options(x))
    return out


def _normed_input(x: torch.Tensor, norms: tuple) -> torch.Tensor:
    """The row a GEMV with `norms` multiplies, computed by its own kernel (the new residual stream into `new`), where
    the GEMV does not normalize its input: int4_mma at tiles that leave the norms out, rows over NORMED_MAX_K."""
    residual, norm_weight, eps, scalar, next_weight, next_eps, new = norms
    new, normed = residual_rms_norm(residual, x, norm_weight, eps, scalar, next_weight, next_eps,
                                    out=new.view(residual.shape))
    return (new if normed is None else normed).view(x.shape)


def gemv(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, tiles: tuple | None = None,
         norms: tuple | None = None) -> torch.Tensor:
    """F.linear(x, weight) for x [..., K] holding one row; weight [N, K] with unit stride along K, or a
    QuantizedWeight that `quantized_supported` accepts (its fp32 dequantized product, rounded once).
    tiles: (BLOCK_N, BLOCK_K, warps, stages[, GROUPS]), by default the tuned ones (tuning.py).
    norms = (residual, norm_weight, eps, scalar, next_weight, next_eps, new): the input is not x but
    residual_rms_norm(residual, x, norm_weight, eps, scalar, next_weight, next_eps)'s normed row (new itself without
    next_weight), computed by every program from x (over NORMED_MAX_K inputs: by a kernel before it); the new
    residual stream is written into `new`."""
    return _launch_gemv(x, weight, weight.shape[0], tiles, norms)


def _mma_tiles(weight: torch.Tensor | QuantizedWeight, x: torch.Tensor, gated: bool = False,
               normed: bool = False) -> tuple[int, ...] | None:
    """int4_mma's tiles where the product runs in its kernel, else None: int4 in groups as these kernels read it
    (`_quantized_format`), and `int4_mma.launch_tiles` for the call. Its epilogue is the rounded product or the
    gated activation; the residual norms of its input (`normed`) run in its programs or in a kernel before it, as the
    tiles say (`int4_mma.fuses_norms`), those of its product in a kernel after it."""
    if not (isinstance(weight, QuantizedWeight) and weight.scheme.strategy == "group"):
        return None
    tiles = int4_mma.launch_tiles(weight, x, gated, normed)
    if tiles is None:
        return None
    fmt = _quantized_format(weight)
    return tiles if not isinstance(fmt, str) and fmt[0]["WFMT"] == INT4_WORDS.value else None


def gemv_gated(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, activation: str,
               multiplier: torch.Tensor | None = None, norms: tuple | None = None,
               tiles: tuple | None = None) -> torch.Tensor:
    """`gated(gate, up, activation)` of one row x [..., K], in one kernel with the product -> [..., W]. multiplier
    None: [gate; up] = F.linear(x, weight), weight [2W, K] (a fused gate/up projection); else gate = F.linear(x,
    weight), weight [W, K], and up = multiplier [..., W]. norms: the input is residual norms of x, as in `gemv`.
    A QuantizedWeight as in `gemv` (fused: its scales' rows follow its values' rows)."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATION_CODES)}")
    width = weight.shape[0] // 2 if multiplier is None else weight.shape[0]
    assert multiplier is None or multiplier.numel() == width
    return _launch_gemv(x, weight, width, tiles, norms, ACTIVATION_CODES[activation], multiplier)
