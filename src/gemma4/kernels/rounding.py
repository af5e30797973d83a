"""Rounding to the model dtype inside kernels, where the eager PyTorch code materializes a tensor."""

import triton
import triton.language as tl


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 -> nearest `dtype` value (ties to even), kept in fp32. bf16 by hand on the bits (the same bits as the GPU's
    cvt.rn.bf16.f32): Triton's CPU interpreter truncates on casts to bf16, and the kernels must give the same bits
    under the interpreter (tests) and on the GPU."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    else:
        return v.to(dtype).to(tl.float32)
