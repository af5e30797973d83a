"""int4 GEMVs (one activation row times a W4A16 weight: int4 in groups, bf16 scales) on the tensor cores, the
weights an MMA's A operand straight from registers, for the bigger matrices of a batch-1 decode step (all of 31B's;
E2B's and E4B's MLPs, E4B's q/k/v, the int4 LM heads; `launch_tiles`).

Unpacking int4 costs instructions: gemv.py's CUDA-core GEMV (INT4_WORDS) issues ~41 a word of 8 weights and stalls
on issue before memory; multiplying on the tensor cores through tl.dot, the dequantized tile Triton hands to the MMA
goes through shared memory. Here the layouts are explicit (Gluon, Triton's layout-level dialect), so each thread
unpacks its words straight into its own A fragments: ~16 instructions a word, no shared memory.

One program: BLOCK_N rows, K / SPLIT inputs in steps of 256, the weights of the next PREFETCH steps in flight (in
registers) while a step multiplies. A step's [BLOCK_N, 256] weights are loaded 16 bytes (4 words of a row) a thread,
every word unpacked in place: with k_width 8 a thread's A fragment holds 8 consecutive K of a row, one word. The K
order the fragments hold is a permutation of the inputs (words and nibbles), which the B operand, the inputs,
follows: B is [256, 8], column c the step's group c (inputs of other groups zero), so one MMA chain sums each group
of 32 apart. q = nibble - 8 is exact in bf16, the products q * x exact in fp32; each group's sum times its scale is
added in fp32 and the 8 columns summed at the end: the fp32 product of the exact dequantized weight up to summation
order (as INT4_WORDS), rounded once. With SPLIT > 1 the programs of a row block write fp32 partial sums and the last
to finish adds them in split order (deterministic) and rounds.

Where the input is the residual norms of an earlier product (gemv.py's `norms`) the tiles say who computes them: a
kernel of their own before this one, or each program for itself from the whole row (`_normed_rows`: a few KB from
L2, into shared memory), which saves a launch and a round trip through memory but repeats the row's arithmetic in
every program: it can pay only where the programs are few and wide (benchmarks/int4_mma_tiles.py times both).

Gluon compiles for the GPU only (no interpreter): tests/test_kernels_int4_mma.py runs it on CUDA,
tests/sm90_compile.py compiles it for sm_90.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..model.quantized import QuantizedWeight
from .activation import store_gated_rows
from .counters import finished_counters
from .norm import _added_norm, _rstd, deferred_norms_args
from .pdl import launch_options
from .tuning import config

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon: gemv.py's kernels take every int4 weight
    gluon = None

BLOCK_K = 256  # inputs a step: 8 groups of 32, the B operand's 8 columns
MAX_SPLIT = 16


def takes(weight: QuantizedWeight, x: torch.Tensor) -> bool:
    """Whether `product` can multiply this int4 weight in groups, in the layout gemv.py's kernels read (one matrix of
    int32 words with unit stride along K: `gemv._quantized_format`, which the caller checks), with x: one bf16 row
    on a GPU of compute capability 9.0 or newer (bf16x2 subtraction; not under Triton's interpreter), groups of 32
    to 256 inputs and K a multiple of 256. Whether it should is `launch_tiles`."""
    n_out, k_in = weight.shape
    return (gluon is not None and x.is_cuda and not triton.knobs.runtime.interpret and x.dtype == torch.bfloat16
            and x.numel() == k_in and weight.scheme.group_size in (32, 64, 128, 256) and k_in % BLOCK_K == 0
            and _capable(x.device.index or 0))


def shape_key(shape: tuple[int, int], gated: bool, normed: bool) -> str:
    """A GEMV's key in INT4_MMA_BY_SHAPE: the weight's N x K, and how the model calls it (gated: the activation in
    the epilogue; normed: its input's residual norms in a kernel before it), e.g. "20480x2560 gated normed"."""
    return f"{shape[0]}x{shape[1]}" + " gated" * gated + " normed" * normed


def launch_tiles(weight: QuantizedWeight, x: torch.Tensor, gated: bool = False,
                 normed: bool = False) -> tuple[int, ...] | None:
    """(BLOCK_N, warps, target programs[, steps prefetched[, norms in the kernel]]) where this product runs in the
    kernel, None where gemv.py's kernels run it (those that do not `takes`; small GEMVs, bound by their launch and
    tail, which gemv.py's kernels serve as well). The device's INT4_MMA_BY_SHAPE entry for the call decides
    (measured: benchmarks/int4_mma_tiles.py); a normed call without one as the same call not normed (its norms in a
    kernel before it); without any, the weights from INT4_MMA_MIN_ELEMENTS run at INT4_MMA_TILES and
    INT4_MMA_PROGRAMS."""
    if not takes(weight, x):
        return None
    tuned = _tuned(x.device)
    by_shape = tuned.get("INT4_MMA_BY_SHAPE") or {}
    for key in dict.fromkeys((shape_key(weight.shape, gated, normed), shape_key(weight.shape, gated, False))):
        if key in by_shape:
            return tuple(by_shape[key]) if by_shape[key] else None
    if weight.shape[0] * weight.shape[1] < tuned["INT4_MMA_MIN_ELEMENTS"]:
        return None
    return _default_tiles(x.device)


def fuses_norms(tiles: tuple[int, ...]) -> bool:
    """Whether a normed call at these tiles computes its input's norms in its own programs (`product`'s `norms`),
    rather than after a kernel of their own: the tiles' fifth entry, 0 where absent."""
    return len(tiles) > 4 and bool(tiles[4])


def _default_tiles(device: torch.device) -> tuple[int, ...]:
    tuned = _tuned(device)
    return (*tuned["INT4_MMA_TILES"], tuned["INT4_MMA_PROGRAMS"])


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _tuned(device: torch.device) -> dict:
    return config("gemv", device)


def product(x: torch.Tensor, weight: QuantizedWeight, act: int | None = None,
            multiplier: torch.Tensor | None = None, tiles: tuple[int, ...] | None = None,
            norms: tuple | None = None) -> torch.Tensor:
    """F.linear(x, weight.dequantize(fp32)) for one row x [..., K], rounded once to the dtype: [..., N]; with `act`
    (an ACTIVATION_CODES code) act(gate) * up, rounded as `activation.store_gated_rows` rounds, of [gate; up] = the
    product (weight [2W, K], a fused gate/up projection) or of gate = the product and up = `multiplier` [..., W].
    norms = (residual, norm_weight, eps, scalar, next_weight, next_eps, new), as gemv.py's: the input is not x but
    its residual norms, which each program computes from the whole row (the new residual stream into `new`).
    tiles: (BLOCK_N, warps, target programs[, steps prefetched, 1 if absent]), by default INT4_MMA_TILES and
    INT4_MMA_PROGRAMS; a fifth entry is the caller's (`fuses_norms`). Only where `takes` (the caller checks)."""
    gated, has_up = act is not None, act is not None and multiplier is None
    width, k_in = weight.shape[0] // (2 if has_up else 1), weight.shape[1]
    block_n, warps, programs, prefetch = (*(tiles or _default_tiles(x.device)), 1)[:4]
    assert prefetch in (1, 2), f"int4_mma prefetches 1 or 2 steps, not {prefetch}"
    blocks = triton.cdiv(width, block_n)
    split = _split(blocks, k_in // BLOCK_K, programs)
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    partials, counters = out, out  # unused with one split
    if split > 1:
        partials = torch.empty(split, 2 if has_up else 1, width, dtype=torch.float32, device=x.device)
        counters = finished_counters("int4_mma", x.device, blocks)
    x = x.contiguous()
    norms_args, norms_flags = deferred_norms_args(x, norms)
    word_load, operand, x_load, x_row, mma = _layouts(block_n, warps)
    chunk_rows = 2 * warps  # rows of 256 inputs a step of the norms' loops: 16 values a thread
    shared_rows = triton.next_power_of_2(triton.cdiv(k_in, BLOCK_K * chunk_rows) * chunk_rows)
    _int4_mma_kernel[(blocks, split)](
        x, weight.values, weight.scale, out, multiplier.contiguous() if multiplier is not None else out,
        partials, counters, width, weight.values.stride(0), weight.scale.stride(0), weight.scale.stride(1),
        *norms_args, K=k_in, ACT=act or 0, GATED=gated, HAS_UP=has_up, BLOCK_N=block_n,
        GROUP=weight.scheme.group_size, SPLIT=split, PREFETCH=prefetch, **norms_flags, CHUNK_ROWS=chunk_rows,
        SHARED_ROWS=shared_rows, WORD_LOAD=word_load, OPERAND=operand, X_LOAD=x_load, X_ROW=x_row, MMA=mma,
        ROWS=_rows_layout(chunk_rows, warps), num_warps=warps, **launch_options(x))
    return out


def _split(blocks: int, steps: int, programs: int) -> int:
    """K splits: the fewest that dividing the steps evenly give at least `programs` programs, MAX_SPLIT at most."""
    divisors = [d for d in range(1, min(steps, MAX_SPLIT) + 1) if steps % d == 0]
    return next((d for d in divisors if blocks * d >= programs), divisors[-1])


@functools.cache
def _rows_layout(chunk_rows: int, warps: int):
    """[chunk_rows, 256] of an input row cut in steps (the norms' loops): 16 bytes a thread, a step a warp."""
    return gl.BlockedLayout([chunk_rows // warps, 8], [1, 32], [warps, 1], [1, 0])


@functools.cache
def _layouts(block_n: int, warps: int) -> tuple:
    """The kernel's register layouts for BLOCK_N rows on `warps` warps (each warp 16-row MMA tiles, rows g and g + 8
    a thread, g = lane // 4). Linear layouts: which element each register, lane and warp bit steps to."""
    words = BLOCK_K // 8

    def bits(count: int) -> range:
        return range(count.bit_length() - 1)

    tiles = block_n // (16 * warps)  # MMA tiles a warp, stacked above the warps' rows
    warp_rows = [[16 << w, 0] for w in bits(warps)]
    tile_rows = [[(16 * warps) << t, 0] for t in bits(tiles)]
    # words as stored, [rows, words]: 4 of a row a thread (one 16-byte load), 4 threads along the row
    word_load = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0], [0, 16]] + tile_rows, lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=warp_rows, block_bases=[], shape=[block_n, words])
    # [rows, words in the operand's order, 8 nibbles]: the A operand (k_width 8) before its reshape to [rows, K]
    operand = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0], [0, 4, 0], [0, 8, 0], [0, 16, 0]]
        + [[r, 0, 0] for r, _ in tile_rows],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[r, 0, 0] for r, _ in warp_rows], block_bases=[], shape=[block_n, words, 8])
    # the inputs as stored, [words, 8 inputs, 8 columns]: a word's inputs a thread (16 bytes), as the B operand
    # (k_width 8) holds them after the same permutation: columns on lanes 2-4, copies on every warp
    x_load = gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [16, 0, 0]],
        lane_bases=[[4, 0, 0], [8, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[0, 0, 0] for _ in bits(warps)], block_bases=[], shape=[words, 8, 8])
    # a step's 256 inputs (8 * word + input) as x_load holds them without its columns: read from shared memory
    x_row = gl.DistributedLinearLayout(
        reg_bases=[[1], [2], [4], [8], [16], [128]], lane_bases=[[32], [64], [0], [0], [0]],
        warp_bases=[[0] for _ in bits(warps)], block_bases=[], shape=[BLOCK_K])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    return word_load, operand, x_load, x_row, mma


