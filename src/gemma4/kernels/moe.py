"""MoE experts at decode: two GEMV kernels that read each chosen expert's weights in place (no gathered copies).

Same result as `Experts.forward_gathered` up to float summation order, rounding where its bmm calls round:
  h[p]   = round(round(act(round(W_gu[e, :W] @ x[t]))) * round(W_gu[e, W:] @ x[t]))   (p = t*k + c, e = experts[t, c])
  out[t] = round(sum_c fp32(round(W_down[e] @ h[p])) * weights[t, c])
The expert ids are read on the device and the grids depend only on shapes: no host syncs, CUDA-graph capturable.

Either weight may be a QuantizedWeight of 8-bit values (fp8 e4m3 or int8) with one scale per output row (the
checkpoints' and `quantize`'s per-channel schemes): the kernels read the 1-byte values and multiply each row's fp32
dot product by the row's scale after the reduction (w = q * s, s constant along the row, so it factors out of the
sum), before the roundings above. In fp32 that equals the dequantized weight's product up to summation order (the
twin rounds each q * s to fp32 first); in bf16 the twin also rounds each weight q * s to bf16, which the kernels never
do: the outputs agree to the bf16 summation-order tolerance.

Or int4 in groups (W4A16: 8 values a 32-bit word, a scale per GROUP inputs of a row; model/quantized.py), read as the
int4 GEMVs read them (gemv.py's INT4_WORDS): each word's nibbles unpacked in registers, each group's fp32 sum of q * x
times its scale, the groups summed in fp32. So the same numerics as the 8-bit path: the exact q * s, never rounded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES, activation_fp32
from .attention import _dot
from .gemv import DENSE, INT4_WORDS, PER_ROW, _dots, _first_tiles, exact_fp32, format_prefix
from .norm import _norm_weight, _norm_weights, _rows, _store, _unit_rms, _warps
from .pdl import after_previous_kernel, launch_options
from .quantized_matmul import _dequantized_tile
from .rounding import dot_operand, round_to
from .tuning import config, for_format
from ..model.quantized import QuantizedWeight

_ACTIVATIONS = {name: ACTIVATION_CODES[name] for name in ("gelu_pytorch_tanh", "silu", "swish")}

# Both kernels are memory-bound matrix-vector products (~95 MB of bf16 weights per layer at T=1, k=8): each program
# streams a few rows along the contiguous axis (H for gate_up_proj, W for down_proj), so that warps issue wide,
# coalesced loads, and the grids stay large (T=1: ~1400 programs per kernel) to keep every SM's loads in flight.
# Tiles: tuning.py, moe: GU_*, DOWN_* (a format's own: INT4_*, BYTE_*). The sizes H, W, k are compile-time
# constants (one compilation per model shape): the loops get static trip counts, which the interpreter also needs
# (its runtime-bounded range() breaks under NumPy >= 2.4). WFMT, a constexpr per weight, is its format as gemv.py
# codes it: DENSE, PER_ROW (8-bit, a scale per row) or INT4_WORDS (int4, a scale per GROUP inputs).


@triton.jit
def _expert_int4_dots(w_ptr, scale_ptr, e, rows, N: tl.constexpr, x_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_UP: tl.constexpr, GROUP: tl.constexpr):
    """fp32 dot products of the input row at x_ptr [K] with rows `rows` of expert e's int4 matrix, by gemv.py's int4
    GEMV (INT4_WORDS): words [E, ROWS, K / 8] and scales [E, ROWS, K / GROUP], contiguous, ROWS = 2N with HAS_UP (a
    gate/up matrix: then also the up rows N further) else N. (gate, up), up = gate without HAS_UP."""
    ROWS: tl.constexpr = 2 * N if HAS_UP else N
    words = w_ptr + e * (ROWS * (K // 8))
    scales = scale_ptr + e * (ROWS * (K // GROUP))
    w, u, w_scale, u_scale = _first_tiles(words, scales, rows, N, K // 8, K // GROUP, 1, N * (K // 8), K, BLOCK_K,
                                          HAS_UP, INT4_WORDS, GROUP, 1)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    return _dots(w, u, w_scale, u_scale, x, x_ptr, words, scales, rows, N, K // 8, K // GROUP, 1, N * (K // 8), K,
                 BLOCK_K, HAS_UP, INT4_WORDS, GROUP, 1)


@triton.jit
def _gate_up_kernel(x_ptr, experts_ptr, gu_ptr, gu_scale_ptr, h_ptr, H: tl.constexpr, W: tl.constexpr,
                    K: tl.constexpr, ACT: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    p = tl.program_id(0)  # (token, choice) pair, token-major
    rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # rows i of gate (and W + i of up)
    row_ok = rows < W
    e = tl.load(experts_ptr + p).to(tl.int64)
    x_row = x_ptr + (p // K) * H
    if WFMT == INT4_WORDS:
        gate, up = _expert_int4_dots(gu_ptr, gu_scale_ptr, e, rows, W, x_row, H, BLOCK_H, True, GROUP)
    else:
        gate_rows = gu_ptr + e * (2 * W) * H + rows.to(tl.int64)[:, None] * H
        up_rows = gate_rows + W * H
        if WFMT == PER_ROW:  # gu_ptr: 8-bit values; one scale per row of gate_up_proj, [E, 2W]
            gate_scale_row = gu_scale_ptr + e * (2 * W) + rows
            gate_scale = tl.load(gate_scale_row, mask=row_ok, other=0.0).to(tl.float32)
            up_scale = tl.load(gate_scale_row + W, mask=row_ok, other=0.0).to(tl.float32)
        # fp32 partial sums per lane over H, one chunk at a time, and one reduction across the lanes at the end (a
        # reduction a chunk would cross the warps every step)
        gate = tl.zeros([BLOCK_W, BLOCK_H], dtype=tl.float32)
        up = tl.zeros([BLOCK_W, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            # the input in the tile's own layout (each lane its columns' inputs, from L1): no layout change a step
            xv = tl.load(x_row + cols[None, :] + 0 * rows[:, None], mask=mask, other=0.0).to(tl.float32)
            gate += exact_fp32(tl.load(gate_rows + cols[None, :], mask=mask, other=0.0)) * xv
            up += exact_fp32(tl.load(up_rows + cols[None, :], mask=mask, other=0.0)) * xv
        gate = tl.sum(gate, axis=1)
        up = tl.sum(up, axis=1)
        if WFMT == PER_ROW:  # the rows' scales on their fp32 dot products, before the roundings
            gate = gate * gate_scale
            up = up * up_scale
    dtype = h_ptr.dtype.element_ty
    # Round where torch rounds: the bmm outputs, the activation's output, the product (the store is then exact).
    # The activation is the gated-activation kernel's (torch's CUDA formulas, fp32 in and out).
    h = round_to(round_to(activation_fp32(round_to(gate, dtype), ACT), dtype) * round_to(up, dtype), dtype)
    tl.store(h_ptr + p * W + rows, h.to(dtype), mask=row_ok)


@triton.jit
def _down_kernel(h_ptr, weights_ptr, experts_ptr, down_ptr, down_scale_ptr, out_ptr, H: tl.constexpr,
                 W: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ONE_LOAD: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)  # one token, all its k choices: the sum over choices stays in registers (no atomics)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # output channels
    row_ok = rows < H
    dtype = out_ptr.dtype.element_ty
    if ONE_LOAD:
        # One token (W <= BLOCK_W; 26B-A4B: W = 704): its row of every chosen expert in one load, issued before the
        # wait for the gate/up kernel. The expert ids and routing weights come from a kernel before that one (complete
        # once this one is scheduled: every gate/up program has passed its own wait), and weights are never written.
        # So the down weights stream in while gate/up finishes. (Slower at 4-8 tokens: there the loop below stays.)
        tl.static_assert(WFMT != INT4_WORDS, "int4 down weights take the loop over choices")
        pairs = t * K + tl.arange(0, K_POW2)
        pair_ok = tl.arange(0, K_POW2) < K
        e = tl.load(experts_ptr + pairs, mask=pair_ok, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_W)
        col_ok = cols < W
        tile = down_ptr + e[:, None, None] * H * W + rows.to(tl.int64)[None, :, None] * W + cols[None, None, :]
        wv = tl.load(tile, mask=pair_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :], other=0.0)
        route = tl.load(weights_ptr + pairs, mask=pair_ok, other=0.0)
        if WFMT == PER_ROW:  # down_ptr: 8-bit values; the scales of the chosen experts' rows [K_POW2, BLOCK_H]
            scale = tl.load(down_scale_ptr + e[:, None] * H + rows[None, :], mask=pair_ok[:, None] & row_ok[None, :],
                            other=0.0).to(tl.float32)
        after_previous_kernel(PDL)
        hv = tl.load(h_ptr + pairs[:, None] * W + cols[None, :], mask=pair_ok[:, None] & col_ok[None, :], other=0.0)
        y = tl.sum(exact_fp32(wv) * hv.to(tl.float32)[:, None, :], axis=2)  # [K_POW2, BLOCK_H]
        if WFMT == PER_ROW:
            y = y * scale
        # The bmm output is rounded to the dtype; the routing weight (fp32) and the sum over choices are fp32.
        total = tl.sum(round_to(y, dtype) * route[:, None], axis=0)
    else:
        after_previous_kernel(PDL)
        total = tl.zeros([BLOCK_H], dtype=tl.float32)
        for c in range(0, K):
            p = t * K + c
            e = tl.load(experts_ptr + p).to(tl.int64)
            if WFMT == INT4_WORDS:
                y, _ = _expert_int4_dots(down_ptr, down_scale_ptr, e, rows, H, h_ptr + p * W, W, BLOCK_W, False, GROUP)
            else:
                down_rows = down_ptr + e * H * W + rows.to(tl.int64)[:, None] * W
                y = tl.zeros([BLOCK_H], dtype=tl.float32)
                for w0 in range(0, W, BLOCK_W):
                    cols = w0 + tl.arange(0, BLOCK_W)
                    col_ok = cols < W
                    hv = tl.load(h_ptr + p * W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    wv = tl.load(down_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                    y += tl.sum(exact_fp32(wv) * hv, axis=1)
                if WFMT == PER_ROW:  # expert e's row scales on the fp32 dot products, before the rounding
                    y = y * tl.load(down_scale_ptr + e * H + rows, mask=row_ok, other=0.0).to(tl.float32)
            total += round_to(y, dtype) * tl.load(weights_ptr + p)
    tl.store(out_ptr + t * H + rows, round_to(total, dtype).to(dtype), mask=row_ok)


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_VALUES = {"float": torch.float8_e4m3fn, "int": torch.int8}  # the 8-bit kinds the kernels read, by Scheme.kind


class _Weight(NamedTuple):
    """An expert weight as the kernels take it: `values` as stored, contiguous (x's dtype or 8-bit [E, N, K], int4
    words [E, N, K / 8]); `scale` contiguous ([E, N, 1] per row, [E, N, K / GROUP] in groups) or None (then
    `scale_ptr` is the values again: a pointer the kernels never read); `shape` [E, N, K]; the format constexprs."""
    values: torch.Tensor
    scale: torch.Tensor | None
    shape: torch.Size
    wfmt: int
    group: int

    @property
    def scale_ptr(self) -> torch.Tensor:
        return self.values if self.scale is None else self.scale

    @property
    def constexprs(self) -> dict:
        return dict(WFMT=self.wfmt, GROUP=self.group)


def _format(weight: torch.Tensor | QuantizedWeight) -> tuple[int, int] | str:
    """An expert weight's (WFMT, GROUP) for the kernels, or why they cannot read it."""
    if not isinstance(weight, QuantizedWeight):
        return DENSE.value, 1
    scheme, values, scale = weight.scheme, weight.values, weight.scale
    (n, k), group = weight.shape[-2:], scheme.group_size
    if scheme.bits == 8 and scheme.strategy == "channel" and values.dtype == _VALUES.get(scheme.kind):
        fmt = PER_ROW.value, 1
    elif (scheme.packed and scheme.strategy == "group" and values.dtype == torch.int32
          and weight.cpu_scales_and_zeros is None and not weight.chunk):
        if group < 8 or group & (group - 1) or k % group:
            return f"int4 groups of {group} inputs (a power of 2 of at least 8 that divides K = {k})"
        fmt = INT4_WORDS.value, group
    else:
        return (f"{scheme.name} with {values.dtype} values (the kernels read 8-bit weights with per-channel scales, "
                "fp8 e4m3 or int8, and int4 in groups in the checkpoints' int32 words)")
    scale_shape = (*values.shape[:-1], scheme.scale_shape(n, k)[1])
    if values.dim() != 3 or scale.dtype not in _FLOATS or scale.shape != scale_shape:
        return f"scale {scale.dtype} {tuple(scale.shape)} for values {tuple(values.shape)}"
    return fmt


