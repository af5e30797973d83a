"""Conversions inside kernels: rounding to the model dtype, where the eager PyTorch code materializes a tensor; fp8
stores rounded by hand; and 8-bit values as exact tl.dot operands."""

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


@triton.jit
def store_fp8(ptrs, x, scale, mask):
    """fp8 e4m3 store (the KV cache, W8A8's activation rows): x / scale (correctly rounded division, as torch's)
    saturated to +-448, rounded to nearest even (what torch's cast gives) by hand: Triton's CPU interpreter rounds
    casts to fp8 wrongly, and the stored bytes must be the same there and on the GPU. The rounded value is exact in
    e4m3: the cast cannot round."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    v_bits = v.to(tl.uint32, bitcast=True)
    magnitude = (v_bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits, ties to even. Below it the subnormals' step is 2^-9:
    # adding 2^14 (whose fp32 ulp is 2^-9) rounds to a multiple of it, ties to even, and subtracting is exact.
    bits = magnitude.to(tl.uint32, bitcast=True)
    normal = (bits + (0x7FFFF + ((bits >> 20) & 1))) & 0xFFF00000
    subnormal = ((magnitude + 16384.0) - 16384.0).to(tl.uint32, bitcast=True)
    rounded = tl.where(magnitude >= 0.015625, normal, subnormal) | (v_bits & 0x80000000)  # the sign back, -0 too
    v = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))  # NaN stays NaN
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


# fp8 e4m3 -> bf16, four values (a 32-bit register of bytes) at a time on the integer and bf16x2 ALUs: Triton's cast
# converts each value twice on sm_90 (F2FP to an fp16 pair, then F2F to bf16, a quarter-rate conversion a value).
# Each byte s eeee mmm lands in a 16-bit lane as s (bit 15) and eeee mmm (bits 10..4): the bf16 of 2^-120 times the
# value, normal or subnormal (exponent bias 127 against 7), then one exact fma by 2^120 (plus -0, which keeps a zero's
# sign). The one NaN code (0x7F, 0xFF) reads 480: neither weights nor the KV cache's stores (saturated) are NaN.
# Output lanes in byte order.
def _fp8_to_bf16_asm(spread: list[str], lanes: list[tuple[str, str]]) -> str:
    """The PTX: `spread` moves the input's bytes into the high bytes of 16-bit lanes (registers lo, hi); each (output,
    register) of `lanes` then turns that register's two lanes into a bf16 pair."""
    return "\n".join([
        "{", ".reg .b32 w, lo, hi, t, s, c, z;", "mov.b32 c, 0x7B807B80;", "mov.b32 z, 0x80008000;", *spread,
        *(line for out, register in lanes for line in (
            f"shr.b32 t, {register}, 4;", f"and.b32 s, {register}, 0x80008000;", "lop3.b32 t, t, 0x07F007F0, s, 0xEA;",
            f"fma.rn.bf16x2 {out}, t, c, z;")),
        "}"])


# bytes 0, 1 and 2, 3 of a 32-bit register
FP8_TO_BF16 = tl.constexpr(_fp8_to_bf16_asm(["prmt.b32 lo, $2, 0, 0x1404;", "prmt.b32 hi, $2, 0, 0x3424;"],
                                            [("$0", "lo"), ("$1", "hi")]))
# The same, two values (a 16-bit register) at a time: for a tile in a layout that holds pairs of consecutive values,
# wgmma's A operand in registers (bf16: k_width 2), which four-value packs would make Triton shuffle between layouts.
FP8_PAIR_TO_BF16 = tl.constexpr(_fp8_to_bf16_asm(["cvt.u32.u16 w, $1;", "prmt.b32 lo, w, 0, 0x1404;"],
                                                 [("$0", "lo")]))


@triton.jit
def dot_operand(w, like, INTERPRET: tl.constexpr, KEEP_LAYOUT: tl.constexpr = False, PAIRS: tl.constexpr = False):
    """An 8-bit tile (weights, an fp8 KV cache) in the other operand's dtype for tl.dot: fp8 e4m3 and int8 values are
    exact in bf16 (and fp16); fp8 to bf16 through FP8_TO_BF16. In the interpreter fp32 (its integer -> bf16 cast
    reinterprets bits; its _dot multiplies in fp32 anyway). KEEP_LAYOUT: convert in the layout the tile was loaded in
    (the conversion marked impure, so that Triton cannot move it into the dot operand's layout, where an operand whose
    reduction runs across its rows, attention's V, is read from shared memory byte by byte). PAIRS: fp8 two values
    at a time (FP8_PAIR_TO_BF16), for wgmma's A operand in registers."""
    if INTERPRET:
        return w.to(tl.float32)
    elif w.dtype == tl.float8e4nv and like.dtype == tl.bfloat16 and PAIRS:
        return tl.inline_asm_elementwise(FP8_PAIR_TO_BF16, "=r,h", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    elif w.dtype == tl.float8e4nv and like.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(FP8_TO_BF16, "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16,
                                         is_pure=not KEEP_LAYOUT, pack=4)
    else:
        return w.to(like.dtype)