if gluon is not None:
    STEP_K = gl.constexpr(BLOCK_K)

    # A word (8 nibbles n = q + 8, broadcast to the 8 operands of its pack) -> its q as 8 bf16, in the order
    # n0, n4, n1, n5, n2, n6, n3, n7: each lop3 ors nibbles p and p + 4 (bits 4p and 16 + 4p) into the mantissas of
    # a bf16x2 128.0 (0x4300: 128 + n exactly), minus 136: q exactly.
    _UNPACK = gl.constexpr("\n".join([
        "{", ".reg .b32 w4, w8, w12, o;", "mov.b32 o, 0x43084308;",
        "shr.u32 w4, $4, 4;", "shr.u32 w8, $4, 8;", "shr.u32 w12, $4, 12;",
        "lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;", "lop3.b32 $1, w4, 0x000F000F, 0x43004300, 0xEA;",
        "lop3.b32 $2, w8, 0x000F000F, 0x43004300, 0xEA;", "lop3.b32 $3, w12, 0x000F000F, 0x43004300, 0xEA;",
        *(f"sub.rn.bf16x2 ${j}, ${j}, o;" for j in range(4)),
        "}"]))

    @gluon.jit
    def _operand_words(t, BLOCK_N: gl.constexpr):
        """[rows, 32 words] as stored (word m: bits m0..m4) -> the operand's order (m2, m3, m0, m1, m4): lanes step
        along bits 2-3 of the stored index, registers along 0-1 (a thread's 16-byte load) and 4."""
        t = gl.reshape(t, [BLOCK_N, 2, 2, 2, 2, 2])  # m4, m3, m2, m1, m0
        t = gl.permute(t, [0, 1, 4, 5, 2, 3])  # m4, m1, m0, m3, m2
        return gl.reshape(t, [BLOCK_N, STEP_K // 8])

    @gluon.jit
    def _pdl_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _step_weights(w_ptrs, s_ptrs, w_ok, s_ok, up_words, up_scales, stride_sk, step, STEPS: gl.constexpr,
                      WORDS: gl.constexpr, GROUPS: gl.constexpr, HAS_UP: gl.constexpr):
        """Step `step`'s words and scales, and the up rows' with HAS_UP (else the same again); zeros past the last."""
        more = step < STEPS
        w = gl.load(w_ptrs + step * WORDS, mask=w_ok & more, other=0)
        s = gl.load(s_ptrs + step * GROUPS * stride_sk, mask=s_ok & more, other=0.0)
        u, su = w, s
        if HAS_UP:
            u = gl.load(w_ptrs + up_words + step * WORDS, mask=w_ok & more, other=0)
            su = gl.load(s_ptrs + up_scales + step * GROUPS * stride_sk, mask=s_ok & more, other=0.0)
        return w, s, u, su

    @gluon.jit
    def _group_sums(w, broadcast, xb, BLOCK_N: gl.constexpr, A: gl.constexpr, MMA: gl.constexpr):
        """A step's sums of q * x per row and group, [BLOCK_N, 8] (fp32), from the rows' words as loaded."""
        ws = gl.convert_layout(_operand_words(w, BLOCK_N), gl.SliceLayout(2, broadcast.type.layout))
        ws, _ = gl.broadcast(ws[:, :, None], broadcast)
        q = gl.inline_asm_elementwise(_UNPACK, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [ws], dtype=gl.bfloat16, is_pure=True,
                                      pack=8)
        a = gl.convert_layout(gl.reshape(q, [BLOCK_N, STEP_K]), A, assert_trivial=True)
        return mma_v2(a, xb, gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA))

    @gluon.jit
    def _normed_rows(x_ptr, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps, rows, writes_new,
                     K: gl.constexpr, CHUNK_ROWS: gl.constexpr, HAS_SCALAR: gl.constexpr, HAS_NEXT: gl.constexpr,
                     ROWS: gl.constexpr):
        """Into `rows` (shared, [at least K / 256, 256] of the dtype: row r holds inputs 256r..), the residual norms of
        the product x (norm.residual_rms_norm's values: statistics in fp32, rounded where the eager ops round): new =
        residual + norm(x) [* scalar], then next_norm(new) with HAS_NEXT, else new. With `writes_new` the program also
        stores new at new_ptr. Three passes over the row in chunks of CHUNK_ROWS rows: x's sum of squares; new (into
        `rows`) and its sum of squares; the next norm in place."""
        dtype: gl.constexpr = new_ptr.dtype.element_ty
        CHUNK: gl.constexpr = CHUNK_ROWS * STEP_K
        CHUNKS: gl.constexpr = (K + CHUNK - 1) // CHUNK
        offs = (gl.arange(0, CHUNK_ROWS, layout=gl.SliceLayout(1, ROWS))[:, None] * STEP_K
                + gl.arange(0, STEP_K, layout=gl.SliceLayout(0, ROWS))[None, :])
        squares = gl.zeros([CHUNK_ROWS, STEP_K], gl.float32, layout=ROWS)
        for c in gl.static_range(CHUNKS):
            y = gl.load(x_ptr + c * CHUNK + offs, mask=c * CHUNK + offs < K, other=0.0).to(gl.float32)
            squares += y * y
        rstd = _rstd(gl.sum(gl.sum(squares, axis=1), axis=0), K, eps)
        scalar = 1.0
        if HAS_SCALAR:
            scalar = gl.load(scalar_ptr).to(gl.float32)
        squares = gl.zeros([CHUNK_ROWS, STEP_K], gl.float32, layout=ROWS)
        for c in gl.static_range(CHUNKS):
            at = c * CHUNK + offs
            ok = at < K
            y = gl.load(x_ptr + at, mask=ok, other=0.0).to(gl.float32)
            residual = gl.load(res_ptr + at, mask=ok, other=0.0).to(gl.float32)
            w = gl.load(nw_ptr + at, mask=ok, other=0.0).to(gl.float32)
            new = _added_norm(y * rstd * w, residual, scalar, dtype, HAS_SCALAR)
            gl.store(new_ptr + at, new.to(dtype), mask=ok & writes_new)
            squares += new * new
            rows.slice(c * CHUNK_ROWS, CHUNK_ROWS).store(new.to(dtype))
        if HAS_NEXT:
            next_rstd = _rstd(gl.sum(gl.sum(squares, axis=1), axis=0), K, next_eps)
            for c in gl.static_range(CHUNKS):
                at = c * CHUNK + offs
                w = gl.load(next_w_ptr + at, mask=at < K, other=0.0).to(gl.float32)
                chunk = rows.slice(c * CHUNK_ROWS, CHUNK_ROWS)
                new = chunk.load(ROWS).to(gl.float32)  # this thread's own stores: no barrier needed
                chunk.store((new * next_rstd * w).to(dtype))
        gl.thread_barrier()  # the main loop reads the rows in another layout

    @gluon.jit
    def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, out_ptr, mult_ptr, partial_ptr, counter_ptr, N, stride_wn, stride_sn,
                         stride_sk, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps,
                         K: gl.constexpr, ACT: gl.constexpr, GATED: gl.constexpr, HAS_UP: gl.constexpr,
                         BLOCK_N: gl.constexpr, GROUP: gl.constexpr, SPLIT: gl.constexpr, PREFETCH: gl.constexpr,
                         NORMED: gl.constexpr, HAS_SCALAR: gl.constexpr, HAS_NEXT: gl.constexpr,
                         CHUNK_ROWS: gl.constexpr, SHARED_ROWS: gl.constexpr, WORD_LOAD: gl.constexpr,
                         OPERAND: gl.constexpr, X_LOAD: gl.constexpr, X_ROW: gl.constexpr, MMA: gl.constexpr,
                         ROWS: gl.constexpr, PDL: gl.constexpr):
        """out = x @ weight.T, or with GATED act(gate) * up (gate/up: rows i and N + i with HAS_UP, else up from
        mult_ptr); N is the output width. With NORMED the input is x's residual norms (`_normed_rows`). Program
        (block, split): rows block * BLOCK_N.., inputs of split `split`."""
        WORDS: gl.constexpr = STEP_K // 8
        GROUPS: gl.constexpr = STEP_K // GROUP  # a step's groups: B's columns 0 .. GROUPS - 1
        STEPS: gl.constexpr = K // STEP_K // SPLIT
        A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=8)
        B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=8)
        block = gl.program_id(0)
        k_first = gl.program_id(1) * (STEPS * STEP_K)
        # the weights' words and scales (the up rows' N rows further), PREFETCH steps ahead (no kernel writes them:
        # loaded before the PDL wait)
        rows = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORD_LOAD))
        words = gl.arange(0, WORDS, layout=gl.SliceLayout(0, WORD_LOAD))
        w_ptrs = w_ptr + rows.to(gl.int64)[:, None] * stride_wn + (k_first // 8 + words)[None, :]
        w_ok = (rows < N)[:, None]
        out_rows = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        columns = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        s_ptrs = (s_ptr + out_rows.to(gl.int64)[:, None] * stride_sn
                  + ((k_first // GROUP + columns) * stride_sk)[None, :])
        s_ok = (out_rows < N)[:, None] & (columns < GROUPS)[None, :]
        up_words = N.to(gl.int64) * stride_wn
        up_scales = N.to(gl.int64) * stride_sn
        # the inputs as stored, column c of a step those of its group c
        x_words = gl.arange(0, WORDS, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_LOAD)))
        x_inputs = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_LOAD)))
        x_columns = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_LOAD)))
        x_ptrs = x_ptr + k_first + (x_words * 8)[:, None, None] + x_inputs[None, :, None] + 0 * x_columns[None, None, :]
        x_ok = (x_columns[None, None, :] == (x_words * 8 // GROUP)[:, None, None]) & (x_inputs >= 0)[None, :, None]
        broadcast = gl.zeros([BLOCK_N, WORDS, 8], gl.int32, layout=OPERAND)
        w, s, u, su = _step_weights(w_ptrs, s_ptrs, w_ok, s_ok, up_words, up_scales, stride_sk, 0, STEPS, WORDS, GROUPS,
                                    HAS_UP)
        w1, s1, u1, su1 = w, s, u, su
        if PREFETCH == 2:
            w1, s1, u1, su1 = _step_weights(w_ptrs, s_ptrs, w_ok, s_ok, up_words, up_scales, stride_sk, 1, STEPS,
                                            WORDS, GROUPS, HAS_UP)
        if PDL:
            _pdl_wait()
        if NORMED:
            rows_smem = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [SHARED_ROWS, STEP_K],
                                                  gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            _normed_rows(x_ptr, res_ptr, nw_ptr, scalar_ptr, next_w_ptr, new_ptr, eps, next_eps, rows_smem,
                         (block == 0) & (gl.program_id(1) == 0), K, CHUNK_ROWS, HAS_SCALAR, HAS_NEXT, ROWS)
            # the same rows viewed one by one (row-major: the main loop indexes a step's row)
            step_rows = rows_smem._reinterpret(x_ptr.dtype.element_ty, [SHARED_ROWS, STEP_K],
                                               gl.SwizzledSharedLayout(1, 1, 1, [0]))
        acc = gl.zeros([BLOCK_N, 8], gl.float32, layout=MMA)
        acc_up = acc
        for step in range(STEPS):
            next_w, next_s, next_u, next_su = _step_weights(w_ptrs, s_ptrs, w_ok, s_ok, up_words, up_scales, stride_sk,
                                                            step + PREFETCH, STEPS, WORDS, GROUPS, HAS_UP)
            if NORMED:  # this step's row of the normed input, from shared memory
                xs = gl.reshape(step_rows.index(k_first // STEP_K + step).load(X_ROW), [WORDS, 8])
                xs = gl.convert_layout(xs, gl.SliceLayout(2, X_LOAD), assert_trivial=True)
                xs = gl.where(x_ok, gl.expand_dims(xs, 2), 0.0)
            else:
                xs = gl.load(x_ptrs + step * STEP_K, mask=x_ok, other=0.0)
            # stored [m4, m3, m2, m1, m0, nibble (i, p1, p0), column] -> the operand's K order: words as
            # _operand_words, then a word's inputs p + 4i in the order (p1, p0, i) that _UNPACK leaves them in
            xs = gl.reshape(xs, [2, 2, 2, 2, 2, 2, 2, 2, 8])
            xs = gl.permute(xs, [0, 3, 4, 1, 2, 6, 7, 5, 8])
            xb = gl.convert_layout(gl.reshape(xs, [STEP_K, 8]), B)
            acc += _group_sums(w, broadcast, xb, BLOCK_N, A, MMA) * s.to(gl.float32)
            if HAS_UP:
                acc_up += _group_sums(u, broadcast, xb, BLOCK_N, A, MMA) * su.to(gl.float32)
            if PREFETCH == 2:
                w, s, u, su = w1, s1, u1, su1
                w1, s1, u1, su1 = next_w, next_s, next_u, next_su
            else:
                w, s, u, su = next_w, next_s, next_u, next_su
        gate = gl.sum(acc, axis=1)
        up = gate
        if HAS_UP:
            up = gl.sum(acc_up, axis=1)
        rows_ok = out_rows < N
        if SPLIT == 1:
            store_gated_rows(out_ptr, out_rows, N, gate, up, mult_ptr, ACT, GATED, HAS_UP)
        else:
            # the block's last program to finish adds the partial sums in split order; its acquire pairs with the
            # other programs' releases (the barrier first puts all of a program's stores before its release), and it
            # re-arms the counter for the next launch (CUDA-graph replays included)
            HALVES: gl.constexpr = 2 if HAS_UP else 1
            partials = partial_ptr + gl.program_id(1) * HALVES * N + out_rows
            gl.store(partials, gate, mask=rows_ok)
            if HAS_UP:
                gl.store(partials + N, up, mask=rows_ok)
            gl.thread_barrier()
            finished = gl.atomic_add(counter_ptr + block, 1, sem="acq_rel")
            if finished == SPLIT - 1:
                gate = gl.zeros([BLOCK_N], gl.float32, layout=gl.SliceLayout(1, MMA))
                up = gate
                for split in gl.static_range(SPLIT):
                    partials = partial_ptr + split * HALVES * N + out_rows
                    gate += gl.load(partials, mask=rows_ok, other=0.0, cache_modifier=".cg")
                    if HAS_UP:
                        up += gl.load(partials + N, mask=rows_ok, other=0.0, cache_modifier=".cg")
                store_gated_rows(out_ptr, out_rows, N, gate, up, mult_ptr, ACT, GATED, HAS_UP)
                gl.atomic_xchg(counter_ptr + block, 0, sem="relaxed")