def experts_supported(weight: torch.Tensor | QuantizedWeight) -> str | None:
    """Why the MoE kernels cannot read this expert weight [E, N, K], or None where they can: a tensor (of x's
    dtype), 8-bit values (fp8 e4m3 or int8) with a scale per row, or int4 packed 8 to an int32 word (the checkpoints'
    layout) with a scale per group of a power of 2 of inputs (8 or more) that divides K; scales of any float
    dtype."""
    fmt = _format(weight)
    return fmt if isinstance(fmt, str) else None


def _weight(name: str, weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> _Weight:
    fmt = _format(weight)
    if isinstance(fmt, str):
        raise ValueError(f"{name}: the MoE kernels do not read this weight: {fmt}; dequantize it first")
    if not isinstance(weight, QuantizedWeight):
        if weight.dtype != dtype:
            raise ValueError(f"dtype mismatch: x {dtype}, {name} {weight.dtype}")
        return _Weight(weight.contiguous(), None, weight.shape, *fmt)
    return _Weight(weight.values.contiguous(), weight.scale.contiguous(), weight.shape, *fmt)


def _tiles(weight: _Weight, device: torch.device) -> dict:
    """The moe tiles (tuning.py) of the kernel that reads `weight`: its format's own (INT4_, BYTE_) where the table
    has them."""
    return for_format(config("moe", device), format_prefix(weight.wfmt))


def _checked(x, experts, gate_up_proj, down_proj, activation):
    """x contiguous, and both weights as _Weight (`experts_supported`'s formats; the scales of any float dtype: the
    kernels read them as fp32)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be one of {_FLOATS}, not {x.dtype}")
    gate_up, down = _weight("gate_up_proj", gate_up_proj, x.dtype), _weight("down_proj", down_proj, x.dtype)
    num_experts, h_size, w_size = down.shape
    assert x.shape == (experts.shape[0], h_size) and gate_up.shape == (num_experts, 2 * w_size, h_size)
    return x.contiguous(), gate_up, down


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                gate_up_proj: torch.Tensor | QuantizedWeight, down_proj: torch.Tensor | QuantizedWeight,
                activation: str = "gelu_pytorch_tanh") -> torch.Tensor:
    """x [T, H]; weights (fp32), experts (integer ids) [T, k]; gate_up_proj [E, 2W, H]; down_proj [E, H, W] -> [T, H].
    Each weight a tensor of x's dtype or a QuantizedWeight, 8-bit per channel or int4 in groups (module docstring,
    `experts_supported`). Expert ids are not range-checked (that would need a host sync)."""
    x, gate_up, down = _checked(x, experts, gate_up_proj, down_proj, activation)
    (tokens, k), (h_size, w_size) = experts.shape, down.shape[1:]
    weights, experts = weights.float().contiguous(), experts.contiguous()
    hidden = torch.empty(tokens * k, w_size, dtype=x.dtype, device=x.device)  # h for every (token, choice) pair
    out = torch.empty_like(x)
    if tokens == 0:
        return out
    # Blocks shrink to the (power-of-2 rounded) matrix sides for small models: fewer masked lanes.
    # Triton's CPU interpreter runs programs one by one in Python: there, 64-row tiles (the rows of a tile do not
    # change any row's arithmetic).
    gu_tiles, down_tiles = _tiles(gate_up, x.device), _tiles(down, x.device)
    # See _down_kernel; int4 down weights take its loop over choices (gemv.py's int4 GEMV per choice).
    one_load = tokens == 1 and w_size <= down_tiles["DOWN_BLOCK_W"] and down.wfmt != INT4_WORDS.value
    gu_rows = gu_tiles["GU_BLOCK_W"] if x.is_cuda else 64
    dn_rows = down_tiles["DOWN_ONE_TOKEN_BLOCK_H" if one_load else "DOWN_BLOCK_H"] if x.is_cuda else 64
    w_side, h_side = triton.next_power_of_2(w_size), triton.next_power_of_2(h_size)
    gu_w, gu_h = min(gu_rows, w_side), min(gu_tiles["GU_BLOCK_H"], h_side)
    dn_h, dn_w = min(dn_rows, h_side), min(down_tiles["DOWN_BLOCK_W"], w_side)
    _gate_up_kernel[(tokens * k, triton.cdiv(w_size, gu_w))](
        x, experts, gate_up.values, gate_up.scale_ptr, hidden, h_size, w_size, k, ACT=_ACTIVATIONS[activation],
        **gate_up.constexprs, BLOCK_W=gu_w, BLOCK_H=gu_h, num_warps=gu_tiles["GU_WARPS"], **launch_options(x))
    _down_kernel[(tokens, triton.cdiv(h_size, dn_h))](
        hidden, weights, experts, down.values, down.scale_ptr, out, h_size, w_size, k, triton.next_power_of_2(k),
        **down.constexprs, BLOCK_H=dn_h, BLOCK_W=dn_w, ONE_LOAD=one_load, num_warps=down_tiles["DOWN_WARPS"],
        **launch_options(x))
    return out


# Batches between the decode kernels' and the grouped GEMMs' (serving decode steps: 8 to 512 tokens). At 64 tokens x 8
# choices nearly every expert is chosen (98% of 128) by ~4 pairs on average: the step reads every expert's weights
# once, and what matters is reading them at bandwidth. One program per (expert, tile of output rows) reads its tile
# once and multiplies it by all the expert's pairs at a time (tensor-core dots of BLOCK_M rows, padded: the rows cost
# nothing beside the weight reads). The pairs come sorted by expert from `sort_pairs`, one small kernel, where
# argsort + index_add + cumsum were ~6 launches. Every size is known without a host sync: CUDA-graph capturable.
# Weights as in the decode kernels, but int4 tiles are dequantized in registers before the dots, q * s rounded to the
# activations' dtype as the twin rounds them (`_int4_tile`): the grouped path's product up to fp32 summation order.
# Tiles: tuning.py, moe: SORTED_* (a format's own: INT4_SORTED_*, BYTE_SORTED_*).


@triton.jit
def _sort_pairs_kernel(chosen_ptr, order_ptr, slots_ptr, counts_ptr, starts_ptr, P, NUM_EXPERTS: tl.constexpr,
                       BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """Program e: the pairs that chose expert e, in pair order (a stable sort by expert), placed after every pair
    of a lower expert."""
    after_previous_kernel(PDL)
    e = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    chosen = tl.load(chosen_ptr + p, mask=p < P, other=NUM_EXPERTS).to(tl.int32)  # padding sorts after everything
    mine = chosen == e
    start = tl.sum((chosen < e).to(tl.int32), axis=0)
    slot = start + tl.cumsum(mine.to(tl.int32), axis=0) - 1
    tl.store(order_ptr + slot, p, mask=mine)  # order[slot] = pair
    tl.store(slots_ptr + p, slot, mask=mine)  # slots[pair] = slot
    tl.store(counts_ptr + e, tl.sum(mine.to(tl.int32), axis=0))
    tl.store(starts_ptr + e, start)


def sort_pairs(experts: torch.Tensor, num_experts: int):
    """experts [T, k] -> (order, slots, counts, starts): the token-major pairs p = t*k + c sorted by expert
    (order[i] = p, slots[p] = i; stable, as argsort(stable=True)), how many pairs chose each expert, where its run of
    sorted pairs starts. int32."""
    chosen = experts.reshape(-1).contiguous()
    pairs = chosen.numel()
    order = torch.empty(pairs, dtype=torch.int32, device=chosen.device)
    slots = torch.empty_like(order)
    counts = torch.empty(num_experts, dtype=torch.int32, device=chosen.device)
    starts = torch.empty_like(counts)
    if pairs:
        _sort_pairs_kernel[(num_experts,)](chosen, order, slots, counts, starts, pairs, num_experts,
                                           BLOCK_P=triton.next_power_of_2(pairs), num_warps=4, **launch_options(chosen))
    return order, slots, counts, starts


@triton.jit
def _expert_tile(counts_ptr, starts_ptr, BLOCK_N: tl.constexpr):
    """Program (e, n): expert e, how many sorted pairs chose it and where they start, output rows [n*BLOCK_N, ...)."""
    e = tl.program_id(0)
    return e, tl.load(counts_ptr + e), tl.load(starts_ptr + e), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _int4_tile(words, scales, rows, k0, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP: tl.constexpr, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows `rows` [BLOCK_N] of an int4 matrix [N, K] (words [N, K / 8], scales [N, K / GROUP], contiguous), inputs
    k0 .. k0 + BLOCK_K, as quantized_matmul's tiles: q * scale in fp32 rounded once to `dtype`, the twin's
    dequantized weight, for tl.dot (the scale varies along K: it cannot wait for the dot's fp32 sums, as a row's
    8-bit scale does). Masked rows and inputs are 0."""
    TILE_GROUPS: tl.constexpr = max(BLOCK_K // GROUP, 1)  # the groups in a tile's row
    return _dequantized_tile(words, scales, rows, k0, N, K // 8, K // GROUP, 1, K, BLOCK_N, BLOCK_K, INT4_WORDS, GROUP,
                             1, TILE_GROUPS, dtype, INTERPRET)


@triton.jit
def _sorted_gate_up_kernel(x_ptr, order_ptr, counts_ptr, starts_ptr, gu_ptr, gu_scale_ptr, h_ptr, H: tl.constexpr,
                           W: tl.constexpr, K: tl.constexpr, ACT: tl.constexpr, WFMT: tl.constexpr,
                           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           INTERPRET: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    e, count, start, cols = _expert_tile(counts_ptr, starts_ptr, BLOCK_N)  # cols: rows i of gate (and W + i of up)
    if count == 0:
        return
    col_ok = cols < W
    if WFMT == INT4_WORDS:  # words [E, 2W, H / 8], scales [E, 2W, H / GROUP]: expert e's gate rows, then its up rows
        gate_words = gu_ptr + e.to(tl.int64) * (2 * W * (H // 8))
        gate_scales = gu_scale_ptr + e.to(tl.int64) * (2 * W * (H // GROUP))
    else:
        gate_rows = gu_ptr + e.to(tl.int64) * (2 * W) * H + cols.to(tl.int64)[:, None] * H
        up_rows = gate_rows + W * H
    if WFMT == PER_ROW:  # gu_ptr: 8-bit values; the scales of the tile's rows, one per output column of the dots
        gate_scale_row = gu_scale_ptr + e.to(tl.int64) * (2 * W) + cols
        gate_scale = tl.load(gate_scale_row, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        up_scale = tl.load(gate_scale_row + W, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dtype = h_ptr.dtype.element_ty
    m0 = 0
    while m0 < count:  # more pairs than BLOCK_M: the tile again, mostly from L2
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < count
        token = tl.load(order_ptr + start + rows, mask=row_ok, other=0) // K
        x_rows = x_ptr + token.to(tl.int64)[:, None] * H
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            xs = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [M, K]
            if WFMT == INT4_WORDS:
                wg = _int4_tile(gate_words, gate_scales, cols, k0, W, H, BLOCK_N, BLOCK_K, GROUP, dtype, INTERPRET)
                wu = _int4_tile(gate_words + W * (H // 8), gate_scales + W * (H // GROUP), cols, k0, W, H, BLOCK_N,
                                BLOCK_K, GROUP, dtype, INTERPRET)
            else:
                w_mask = col_ok[:, None] & k_ok[None, :]
                wg = tl.load(gate_rows + ks[None, :], mask=w_mask, other=0.0)  # [N, K]
                wu = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
            if WFMT == PER_ROW:
                wg = dot_operand(wg, xs, INTERPRET)
                wu = dot_operand(wu, xs, INTERPRET)
            gate += _dot(xs, tl.trans(wg), INTERPRET)
            up += _dot(xs, tl.trans(wu), INTERPRET)
        if WFMT == PER_ROW:  # the scales on the fp32 dot products, before the roundings
            gate = gate * gate_scale
            up = up * up_scale
        # Round where the grouped path rounds: the GEMM outputs, the activation's output, the product.
        h = round_to(round_to(activation_fp32(round_to(gate, dtype), ACT), dtype) * round_to(up, dtype), dtype)
        h_rows = h_ptr + (start + rows).to(tl.int64)[:, None] * W
        tl.store(h_rows + cols[None, :], h.to(dtype), mask=row_ok[:, None] & col_ok[None, :])
        m0 += BLOCK_M


@triton.jit
def _sorted_down_kernel(h_ptr, counts_ptr, starts_ptr, down_ptr, down_scale_ptr, y_ptr, H: tl.constexpr,
                        W: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    e, count, start, cols = _expert_tile(counts_ptr, starts_ptr, BLOCK_N)  # cols: output channels
    if count == 0:
        return
    col_ok = cols < H
    if WFMT == INT4_WORDS:  # words [E, H, W / 8], scales [E, H, W / GROUP]
        down_words = down_ptr + e.to(tl.int64) * (H * (W // 8))
        down_scales = down_scale_ptr + e.to(tl.int64) * (H * (W // GROUP))
    else:
        down_rows = down_ptr + e.to(tl.int64) * H * W + cols.to(tl.int64)[:, None] * W
    if WFMT == PER_ROW:  # down_ptr: 8-bit values; the scales of the tile's rows (output channels)
        scale = tl.load(down_scale_ptr + e.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dtype = y_ptr.dtype.element_ty
    m0 = 0
    while m0 < count:
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < count
        h_rows = h_ptr + (start + rows).to(tl.int64)[:, None] * W
        y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, W, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < W
            hs = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [M, K]
            if WFMT == INT4_WORDS:
                wd = _int4_tile(down_words, down_scales, cols, k0, H, W, BLOCK_N, BLOCK_K, GROUP, dtype, INTERPRET)
            else:
                wd = tl.load(down_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [N, K]
            if WFMT == PER_ROW:
                wd = dot_operand(wd, hs, INTERPRET)
            y += _dot(hs, tl.trans(wd), INTERPRET)
        if WFMT == PER_ROW:
            y = y * scale
        y_rows = y_ptr + (start + rows).to(tl.int64)[:, None] * H
        tl.store(y_rows + cols[None, :], round_to(y, dtype).to(dtype), mask=row_ok[:, None] & col_ok[None, :])
        m0 += BLOCK_M


def sorted_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                   gate_up_proj: torch.Tensor | QuantizedWeight, down_proj: torch.Tensor | QuantizedWeight,
                   activation: str = "gelu_pytorch_tanh", combine: bool = True) -> torch.Tensor | ExpertPairs:
    """As `moe_experts` (same arguments, same result up to fp32 summation order), for batches of tens to hundreds of
    tokens: each chosen expert's weights are read once for all the pairs that chose it. `combine` False: the
    ExpertPairs, not summed."""
    x, gate_up, down = _checked(x, experts, gate_up_proj, down_proj, activation)
    (tokens, k), (num_experts, h_size, w_size) = experts.shape, down.shape
    if tokens == 0:
        return torch.empty_like(x) if combine else ExpertPairs(x[:0], experts.reshape(-1), weights.float())
    order, slots, counts, starts = sort_pairs(experts, num_experts)
    hidden = torch.empty(tokens * k, w_size, dtype=x.dtype, device=x.device)  # h of every pair, in sorted order
    y = torch.empty(tokens * k, h_size, dtype=x.dtype, device=x.device)
    gu_tiles, down_tiles = _tiles(gate_up, x.device), _tiles(down, x.device)
    # Pairs per tl.dot: 16 at least (the tensor cores' tile), twice the mean pairs per expert up to 64, so that most
    # experts take one pass over their tiles.
    twice_mean = -(-2 * tokens * k // num_experts)  # rounded up
    block_m = gu_tiles["SORTED_BLOCK_M"] or max(16, min(64, triton.next_power_of_2(twice_mean)))
    # Tiles shrink to the (power-of-2 rounded, >= 16 for tl.dot) matrix sides of small models.
    w_side, h_side = max(16, triton.next_power_of_2(w_size)), max(16, triton.next_power_of_2(h_size))
    gu_n, gu_k = min(gu_tiles["SORTED_GU_BLOCK_N"], w_side), min(gu_tiles["SORTED_GU_BLOCK_K"], h_side)
    dn_n, dn_k = min(down_tiles["SORTED_DOWN_BLOCK_N"], h_side), min(down_tiles["SORTED_DOWN_BLOCK_K"], w_side)
    options = dict(BLOCK_M=block_m, INTERPRET=not x.is_cuda, **launch_options(x))
    _sorted_gate_up_kernel[(num_experts, triton.cdiv(w_size, gu_n))](
        x, order, counts, starts, gate_up.values, gate_up.scale_ptr, hidden, h_size, w_size, k,
        ACT=_ACTIVATIONS[activation], **gate_up.constexprs, BLOCK_N=gu_n, BLOCK_K=gu_k,
        num_warps=gu_tiles["SORTED_GU_WARPS"], **options)
    _sorted_down_kernel[(num_experts, triton.cdiv(h_size, dn_n))](
        hidden, counts, starts, down.values, down.scale_ptr, y, h_size, w_size, **down.constexprs, BLOCK_N=dn_n,
        BLOCK_K=dn_k, num_warps=down_tiles["SORTED_DOWN_WARPS"], **options)
    pairs = ExpertPairs(y, slots, weights.float().contiguous())
    return pairs.combine() if combine else pairs


# Prefill and large batches (Experts.forward_grouped): the grouped GEMMs leave one output row per (token, choice)
# pair, sorted by expert. One kernel weights, rounds and sums each token's k rows, where eager PyTorch needs a
# broadcast multiply (bf16 x fp32 -> fp32), a cast, an index_copy back to token order and a sum: 26B-A4B at 4K
# tokens moves ~1.3 GB through those per layer, the kernel ~0.4 GB.


@triton.jit
def weighted_pair_sum(y_ptr, slots_ptr, weights_ptr, t, cols, col_ok, H, K: tl.constexpr, dtype: tl.constexpr):
    """Token t's output over columns `cols`, fp32: sum_c round(y[slot(t, c)] * weights[t, c]) (then rounded by the
    caller). As the eager ops: each weighted row is a tensor of the model dtype, the sum over choices is fp32."""
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for c in tl.static_range(K):
        slot = tl.load(slots_ptr + t * K + c).to(tl.int64)  # where pair (t, c) sits among the sorted rows
        y = tl.load(y_ptr + slot * H + cols, mask=col_ok, other=0.0).to(tl.float32)
        total += round_to(y * tl.load(weights_ptr + t * K + c), dtype)
    return total


@triton.jit
def _combine_pairs_kernel(y_ptr, slots_ptr, weights_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr,
                          PDL: tl.constexpr):
    after_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    dtype = out_ptr.dtype.element_ty
    total = weighted_pair_sum(y_ptr, slots_ptr, weights_ptr, t, cols, col_ok, H, K, dtype)
    tl.store(out_ptr + t * H + cols, round_to(total, dtype).to(dtype), mask=col_ok)


class ExpertPairs(NamedTuple):
    """The experts' outputs before each token's weighted sum: y [T*k, H], one row per (token, choice) pair in expert
    order; pair t*k + c is row slots[t*k + c]; weights [T, k] fp32. `combine()` sums them into [T, H]; the MoE tail
    (moe_residual_norm, below) takes them as they are and sums them itself, which saves a launch and a round trip
    of [T, H] through memory."""

    y: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor

    def combine(self) -> torch.Tensor:
        """out[t] = sum_c round(y[slots[t*k + c]] * weights[t, c])."""
        (tokens, k), h_size = self.weights.shape, self.y.shape[1]
        out = torch.empty(tokens, h_size, dtype=self.y.dtype, device=self.y.device)
        block = min(config("moe", out.device)["COMBINE_BLOCK_H"] if out.is_cuda else 4096,
                    triton.next_power_of_2(h_size))
        if tokens > 0:
            _combine_pairs_kernel[(tokens, triton.cdiv(h_size, block))](
                self.y, self.slots, self.weights, out, h_size, k, BLOCK_H=block, num_warps=4, **launch_options(out))
        return out


def combine_pairs(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                  combine: bool = True) -> torch.Tensor | ExpertPairs:
    """out[t] = sum_c round(y[slot(t, c)] * weights[t, c]), with y [T*k, H] the pairs' outputs in `order` (y[i] belongs
    to pair order[i] = t*k + c, as from a sort of the token-major pairs); weights [T, k] fp32 -> [T, H] in y's dtype
    (`combine` False: the ExpertPairs, not summed)."""
    assert y.shape[0] == order.numel() == weights.numel(), (y.shape, order.shape, weights.shape)
    slots = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    pairs = ExpertPairs(y.contiguous(), slots, weights.float().contiguous())
    return pairs.combine() if combine else pairs


@triton.jit
def _moe_residual_norm_kernel(res_ptr, dense_ptr, sparse_ptr, slots_ptr, pair_w_ptr, dense_w_ptr, sparse_w_ptr, w_ptr,
                              scalar_ptr, out_ptr, next_w_ptr, next_out_ptr, res_stride, dense_stride, sparse_stride,
                              D, eps, next_eps, PAIRS: tl.constexpr, HAS_SCALAR: tl.constexpr,
                              HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    dtype = out_ptr.dtype.element_ty
    # DecoderLayer's MoE tail, rounded where its eager ops materialize tensors of the model dtype: the two branch
    # norms and their sum, then as add_normed: the norm of the sum, the residual add, the layer scalar.
    # Before the wait (see moe_residual_norm): the residual, the norm weights and the layer scalar.
    residual = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
    dense_w, sparse_w = _norm_weight(dense_w_ptr, offs, mask, True), _norm_weight(sparse_w_ptr, offs, mask, True)
    w, scalar, next_w = _norm_weights(w_ptr, scalar_ptr, next_w_ptr, offs, mask, True, HAS_SCALAR, HAS_NEXT)
    after_previous_kernel(PDL)
    dense = tl.load(dense_ptr + row * dense_stride + offs, mask=mask, other=0.0).to(tl.float32)
    dense_normed = round_to(_unit_rms(dense, D, eps) * dense_w, dtype)
    if PAIRS:  # sparse_ptr: the experts' row of each (token, choice) pair; their weighted sum, as combine() gives it
        sparse = weighted_pair_sum(sparse_ptr, slots_ptr, pair_w_ptr, row, offs, mask, D, PAIRS, dtype)
        sparse = round_to(sparse, dtype)
    else:
        sparse = tl.load(sparse_ptr + row * sparse_stride + offs, mask=mask, other=0.0).to(tl.float32)
    combined = round_to(dense_normed + round_to(_unit_rms(sparse, D, eps) * sparse_w, dtype), dtype)
    normed = round_to(_unit_rms(combined, D, eps) * w, dtype)
    new = round_to(residual + normed, dtype)
    if HAS_SCALAR:
        new = round_to(new * scalar, dtype)
    _store(out_ptr + row * D + offs, new, mask)
    if HAS_NEXT:  # the next layer's input norm
        _store(next_out_ptr + row * D + offs, _unit_rms(new, D, next_eps) * next_w, mask)


def moe_residual_norm(residual: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor | ExpertPairs,
                      dense_weight: torch.Tensor, sparse_weight: torch.Tensor, weight: torch.Tensor, eps: float,
                      scalar: torch.Tensor | None, next_weight: torch.Tensor | None = None,
                      next_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(residual + rms_norm(rms_norm(dense, dense_weight) + rms_norm(sparse, sparse_weight), weight)) * scalar, in
    one launch: DecoderLayer's post_feedforward_layernorm_1/_2, their sum, and add_normed with layer_scalar (a 1-element
    tensor in the model dtype, read on the device; None: no scaling). residual, dense, sparse [..., D] of one shape, or
    sparse the experts' ExpertPairs, summed here as their `combine()` would. Returns (new, rms_norm(new, next_weight,
    next_eps) or None) as residual_rms_norm, rounded at the same points as the eager ops.

    With PDL the kernel reads `residual` before it waits for the previous kernel: `dense` may come from a kernel on
    another stream (DecoderLayer.moe_feedforward runs the dense MLP beside the router and the experts)."""
    res_rows, dense_rows, D = _rows(residual), _rows(dense), residual.shape[-1]
    pairs = sparse if isinstance(sparse, ExpertPairs) else None
    sparse_rows = pairs.y if pairs is not None else _rows(sparse)
    assert dense.shape == residual.shape and (pairs is not None or sparse.shape == residual.shape), \
        (residual.shape, dense.shape, sparse_rows.shape)
    assert pairs is None or (pairs.weights.shape[0] == res_rows.shape[0] and sparse_rows.stride(-1) == 1
                             and sparse_rows.shape[-1] == D)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    next_out = torch.empty_like(out) if next_weight is not None else None
    block = triton.next_power_of_2(D)
    slots, pair_weights = (pairs.slots, pairs.weights) if pairs is not None else (res_rows, res_rows)
    if out.numel() > 0:
        _moe_residual_norm_kernel[(res_rows.shape[0],)](
            res_rows, dense_rows, sparse_rows, slots, pair_weights, dense_weight, sparse_weight, weight,
            scalar if scalar is not None else res_rows, out, next_weight if next_weight is not None else res_rows,
            next_out if next_out is not None else out, res_rows.stride(0), dense_rows.stride(0), sparse_rows.stride(0),
            D, eps, eps if next_eps is None else next_eps, PAIRS=pairs.weights.shape[1] if pairs is not None else 0,
            HAS_SCALAR=scalar is not None, HAS_NEXT=next_weight is not None, BLOCK=block, num_warps=_warps(block),
            **launch_options(res_rows))
    return out, next_out
