"""Fused gated activation: the MLPs' `act(gate) * up` (act from gemma4.model.common.activation) in one pass.

Rounded as the eager ops: act(gate) is computed in fp32 and rounded to the model dtype (torch materializes it), then
the product with `up` is computed in fp32 and rounded again. The activations follow the formulas of torch's CUDA
kernels operation by operation, so the only fp32 differences left are those of the transcendental functions:
  gelu_pytorch_tanh  (0.5 x) (1 + tanh(kBeta fma(kKappa, x^3, x)))
  gelu               (0.5 x) (1 + erf(x / sqrt(2)))
  silu, swish        x / (1 + exp(-x))
  relu               max(x, 0)
tanh and exp are built here from plain fp32 operations (`_tanh`, `_exp`, within one ulp of the correctly rounded
values), because libdevice's tanhf/expf, which torch's CUDA kernels call, are not available under Triton's
interpreter, and tl.exp is ex2.approx(x log2 e) on the GPU, whose error grows with |x|. erf is tl.erf: libdevice's
erff on the GPU, the function torch's CUDA kernel calls. So bf16 results equal the eager ones except where torch's
tanh/erf/exp and these differ in the last fp32 bit and that bit decides a bf16 rounding: rare, and one bf16 ulp of
act(gate), except in GELU's negative tail, where (1 + t) cancels and act is a small multiple of 0.5 |x| 2^-24 in the
eager fp32 arithmetic too.

The grid covers rows x column blocks, with blocks small enough that one decode row is split over many programs. No
host syncs and no CPU tensors: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm import _rows  # [rows, W] with one row stride: a view where the leading dims collapse, else a copy
from .pdl import after_previous_kernel, launch_options
from .rounding import round_to

GELU_TANH, GELU_ERF, SILU, RELU = (tl.constexpr(code) for code in range(4))

ACTIVATION_CODES = {"gelu_pytorch_tanh": GELU_TANH.value, "gelu": GELU_ERF.value, "silu": SILU.value,
                    "swish": SILU.value, "relu": RELU.value}

# torch's constants, computed in double and rounded to fp32 as its `constexpr opmath_t` ones are.
_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2) * (2 / sqrt(pi)) * 0.5 = sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)
_SQRT1_2 = tl.constexpr(0.7071067811865476)

_LOG2E = tl.constexpr(1.4426950408889634)
# ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with 9 significant bits: n * _LN2_HI is exact for the |n| <= 150 used here.
_LN2_HI = tl.constexpr(0.693359375)
_LN2_LO = tl.constexpr(-2.1219444005469057e-4)


@triton.jit
def _exp(v):
    """exp(v) in fp32, within one ulp of the correctly rounded value (~10% of arguments are one ulp off).

    v = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite: v - n _LN2_HI is exact), exp(r) = 1 + (r + r^2 Q(r)) with Q a
    near-minimax fit of (e^r - 1 - r) / r^2, and 2^n applied as two exact power-of-two factors, so that results down
    in the subnormals round once and results past fp32's range become inf."""
    vc = tl.where(v != v, 0.0, tl.where(v > 89.0, 89.0, tl.where(v < -104.0, -104.0, v)))  # no NaN into the int
    n = tl.floor(vc * _LOG2E + 0.5)
    r = vc - n * _LN2_HI
    r = r - n * _LN2_LO
    q = 1.9899376e-4
    q = q * r + 1.3933644e-3
    q = q * r + 8.333298e-3
    q = q * r + 4.1666467e-2
    q = q * r + 0.16666667
    q = q * r + 0.5
    p = 1.0 + (r + (r * r) * q)
    ni = n.to(tl.int32)
    half = ni >> 1
    scale_a = ((half + 127) << 23).to(tl.float32, bitcast=True)
    scale_b = ((ni - half + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, (p * scale_a) * scale_b)


@triton.jit
def _tanh(y):
    """tanh(y) in fp32, within one ulp of the correctly rounded value (a few % of arguments are one ulp off)."""
    a = tl.abs(y)
    # |y| < 0.55: y + y^3 P(y^2), P a near-minimax fit of (tanh(y) - y) / y^3 on [0, 0.55^2].
    s = y * y
    p = 2.5285282e-3
    p = p * s - 8.527954e-3
    p = p * s + 2.181888e-2
    p = p * s - 5.396475e-2
    p = p * s + 0.13333325
    p = p * s - 0.33333334
    small = y + (y * s) * p
    # |y| >= 0.55: 1 - 2 / (e^{2|y|} + 1), where the quotient is at most 0.5 and its rounding error halves in the
    # subtraction. From |y| = 9.01 on tanh rounds to 1: clamping at 10 keeps e^{2|y|} finite.
    e = _exp(2.0 * tl.where(a < 10.0, a, 10.0))
    big = 1.0 - tl.div_rn(2.0, e + 1.0)
    big = tl.where(y < 0.0, -big, big)
    return tl.where(a >= 0.55, big, small)  # NaN takes the `small` branch and stays NaN


@triton.jit
def activation_fp32(x, ACT: tl.constexpr):
    """act(x) on fp32 values (the MoE kernel's too), before the rounding to the model dtype."""
    if ACT == GELU_TANH:
        # torch's CUDA kernel contracts x + kKappa * x^3 into an fma (nvcc); the interpreter's fma rounds twice.
        inner = _BETA * tl.fma(_KAPPA, x * x * x, x)
        return (0.5 * x) * (1.0 + _tanh(inner))
    elif ACT == GELU_ERF:
        return (x * 0.5) * (1.0 + tl.erf(x * _SQRT1_2))
    elif ACT == SILU:
        return tl.div_rn(x, 1.0 + _exp(-x))  # IEEE division: Triton's `/` is the approximate div.full.f32
    else:
        return tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, as torch's relu


@triton.jit
def store_gated_rows(out_ptr, rows, N, gate, up, mult_ptr, ACT: tl.constexpr, GATED: tl.constexpr,
                     HAS_UP: tl.constexpr):
    """A GEMV's epilogue (gemv.py, int4_mma.py): stores the fp32 products of rows `rows` (gate) or, with GATED,
    act(gate) * up, rounded as the eager ops round: the product(s), act(gate), and act(gate) * up each a tensor of
    the model dtype. Without HAS_UP, up is the multiplier's row."""
    dtype = out_ptr.dtype.element_ty
    row_ok = rows < N
    if GATED:
        gate = round_to(gate, dtype)
        if HAS_UP:
            up = round_to(up, dtype)
        else:
            up = tl.load(mult_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        gate = round_to(round_to(activation_fp32(gate, ACT), dtype) * up, dtype)
    tl.store(out_ptr + rows, gate.to(dtype), mask=row_ok)


@triton.jit
def _gated_activation_kernel(gate_ptr, up_ptr, out_ptr, gate_stride, up_stride, W, ACT: tl.constexpr,
                             BLOCK: tl.constexpr, PDL: tl.constexpr):
    after_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < W
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * gate_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + offs, mask=mask, other=0.0).to(tl.float32)
    act = round_to(activation_fp32(gate, ACT), dtype)  # the eager act(gate) is a tensor of the model dtype
    tl.store(out_ptr + row * W + offs, round_to(act * up, dtype).to(dtype), mask=mask)  # exact in dtype


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """`activation(name)(gate) * up` (gemma4.model.common) in one kernel, rounded as the eager ops round: a new
    contiguous tensor shaped like gate. gate, up: same shape [..., W] and dtype; each is read in place where its rows
    can be addressed with one stride and unit stride along W, else made contiguous."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {sorted(ACTIVATION_CODES)}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up differ: {tuple(gate.shape)} {gate.dtype} {gate.device} vs "
                         f"{tuple(up.shape)} {up.dtype} {up.device}")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    W, gate_rows, up_rows = gate.shape[-1], _rows(gate), _rows(up)
    rows = gate_rows.shape[0]
    # Columns per program: up to 1024, halved (down to 64) until there are >= 512 programs, so that a decode step
    # (one row of 256..12288) is still spread over many SMs, while prefill keeps wide blocks.
    block = min(1024, max(64, triton.next_power_of_2(W)))
    while block > 64 and rows * triton.cdiv(W, block) < 512:
        block //= 2
    _gated_activation_kernel[(rows, triton.cdiv(W, block))](
        gate_rows, up_rows, out, gate_rows.stride(0), up_rows.stride(0), W, ACT=ACTIVATION_CODES[activation],
        BLOCK=block, num_warps=max(1, min(4, block // 256)), **launch_options(out))
    return out
